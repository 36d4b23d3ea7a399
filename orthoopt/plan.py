"""The plan of an ortho optimizer's step: built once, kept while nothing it depends on changes.

A :class:`Plan` holds, for the parameters that have a gradient, the soft step's buckets (local
:class:`orthoopt.soft.Bucket` and sharded :class:`orthoopt.distributed.ShardedBucket`, behind one
interface: ``due()``, ``before(optimizer)``, ``after(optimizer)``), the pieces that take a hard
step, and the pieces the guard watches, every layout resolved once (:mod:`orthoopt.pieces`).
The optimizer's ``step()`` is then a few calls::

    plan = self._plan()            # cached
    plan.before(self)              # the soft step at the pre-step weights; hard mode's checks
    with plan.hard_grads_hidden():
        loss = self._base_step(closure)
    plan.hard_step(self)
    plan.after(self)               # 'auto', the update added, ortho_every, the guard

:meth:`Plan.current` says whether a cached plan still holds: it compares what the plan depends
on besides the values of the learning rate and β (which the step reads at every call): the
groups (their number, identity, parameter lists and every ortho option but β's value, with
whether β is ``'auto'``), and, per parameter of a penalized group, whether it has a gradient
(and a sparse one) and where its storage is.  That is one pass over the constrained
parameters; ``add_param_group``, ``load_state_dict`` and unpickling drop the plan outright.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch

from . import distributed, guard, host, penalty, soft, stiefel
from .options import ORTHO_DEFAULTS, penalized
from .pieces import Piece, pieces

__all__ = ["Plan", "Amp", "shadow", "refuse_differentiable"]

# The options that shape the plan: all of them but β's value (read at every step).
_PLANNED = tuple(k for k in ORTHO_DEFAULTS if k != "ortho")
_planned = operator.itemgetter(*_PLANNED)
_NOTHING = contextlib.nullcontext()


class Plan:
    """The buckets, hard pieces and watched pieces of an optimizer's step (see the module).

    ``workspaces``: the buckets keep their workspaces (a plan kept across eager steps); a
    plan built while torch.compile traces the step has none (the compiler plans its own
    buffers), and leaves the guard and the monitor to the optimizer's *shadow* plan, an eager
    one without workspaces (:func:`_traced_start`, :func:`_traced_after`)."""

    def __init__(self, param_groups: list[dict[str, Any]], *, workspaces: bool = True):
        # Built while torch.compile traces the step: its start and finish are the shadow plan's,
        # also where dynamo runs a part of the step eagerly (a frame it cannot trace).
        self.traced = traced = torch.compiler.is_compiling()
        for gi, group in enumerate(param_groups):
            if group.get("differentiable", False) and penalized(group):
                refuse_differentiable(group, gi)
        self.tracked = [p for g in param_groups if penalized(g) for p in g["params"]]
        self.signature = None if traced else _signature(param_groups)
        self.watch = None if traced else _watch(self.tracked)
        soft_pieces: list[Piece] = []
        self.hard: list[Piece] = []
        for piece in pieces(param_groups, with_grad=True):
            if piece.group["ortho_mode"] == "hard":
                distributed.refuse_hard(piece.param, piece.name)
                self.hard.append(piece)
            else:
                soft_pieces.append(piece)
            _refuse_sparse_grad(piece)
        self.buckets = soft.buckets(soft_pieces, workspaces=workspaces)
        # What every step asks of the buckets, known once the plan is made.
        self.local = [bucket for bucket in self.buckets if isinstance(bucket, soft.Bucket)]
        self.correcting = [bucket for bucket in self.local if bucket.tol is not None]
        self.counting = any(bucket.every > 1 for bucket in self.buckets)
        self.watched = guard.watched(soft_pieces)
        self.starting = True  # a new plan may hold pieces at their first soft step
        self._items: list[stiefel.HardItem] = []
        self._due: list[Any] = []
        self._amp: Amp | None = None
        self._started = False

    def current(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether this plan still holds for ``param_groups`` (see the module)."""
        return self.signature == _signature(param_groups) and self.watch == _watch(self.tracked)

    # -- the step protocol ---------------------------------------------------------------
    def before(self, optimizer: Any) -> None:
        """Before the base step: hard mode's checks (nothing has changed when they raise), the
        start of new pieces for ``ortho_init``, and every due bucket's soft step."""
        self._amp = Amp.of(optimizer)
        hard_skipped = self._amp is not None and self.hard and self._amp.read_found()
        self._items = [] if hard_skipped else self._hard_items(self._amp)
        stiefel.check(optimizer, self._items)
        self._started = False
        if host.capturing():
            pass  # the start reads values (a sync): a capture follows eager warm-up steps
        elif self.traced:
            _traced_start(optimizer, None if self._amp is None else self._amp.found_inf)
        elif self.starting:
            self.start(optimizer, self._amp)
        self._due = [bucket for bucket in self.buckets if bucket.due()]
        for bucket in self._due:
            bucket.before(optimizer, self._amp)

    def _hard_items(self, amp: Amp | None) -> list[stiefel.HardItem]:
        unscale = None if amp is None else amp.unscale()
        return [
            stiefel.HardItem(
                piece.param,
                piece.layout,
                piece.param.grad,
                piece.group,
                piece.name,
                view=piece.view,
                grad_view=piece.of(piece.param.grad),
                suffix=piece.suffix,
                unscale=unscale,
            )
            for piece in self.hard
        ]

    def hard_grads_hidden(self) -> contextlib.AbstractContextManager:
        """Around the base step: the hard pieces' parameters have no gradient (it skips them)."""
        if not self.hard:
            return _NOTHING
        return stiefel.grads_hidden([_hidden(piece) for piece in self.hard])

    def hard_step(self, optimizer: Any) -> None:
        if self._items:
            stiefel.step_(optimizer, self._items)
            self._items = []

    def after(self, optimizer: Any) -> None:
        """After the base step: each due bucket's 'auto' step and update, the ``ortho_every``
        counts, ``ortho_init`` for new pieces, and the monitor at its cadence."""
        due, self._due = self._due, []
        amp, self._amp = self._amp, None
        for bucket in due:
            bucket.after(optimizer, amp)
        for bucket in self.correcting:  # every step, due or not: the base step moved them
            bucket.correct(optimizer)
        if not (amp is not None and self.counting and amp.read_found()):
            soft.advance(optimizer.param_groups)  # a step that found_inf skips does not count
        errors = [bucket.errors for bucket in self.local]
        if host.capturing():
            return  # the replays of a CUDA graph run no Python: no count, no monitor
        if self.traced:
            _traced_after(optimizer, errors)
        else:
            self.finish(optimizer, errors)

    # -- the guard and the monitor (eager: for a traced step, run by its shadow plan) ------------
    def start(self, optimizer: Any, amp: Amp | None) -> None:
        """Read where new pieces start (ortho_init), unless this step is one a GradScaler skips."""
        if amp is None or not amp.read_found():
            guard.before_step(self.watched, optimizer.state, guard.memory_of(optimizer))
            self._started = True

    def finish(self, optimizer: Any, errors: list[list[torch.Tensor]]) -> None:
        """ortho_init for new pieces after their first step; the monitor at its cadence, with
        ``errors``, the buckets' ``max|R|`` of their last steps."""
        if not self.buckets:
            return
        if self._started:
            self.starting = self._started = False
            guard.after_step(self.watched, optimizer.state, guard.memory_of(optimizer))
        steps = optimizer.__dict__["_ortho_steps"] = optimizer.__dict__.get("_ortho_steps", 0) + 1
        monitor = optimizer.__dict__.get("_ortho_monitor")
        if monitor is None:
            monitor = optimizer.__dict__["_ortho_monitor"] = guard.Monitor()
        if steps % guard.WATCH_EVERY == 0:
            monitor.watch(self._errors(errors), optimizer)
        else:
            monitor.poll(optimizer)

    def _errors(self, errors: list[list[torch.Tensor]]) -> list[tuple[list[tuple[Piece, int, float]], torch.Tensor]]:
        """The watched pieces with their latest ``max|R|`` per matrix (``errors``: per soft
        bucket, per chunk)."""
        watched = {id(piece) for piece in self.watched}
        entries = []
        for bucket, found in zip(self.local, errors):
            if not found:
                continue
            limit = penalty.largest_residual(bucket.kind, found[0].dtype)
            for chunk, chunk_errors in zip(bucket.chunks or [bucket.whole()], found):
                pieces = bucket.pieces[chunk.params]
                if all(id(piece) in watched for piece in pieces):
                    entries.append(([(pc, count, limit) for pc, count in zip(pieces, chunk.counts)], chunk_errors))
        return entries

    def workspace_bytes(self) -> int:
        """Bytes held by the soft buckets' workspaces."""
        return sum(bucket.workspace_bytes() for bucket in self.local)


