r"""Saying so when the soft constraint will not hold: the start, and drift during training.

The soft step pulls each entry of :math:`R = \Phi^\top\Phi - I` towards zero by at most
:math:`2\eta = 4\gamma\beta` per step (:mod:`orthoopt.optim`), so a parameter that starts far
from the manifold needs at least :math:`\max|R| / (4\gamma\beta)` steps to get there.  With
the std-0.02 initialisations of timm and Hugging Face (:math:`\max|R| \approx 1`) and a
learning rate that warms up from nearly zero, that can be longer than the whole run.  And
where the base optimizer's update moves a parameter away faster than the capped step pulls
it back (β below the exactness threshold, or a coherent drift that the step's spectral cap
limits), the error grows during training.  Neither is visible from the loss, so this module
checks, once per parameter at its first soft step and then every ``WATCH_EVERY`` steps
(:class:`Monitor`):

* ``ortho_init="project"``: after its first step a parameter is snapped to its polar factor
  (the nearest point with orthonormal vectors), so it starts on the manifold;
* ``ortho_init="warn"`` (the default): a parameter that is more than ``FAR`` away and that
  the pull needs more than ``FAR_STEPS`` steps to reach gets an :class:`OrthogonalityWarning`
  naming it, its error, the steps needed and the fixes;
* ``ortho_init="keep"``: neither;
* always: a parameter whose error is above ``FAR`` at two checks in a row and not falling
  gets a warning (once), naming it and the fixes, among them ``ortho_tol`` and leaving the
  output layer out of the constraint (a classifier's or language model's head, whose rows
  cannot all be orthonormal to any use);
* with ``ortho_nonfinite="warn"``, on an accelerator: the matrices that held NaN or Inf (the
  step skipped them at once, on the device) are reported at the check.

The drift check costs nothing on the device: the soft step computes every matrix's
``max|R|`` before its update anyway.  Every ``WATCH_EVERY`` steps the monitor copies those of
the watched pieces to the host, asynchronously on an accelerator (no sync), and reads the
copy: on CPU at once, elsewhere at the first step after it has arrived (it asks the device's
event, which does not wait).  So a loss of the constraint is reported within
``2·WATCH_EVERY`` steps (8) of the error passing ``FAR``, a step or two later on an
accelerator: within 10.  The first-step check reads the errors (a sync, once).  The first-step mark
lives in the optimizer state (``ortho_started``), so a resumed run does not project again.
Sharded (FSDP2) and hard-mode parameters are not checked here: hard mode projects at its
first step itself (:mod:`orthoopt.stiefel`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import auto, host, penalty
from .options import report_nonfinite, warn_at_caller
from .pieces import Piece, is_dtensor

__all__ = [
    "OrthogonalityWarning",
    "WATCH_EVERY",
    "FAR",
    "FAR_STEPS",
    "Monitor",
    "watched",
    "before_step",
    "after_step",
    "memory_of",
]

# Every how many optimizer steps the monitor copies the errors to the host.
WATCH_EVERY = 4
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


def memory_of(optimizer: Any) -> dict[str, float | None]:
    """The guard's errors per piece, kept on the optimizer instance (not in its state: losing
    them, as a copy does, only repeats a warning)."""
    return optimizer.__dict__.setdefault("_ortho_memory", {})


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
            memory[_memory_key(piece)] = _error(piece)


@torch.no_grad()
def after_step(pieces: list[Piece], state: Any, memory: dict[str, float | None]) -> None:
    """ortho_init for the pieces that took their first soft step (called after the step
    for which :func:`before_step` ran).

    ``memory``: the start error, then the last error read per piece, None once it was
    warned about (kept by the optimizer between calls; losing it, as a pickle does, only
    repeats a warning).
    """
    for piece in pieces:
        key, started = _memory_key(piece), STARTED + piece.suffix
        if started not in state.get(piece.param, ()):
            state[piece.param][started] = True
            memory[key] = _start(piece, state[piece.param], memory.get(key))


class Monitor:
    """The drift check and the deferred non-finite report, from the errors the soft step
    computes anyway (see the module).  :meth:`watch` takes, every ``WATCH_EVERY`` steps, the
    pieces with their ``max|R|`` per matrix (device tensors) and starts their copy to the
    host; the copy is read where it is free at once, else by :meth:`poll`, at the first step
    after it has arrived."""

    def __init__(self) -> None:
        self._copy: tuple[list[tuple[Piece, int, float]], torch.Tensor, Any] | None = None

    def poll(self, optimizer: Any) -> None:
        """Read the copy of the last check's errors if it has arrived (no wait): called at every
        step, so that a check is read a step or two after it is made."""
        if self._copy is not None and self._arrived():
            pieces, copy, _ = self._copy
            self._copy = None
            self._check(pieces, host.read_copy(copy), optimizer)

    @torch.no_grad()
    def watch(self, entries: list[tuple[list[tuple[Piece, int, float]], torch.Tensor]], optimizer: Any) -> None:
        """``entries``: ``([(piece, its number of matrices, the largest finite max|R| of its
        penalty and dtype), ...], their max|R| per matrix)``."""
        entries = [(pieces, errors) for pieces, errors in entries if not errors.is_meta]
        self.poll(optimizer)
        if not entries or self._copy is not None:
            return
        pieces = [item for found, _ in entries for item in found]
        errors = torch.cat([e.reshape(-1) for _, e in entries])
        if host.reads_free(errors):
            self._check(pieces, host.read(errors), optimizer)
            return
        copy, event = host.copy_to_host(errors)
        self._copy = (pieces, copy, event)

    def _arrived(self) -> bool:
        return self._copy[2] is None or self._copy[2].query()

    def _check(self, pieces: list[tuple[Piece, int, float]], errors: list[float], optimizer: Any) -> None:
        memory = memory_of(optimizer)
        bad: dict[str, list[str]] = {}
        row = 0
        for piece, count, limit in pieces:
            part = errors[row : row + count]
            row += count
            error = max(part)  # NaN where a matrix is not finite (then not below the limit)
            if not all(e <= limit for e in part):
                bad.setdefault(piece.group["ortho_nonfinite"], []).append(piece.name)
                continue
            tol = piece.group.get("ortho_tol")
            if tol is None:
                _drift(piece, error, memory)
            elif error > tol:
                _missed(piece, error, tol, memory)
        for policy, names in bad.items():
            if policy == "warn":  # 'raise' read them at the step; 'skip' says nothing
                report_nonfinite(optimizer, list(dict.fromkeys(names)), policy, NONFINITE_WHAT)


# What the ortho_nonfinite policy's report says the soft step does.
NONFINITE_WHAT = "the orthogonality step skips its non-finite matrices"


def _missed(piece: Piece, error: float, tol: float, memory: dict[str, float | None]) -> None:
    key = _memory_key(piece) + " ortho_tol"
    if key in memory:
        return
    memory[key] = error
    _warn(
        f"{piece.name} is above ortho_tol={tol:.3g} after its correction (max |ΦᵀΦ - I| = {error:.3g}): its "
        "step moved it further than the correction's fixed Newton–Schulz iterations reach (on CPU the polar "
        "factor takes over). Use a lower learning rate, or a larger ortho"
    )


def _drift(piece: Piece, error: float, memory: dict[str, float | None]) -> None:
    key = _memory_key(piece)
    last = memory.get(key)
    # Above FAR at two checks in a row and not falling: a blip above it (a noisy step that the pull
    # undoes) says nothing; a start far away that the pull brings in is falling.
    if last is not None and error > FAR and last > FAR and error >= last:
        goal, measure, _ = _target_words(piece.group)
        _warn(
            f"{piece.name} is moving away from {goal}ity: {measure} rose from {last:.3g} to "
            f"{error:.3g} over the last {WATCH_EVERY} steps. The base optimizer's updates move it faster "
            f"than the soft step pulls it back: use {_stronger_pull(piece.group)}, a lower learning rate, "
            "ortho_tol (a correction that holds the error at any learning rate), or ortho_mode='hard'. "
            "If it is the output layer (a classifier's or language model's head), leave it out of the "
            "constraint (exclude=[its name])"
        )
        memory[key] = None  # warned: once per piece
    elif key not in memory or last is not None:
        memory[key] = error


def _start(piece: Piece, state: dict, before: float | None) -> float:
    """ortho_init after a piece's first soft step, judged by its error ``before`` it;
    returns its error now."""
    group, p, layout, name = piece.group, piece.view, piece.layout, piece.name
    error = _error(piece)
    policy = group["ortho_init"]
    if before is None or not before > (PROJECT_TOL if policy == "project" else FAR):
        return error  # started on the manifold (or no start was read): nothing to do
    if policy == "project":
        if math.isfinite(error):
            p.copy_(layout.from_matrices(penalty.project(layout.matrices(p), group["ortho_target"]), p.shape))
        return _error(piece)
    if policy != "warn":
        return error
    # The most an entry of R moves per step: 2γβ·W_jk, W = 2 for orthonormal vectors.
    lr_beta = float(group["lr"]) * _beta(piece, state)
    pull = 2 * lr_beta * _largest_weight(piece)
    needed = before / pull if pull > 0 else math.inf
    if needed > FAR_STEPS:
        goal, measure, residual = _target_words(group)
        _warn(
            f"{name} starts far from {goal} ({measure} = {before:.3g}): at this step's lr·ortho = "
            f"{lr_beta:.3g} the soft step moves each entry of {residual} by at most {pull:.3g} per step, so it "
            f"needs at least {needed:.3g} steps to get there, more while the learning rate is warming up or "
            "decaying. Start on the manifold with ortho_init='project' (or orthoopt.project_(optimizer) before "
            "training), or use a larger ortho; ortho_init='keep' silences this"
        )
    return error


def _error(piece: Piece) -> float:
    """The error of the piece's own target (:func:`orthoopt.penalty.max_error`)."""
    group = piece.group
    return penalty.max_error(piece.layout.matrices(piece.view), group["ortho_target"], group["ortho_normalize"])


