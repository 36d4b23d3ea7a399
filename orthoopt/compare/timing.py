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
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack

from .methods import build_optimizers, prepared, task_settings
from .tasks import Task, get_task

__all__ = ["interleaved_times", "time_iterations", "timing_table"]


def interleaved_times(
    task: str | Task,
    methods: Sequence[str],
    rounds: int,
    clocks: Mapping[str, Callable[[], float]],
    *,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """``{clock: {method: [ms per iteration, one per round]}}``: batch, forward, backward and the
    optimizer step of each method in turn, ``rounds`` rounds after ``warmup`` untimed ones, each
    iteration read on every clock of ``clocks`` (seconds, read in their order)."""
    task = get_task(task)
    settings = task_settings(task)
    times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in methods} for c in clocks}
    with ExitStack() as stack:
        runs = {}
        for m in methods:
            problem = task.build(seed=seed, **task.params)  # one model per method, the same weights
            stack.enter_context(prepared(m, problem.model, problem))
            runs[m] = (problem, build_optimizers(m, problem.model, problem, settings))
        for t in range(rounds + warmup):
            for m, (problem, optimizers) in runs.items():
                start = [clock() for clock in clocks.values()]
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                problem.loss(t).backward()
                for o in optimizers:
                    o.step()
                if t >= warmup:
                    for (c, clock), t0 in zip(clocks.items(), start):
                        times[c][m].append(1e3 * (clock() - t0))
    return times


def time_iterations(
    task: str | Task, methods: Sequence[str], rounds: int, *, warmup: int = 2, seed: int = 0
) -> dict[str, list[float]]:
    """``{method: [ms per iteration, one per round]}`` of :func:`interleaved_times` in wall time."""
    return interleaved_times(task, methods, rounds, {"wall": time.perf_counter}, warmup=warmup, seed=seed)["wall"]


def timing_table(times: dict[str, list[float]]) -> list[str]:
    """The markdown table of :func:`time_iterations`' figures, against the first method's."""
    lines = ["| method | median ms | min ms | max ms | median / " + f"{next(iter(times))}'s |", "|---|---|---|---|---|"]
    base = statistics.median(next(iter(times.values())))
    for m, ms in times.items():
        med = statistics.median(ms)
        lines.append(f"| {m} | {med:.1f} | {min(ms):.1f} | {max(ms):.1f} | {med / base:.2f} |")
    return lines
