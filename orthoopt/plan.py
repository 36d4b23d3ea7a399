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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import distributed, guard, soft, stiefel
from .options import ORTHO_DEFAULTS, penalized
from .pieces import Piece, pieces

__all__ = ["Plan", "refuse_differentiable"]

# The options that shape the plan: all of them but β's value (read at every step).
_PLANNED = tuple(k for k in ORTHO_DEFAULTS if k != "ortho")


class Plan:
    """The buckets, hard pieces and watched pieces of an optimizer's step (see the module).

    ``cached``: the plan is kept across steps, with its buckets' workspaces; a plan built
    while torch.compile traces the step is not (the compiler plans its own buffers)."""

    def __init__(self, param_groups: list[dict[str, Any]], *, cached: bool = True):
        self.cached = cached
        for gi, group in enumerate(param_groups):
            if group.get("differentiable", False) and penalized(group):
                refuse_differentiable(group, gi)
        self.tracked = [p for g in param_groups if penalized(g) for p in g["params"]]
        self.signature = _signature(param_groups) if cached else None
        self.watch = _watch(self.tracked) if cached else None
        soft_pieces: list[Piece] = []
        self.hard: list[Piece] = []
        for piece in pieces(param_groups, with_grad=True):
            if piece.group["ortho_mode"] == "hard":
                distributed.refuse_hard(piece.param, piece.name)
                self.hard.append(piece)
            else:
                soft.check_gradient(piece)
                soft_pieces.append(piece)
        self.buckets = soft.buckets(soft_pieces, workspaces=cached)
        self.watched = guard.watched(soft_pieces)
        self.starting = True  # a new plan may hold pieces at their first soft step
        self._items: list[stiefel.HardItem] = []
        self._due: list[Any] = []

    def current(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether this plan still holds for ``param_groups`` (see the module)."""
        return self.signature == _signature(param_groups) and self.watch == _watch(self.tracked)

    # -- the step protocol ---------------------------------------------------------------
    def before(self, optimizer: Any) -> None:
        """Before the base step: hard mode's checks (nothing has changed when they raise), the
        start of new pieces for ``ortho_init``, and every due bucket's soft step."""
        self._items = [
            stiefel.HardItem(
                piece.param,
                piece.layout,
                piece.param.grad,
                piece.group,
                piece.name,
                view=piece.view,
                grad_view=piece.of(piece.param.grad),
                suffix=piece.suffix,
            )
            for piece in self.hard
        ]
        stiefel.check(optimizer, self._items)
        if self.starting and not torch.compiler.is_compiling():
            guard.before_step(self.watched, optimizer.state, _memory(optimizer))
        self._due = [bucket for bucket in self.buckets if bucket.due()]
        for bucket in self._due:
            bucket.before(optimizer)

    @contextmanager
    def hard_grads_hidden(self) -> Iterator[None]:
        """Around the base step: the hard pieces' parameters have no gradient (it skips them)."""
        with stiefel.grads_hidden(self._items):
            yield

    def hard_step(self, optimizer: Any) -> None:
        stiefel.step_(optimizer, self._items)
        self._items = []

    def after(self, optimizer: Any) -> None:
        """After the base step: each due bucket's 'auto' step and update, the ``ortho_every``
        counts, and the guard at its cadence."""
        due, self._due = self._due, []
        for bucket in due:
            bucket.after(optimizer)
        soft.advance(optimizer.param_groups)
        starting, self.starting = self.starting, False
        if self.buckets and not torch.compiler.is_compiling():
            steps = optimizer.__dict__["_ortho_steps"] = optimizer.__dict__.get("_ortho_steps", 0) + 1
            watching = steps % guard.WATCH_EVERY == 0
            guard.after_step(self.watched, optimizer.state, _memory(optimizer), starting=starting, watching=watching)

    def workspace_bytes(self) -> int:
        """Bytes held by the soft buckets' workspaces."""
        return sum(bucket.workspace_bytes() for bucket in self.buckets if isinstance(bucket, soft.Bucket))


def _memory(optimizer: Any) -> dict[str, float | None]:
    # The guard's errors per piece, kept on the instance (not in its state: losing them, as a
    # copy does, only repeats a warning).
    return optimizer.__dict__.setdefault("_ortho_memory", {})


def _signature(param_groups: list[dict[str, Any]]) -> tuple:
    return tuple(
        (id(g), id(g["params"]), len(g["params"]), g.get("differentiable", False), g["ortho"] == "auto")
        + tuple(g.get(k) for k in _PLANNED)
        if penalized(g)
        else (id(g), None)
        for g in param_groups
    )


def _watch(tracked: list[torch.Tensor]) -> tuple:
    return tuple((None if p.grad is None else p.grad.is_sparse, p.data_ptr()) for p in tracked)


def refuse_differentiable(group: dict, group_index: int) -> None:
    raise ValueError(
        f"param group {group_index}: differentiable=True with ortho={group['ortho']!r}: orthoopt's "
        "orthogonality step is not differentiable, so autograd through step() would treat it as a "
        "constant and give wrong gradients. Put the parameters you differentiate through in a group "
        "with ortho=0, or use differentiable=False"
    )