class Amp:
    """What a GradScaler hands a base optimizer that unscales and skips itself (``fused=True``
    sets ``_step_supports_amp_scaling``): the scale the gradients still carry (None where
    ``unscale_`` was called) and ``found_inf`` (1.0 where they hold Inf or NaN: no step).

    The soft step is masked on the device by ``keep = 1 - found_inf`` (no sync); hard mode and
    ``ortho_every`` read ``found_inf`` (:meth:`read_found`: a sync on an accelerator, free on
    CPU), as does the first soft step, once.
    """

    def __init__(self, found_inf: torch.Tensor, grad_scale: torch.Tensor | None):
        self.found_inf, self.grad_scale = found_inf, grad_scale
        self._found: bool | None = None
        self.skipped = self.read_found() if host.reads_free(found_inf) else None
        self.keep = None if self.skipped is not None else torch.rsub(found_inf, 1)
        self.found = None if self.skipped is not None else found_inf.bool()

    @classmethod
    def of(cls, optimizer: Any) -> Amp | None:
        found_inf = optimizer.__dict__.get("found_inf")
        return None if found_inf is None else cls(found_inf, optimizer.__dict__.get("grad_scale"))

    def read_found(self) -> bool:
        if self._found is None:
            self._found = bool(self.found_inf.item())
        return self._found

    def unscale(self) -> torch.Tensor | None:
        """``1/scale`` as GradScaler's ``unscale_`` computes it (a float32 reciprocal of the
        float64 scale), or None where the gradients are unscaled."""
        return None if self.grad_scale is None else self.grad_scale.double().reciprocal().float()


