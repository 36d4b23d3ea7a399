"""Milliseconds per training iteration of several methods on one task, interleaved.

:func:`compare.run <orthoopt.compare.harness.run>` times each run on its own, one after the
other, so that a change of machine load between runs shows up as a difference between
methods.  Here every method trains its own copy of the task's model (the same initial
weights, the same settings) and each round runs one iteration of every method in turn, so
that load hits all of them alike; the figures are per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack

from .methods import build_optimizers, prepared, task_settings
from .tasks import Task, get_task

__all__ = ["time_iterations", "timing_table"]


def time_iterations(
    task: str | Task, methods: Sequence[str], rounds: int, *, warmup: int = 2, seed: int = 0
) -> dict[str, list[float]]:
    """``{method: [ms per iteration, one per round]}``: batch, forward, backward and the
    optimizer step of each method in turn, ``rounds`` rounds after ``warmup`` untimed ones."""
    task = get_task(task)
    settings = task_settings(task)
    times: dict[str, list[float]] = {m: [] for m in methods}
    with ExitStack() as stack:
        runs = {}
        for m in methods:
            problem = task.build(seed=seed, **task.params)  # one model per method, the same weights
            stack.enter_context(prepared(m, problem.model, problem))
            runs[m] = (problem, build_optimizers(m, problem.model, problem, settings))
        for t in range(rounds + warmup):
            for m, (problem, optimizers) in runs.items():
                start = time.perf_counter()
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                problem.loss(t).backward()
                for o in optimizers:
                    o.step()
                if t >= warmup:
                    times[m].append(1e3 * (time.perf_counter() - start))
    return times


def timing_table(times: dict[str, list[float]]) -> list[str]:
    """The markdown table of :func:`time_iterations`' figures, against the first method's."""
    lines = ["| method | median ms | min ms | max ms | median / " + f"{next(iter(times))}'s |", "|---|---|---|---|---|"]
    base = statistics.median(next(iter(times.values())))
    for m, ms in times.items():
        med = statistics.median(ms)
        lines.append(f"| {m} | {med:.1f} | {min(ms):.1f} | {max(ms):.1f} | {med / base:.2f} |")
    return lines
