r"""Benchmark of one optimizer step: orthoopt's soft step against its matmul floor.

Every contender runs in one process, on one device, side by side: each round times one
step of every contender in turn, so that a change of machine load hits all of them alike,
and a contender's figure is the median over rounds after a warm-up.  At each shape
``(m, l, n)`` (``m`` matrices ``Φ_i`` of ``l × n``):

=============  ==========================================================================
``floor``      the two bare batched matmuls of the soft step, :math:`\Phi^\top\Phi` and
               :math:`\Phi S`, into preallocated buffers
``base``       torch's AdamW step alone (fused where the device supports it, else foreach)
``soft``       :class:`orthoopt.OrthoAdamW` with the penalty on; its overhead is
               ``soft - base``
``soft-auto``  the same with ``ortho='auto'`` (β from the update: one more matmul)
``autograd``   ``base`` plus the penalty's gradient by autograd of
               :func:`orthoopt.l1_orthogonality`, as one writes it by hand
``hard``       ``ortho_mode='hard'`` (``n/a`` where this tree has no hard mode)
``geoopt-E``   geoopt's RiemannianAdam on EuclideanStiefel (reference)
``geoopt-C``   geoopt's RiemannianAdam on CanonicalStiefel (reference)
=============  ==========================================================================

The ``many`` cases put ``m`` separate ``(l, n)`` parameters in one optimizer and add
``soft-stacked`` and ``base-stacked``: one ``(m, l, n)`` parameter of the same size.

The report's table is :data:`COLUMNS` after a column per contender: one entry per column.
Run ``python -m orthoopt bench --help``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import argtypes, penalty
from ..guard import OrthogonalityWarning
from ..optim import OrthoAdamW
from .common import CLOCKS, NotAvailable, human_bytes, machine, or_na, publish, render, sync
from .memory import available_bytes, step_memory
from .ops import step_ops

__all__ = [
    "main",
    "run",
    "run_case",
    "parser",
    "config",
    "format_table",
    "Case",
    "Column",
    "COLUMNS",
    "TARGETS",
    "CPU_SHAPES",
    "CUDA_SHAPES",
    "MANY",
    "QUICK_SHAPES",
    "QUICK_MANY",
]

CPU_SHAPES = [(16, 256, 64), (256, 64, 16), (1, 1024, 512)]
CUDA_SHAPES = [(1, 4096, 4096), (32, 4096, 128), (64, 512, 64), (1024, 64, 64)]
MANY = (48, 512, 64)  # 48 parameters of shape (512, 64) against one (48, 512, 64)
CPU_MANY = [(16, 256, 64), MANY]  # and 16 of (256, 64), the separate weights of the budget
QUICK_SHAPES = [(4, 32, 8), (16, 16, 4)]
QUICK_MANY = (6, 32, 8)

# The performance budget, from ratios measured side by side in one run.
TARGETS = {
    "overhead_over_floor": {"cpu": 1.3, "cuda": 1.15},  # (soft - base) / floor, at most
    "autograd_over_soft": 1.5,  # (base + autograd penalty) / soft, at least
    "many_over_stacked": 1.2,  # soft step, many parameters / one stacked, at most
    "auto_over_soft": 1.15,  # ortho='auto' step / soft step, at most
    "workspace_x_params": 0.25,  # workspaces the soft step holds / the parameters' bytes, at most
}

LR = 1e-3
WEIGHT_DECAY = 1e-2
BETA = 1.0
HARD = ("hard", "geoopt-E", "geoopt-C")
CONTENDERS = ("floor", "base", "soft", "soft-auto", "autograd", *HARD, "base-stacked", "soft-stacked")
OPTIONAL = ("soft-compiled",)
# Tensors of the case's size (m·l·n elements) each contender holds, at least: the parameters,
# their gradients and AdamW's two moments; the floor's input and product; a copy more for
# the 'auto' step's previous weights and for the autograd contender's task gradient.
HELD = {name: 4 for name in (*CONTENDERS, *OPTIONAL)} | {"floor": 2, "soft-auto": 5, "autograd": 5}


@dataclass(frozen=True)
class Case:
    """``m`` matrices of ``l × n``: one ``(m, l, n)`` parameter, or ``m`` of ``(l, n)``."""

    m: int
    l: int
    n: int
    many: bool = False

    @property
    def name(self) -> str:
        return f"{self.m}x({self.l},{self.n}) params" if self.many else f"({self.m},{self.l},{self.n})"


@dataclass
class Contender:
    """One timed step; ``prepare`` runs untimed before each step."""

    name: str
    step: Callable[[], object]
    params: list[torch.Tensor]
    prepare: Callable[[], None] | None = None
    optimizer: torch.optim.Optimizer | None = None
    few: bool = False  # a slow reference, timed on fewer rounds
    times: list[float] = field(default_factory=list)

    def run(self) -> None:
        """One untimed step, ``prepare`` first."""
        if self.prepare is not None:
            self.prepare()
        self.step()


def case_bytes(case: Case, dtype: torch.dtype, contenders: Sequence[str]) -> int:
    """A lower bound on the memory one case takes: the tensors of :data:`HELD` of every
    contender that runs it, all held at once (each case builds its contenders together)."""
    names = [n for n in contenders if case.many or not n.endswith("-stacked")]
    copies = sum(HELD[n] for n in names)
    return copies * case.m * case.l * case.n * dtype.itemsize


# -- parameters ------------------------------------------------------------------------
def _start(case: Case, device: torch.device, dtype: torch.dtype, noise: float, seed: int) -> torch.Tensor:
    """Orthonormal columns plus ``noise``: near the manifold, where training keeps them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(case.m, case.l, case.n, generator=g)
    q = torch.linalg.qr(a.to(device)).Q
    if noise:
        q = q + noise / math.sqrt(case.l) * torch.randn(case.m, case.l, case.n, generator=g).to(device)
    return q.to(dtype).contiguous()  # QR returns column-major matrices; parameters are row-major


