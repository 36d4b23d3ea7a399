"""The constrained matrix sets of an optimizer's parameter groups: the one iterator over them.

Every consumer of the constraint (the soft and hard steps, the guard, the errors, the
projection, the checkpoint checks, the sharded step's byte count) walks the groups the same
way: the penalized groups, their parameters, each parameter's layout resolved against its
shape, and the layout's *pieces* (:meth:`orthoopt.layout.Layout.pieces`): one ``(view of the
parameter, simple layout)`` per part that is constrained on its own.  A simple layout has one
piece, the parameter itself; a layout of blocks of unequal sizes (fused q/k/v projections) has
one per block.  :func:`pieces` yields them, with what each consumer needs to name and key them.

A piece after the first keeps its optimizer state under suffixed keys (:attr:`Piece.suffix`), so
that a parameter's state dict holds every piece's state and round-trips through
``state_dict`` as torch's does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .layout import Layout, resolve_layout
from .options import param_key, param_name, penalized

__all__ = ["Piece", "pieces", "parameter_pieces", "split", "is_dtensor"]

if dist.is_available():
    from torch.distributed.tensor import DTensor
else:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(p: torch.Tensor) -> bool:
    """True for a :class:`~torch.distributed.tensor.DTensor` (e.g. a ``fully_shard`` parameter)."""
    return DTensor is not None and isinstance(p, DTensor)


@dataclass(frozen=True)
class Piece:
    """One constrained matrix set: a parameter, or one block of it.

    ``view`` is the piece (the parameter itself for a simple layout) and ``layout`` its simple
    layout; ``whole`` is the parameter's resolved layout, whose :meth:`~Layout.pieces` gives the
    same piece of any tensor of the parameter's shape (its gradient).  ``part`` counts the pieces
    of the parameter from 0, of ``parts``.
    """

    group: dict
    group_index: int
    index: int
    param: torch.Tensor
    name: str  # for messages: "parameter 'w'", or "parameter 'w' (block 2 of 3)"
    key: str  # the parameter's, for logs: "w" (its pieces are told apart by ``suffix``)
    whole: Layout
    layout: Layout
    view: torch.Tensor
    part: int = 0
    parts: int = 1

    @property
    def suffix(self) -> str:
        """The suffix of this piece's optimizer-state keys ('' for the first)."""
        return "" if self.part == 0 else f".{self.part}"

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The same piece of ``t``, a tensor of the parameter's shape (e.g. its gradient)."""
        if self.parts == 1:
            return t
        return self.whole.pieces(t)[self.part][0]


def split(p: torch.Tensor, layout: Layout, name: str) -> list[tuple[torch.Tensor, Layout]]:
    """``layout.pieces(p)``: ``[(p, layout)]`` for a simple layout; a composite layout's blocks
    (refused on a sharded parameter, naming it)."""
    if not layout.composite:
        return [(p, layout)]
    _refuse_sharded_composite(p, layout, name)
    return layout.pieces(p)


def parameter_pieces(group: dict, group_index: int, index: int, p: torch.Tensor) -> list[Piece]:
    """The pieces of one parameter of a penalized group ([] where its layout skips it)."""
    name = param_name(group, index, group_index)
    whole = resolve_layout(group["ortho_layout"], p.shape, name)
    if whole is None:
        return []
    key = param_key(group, index, group_index)
    if not whole.composite:
        return [Piece(group, group_index, index, p, name, key, whole, whole, p)]
    blocks = split(p, whole, name)
    return [
        Piece(
            group,
            group_index,
            index,
            p,
            f"{name} (block {k} of {len(blocks)})",
            key,
            whole,
            layout,
            view,
            k,
            len(blocks),
        )
        for k, (view, layout) in enumerate(blocks)
    ]


def pieces(param_groups: list[dict[str, Any]], *, mode: str | None = None, with_grad: bool = False) -> Iterator[Piece]:
    """Every piece of every parameter of the penalized groups, in the groups' order.

    ``mode``: only the groups of that ``ortho_mode`` ('soft' or 'hard'); ``with_grad``: only
    the parameters that have a gradient (those the base optimizer steps).
    """
    for gi, group in enumerate(param_groups):
        if not penalized(group) or (mode is not None and group["ortho_mode"] != mode):
            continue
        for i, p in enumerate(group["params"]):
            if with_grad and p.grad is None:
                continue
            yield from parameter_pieces(group, gi, i, p)


def _refuse_sharded_composite(p: torch.Tensor, layout: Layout, name: str) -> None:
    # A DTensor's pieces would be slices across the shards: the gather and all-reduce paths
    # of orthoopt.distributed work on whole parameters.
    if is_dtensor(p):
        raise NotImplementedError(
            f"{name} is a DTensor (e.g. from FSDP2's fully_shard) with the layout '{layout}', whose blocks "
            "of unequal sizes the sharded soft step does not split; constrain this parameter with a simple "
            "layout (e.g. row_groups:G where its blocks are equal), or leave it out of the constraint"
        )
