r"""Benchmark of the whole training iteration: what orthogonality costs on real models.

``python -m orthoopt bench --models`` times forward + backward + step on the same batches,
side by side in one process (each round runs one iteration of every contender in turn), for
each model of :mod:`orthoopt.bench.models` and each contender of
:mod:`orthoopt.bench.contenders`, from the same initial weights (snapped to the manifold).

The parametrizations can be very slow (geotorch completes an ``l × n`` weight to an
``l × l`` orthogonal matrix), so their setup and first iteration run first in a child
process, abandoned past the budget (``--budget``, 10 s): such a contender is reported over
budget with the time it was given.  Any other contender whose first iteration exceeds the
budget is dropped after it.  Reported per model and contender: median ms per iteration (and
the quartiles), the ratio to ``plain`` (the median of the per-round ratios), the memory the
method holds beyond ``plain`` (CPU: :func:`~orthoopt.bench.contenders.held_bytes`; CUDA: the
iteration's ``max_memory_allocated`` over plain's), and the largest orthogonality error
``max|ΦᵀΦ - I|`` of the constrained weights after the timed steps.  ``--runs`` repeats the
timed rounds; the report gives the median of the runs' medians and each run's.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from .. import argtypes
from ..optim import project_
from .common import CLOCKS, human_bytes, machine, or_na, publish, render, sync
from .contenders import CONTENDERS, RISKY, Contender, held_bytes, make_contender, peak_bytes
from .models import DEFAULT_MODELS, MODELS, ModelSpec, NotAvailable, constrained_weights, max_error

__all__ = ["EVERY", "TARGETS", "CUDA_TARGETS", "main", "run", "probe", "config"]

EVERY = 4  # the default k of the soft-every and auto-every contenders

# The performance budget: the iteration time over the plain optimizer's, at most (CPU).
TARGETS = {
    "mnist": {"soft": 1.05, "soft-auto": 1.08, "hard": 1.10},
    "lstm": {"soft": 1.03, "soft-auto": 1.05, "hard": 1.10},
    "vit": {"soft": 1.03, "soft-auto": 1.05, "hard": 1.10},
    "mlp": {"soft": 1.5},
}
CUDA_TARGETS = {"vit": {"soft": 1.02}}


# -- the budget probe ------------------------------------------------------------------
def _probe_child(conn, jobs: list[tuple[str, str]], quick: bool, threads: int | None, seed: int, every: int) -> None:
    """In a child process: set up and run one iteration of each job, reporting each phase."""
    try:
        for model_name, name in jobs:
            spec = MODELS[model_name]
            torch.set_num_threads(spec.threads or threads or torch.get_num_threads())
            model, weights, batches = _setup(spec, quick, seed, torch.device("cpu"), 1)
            conn.send(("start", None))
            try:
                t0 = time.perf_counter()
                c = make_contender(name, spec, model, weights, every)
                conn.send(("setup", time.perf_counter() - t0))
                t0 = time.perf_counter()
                c.iteration(batches[0])
                conn.send(("done", time.perf_counter() - t0))
            except NotAvailable as e:
                conn.send(("n/a", str(e)))
    except Exception:  # report, so that the parent does not wait for nothing
        conn.send(("error", traceback.format_exc()))


def probe(jobs: list[tuple[str, str]], budget: float, cfg) -> dict[tuple[str, str], tuple[str, Any]]:
    """Setup and first iteration of each job in a child process, killed when either phase
    runs past ``budget`` seconds.

    Returns ``{(model, contender): (status, value)}``: ``("ok", seconds of the first
    iteration)``, ``("over budget", "setup" or "first iteration")`` or ``("n/a", reason)``.
    One child runs the jobs in turn; after a kill, a new one takes the rest.
    """
    ctx = multiprocessing.get_context("spawn")
    results: dict[tuple[str, str], tuple[str, Any]] = {}
    todo = list(jobs)
    while todo:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_probe_child, args=(child, todo, cfg.quick, cfg.threads, cfg.seed, cfg.every))
        proc.start()
        try:
            while todo:
                # Importing and building the model is not the contender's cost: no budget on it.
                if not parent.poll(600):
                    raise RuntimeError("the probe process did not start a job within 600 s")
                kind, value = parent.recv()
                if kind == "error":
                    raise RuntimeError(f"the probe process failed:\n{value}")
                key = todo.pop(0)
                for phase in ("setup", "first iteration"):
                    if not parent.poll(budget):
                        results[key] = ("over budget", phase)
                        break
                    kind, value = parent.recv()
                    if kind != "setup":
                        results[key] = ("ok", value) if kind == "done" else (kind, value)
                        break
                if results[key][0] == "over budget":
                    break  # kill the child, start afresh on what is left
        finally:
            proc.kill()
            proc.join()
    return results


# -- one model ---------------------------------------------------------------------------
def _setup(spec: ModelSpec, quick: bool, seed: int, device: torch.device, n_batches: int):
    torch.manual_seed(seed)
    model = spec.build(quick).to(device)
    weights = constrained_weights(model, spec)
    for w in weights:  # start on the manifold, in each weight's own layout (an LSTM's gate blocks)
        project_([model.get_submodule(w.module).get_parameter(w.attr)], layout=str(w.layout))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [tuple(t.to(device) for t in spec.batch(g, quick)) for _ in range(n_batches)]
    return model, weights, batches


def _timed(c: Contender, batches: list, device, clock=time.perf_counter) -> float:
    """Seconds per iteration over ``batches``, one iteration each."""
    sync(device)
    t0 = clock()
    for batch in batches:
        c.iteration(batch)
    sync(device)
    return (clock() - t0) / len(batches)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def run_model(spec: ModelSpec, cfg, probed: dict) -> dict:
    """Every contender of ``cfg`` on one model, round-robin; the model's entry of the report."""
    device = cfg.device
    threads_before = torch.get_num_threads()
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    try:
        model, weights, batches = _setup(spec, cfg.quick, cfg.seed, device, cfg.batches)
        params_bytes = sum(w.value(model).numel() * w.value(model).element_size() for w in weights)
        entries: dict[str, dict] = {}
        contenders: list[Contender] = []
        for name in cfg.contenders:
            status = probed.get((spec.name, name))
            if status is not None and status[0] == "over budget":
                entries[name] = {"status": "over budget", "phase": status[1], "seconds": cfg.budget}
                continue
            if status is not None and status[0] != "ok":
                entries[name] = {"status": status[0], "reason": status[1]}
                continue
            try:
                c = make_contender(name, spec, model, weights, cfg.every)
            except NotAvailable as e:
                entries[name] = {"status": "n/a", "reason": str(e)}
                continue
            # A check after one iteration, for the contenders not probed in a child process.
            first = _timed(c, batches[:1], device)
            if first > cfg.budget:
                entries[name] = {"status": "over budget", "phase": "first iteration", "seconds": first}
                continue
            entries[name] = {"status": "ok", "first_iteration_s": status[1] if status else first}
            contenders.append(c)

        # The parametrizations, slow by orders of magnitude, are timed on the first rounds only.
        def runs_in(c: Contender, r: int, rounds: int) -> bool:
            return c.name not in RISKY or r < rounds

        for k in range(cfg.warmup):
            for c in contenders:
                if runs_in(c, k, 1):
                    c.iteration(batches[(k + 1) % len(batches)])
        plain = next((c for c in contenders if c.name == "plain"), None)
        # A round runs `every` iterations of each contender, one whole cycle of the every-k
        # ones, whose median over rounds is then their amortized cost, not that of the
        # iterations without a penalty step.  The parametrizations run one.
        cycle = cfg.every if any(c.name in EVERY_VARIANT.values() for c in contenders) else 1
        for r in range(cfg.rounds):
            batch = [batches[(r * cycle + i) % len(batches)] for i in range(cycle)]
            timed = [c for c in contenders if runs_in(c, r, cfg.slow_rounds)]
            round_times = {
                c.name: _timed(c, batch[:1] if c.name in RISKY else batch, device, cfg.clock_fn) for c in timed
            }
            for c in timed:
                c.times.append(round_times[c.name])
                if plain is not None:
                    c.ratios.append(round_times[c.name] / round_times["plain"])
        base_held = held_bytes(plain) if plain is not None else 0
        base_peak = peak_bytes(plain, batches[0], device) if plain is not None and device.type == "cuda" else None
        for c in contenders:
            entry = entries[c.name]
            entry["iterations_per_round"] = 1 if c.name in RISKY else cycle
            entry["times_ms"] = [t * 1e3 for t in c.times]
            if c.ratios:
                entry["ratios"] = c.ratios
            _summarize(entry)
            entry["max_error"] = max_error(c.model, c.weights)
            if device.type == "cuda":
                entry["extra_peak_bytes"] = peak_bytes(c, batches[0], device) - base_peak
            else:
                entry["extra_held_bytes"] = held_bytes(c) - base_held
                entry["extra_held_x_params"] = entry["extra_held_bytes"] / params_bytes
        return {
            "model": spec.name,
            "title": spec.title,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "constrained": [f"{w.module}.{w.attr}" if w.module else w.attr for w in weights],
            "constrained_bytes": params_bytes,
            "contenders": entries,
        }
    finally:
        torch.set_num_threads(threads_before)