def _params(case: Case, device, dtype, *, stacked: bool = False, noise: float = 0.01) -> list[torch.Tensor]:
    """Leaf parameters with a fixed gradient; ``m`` separate ones in the many case."""
    data = _start(case, device, dtype, noise, seed=0)
    grad = (1e-3 * torch.randn(data.shape, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    pieces = [data] if stacked or not case.many else list(data.unbind(0))
    grads = [grad] if stacked or not case.many else list(grad.unbind(0))
    params = []
    for x, gr in zip(pieces, grads):
        p = torch.nn.Parameter(x.clone())
        p.grad = gr.clone()
        params.append(p)
    return params


def _layout(params: list[torch.Tensor]) -> str:
    # A (l, n) parameter's n columns; a stack's matrices along axis 0.
    return "columns" if params[0].dim() == 2 else "group_axis:0"


def _adamw_flags(device: torch.device, dtype: torch.dtype) -> dict:
    """``fused=True`` where torch has the fused kernel for this device and dtype, else foreach."""
    probe = torch.nn.Parameter(torch.zeros(2, device=device, dtype=dtype))
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


# -- contenders ------------------------------------------------------------------------
def _floor(case, device, dtype, flags) -> Contender:
    x = _start(case, device, dtype, 0.01, seed=0)
    half_cuda = dtype in penalty._HALF and x.is_cuda
    # CUDA accumulates a half Gram in float32 (as orthoopt does); CPU has no such matmul.
    gram = torch.empty(case.m, case.n, case.n, device=device, dtype=torch.float32 if half_cuda else dtype)
    s = torch.randn(case.m, case.n, case.n, device=device).to(dtype)
    prod = torch.empty_like(x)

    def step():
        if half_cuda:
            torch.bmm(x.mT, x, out_dtype=torch.float32, out=gram)
        else:
            torch.bmm(x.mT, x, out=gram)
        torch.bmm(x, s, out=prod)

    return Contender("floor", step, [x])


def _base(case, device, dtype, flags, *, stacked=False, name="base") -> Contender:
    params = _params(case, device, dtype, stacked=stacked)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **flags)
    return Contender(name, opt.step, params, optimizer=opt)


def _soft(case, device, dtype, flags, *, stacked=False, name="soft", ortho=BETA) -> Contender:
    params = _params(case, device, dtype, stacked=stacked)
    opt = OrthoAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, ortho=ortho, ortho_layout=_layout(params), **flags)
    return Contender(name, opt.step, params, optimizer=opt)


def _autograd(case, device, dtype, flags) -> Contender:
    from ..penalty import l1_orthogonality

    params = _params(case, device, dtype)
    task_grads = [p.grad.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **flags)
    group_dim = None if params[0].dim() == 2 else 0

    def prepare():
        # The task's gradient, as backward of the task loss would leave it.
        for p, g in zip(params, task_grads):
            p.grad.copy_(g)

    def step():
        loss = sum(l1_orthogonality(p, BETA, group_dim=group_dim) for p in params)
        loss.backward()
        opt.step()

    return Contender("autograd", step, params, prepare=prepare, optimizer=opt)


