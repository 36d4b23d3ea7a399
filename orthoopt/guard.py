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
from typing import Any

import torch

from . import auto, penalty
from .options import warn_at_caller
from .pieces import Piece, is_dtensor

__all__ = ["OrthogonalityWarning", "WATCH_EVERY", "FAR", "FAR_STEPS", "watched", "before_step", "after_step"]

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


def _beta(piece: Piece, state: dict) -> float:
    group = piece.group
    if group["ortho"] != "auto":
        return float(group["ortho"])
    estimate = state.get(auto.STATE + piece.suffix)
    return auto.AUTO_SAFETY * float(estimate.max()) if estimate is not None else 0.0


def watched(soft_pieces: list[Piece]) -> list[Piece]:
    """The pieces the guard checks, of those the soft step moves (with a gradient): not
    sharded (their errors are collectives) and not on the meta device (no values)."""
    return [piece for piece in soft_pieces if not is_dtensor(piece.param) and piece.param.device.type != "meta"]


def _memory_key(piece: Piece) -> str:
    return piece.key + piece.suffix


@torch.no_grad()
def before_step(pieces: list[Piece], state: Any, memory: dict[str, float | None]) -> None:
    """The error of each piece before its first soft step: the start that ortho_init judges.

    Called when the optimizer's plan of parameters may have changed (its first step, a new
    group, a gradient that appeared), with :func:`watched`'s pieces; ``memory`` is
    :func:`after_step`'s.
    """
    for piece in pieces:
        if STARTED + piece.suffix not in state.get(piece.param, ()):  # .get: a defaultdict; this step may yet raise
            memory[_memory_key(piece)] = penalty.max_error(piece.layout.matrices(piece.view))


@torch.no_grad()
def after_step(
    pieces: list[Piece], state: Any, memory: dict[str, float | None], *, starting: bool, watching: bool
) -> None:
    """ortho_init for the parameters that took their first soft step (``starting``: when
    :func:`before_step` ran before this step), and the drift check (``watching``).

    ``memory``: the start error, then the last error read per parameter, None once it was
    warned about (kept by the optimizer between calls; losing it, as a pickle does, only
    repeats a warning).
    """
    if not (starting or watching):
        return
    for piece in pieces:
        key, started = _memory_key(piece), STARTED + piece.suffix
        if started not in state.get(piece.param, ()):
            if starting:
                state[piece.param][started] = True
                memory[key] = _start(piece, state[piece.param], memory.get(key))
            continue
        if not watching:
            continue
        error = penalty.max_error(piece.layout.matrices(piece.view))
        last = memory.get(key)
        if last is not None and error > FAR and error > last:
            _warn(
                f"{piece.name} is moving away from orthonormality: max |ΦᵀΦ - I| rose from {last:.3g} to "
                f"{error:.3g} over the last {WATCH_EVERY} steps. The base optimizer's updates move it faster "
                f"than the soft step pulls it back: use {_stronger_pull(piece.group)}, a lower learning rate, or "
                "ortho_mode='hard'"
            )
            memory[key] = None  # warned: once per parameter
        elif key not in memory or last is not None:
            memory[key] = error


def _start(piece: Piece, state: dict, before: float | None) -> float:
    """ortho_init after a piece's first soft step, judged by its error ``before`` it;
    returns its error now."""
    group, p, layout, name = piece.group, piece.view, piece.layout, piece.name
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
    pull = 4 * float(group["lr"]) * _beta(piece, state)  # the most an entry of R moves per step
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
