"""Run one task under several methods on equal terms, and summarise.

Every method of a seed starts from the same weights (the task's one orthonormal draw for
that seed, restored from a snapshot), sees the same data order (a function of the seed
and the step), the same lr schedule (cosine to zero unless told otherwise) and the same
step budget.  Per step the harness records the task loss, ``f - f*`` where the optimum
is known, the largest orthogonality error over the constrained parameters (max-abs and
Frobenius), the wall time of ``step()`` alone and of the whole iteration; a run whose loss
or weights turn non-finite, or whose loss blows up, is stopped and reported as diverged
at that step while the other runs go on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import OrthogonalityWarning
from ..penalty import residual
from .methods import (
    ALL_METHODS,
    METHODS,
    Settings,
    build_optimizers,
    constrained_parameters,
    prepared,
    task_settings,
)
from .tasks import Problem, Task, get_task

__all__ = ["RunResult", "Comparison", "run", "summarize", "multiplier_threshold", "orthogonality"]

HISTORY_KEYS = ("step", "loss", "gap", "orth_max", "orth_fro", "t_step", "t_iter", "time")


@dataclass
class RunResult:
    task: str
    method: str
    seed: int
    steps: int
    init_fingerprint: list[float]
    history: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float | None] = field(default_factory=dict)
    diverged: bool = False
    diverged_at: int | None = None
    error: str | None = None
    step_to_target: int | None = None
    time_to_target: float | None = None
    completed: int = 0

    @property
    def ok(self) -> bool:
        return not self.diverged and self.error is None


@dataclass
class Comparison:
    task: str
    config: dict[str, Any]
    runs: list[RunResult]
    summary: list[dict[str, Any]]

    def by_method(self, method: str) -> list[RunResult]:
        return [r for r in self.runs if r.method == method]


def _current(model: torch.nn.Module, params: Sequence[tuple[str, torch.Tensor, Any]]):
    """The constrained tensors as the model computes them now (a parametrized weight is re-evaluated)."""
    out = []
    for name, _, layout in params:
        module, _, attr = name.rpartition(".")
        out.append((name, getattr(model.get_submodule(module), attr), layout))
    return out


@torch.no_grad()
def orthogonality(params: Sequence[tuple[str, torch.Tensor, Any]]) -> tuple[float, float]:
    """``(max-abs, Frobenius)``: the largest ``|ΦᵀΦ - I|_jk`` and ``‖ΦᵀΦ - I‖_F`` over all matrices."""
    worst_abs, worst_fro = 0.0, 0.0
    for _, p, layout in params:
        r = residual(layout.matrices(p.detach()))
        worst_abs = max(worst_abs, r.abs().amax().item())
        worst_fro = max(worst_fro, torch.linalg.matrix_norm(r).amax().item())
    return worst_abs, worst_fro


def multiplier_threshold(problem: Problem) -> float | None:
    r"""β* = max |Λ| / 2 with Λ = sym(Φᵀ∇f) at the constrained optimum, for every matrix.

    Above β* the L1 penalty is exact (the constrained minimiser minimises the penalised
    problem); below it the penalised problem can run off.  ``None`` if Φ* is unknown.
    """
    if problem.phi_star is None:
        return None
    named = dict(problem.model.named_parameters())
    saved = {n: named[n].detach().clone() for n in problem.phi_star}
    try:
        with torch.no_grad():
            for n, v in problem.phi_star.items():
                named[n].copy_(v)
        problem.model.zero_grad(set_to_none=True)
        problem.loss(0).backward()
        worst = 0.0
        for n, p, layout in constrained_parameters(problem.model, problem):
            if n in problem.phi_star:
                x, g = layout.matrices(p.detach()), layout.matrices(p.grad)
                lam = x.mT @ g
                worst = max(worst, (0.5 * (lam + lam.mT)).abs().amax().item())
        return worst / 2
    finally:
        problem.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v)


def _fingerprint(model: torch.nn.Module) -> list[float]:
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return [flat.sum().item(), (flat * flat).sum().item(), flat.abs().max().item()]


def _schedule(kind: str, steps: int):
    if kind == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    if kind == "constant":
        return lambda t: 1.0
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _objective(problem: Problem) -> float:
    with torch.no_grad():
        return float(problem.objective() if problem.objective is not None else problem.loss(0))


def run_one(
    problem: Problem,
    snapshot: dict[str, torch.Tensor],
    method: str,
    settings: Settings,
    *,
    task_name: str,
    seed: int,
    steps: int,
    schedule: str = "cosine",
    record_every: int = 1,
    blowup: float = 1e4,
    target_gap: float | None = None,
    target_orth: float | None = None,
    progress=None,
) -> RunResult:
    """One method on one seed's problem, starting from ``snapshot``."""
    model = problem.model
    with torch.no_grad():
        model.load_state_dict(snapshot)
    model.zero_grad(set_to_none=True)
    result = RunResult(task_name, method, seed, steps, _fingerprint(model), {k: [] for k in HISTORY_KEYS})
    constrained = constrained_parameters(model, problem)

    def on_target(value: float, gap: float, orth: float) -> bool:
        return _on_target(problem, value, gap, orth, target_gap, target_orth)

    try:
        with prepared(method, model, problem), warnings.catch_warnings():
            # The table reports every method's orthogonality; the drift check's warnings would
            # speak of the baselines (Frobenius, the unconstrained run) that are not meant to hold it.
            warnings.simplefilter("ignore", OrthogonalityWarning)
            optimizers = build_optimizers(method, model, problem, settings)
            factor = _schedule(schedule, steps)
            _train(result, problem, constrained, optimizers, factor, record_every, blowup, on_target, progress)
            if not result.diverged:
                _finish(result, problem, _current(model, constrained), on_target)
    except Exception as e:  # a failing method must not take the other runs with it
        result.error = f"{type(e).__name__}: {e}"
        result.final["traceback"] = traceback.format_exc(limit=3)
    return result