def _compiled(case, device, dtype, flags) -> Contender:
    """The soft step under ``torch.compile``, as PyTorch documents it for its optimizers:
    a tensor lr (so that a scheduler does not recompile) and torch's default kernels."""
    params = _params(case, device, dtype)
    opt = OrthoAdamW(params, lr=torch.tensor(LR), weight_decay=WEIGHT_DECAY, ortho=BETA, ortho_layout=_layout(params))

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return Contender("soft-compiled", step, params, optimizer=opt)


def _hard(case, device, dtype, flags) -> Contender:
    _check_hard_mode(device, flags)
    params = _params(case, device, dtype, noise=0.0)
    try:
        opt = OrthoAdamW(
            params,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            ortho=BETA,
            ortho_mode="hard",
            ortho_layout=_layout(params),
            **flags,
        )
    except (TypeError, ValueError, NotImplementedError) as e:
        raise NotAvailable(f"ortho_mode='hard': {e}") from None
    return Contender("hard", opt.step, params, optimizer=opt, few=True)


def _check_hard_mode(device, flags) -> None:
    """Raise NotAvailable unless ``ortho_mode='hard'`` keeps a parameter on the manifold."""
    p = torch.nn.Parameter(_start(Case(2, 16, 4), device, torch.float32, 0.0, seed=2))
    p.grad = torch.randn_like(p)
    try:
        opt = OrthoAdamW([p], lr=0.1, ortho=1.0, ortho_mode="hard", ortho_layout="group_axis:0", **flags)
        for _ in range(3):
            opt.step()
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        raise NotAvailable(f"ortho_mode='hard': {type(e).__name__}: {e}") from None
    error = penalty.orthogonality_error(p.detach(), group_dim=0).max().item()
    if not error < 1e-4:
        raise NotAvailable(f"ortho_mode='hard' is not implemented in this tree (orthogonality error {error:.1e})")


