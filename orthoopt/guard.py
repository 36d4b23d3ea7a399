r"""Saying so when the soft constraint will not hold: the start, and drift during training.

The soft step pulls each entry of :math:`R = \Phi^\top\Phi - I` towards zero by at most
:math:`2\eta = 4\gamma\beta` per step (:mod:`orthoopt.optim`), so a parameter that starts far
from the manifold needs at least :math:`\max|R| / (4\gamma\beta)` steps to get there.  With
the std-0.02 initialisations of timm and Hugging Face (:math:`\max|R| \approx 1`) and a
learning rate that warms up from nearly zero, that can be longer than the whole run.  And
where the base optimizer's update moves a parameter away faster than the capped step pulls
it back (β below the exactness threshold, or a coherent drift that the step's spectral cap
limits), the error grows during training.  Neither is visible from the loss, so this module
checks, once per parameter at its first soft step and then every ``WATCH_EVERY`` steps:

* ``ortho_init="project"``: after its first step a parameter is snapped to its polar factor
  (the nearest point with orthonormal vectors), so it starts on the manifold;
* ``ortho_init="warn"`` (the default): a parameter that is more than ``FAR`` away and that
  the pull needs more than ``FAR_STEPS`` steps to reach gets an :class:`OrthogonalityWarning`
  naming it, its error, the steps needed and the fixes;
* ``ortho_init="keep"``: neither;
* always: a parameter whose error has grown above ``FAR`` since the last check gets a
  warning (once), naming it and the fixes.

The first-step mark lives in the optimizer state (``ortho_started``), so a resumed run does
not project again; the checks cost one Gram matrix per parameter every ``WATCH_EVERY``
steps (and a host sync).  Sharded (FSDP2) and hard-mode parameters are not checked here:
hard mode projects at its first step itself (:mod:`orthoopt.stiefel`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from . import auto, penalty
from .distributed import is_dtensor
from .layout import Layout, resolve_layout
from .options import param_key, param_name, penalized, warn_at_caller

__all__ = ["OrthogonalityWarning", "WATCH_EVERY", "FAR", "FAR_STEPS", "before_step", "after_step"]

# Every how many optimizer steps the errors are read again (one Gram per parameter).
WATCH_EVERY = 100
# max |ΦᵀΦ - I| above which a parameter is far from orthonormal (a singular value off by
# about 5% or more), and the number of steps of the pull after which a far start is reported.
FAR = 0.1
FAR_STEPS = 100
# ortho_init="project" snaps a parameter whose error is above this (hard mode's tolerance).
PROJECT_TOL = 1e-5
STARTED = "ortho_started"


class OrthogonalityWarning(UserWarning):
    """A constrained parameter is, or is becoming, far from orthonormal."""


def _warn(message: str) -> None:
    warn_at_caller(message, OrthogonalityWarning)


def _beta(group: dict, state: dict) -> float:
    if group["ortho"] != "auto":
        return float(group["ortho"])
    estimate = state.get(auto.STATE)
    return auto.AUTO_SAFETY * float(estimate.max()) if estimate is not None else 0.0


def _soft_parameters(param_groups: list[dict]) -> Iterator[tuple[dict, torch.Tensor, Layout, str, str]]:
    """(group, parameter, layout, name for messages, key) of every parameter the soft step moves."""
    for gi, group in enumerate(param_groups):
        if not penalized(group) or group["ortho_mode"] != "soft":
            continue
        for i, p in enumerate(group["params"]):
            if p.grad is None or is_dtensor(p) or p.device.type == "meta":
                continue
            name = param_name(group, i, gi)
            layout = resolve_layout(group["ortho_layout"], p.shape, name)
            if layout is not None:
                yield group, p, layout, name, param_key(group, i, gi)


@torch.no_grad()
def before_step(param_groups: list[dict], state: Any, memory: dict[str, float | None]) -> None:
    """The error of each parameter before its first soft step: the start that ortho_init judges.

    Called when the optimizer's plan of parameters may have changed (its first step, a new
    group, a gradient that appeared); ``memory`` is :func:`after_step`'s.
    """
    for _, p, layout, _, key in _soft_parameters(param_groups):
        if STARTED not in state.get(p, ()):  # .get: the state is a defaultdict, and this step may yet raise
            memory[key] = penalty.max_error(layout.matrices(p))


@torch.no_grad()
def after_step(
    param_groups: list[dict], state: Any, memory: dict[str, float | None], *, starting: bool, watching: bool
) -> None:
    """ortho_init for the parameters that took their first soft step (``starting``: when
    :func:`before_step` ran before this step), and the drift check (``watching``).

    ``memory``: the start error, then the last error read per parameter, None once it was
    warned about (kept by the optimizer between calls; losing it, as a pickle does, only
    repeats a warning).
    """
    if not (starting or watching):
        return
    for group, p, layout, name, key in _soft_parameters(param_groups):
        if STARTED not in state.get(p, ()):
            if starting:
                state[p][STARTED] = True
                memory[key] = _start(group, state[p], p, layout, memory.get(key), name)
            continue
        if not watching:
            continue
        error = penalty.max_error(layout.matrices(p))
        last = memory.get(key)
        if last is not None and error > FAR and error > last:
            _warn(
                f"{name} is moving away from orthonormality: max |ΦᵀΦ - I| rose from {last:.3g} to "
                f"{error:.3g} over the last {WATCH_EVERY} steps. The base optimizer's updates move it faster "
                f"than the soft step pulls it back: use {_stronger_pull(group)}, a lower learning rate, or "
                "ortho_mode='hard'"
            )
            memory[key] = None  # warned: once per parameter
        elif key not in memory or last is not None:
            memory[key] = error


def _start(group: dict, state: dict, p: torch.Tensor, layout: Layout, before: float | None, name: str) -> float:
    """ortho_init after a parameter's first soft step, judged by its error ``before`` it;
    returns its error now."""
    error = penalty.max_error(layout.matrices(p))
    policy = group["ortho_init"]
    if before is None or not before > (PROJECT_TOL if policy == "project" else FAR):
        return error  # started on the manifold (or no start was read): nothing to do
    if policy == "project":
        if math.isfinite(error):
            p.copy_(layout.from_matrices(penalty.polar(layout.matrices(p)), p.shape))
        return penalty.max_error(layout.matrices(p))
    if policy != "warn":
        return error
    pull = 4 * float(group["lr"]) * _beta(group, state)  # the most an entry of R moves per step
    needed = before / pull if pull > 0 else math.inf
    if needed > FAR_STEPS:
        _warn(
            f"{name} starts far from orthonormal (max |ΦᵀΦ - I| = {before:.3g}): at this step's lr·ortho = "
            f"{pull / 4:.3g} the soft step moves each entry of ΦᵀΦ - I by at most {pull:.3g} per step, so it needs "
            f"at least {needed:.3g} steps to get there, more while the learning rate is warming up or decaying. "
            "Start on the manifold with ortho_init='project' (or orthoopt.project_(optimizer) before training), "
            "or use a larger ortho; ortho_init='keep' silences this"
        )
    return error


def _stronger_pull(group: dict) -> str:
    """The soft options that pull harder than the group's own (the drift warning's advice)."""
    ways = [] if group["ortho"] == "auto" else ["ortho='auto' (or a larger ortho)"]
    if group.get("ortho_every", 1) > 1:
        ways.append("ortho_every=1 (a k-fold step meets the step caps)")
    return " or ".join(ways) or "a decaying learning rate"
