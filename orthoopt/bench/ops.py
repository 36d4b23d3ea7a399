"""The aten operations and host reads of the soft step beyond the base step (the step
benchmark's ``ops`` and ``reads`` columns).

Counted over ``WATCH_EVERY`` steady-state steps (so that the monitor's check is averaged in)
with :class:`orthoopt.testing.OpCounter`: on this device's own path, and on CPU also on the
accelerator's (:func:`orthoopt.testing.accelerator_path`).  Each case of the benchmark is one
shape class (one bucket), so the figures are per shape class.
"""

from __future__ import annotations

import contextlib

import torch

from .. import guard, testing

__all__ = ["step_ops"]


def _per_step(step, steps: int) -> tuple[float, float]:
    total = reads = 0
    for _ in range(steps):
        counter = testing.count_ops(step)
        total, reads = total + counter.total, reads + counter.host_reads
    return total / steps, reads / steps


def step_ops(soft, base, device: torch.device) -> dict:
    """``{path: {"ops": extra ops per step, "reads": extra host reads per step}}`` of the
    ``soft`` contender over the ``base`` one, for this device's path and, on CPU, the
    accelerator path as well."""
    paths = {device.type: contextlib.nullcontext}
    if device.type == "cpu":
        paths["accelerator"] = testing.accelerator_path
    out = {}
    for name, context in paths.items():
        with context():
            for c in (soft, base):  # the first step on a path may plan; not counted
                c.run()
            ops, reads = _per_step(soft.step, guard.WATCH_EVERY)
            base_ops, base_reads = _per_step(base.step, guard.WATCH_EVERY)
        out[name] = {"ops": ops - base_ops, "reads": reads - base_reads}
    return out