def _geoopt(case, device, dtype, flags, *, canonical: bool) -> Contender:
    try:
        import geoopt
    except ImportError as e:
        raise NotAvailable(f"geoopt is not installed ({e})") from None
    manifold = geoopt.CanonicalStiefel() if canonical else geoopt.EuclideanStiefel()
    params = []
    for p in _params(case, device, dtype, noise=0.0):
        q = geoopt.ManifoldParameter(p.detach().clone(), manifold=manifold)
        q.grad = p.grad.clone()
        params.append(q)
    opt = geoopt.optim.RiemannianAdam(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return Contender("geoopt-C" if canonical else "geoopt-E", opt.step, params, optimizer=opt, few=True)


BUILDERS: dict[str, Callable[..., Contender]] = {
    "floor": _floor,
    "base": _base,
    "soft": _soft,
    "soft-auto": lambda *a: _soft(*a, name="soft-auto", ortho="auto"),
    "autograd": _autograd,
    "hard": _hard,
    "geoopt-E": lambda *a: _geoopt(*a, canonical=False),
    "geoopt-C": lambda *a: _geoopt(*a, canonical=True),
    "base-stacked": lambda *a: _base(*a, stacked=True, name="base-stacked"),
    "soft-stacked": lambda *a: _soft(*a, stacked=True, name="soft-stacked"),
    "soft-compiled": _compiled,  # opt-in: compiling takes a while
}


# -- timing ----------------------------------------------------------------------------
def _time_step(c: Contender, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds of one step: CUDA events around it on an idle device, else ``clock``."""
    if c.prepare is not None:
        c.prepare()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        c.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    c.step()
    return clock() - t0


def _rounds(contenders: list[Contender], device, repeats: int, few: int, warmup: int, clock=time.perf_counter) -> None:
    for c in contenders:
        # geoopt's TorchScript functions specialise over their first calls: 3 warm-up steps.
        for _ in range(warmup if not c.few else min(warmup, 3)):
            c.run()
    sync(device)
    for r in range(repeats):
        for c in contenders:
            if c.few and r >= few:
                continue
            c.times.append(_time_step(c, device, clock))


# -- one case --------------------------------------------------------------------------
def _median_ms(c: Contender) -> float | None:
    return statistics.median(c.times) * 1e3 if c.times else None


def _ratios(ms: dict[str, float | None]) -> dict[str, float | None]:
    def div(a, b):
        return None if a is None or b is None or b <= 0 else a / b

    overhead = None if ms.get("soft") is None or ms.get("base") is None else ms["soft"] - ms["base"]
    out = {
        "overhead_ms": overhead,
        "overhead_over_floor": div(overhead, ms.get("floor")),
        "autograd_over_soft": div(ms.get("autograd"), ms.get("soft")),
        "auto_over_soft": div(ms.get("soft-auto"), ms.get("soft")),
    }
    if "soft-stacked" in ms:
        out["many_over_stacked"] = div(ms.get("soft"), ms.get("soft-stacked"))
        stacked = (
            None
            if ms.get("soft-stacked") is None or ms.get("base-stacked") is None
            else (ms["soft-stacked"] - ms["base-stacked"])
        )
        out["many_over_stacked_overhead"] = div(overhead, stacked)
    return out


def run_case(case: Case, device, dtype, cfg: argparse.Namespace) -> dict:
    flags = _adamw_flags(device, dtype)
    names = [n for n in cfg.contenders if case.many or not n.endswith("-stacked")]
    contenders, missing = [], {}
    for name in names:
        try:
            contenders.append(BUILDERS[name](case, device, dtype, flags))
        except NotAvailable as e:
            missing[name] = str(e)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            missing[name] = f"{type(e).__name__}: {e}"
    # A contender that fails on its first step is n/a, not the end of the run.
    for c in list(contenders):
        try:
            c.run()
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            missing[c.name] = f"{type(e).__name__}: {e}"
            contenders.remove(c)
    _rounds(contenders, device, cfg.repeats, cfg.hard_repeats, cfg.warmup, CLOCKS[cfg.clock])
    ms = {c.name: _median_ms(c) for c in contenders}
    memory = {c.name: step_memory(c, device) for c in contenders if c.name in ("base", "soft", "soft-auto", "autograd")}
    by_name = {c.name: c for c in contenders}
    ops = step_ops(by_name["soft"], by_name["base"], device) if {"soft", "base"} <= set(by_name) else {}
    return {
        "case": case.name,
        "shape": [case.m, case.l, case.n],
        "many": case.many,
        "dtype": str(dtype).removeprefix("torch."),
        "adamw": flags,
        "median_ms": {n: ms.get(n) for n in names},
        "min_ms": {c.name: min(c.times) * 1e3 for c in contenders if c.times},
        "rounds": {c.name: len(c.times) for c in contenders},
        "n/a": missing,
        "ratios": _ratios({n: ms.get(n) for n in names}),
        "memory": memory,
        "ops": ops,
    }


def _verdicts(results: list[dict], device: torch.device) -> dict:
    """Each target, met or not, with the worst case that decides it."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    out = {}
    specs = [
        ("overhead_over_floor", TARGETS["overhead_over_floor"][kind], max),
        ("autograd_over_soft", TARGETS["autograd_over_soft"], min),
        ("many_over_stacked", TARGETS["many_over_stacked"], max),
        ("auto_over_soft", TARGETS["auto_over_soft"], max),
    ]
    for key, bound, worst in specs:
        values = {f"{r['case']} {r['dtype']}": r["ratios"].get(key) for r in results}
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            out[key] = {"bound": bound, "met": None}
            continue
        decider = worst(values, key=values.get)
        met = values[decider] <= bound if worst is max else values[decider] >= bound
        out[key] = {"bound": bound, "worst": values[decider], "worst_case": decider, "met": bool(met)}
    soft_alloc = [r["memory"]["soft"]["allocated_per_step_x_params"] for r in results if "soft" in r["memory"]]
    if soft_alloc:
        out["soft_allocated_per_step_x_params"] = {"worst": max(soft_alloc)}
    held = {
        f"{r['case']} {r['dtype']}": r["memory"]["soft"]["workspace_x_params"] for r in results if "soft" in r["memory"]
    }
    if held:
        decider = max(held, key=held.get)
        bound = TARGETS["workspace_x_params"]
        out["workspace_x_params"] = {
            "bound": bound,
            "worst": held[decider],
            "worst_case": decider,
            "met": bool(held[decider] <= bound),
        }
    return out


# -- the table -------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A column of the table after the contenders' times: its header and its cell for one result."""

    head: str
    cell: Callable[[dict], str]


def _ratio(key: str, *, many_only: bool = False) -> Callable[[dict], str]:
    return lambda r: "" if many_only and not r["many"] else or_na(r["ratios"].get(key), ".2f")


def _soft_memory(key: str, spec: str) -> Callable[[dict], str]:
    def cell(r: dict) -> str:
        mem = r["memory"].get("soft")
        return or_na(mem.get(key), spec) + "x" if mem else ""

    return cell


COLUMNS: list[Column] = [
    Column("ovh/floor", _ratio("overhead_over_floor")),
    Column("autograd/soft", _ratio("autograd_over_soft")),
    Column("auto/soft", _ratio("auto_over_soft")),
    Column("many/stacked", _ratio("many_over_stacked", many_only=True)),
    Column("soft alloc/step", _soft_memory("allocated_per_step_x_params", ".3f")),
    Column("ws", _soft_memory("workspace_x_params", ".2f")),
    Column("ops", lambda r: "/".join(f"{v['ops']:.1f}" for v in r.get("ops", {}).values())),
    Column("reads", lambda r: "/".join(f"{v['reads']:.1f}" for v in r.get("ops", {}).values())),
]


def format_table(report: dict) -> str:
    names = [n for n in (*CONTENDERS, *OPTIONAL) if any(n in r["median_ms"] for r in report["results"])]
    head = ["case", "dtype", *names, *(c.head for c in COLUMNS)]
    rows = [
        [
            r["case"],
            r["dtype"],
            *[or_na(r["median_ms"].get(n)) if n in r["median_ms"] else "" for n in names],
            *(c.cell(r) for c in COLUMNS),
        ]
        for r in report["results"]
    ]
    lines = render(head, rows)
    meta = report["meta"]
    out = [
        f"median ms per step over {meta['repeats']} rounds ({meta['hard_repeats']} for hard/geoopt), "
        f"{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, {meta.get('clock', 'wall')} clock",
        *lines,
        "",
    ]
    for key, v in report["targets"].items():
        if "bound" in v:
            state = "n/a" if v["met"] is None else ("met" if v["met"] else "NOT met")
            worst = "" if v["met"] is None else f": worst {v['worst']:.2f} at {v['worst_case']}"
            out.append(f"target {key} {'>=' if key == 'autograd_over_soft' else '<='} {v['bound']}: {state}{worst}")
    for r in report["results"]:
        for name, why in r["n/a"].items():
            out.append(f"n/a {name} at {r['case']} {r['dtype']}: {why}")
    return "\n".join(out)


# -- entry points ----------------------------------------------------------------------
def _shapes(text: str | None, device: torch.device, quick: bool) -> list[Case]:
    if text is None:
        shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
        many = [QUICK_MANY] if quick else ([MANY] if device.type == "cuda" else CPU_MANY)
        return [Case(*s) for s in shapes] + [Case(*m, many=True) for m in many]
    cases = []
    for item in text.split(","):
        item = item.strip()
        many = item.startswith("many")
        dims = item.removeprefix("many").strip(":") or "x".join(map(str, QUICK_MANY if quick else MANY))
        try:
            m, l, n = (int(x) for x in dims.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: cannot read {item!r}; write MxLxN (e.g. 16x256x64) or many[:MxLxN]") from None
        if n > l:
            raise SystemExit(f"--shapes: {item!r} has n={n} > l={l}; n orthonormal columns need l >= n")
        cases.append(Case(m, l, n, many=many))
    return cases


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="orthoopt bench",
        description="Time one optimizer step: the soft step against its matmul floor, torch's AdamW, "
        "the autograd penalty, the hard mode and geoopt, side by side in one process.",
        epilog="orthoopt bench --models [--help] times the whole training iteration of small real models instead "
        "(orthoopt.bench.iteration).",
    )
    ap.add_argument(
        "--device", type=argtypes.device, default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)"
    )
    ap.add_argument(
        "--shapes", default=None, help="comma-separated MxLxN, 'many' or 'many:MxLxN' (default: the device's set)"
    )
    ap.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or both comma-separated (default: float32; on CUDA both)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few rounds (a smoke test, not a measurement)")
    ap.add_argument(
        "--out",
        type=argtypes.out_file,
        default=None,
        help="JSON file to write, its missing folders made (default: bench_step_<device>.json)",
    )
    ap.add_argument(
        "--repeats",
        type=argtypes.whole(1),
        default=None,
        help="timed rounds per contender (default 50 on CPU, 100 on CUDA)",
    )
    ap.add_argument(
        "--hard-repeats",
        type=argtypes.whole(1),
        default=None,
        help="rounds for hard/geoopt (default repeats/5, at least 3)",
    )
    ap.add_argument(
        "--warmup", type=argtypes.whole(0), default=None, help="untimed steps per contender first (default 5)"
    )
    ap.add_argument(
        "--threads", type=argtypes.whole(1), default=None, help="torch.set_num_threads on CPU (default: torch's)"
    )
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="CPU timer: wall time (default) or the process's CPU time (steadier on a shared machine)",
    )
    ap.add_argument(
        "--contenders",
        type=argtypes.names(CONTENDERS + OPTIONAL),
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS + OPTIONAL)} (default: all but {', '.join(OPTIONAL)})",
    )
    return ap


