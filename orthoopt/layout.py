"""Parameter layouts: which vectors of a parameter must be orthonormal.

A layout maps a parameter tensor to a stack of matrices of shape ``(m, l, n)``
whose *columns* are to be orthonormal, ``Φ_iᵀ Φ_i = I_n``.  The stack is a view
of the parameter wherever strides allow, so an in-place update of the stack is
an update of the parameter.

Layouts are named by short strings, so that they can live in an optimizer's
``param_groups`` and survive ``torch.load(weights_only=True)``:

============================  ==========================================================
``"auto"``                    the rule of :func:`torch.nn.init.orthogonal_`: view the
                              parameter as ``(size(0), numel/size(0))`` and make the
                              shorter side orthonormal (rows of a wide ``nn.Linear``
                              weight, columns of a tall one, conv filters when they fit)
``"rows"``                    ``(out, ...)`` seen as ``(out, numel/out)``: the ``out``
                              rows are orthonormal; for a conv weight these are its
                              filters of length ``in·kh·kw`` (``"filters"`` is an alias)
``"columns"``                 ``(out, ...)`` seen as ``(out, numel/out)``: its columns
                              are orthonormal
``"group_axis:D"``            3-D: the group tensor; ``Φ_i = phi.select(D, i)`` and the
                              other two axes, in order, are ``l`` and ``n``
``"column_groups:H"``         2-D ``(out, in)``: the ``in`` columns split into ``H`` equal
                              groups (attention heads), each orthonormal on its own
``"row_groups:G"``            2-D ``(out, in)``: the ``out`` rows split into ``G`` equal
                              blocks (an LSTM's gates, attention's q/k/v), each on its
                              own and by the ``"auto"`` rule: a block ``(out/G, in)``
                              has orthonormal rows when ``out/G <= in``, else
                              orthonormal columns, as :func:`torch.nn.init.orthogonal_`
                              applied to each block makes them
============================  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["Layout", "resolve_layout", "canonical_layout", "as_matrices", "LAYOUT_NAMES"]

LAYOUT_NAMES = ("auto", "rows", "columns", "group_axis:D", "column_groups:H", "row_groups:G")


@dataclass(frozen=True)
class Layout:
    """A resolved layout: ``kind`` is one of rows/columns/group_axis/column_groups/row_groups.

    ``tall`` (row_groups only) says which side of each block is orthonormal: its columns
    when the blocks are taller than wide, else its rows; :func:`resolve_layout` sets it
    from the shape.
    """

    kind: str
    arg: int | None = None
    tall: bool = False

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    # -- the map parameter -> stack of matrices -------------------------------------
    def stack_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """``(m, l, n)`` of the stack for a parameter of ``shape`` (no feasibility check)."""
        if self.kind in ("rows", "columns"):
            flat = 1
            for s in shape[1:]:
                flat *= s
            return (1, flat, shape[0]) if self.kind == "rows" else (1, shape[0], flat)
        if self.kind == "group_axis":
            rest = [s for d, s in enumerate(shape) if d != self.arg]
            return (shape[self.arg], rest[0], rest[1])
        if self.kind == "column_groups":
            return (self.arg, shape[0], shape[1] // self.arg)
        if self.kind == "row_groups":
            block = shape[0] // self.arg
            return (self.arg, block, shape[1]) if self.tall else (self.arg, shape[1], block)
        raise AssertionError(self.kind)

    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        """The stack ``(m, l, n)``; a view of ``p`` unless ``p``'s strides forbid one."""
        if self.kind == "rows":
            return p.reshape(p.shape[0], -1).t().unsqueeze(0)
        if self.kind == "columns":
            return p.reshape(p.shape[0], -1).unsqueeze(0)
        if self.kind == "group_axis":
            return p.movedim(self.arg, 0)
        if self.kind == "column_groups":
            return p.reshape(p.shape[0], self.arg, -1).transpose(0, 1)
        if self.kind == "row_groups":
            blocks = p.reshape(self.arg, -1, p.shape[1])
            return blocks if self.tall else blocks.mT
        raise AssertionError(self.kind)

    def from_matrices(self, stack: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The inverse of :meth:`matrices`: a stack ``(m, l, n)`` back in the parameter's shape."""
        if self.kind == "rows":
            return stack.squeeze(0).t().reshape(shape)
        if self.kind == "columns":
            return stack.squeeze(0).reshape(shape)
        if self.kind == "group_axis":
            return stack.movedim(0, self.arg)
        if self.kind == "column_groups":
            return stack.transpose(0, 1).reshape(shape)
        if self.kind == "row_groups":
            return (stack if self.tall else stack.mT).reshape(shape)
        raise AssertionError(self.kind)

    def pieces(self, p: torch.Tensor) -> list[tuple[torch.Tensor, Layout]]:
        """The parts of ``p`` that are constrained each on its own, as ``(view of p, layout of
        that view)``.  A simple layout has one piece, ``p`` itself; a layout of blocks of
        unequal sizes (fused projections) has one per block, each a view of ``p`` with a
        simple layout, so that every consumer (the soft and hard steps, the errors, the
        projection) works on the pieces as on parameters."""
        return [(p, self)]

    def check(self, shape: torch.Size | tuple[int, ...], name: str, mode: str = "soft") -> None:
        """Raise ValueError naming ``name`` if the layout does not fit ``shape``."""
        if len(shape) < 2:
            raise ValueError(
                f"{name}: layout '{self}' needs a parameter of 2 or more dimensions, got shape "
                f"{tuple(shape)}; put 0-D and 1-D parameters in a group with ortho=0"
            )
        need = {"column_groups": 2, "row_groups": 2, "group_axis": 3}.get(self.kind)
        if need is not None and len(shape) != need:
            raise ValueError(
                f"{name}: layout '{self}' needs a {need}-D parameter, got shape {tuple(shape)}; "
                f"use ortho_layout='auto' or one of {', '.join(LAYOUT_NAMES)}"
            )
        if self.kind == "group_axis" and not -3 <= self.arg < 3:
            raise ValueError(
                f"{name}: layout '{self}' names axis {self.arg}, but the parameter has 3 axes "
                f"(-3..2: 0, 1, 2, or -3, -2, -1 from the end); use group_axis:0, group_axis:1 or group_axis:2"
            )
        if self.kind == "column_groups" and (self.arg < 1 or shape[1] % self.arg):
            raise ValueError(
                f"{name}: layout '{self}' splits {shape[1]} columns into {self.arg} equal groups, "
                f"which does not divide; choose a number of groups that divides {shape[1]}"
            )
        if self.kind == "row_groups" and (self.arg < 1 or shape[0] % self.arg):
            raise ValueError(
                f"{name}: layout '{self}' splits {shape[0]} rows into {self.arg} equal blocks, "
                f"which does not divide; choose a number of blocks that divides {shape[0]}"
            )
        _, length, count = self.stack_shape(shape)
        if count > length:
            raise ValueError(
                f"{name}: layout '{self}' asks for {count} orthonormal vectors of length {length} "
                f"(shape {tuple(shape)}), which is impossible: at most {length} vectors of length "
                f"{length} can be orthonormal. {_suggestion(self)}"
            )


def _suggestion(layout: Layout) -> str:
    return {
        "rows": "Use ortho_layout='columns' (or 'auto').",
        "columns": "Use ortho_layout='rows' (or 'auto').",
        "group_axis": "Choose another group axis so that the matrices are tall (l >= n).",
        "column_groups": "Use fewer, larger groups only if they stay tall, or 'rows' instead.",
        "row_groups": "Leave 'tall' to resolve_layout, which picks the shorter side of each block.",
    }[layout.kind]


@lru_cache(maxsize=256)
def _parse(spec: str) -> Layout:
    kind, _, arg = spec.partition(":")
    if kind in ("auto", "rows", "columns", "filters") and not arg:
        return Layout("rows" if kind == "filters" else kind)
    if kind in ("group_axis", "column_groups", "row_groups") and arg.lstrip("-").isdigit():
        return Layout(kind, int(arg))
    raise ValueError(
        f"unknown layout {spec!r}; expected one of {', '.join(LAYOUT_NAMES)} (D an axis, H and G numbers of groups)"
    )


def canonical_layout(spec: str | Layout, name: str = "ortho_layout") -> str:
    """Validate a layout given as a string or :class:`Layout`; return its string form."""
    if isinstance(spec, Layout):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"{name} must be a layout string such as 'auto' or 'group_axis:1', got {spec!r}")
    try:
        return str(_parse(spec))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def resolve_layout(spec: str | Layout, shape: torch.Size | tuple[int, ...], name: str) -> Layout | None:
    """The concrete layout of a parameter, or None when it is left unpenalized.

    'auto' skips 0-D and 1-D parameters (biases, norms); an explicit layout on them
    is an error.  Empty parameters have nothing to constrain and are skipped.  The returned layout has been checked against ``shape``.
    """
    layout = _parse(canonical_layout(spec))
    if len(shape) >= 2 and math.prod(shape) == 0:
        return None  # an empty parameter has no vectors to constrain
    if layout.kind == "auto":
        if len(shape) < 2:
            return None
        rows, cols = shape[0], 1
        for s in shape[1:]:
            cols *= s
        layout = Layout("rows" if rows <= cols else "columns")
    elif layout.kind == "group_axis" and len(shape) == 3 and -3 <= layout.arg < 0:
        layout = Layout("group_axis", layout.arg + 3)  # below -3 is left for check to refuse
    elif layout.kind == "row_groups" and len(shape) == 2 and layout.arg >= 1 and shape[0] % layout.arg == 0:
        # each block by init.orthogonal_'s rule: its rows unless it is taller than wide
        layout = Layout("row_groups", layout.arg, tall=shape[0] // layout.arg > shape[1])
    layout.check(shape, name)
    return layout


def as_matrices(phi: torch.Tensor, group_dim: int | None) -> torch.Tensor:
    """The functional API's view: a 3-D ``phi`` with a group axis, or one 2-D matrix."""
    if group_dim is None:
        if phi.dim() != 2:
            raise ValueError(f"phi: group_dim=None needs a 2-D matrix, got shape {tuple(phi.shape)}")
        return phi.unsqueeze(0)
    if phi.dim() != 3:
        raise ValueError(
            f"phi: expected a 3-D tensor (l, m, n) with group_dim={group_dim}, got shape "
            f"{tuple(phi.shape)}; pass group_dim=None for a single 2-D matrix"
        )
    if not -3 <= group_dim < 3:
        raise ValueError(f"group_dim={group_dim} is not an axis of a 3-D tensor; use 0, 1 or 2")
    return phi.movedim(group_dim, 0)