# -- the report ------------------------------------------------------------------------
def _summarize(entry: dict) -> None:
    """Median and quartiles of an entry's iteration times and per-round ratios to plain."""
    q1, med, q3 = _quantiles(entry["times_ms"])
    entry.update(
        {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": min(entry["times_ms"]), "rounds": len(entry["times_ms"])}
    )
    if "ratios" in entry:
        r1, rmed, r3 = _quantiles(entry["ratios"])
        entry.update({"ratio": rmed, "ratio_q1": r1, "ratio_q3": r3})


def _combine(runs: list[dict]) -> dict:
    """One model's entry over repeated runs: the median of the runs' medians (each run's in
    ``median_ms_runs`` and ``ratio_runs``, for the spread between runs), and the quartiles of
    all rounds pooled."""
    first = copy.deepcopy(runs[0])
    for name, entry in first["contenders"].items():
        entries = [r["contenders"][name] for r in runs if r["contenders"][name].get("status") == "ok"]
        if entry.get("status") != "ok" or len(runs) == 1:
            continue
        entry["median_ms_runs"] = [e["median_ms"] for e in entries]
        entry["times_ms"] = [t for e in entries for t in e["times_ms"]]
        if "ratios" in entry:
            entry["ratio_runs"] = [e["ratio"] for e in entries]
            entry["ratios"] = [x for e in entries for x in e["ratios"]]
        _summarize(entry)
        entry["median_ms"] = statistics.median(entry["median_ms_runs"])
        if "ratios" in entry:
            entry["ratio"] = statistics.median(entry["ratio_runs"])
        entry["max_error"] = max(e["max_error"] for e in entries)
    return first


# The every-k variant of a contender, judged against the same target.
EVERY_VARIANT = {"soft": "soft-every", "soft-auto": "auto-every"}


def verdicts(results: list[dict], device: torch.device) -> dict:
    """Each target, met or not, from the measured ratio (also for the every-k variants)."""
    table = CUDA_TARGETS if device.type == "cuda" else TARGETS
    out = {}
    for r in results:
        for name, bound in table.get(r["model"], {}).items():
            for cand in [name, EVERY_VARIANT.get(name)]:
                if cand is None:
                    continue
                entry = r["contenders"].get(cand, {})
                ratio = entry.get("ratio")
                out[f"{r['model']} {cand}"] = {
                    "bound": bound,
                    "ratio": ratio,
                    "met": None if ratio is None else bool(ratio <= bound),
                    "status": entry.get("status", "not run"),
                }
    return out


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"whole iteration (forward + backward + step), median ms over {meta['rounds']} rounds x {meta['runs']} run(s), "
        f"{meta['device_name']}, torch {meta['torch']}, {meta['clock']} clock",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines += ["", f"{r['model']}: skipped: {r['skipped']}"]
            continue
        lines += ["", f"{r['model']}: {r['title']} ({r['threads'] or 'cuda'} threads; {len(r['constrained'])} weights)"]
        head = [
            "contender",
            "ms",
            "q1-q3 ms",
            "x plain",
            "ratio q1-q3",
            "runs' x plain",
            "extra mem",
            "max error",
            "status",
        ]
        rows = []
        for name, e in r["contenders"].items():
            if e["status"] != "ok":
                why = f"{e['phase']} > {e['seconds']:.3g} s" if e["status"] == "over budget" else e.get("reason", "")
                rows.append([name, "", "", "", "", "", "", "", f"{e['status']}: {why}"])
                continue
            mem = e.get("extra_peak_bytes", e.get("extra_held_bytes"))
            rows.append(
                [
                    name,
                    or_na(e["median_ms"], ".2f"),
                    f"{e['q1_ms']:.2f}-{e['q3_ms']:.2f}",
                    or_na(e.get("ratio"), ".3f"),
                    f"{e['ratio_q1']:.3f}-{e['ratio_q3']:.3f}" if "ratio_q1" in e else "",
                    f"{min(e['ratio_runs']):.3f}-{max(e['ratio_runs']):.3f}" if "ratio_runs" in e else "",
                    human_bytes(mem),
                    f"{e['max_error']:.1e}",
                    "ok",
                ]
            )
        lines += render(head, rows, right=False, rule=False)
    lines.append("")
    if report["meta"].get("quick"):
        # The targets are for the full-size models; --quick's tiny ones say nothing about them.
        lines.append("(--quick: tiny models; the verdicts below are not the targets' sizes)")
    for key, v in report["targets"].items():
        state = "n/a" if v["met"] is None else ("met" if v["met"] else "NOT met")
        lines.append(f"target {key} <= {v['bound']}x: {state} ({or_na(v['ratio'], '.3f')}x, {v['status']})")
    return "\n".join(lines)


# -- entry points ----------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="orthoopt bench --models",
        description="Time the whole training iteration (forward + backward + step) of small real models "
        "with each orthogonality method, side by side in one process.",
    )
    ap.add_argument(
        "--models",
        type=argtypes.names(tuple(MODELS)),
        nargs="?",
        const=",".join(DEFAULT_MODELS),
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})",
    )
    ap.add_argument(
        "--contenders",
        type=argtypes.names(CONTENDERS),
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS)}",
    )
    ap.add_argument(
        "--device", type=argtypes.device, default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny models, two rounds (a smoke test, not a measurement)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per contender and run, each of --every iterations where soft-every or auto-every runs "
        "(default 10)",
    )
    ap.add_argument("--runs", type=int, default=1, help="repeat the timed rounds this many times (default 1)")
    ap.add_argument(
        "--slow-rounds",
        type=int,
        default=None,
        help="timed rounds of torch-orthogonal and geotorch (default rounds/5, at least 2; one warm-up)",
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations per contender first (default 3)")
    ap.add_argument(
        "--budget", type=float, default=10.0, help="seconds a contender's setup and first iteration may take"
    )
    ap.add_argument("--every", type=int, default=EVERY, help=f"k of soft-every and auto-every (default {EVERY})")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; mlp and wide use 1)"
    )
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default 4)")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="CPU timer: wall time (default) or the process's CPU time (steadier on a shared machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        type=argtypes.out_file,
        default=None,
        help="JSON file to write, its missing folders made (default: bench_models_<device>.json)",
    )
    return ap