def _hidden(piece: Piece) -> stiefel.HardItem:
    return stiefel.HardItem(piece.param, piece.layout, piece.param.grad, piece.group, piece.name)


@torch.compiler.disable
def _traced_start(optimizer: Any, found_inf: torch.Tensor | None) -> None:
    """The start of new pieces for a step torch.compile traces: run eagerly (a graph break),
    by the optimizer's shadow plan."""
    plan = shadow(optimizer)
    if plan.starting:
        plan.start(optimizer, None if found_inf is None else Amp(found_inf, None))


@torch.compiler.disable
def _traced_after(optimizer: Any, errors: list[list[torch.Tensor]]) -> None:
    """The guard and the monitor after a step torch.compile traces, with the traced
    buckets' errors: run eagerly (a graph break), by the optimizer's shadow plan."""
    shadow(optimizer).finish(optimizer, errors)


def shadow(optimizer: Any) -> Plan:
    """The eager plan, without workspaces, that keeps the guard's and the monitor's state for
    the steps that torch.compile traces (their own plans live in the trace)."""
    plan = optimizer.__dict__.get("_ortho_shadow")
    if plan is None or not plan.current(optimizer.param_groups):
        plan = optimizer.__dict__["_ortho_shadow"] = Plan(optimizer.param_groups, workspaces=False)
    return plan


def _signature(param_groups: list[dict[str, Any]]) -> tuple:
    return tuple(
        (id(g), id(g["params"]), len(g["params"]), g.get("differentiable", False), g["ortho"] == "auto", _options(g))
        if penalized(g)
        else (id(g), None)
        for g in param_groups
    )


def _options(group: dict[str, Any]) -> tuple:
    try:
        return _planned(group)
    except KeyError:  # a group without an option: as if None
        return tuple(group.get(k) for k in _PLANNED)


def _watch(tracked: list[torch.Tensor]) -> tuple:
    return tuple((None if p.grad is None else p.grad.is_sparse, p.data_ptr()) for p in tracked)


def _refuse_sparse_grad(piece: Piece) -> None:
    # Checked when the plan is made: a gradient that turns sparse changes the plan's watch.
    if piece.param.grad.is_sparse:
        raise TypeError(f"{piece.name} has a sparse gradient, which orthoopt does not support; use a dense one")


def refuse_differentiable(group: dict, group_index: int) -> None:
    raise ValueError(
        f"param group {group_index}: differentiable=True with ortho={group['ortho']!r}: orthoopt's "
        "orthogonality step is not differentiable, so autograd through step() would treat it as a "
        "constant and give wrong gradients. Put the parameters you differentiate through in a group "
        "with ortho=0, or use differentiable=False"
    )