def config(argv: Sequence[str] | None) -> argparse.Namespace:
    """The checked configuration: a bad argument stops here, before any work, with
    argparse's exit code 2 and a line that says what is allowed."""
    ap = parser()
    cfg = ap.parse_args(argv)
    cfg.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.repeats is None:
        cfg.repeats = 3 if cfg.quick else (100 if cfg.device.type == "cuda" else 50)
    if cfg.hard_repeats is None:
        cfg.hard_repeats = 2 if cfg.quick else max(3, cfg.repeats // 5)
    if cfg.warmup is None:
        cfg.warmup = 1 if cfg.quick else 5
    dtypes = cfg.dtype or ("float32,bfloat16" if cfg.device.type == "cuda" and not cfg.quick else "float32")
    cfg.dtypes = []
    for name in dtypes.split(","):
        dt = getattr(torch, name.strip(), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            ap.error(f"argument --dtype: {name!r} is not a torch floating dtype; use float32 or bfloat16")
        cfg.dtypes.append(dt)
    try:
        cfg.cases = _shapes(cfg.shapes, cfg.device, cfg.quick)
    except SystemExit as e:  # _shapes says what it cannot read
        ap.error(f"argument {e.code}")
    empty = [c.name for c in cfg.cases if min(c.m, c.l, c.n) < 1]
    if empty:
        ap.error(f"argument --shapes: {empty[0]} has a dimension < 1; every M, L and N must be >= 1")
    _check_memory(ap, cfg)
    if cfg.out is None:
        cfg.out = f"bench_step_{cfg.device.type}.json"
        try:
            argtypes.out_file(cfg.out)
        except argparse.ArgumentTypeError as e:
            ap.error(f"the default --out: {e}")
    return cfg


def _check_memory(ap: argparse.ArgumentParser, cfg: argparse.Namespace) -> None:
    """Refuse a shape whose contenders cannot fit in the device's memory, before building any."""
    free = available_bytes(cfg.device)
    if free is None:
        return
    for dtype in cfg.dtypes:
        for case in cfg.cases:
            need = case_bytes(case, dtype, cfg.contenders)
            if need > free:
                size = case.m * case.l * case.n
                ap.error(
                    f"argument --shapes: {case.name} in {str(dtype).removeprefix('torch.')} needs at least "
                    f"{human_bytes(need)} ({need // (size * dtype.itemsize)} tensors of {size} elements held at once "
                    f"by the contenders), more than the {human_bytes(free)} available on {cfg.device}; "
                    "give smaller shapes or fewer --contenders"
                )


def run(cfg: argparse.Namespace) -> dict:
    """Every case and dtype of ``cfg``; returns the report written as JSON."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device
    results = []
    with warnings.catch_warnings():
        # The contenders step random weights with random gradients, so the drift check speaks
        # of weights that no model trains; the timings are what this run reports.
        warnings.simplefilter("ignore", OrthogonalityWarning)
        for dtype in cfg.dtypes:
            for case in cfg.cases:
                results.append(run_case(case, device, dtype, cfg))
                print(f"  done {case.name} {dtype}", file=sys.stderr, flush=True)
    return {
        "meta": {
            **machine(device, cfg.clock),
            "repeats": cfg.repeats,
            "hard_repeats": cfg.hard_repeats,
            "warmup": cfg.warmup,
            "quick": cfg.quick,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "ortho": BETA,
        },
        "targets": _verdicts(results, device),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthoopt bench [flags]``: print the table and write the JSON."""
    cfg = config(argv)
    report = run(cfg)
    publish(report, cfg.out, format_table(report))
    failed = [f"{r['case']} {r['dtype']}" for r in report["results"] if not any(r["min_ms"].values())]
    if failed:
        print(f"orthoopt bench: every contender failed at {', '.join(failed)} (the n/a lines say why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