def _train(result, problem, constrained, optimizers, factor, record_every, blowup, on_target, progress) -> None:
    """The training loop: step, record, stop at divergence."""
    model, f_star = problem.model, problem.f_star
    device = next(model.parameters()).device
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]
    scale = None
    elapsed = 0.0
    h = result.history
    for t in range(result.steps):
        record = t % record_every == 0 or t == result.steps - 1
        if record:
            orth_max, orth_fro = orthogonality(_current(model, constrained)) if constrained else (math.nan, math.nan)
        _sync(device)
        t0 = time.perf_counter()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss = problem.loss(t)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        for o in optimizers:
            o.step()
        _sync(device)
        t2 = time.perf_counter()
        for s in schedulers:
            s.step()
        _sync(device)
        t3 = time.perf_counter()
        elapsed += t3 - t0
        value = loss.item()
        if scale is None:
            scale = max(abs(value), abs(f_star) if f_star is not None else 0.0, 1.0)
        if record:
            gap = value - f_star if f_star is not None else math.nan
            for key, v in zip(HISTORY_KEYS, (t, value, gap, orth_max, orth_fro, t2 - t1, t3 - t0, elapsed)):
                h[key].append(v)
            if result.step_to_target is None and on_target(value, gap, orth_max):
                result.step_to_target, result.time_to_target = t, elapsed - (t3 - t0)
        if not math.isfinite(value) or abs(value) > blowup * scale:
            result.diverged, result.diverged_at = True, t
            return
        result.completed = t + 1
        if progress is not None:
            progress.update(1)


def _on_target(problem, value, gap, orth, target_gap, target_orth) -> bool:
    if problem.target is not None:
        return math.isfinite(value) and bool(problem.target(value))
    f_star = problem.f_star
    if target_gap is None or f_star is None or not math.isfinite(gap):
        return False
    return abs(gap) <= target_gap * abs(f_star) and (target_orth is None or orth <= target_orth)