def _largest_weight(piece: Piece) -> float:
    """``max W_jk`` of the soft step's linearisation (:func:`orthoopt.penalty.orthogonal_step`):
    2 for orthonormal vectors, the largest ``q_j + q_k`` of distinct vectors where lengths are free."""
    group = piece.group
    if group["ortho_target"] == "orthonormal":
        return 2.0
    return penalty.largest_weight(piece.layout.matrices(piece.view), group["ortho_normalize"])


def _target_words(group: dict) -> tuple[str, str, str]:
    """What the group's target is, its error and its residual, for messages."""
    if group["ortho_target"] == "orthonormal":
        return "orthonormal", "max |ΦᵀΦ - I|", "ΦᵀΦ - I"
    if group["ortho_normalize"]:
        return "orthogonal", "the largest |cos| of two of its vectors", "its vectors' cosines"
    return "orthogonal", "the largest |dot product| of two of its vectors", "its vectors' dot products"


def _stronger_pull(group: dict) -> str:
    """The soft options that pull harder than the group's own (the drift warning's advice)."""
    ways = [] if group["ortho"] == "auto" else ["ortho='auto' (or a larger ortho)"]
    if group.get("ortho_every", 1) > 1:
        ways.append("ortho_every=1 (a k-fold step meets the step caps)")
    return " or ".join(ways) or "a decaying learning rate"