def config(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = parser()
    cfg = ap.parse_args(argv)  # every refusal below is argparse's: exit code 2, before any work
    cfg.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.rounds is None:
        cfg.rounds = 2 if cfg.quick else 10
    if cfg.warmup is None:
        cfg.warmup = 1 if cfg.quick else 3
    if cfg.slow_rounds is None:
        cfg.slow_rounds = min(cfg.rounds, max(2, cfg.rounds // 5))
    if min(cfg.rounds, cfg.runs, cfg.every, cfg.batches, cfg.slow_rounds) < 1 or cfg.warmup < 0 or not cfg.budget > 0:
        ap.error("--rounds, --slow-rounds, --runs, --every and --batches must be >= 1, --warmup >= 0 and --budget > 0")
    cfg.out = cfg.out or f"bench_models_{cfg.device.type}.json"
    cfg.clock_fn = CLOCKS[cfg.clock] if cfg.device.type == "cpu" else time.perf_counter
    return cfg


def run(cfg: argparse.Namespace) -> dict:
    """Every model of ``cfg``; returns the report written as JSON."""
    if cfg.threads and cfg.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    specs = []
    results = []
    for name in cfg.models:
        spec = MODELS[name]
        try:
            spec.build(True)  # fails fast where the model cannot be built (timm absent)
            specs.append(spec)
        except NotAvailable as e:
            print(f"skipping {name}: {e}", file=sys.stderr, flush=True)
            results.append({"model": name, "title": spec.title, "skipped": str(e)})
    # The child process probes on CPU; on CUDA the check after one iteration applies.
    jobs = [(s.name, c) for s in specs for c in cfg.contenders if c in RISKY]
    probed = probe(jobs, cfg.budget, cfg) if jobs and not cfg.quick and cfg.device.type == "cpu" else {}
    for spec in specs:
        runs = [run_model(spec, cfg, probed) for _ in range(cfg.runs)]
        results.append(_combine(runs))
        print(f"  done {spec.name}", file=sys.stderr, flush=True)
    order = {n: i for i, n in enumerate(cfg.models)}
    results.sort(key=lambda r: order[r["model"]])
    device = cfg.device
    return {
        "meta": {
            **machine(device, cfg.clock),
            "rounds": cfg.rounds,
            "slow_rounds": cfg.slow_rounds,
            "runs": cfg.runs,
            "warmup": cfg.warmup,
            "budget_s": cfg.budget,
            "every": cfg.every,
            "quick": cfg.quick,
        },
        "targets": verdicts([r for r in results if "skipped" not in r], device),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthoopt bench --models [names] [flags]``: print the tables, write the JSON."""
    cfg = config(argv)
    report = run(cfg)
    publish(report, cfg.out, format_table(report))
    return 0