def _finish(result, problem, constrained, on_target) -> None:
    f_star = problem.f_star
    value = _objective(problem)
    orth_max, orth_fro = orthogonality(constrained) if constrained else (math.nan, math.nan)
    weights_finite = all(torch.isfinite(p).all() for p in problem.model.parameters())
    if not (math.isfinite(value) and weights_finite):
        result.diverged, result.diverged_at = True, result.steps
        return
    gap = value - f_star if f_star is not None else None
    h = result.history
    t_step = sorted(h["t_step"])
    t_iter = sorted(h["t_iter"])
    result.final = {
        "loss": value,
        "gap": gap,
        "rel_gap": abs(gap) / abs(f_star) if gap is not None and f_star else None,
        "orth_max": orth_max,
        "orth_fro": orth_fro,
        "step_ms": 1e3 * t_step[len(t_step) // 2],
        "iter_ms": 1e3 * t_iter[len(t_iter) // 2],
        "total_s": h["time"][-1] if h["time"] else 0.0,
    }
    if result.step_to_target is None and on_target(value, gap, orth_max):
        result.step_to_target, result.time_to_target = result.steps, result.final["total_s"]
    if problem.evaluate is not None:
        result.final.update(problem.evaluate())


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


SUMMARY_KEYS = ("loss", "gap", "rel_gap", "orth_max", "orth_fro", "test_acc", "step_ms", "iter_ms", "total_s")


def summarize(runs: Iterable[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds of the final figures."""
    runs = list(runs)
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        ok = [r for r in mine if r.ok]
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(mine),
            "diverged": sum(r.diverged for r in mine),
            "diverged_at": [r.diverged_at for r in mine if r.diverged],
            "failed": sum(r.error is not None for r in mine),
            "error": next((r.error for r in mine if r.error), None),
        }
        extra = sorted({k for r in ok for k, v in r.final.items() if isinstance(v, (int, float))} - set(SUMMARY_KEYS))
        for key in SUMMARY_KEYS + tuple(extra):
            row[key], row[key + "_std"] = _mean_std([r.final.get(key) for r in ok])
        hits = [r.time_to_target for r in ok if r.time_to_target is not None]
        row["reached_target"] = len(hits)
        row["time_to_target"] = statistics.median(hits) if hits else None
        steps = [r.step_to_target for r in ok if r.step_to_target is not None]
        row["step_to_target"] = statistics.median(steps) if steps else None
        rows.append(row)
    return rows


def run(
    task: str | Task = "pca",
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | int = (0, 1, 2),
    steps: int | None = None,
    *,
    beta: float | None = None,
    lr: float | None = None,
    base: str | None = None,
    smoothing: float | None = None,
    momentum: float | None = None,
    landing_lr: float | None = None,
    schedule: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    record_every: int = 1,
    blowup: float = 1e4,
    quick: bool = False,
    progress: bool = False,
    beta_relative: bool | None = None,
    threads: int | None = None,
    constrained_lr_scale: float | None = None,
    target_gap: float | None = None,
    target_orth: float | None = None,
) -> Comparison:
    """Run ``task`` under each of ``methods`` for every seed; return runs and a summary.

    ``beta_relative=True`` reads ``beta`` as a multiple of the task's exactness threshold
    β* (:func:`multiplier_threshold`).  Settings left ``None`` take the task's defaults
    (methods: the task's, else every method of ``METHODS``; schedule: the task's, mostly cosine).
    ``threads`` sets ``torch.set_num_threads`` for the run (timings on a loaded machine
    are steadier with one thread).  ``constrained_lr_scale``: the constrained parameters'
    lr as a multiple of ``lr`` (default: the task's).  ``target_gap`` and ``target_orth``
    replace the task's target (``|f - f*| <= target_gap·|f*|`` with ``max|ΦᵀΦ - I| <=
    target_orth``) where the optimum is known.
    """
    task = get_task(task)
    if target_gap is not None or target_orth is not None:
        task = dataclasses.replace(
            task,
            target_gap=target_gap if target_gap is not None else task.target_gap,
            target_orth=target_orth if target_orth is not None else task.target_orth,
        )
    if beta_relative is None:
        beta_relative = task.beta_relative
    if threads is not None:
        torch.set_num_threads(threads)
    methods = list(methods if methods is not None else task.methods or METHODS)
    schedule = schedule if schedule is not None else task.schedule
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for what, values in (("method", methods), ("seed", seeds)):
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise ValueError(f"{what} {twice[0]!r} is given twice; each runs once per comparison")
    steps = steps if steps is not None else (task.quick_steps if quick else task.steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    settings = task_settings(
        task,
        base=base,
        lr=lr,
        momentum=momentum,
        beta=beta,
        smoothing=smoothing,
        landing_lr=landing_lr,
        constrained_lr_scale=constrained_lr_scale,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds) * len(methods) * steps, desc=f"{task.name}", unit="step", leave=False)
    runs: list[RunResult] = []
    threshold = None
    for seed in seeds:
        problem = task.build(seed=seed, dtype=dtype, device=device, **task.params)
        if seed == seeds[0]:
            first = problem
            threshold = multiplier_threshold(problem)
            if beta_relative:
                if threshold is None:
                    raise ValueError(f"task {task.name}: beta_relative needs a known optimum, which it lacks")
                settings.beta = settings.beta * threshold
        snapshot = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
        for method in methods:
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {method}")
            r = run_one(
                problem,
                snapshot,
                method,
                settings,
                task_name=task.name,
                seed=seed,
                steps=steps,
                schedule=schedule,
                record_every=record_every,
                blowup=blowup,
                target_gap=task.target_gap,
                target_orth=task.target_orth,
                progress=bar,
            )
            if bar is not None and r.completed < steps:
                bar.update(steps - r.completed)
            runs.append(r)
    if bar is not None:
        bar.close()
    config = {
        "task": task.name,
        "task_params": task.params,
        "methods": list(methods),
        "seeds": seeds,
        "steps": steps,
        "schedule": schedule,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threshold": threshold,
        "threads": torch.get_num_threads(),
        "target_gap": task.target_gap,
        "target_orth": task.target_orth,
        "target_text": first.target_text,
        "reference": first.reference,
        "metrics": task.metrics,
        **asdict(settings),
    }
    return Comparison(task.name, config, runs, summarize(runs, methods))
