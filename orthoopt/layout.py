"""Parameter layouts: which vectors of a parameter must be orthonormal.

A layout maps a parameter tensor to a stack of matrices of shape ``(m, l, n)``
whose *columns* are to be orthonormal, ``Φ_iᵀ Φ_i = I_n``.  The stack is a view
of the parameter wherever strides allow, so an in-place update of the stack is
an update of the parameter.

Layouts are named by short strings, so that they can live in an optimizer's
``param_groups`` and survive ``torch.load(weights_only=True)`` (docs/layouts.md has them in a
table, with which modules get which):

* ``"auto"``: the rule of :func:`torch.nn.init.orthogonal_`: view the parameter as
  ``(size(0), numel/size(0))`` and make the shorter side orthonormal (rows of a wide
  ``nn.Linear`` weight, columns of a tall one, conv filters when they fit);
* ``"rows"`` (alias ``"filters"``): ``(out, ...)`` seen as ``(out, numel/out)``, its ``out`` rows
  orthonormal; for a conv weight these are its filters of length ``in·kh·kw``;
* ``"columns"``: the columns of that view;
* ``"group_axis:D"``: a 3-D group tensor, ``Φ_i = phi.select(D, i)``, the other two axes, in
  order, ``l`` and ``n``;
* ``"column_groups:H"``: a 2-D ``(out, in)`` whose ``in`` columns split into ``H`` equal groups
  (attention heads), each orthonormal on its own;
* ``"row_groups:G"``: the ``out`` rows of the ``(out, numel/out)`` view split into ``G`` equal
  blocks (an LSTM's gates, attention's q/k/v, the groups of a grouped convolution, whose
  weight ``(out, in/G, kh, kw)`` gives blocks ``(out/G, in/G·kh·kw)``), each by the ``"auto"``
  rule, as :func:`torch.nn.init.orthogonal_` applied to each block makes them;
* ``"row_blocks:a,b,c"``: consecutive blocks of ``a``, ``b`` and ``c`` rows (unequal sizes: q, k
  and v of grouped-query attention), each a matrix of its own by the ``"auto"`` rule; a block
  written ``~c`` holds ``c`` rows left free (the per-level gates of a focal modulation);
* ``"row_blocks:Hx(a,b,c)"``: rows that run ``H`` times (heads) through blocks of ``a``, ``b`` and
  ``c`` rows, the ``j``-th block of every head together one matrix (q, k and v laid out head by
  head); sections join with ``+``: ``"row_blocks:a+Hx(b,c)"`` is ``a`` rows, then ``H`` heads of
  ``b`` and ``c`` rows (a parallel block's MLP rows, then its differential attention's two
  queries interleaved head by head).

The blocks of ``row_blocks`` differ in size, so they make no single stack: such a layout
is *composite* (:class:`RowBlocks`), and :meth:`Layout.pieces` gives one ``(view of the
parameter, simple layout of that view)`` per block, every view sharing the parameter's storage.  A block that runs
through the heads is a strided view ``(H, rows, ...)``, whose simple layout folds its first
two axes into its rows (``Layout.fold``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["Layout", "RowBlocks", "Section", "resolve_layout", "canonical_layout", "as_matrices", "LAYOUT_NAMES"]

LAYOUT_NAMES = (
    "auto",
    "rows",
    "columns",
    "group_axis:D",
    "column_groups:H",
    "row_groups:G",
    "row_blocks:a,b,...",
    "row_blocks:Hx(a,b,...)",
    "row_blocks:a+Hx(b,c)+...",
)


@dataclass(frozen=True)
class Layout:
    """A resolved simple layout: ``kind`` is one of rows/columns/group_axis/column_groups/row_groups.

    ``tall`` (row_groups only) says which side of each block is orthonormal: its columns
    when the blocks are taller than wide, else its rows; :func:`resolve_layout` sets it
    from the shape.  ``fold`` (rows and columns) is how many leading axes make up the rows
    (2 for a block of a head-by-head projection, a view ``(heads, rows, in)``).
    """

    kind: str
    arg: int | None = None
    tall: bool = False
    fold: int = 1

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @property
    def composite(self) -> bool:
        """Whether the layout splits a parameter into several pieces: a layout of blocks of
        different shapes (:class:`RowBlocks`) overrides :meth:`pieces`."""
        return type(self).pieces is not Layout.pieces

    # -- the map parameter -> stack of matrices -------------------------------------
    def stack_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """``(m, l, n)`` of the stack for a parameter of ``shape`` (no feasibility check)."""
        if self.kind in ("rows", "columns"):
            out, flat = math.prod(shape[: self.fold]), math.prod(shape[self.fold :])
            return (1, flat, out) if self.kind == "rows" else (1, out, flat)
        if self.kind == "group_axis":
            rest = [s for d, s in enumerate(shape) if d != self.arg]
            return (shape[self.arg], rest[0], rest[1])
        if self.kind == "column_groups":
            return (self.arg, shape[0], shape[1] // self.arg)
        if self.kind == "row_groups":
            block, flat = shape[0] // self.arg, math.prod(shape[1:])
            return (self.arg, block, flat) if self.tall else (self.arg, flat, block)
        raise AssertionError(self.kind)

    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        """The stack ``(m, l, n)``; a view of ``p`` unless ``p``'s strides forbid one."""
        if self.kind == "rows":
            return p.reshape(math.prod(p.shape[: self.fold]), -1).t().unsqueeze(0)
        if self.kind == "columns":
            return p.reshape(math.prod(p.shape[: self.fold]), -1).unsqueeze(0)
        if self.kind == "group_axis":
            return p.movedim(self.arg, 0)
        if self.kind == "column_groups":
            return p.reshape(p.shape[0], self.arg, -1).transpose(0, 1)
        if self.kind == "row_groups":
            blocks = p.reshape(self.arg, p.shape[0] // self.arg, -1)
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
        unequal sizes (fused projections, :class:`RowBlocks`) has one per block, each a view
        of ``p`` with a simple layout, so that every consumer (the soft and hard steps, the
        errors, the projection) works on the pieces as on parameters."""
        return [(p, self)]

    def piece_shapes(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shape of each piece of a parameter of ``shape`` (:meth:`pieces`)."""
        return [tuple(shape)]

    def stack_shapes(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[int, int, int]]:
        """``(m, l, n)`` of each piece's stack."""
        return [self.stack_shape(shape)]

    def check(self, shape: torch.Size | tuple[int, ...], name: str, mode: str = "soft") -> None:
        """Raise ValueError naming ``name`` if the layout does not fit ``shape``."""
        if len(shape) < 2:
            raise ValueError(
                f"{name}: layout '{self}' needs a parameter of 2 or more dimensions, got shape "
                f"{tuple(shape)}; put 0-D and 1-D parameters in a group with ortho=0"
            )
        need = {"column_groups": 2, "group_axis": 3}.get(self.kind)
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
        if self.kind in ("rows", "columns") and not 1 <= self.fold < len(shape):
            raise ValueError(f"{name}: layout '{self}' folds {self.fold} axes into rows of a {len(shape)}-D view")
        _, length, count = self.stack_shape(shape)
        if count > length:
            raise ValueError(
                f"{name}: layout '{self}' asks for {count} orthonormal vectors of length {length} "
                f"(shape {tuple(shape)}), which is impossible: at most {length} vectors of length "
                f"{length} can be orthonormal. {_suggestion(self)}"
            )


@dataclass(frozen=True)
class Section:
    """Consecutive rows of a row_blocks layout: ``repeat`` times (heads) the blocks ``sizes``;
    ``free`` holds the indices of the blocks left free (written ``~c``)."""

    repeat: int
    sizes: tuple[int, ...]
    free: tuple[int, ...] = ()

    def __str__(self) -> str:
        inner = ",".join(("~" if j in self.free else "") + str(size) for j, size in enumerate(self.sizes))
        return f"{self.repeat}x({inner})" if self.repeat > 1 else inner

    @property
    def rows(self) -> int:
        return self.repeat * sum(self.sizes)


@dataclass(frozen=True)
class RowBlocks(Layout):
    """A composite layout: the rows in sections of blocks (:class:`Section`), each block of a
    section (through its heads) one matrix, of the simple layout in ``parts`` once resolved.
    Blocks of different sizes make no single stack: :meth:`pieces` gives one view per block."""

    kind: str = "row_blocks"
    sections: tuple[Section, ...] = ()
    parts: tuple[Layout, ...] = ()

    def __str__(self) -> str:
        return "row_blocks:" + "+".join(map(str, self.sections))

    def _blocks(self) -> list[tuple[int, Section, int, int]]:
        """``(row offset of the section, section, offset of the block in a head, block size)``
        of every constrained block, in order."""
        out, offset = [], 0
        for section in self.sections:
            for j, size in enumerate(section.sizes):
                if j not in section.free:
                    out.append((offset, section, sum(section.sizes[:j]), size))
            offset += section.rows
        return out

    def pieces(self, p: torch.Tensor) -> list[tuple[torch.Tensor, Layout]]:
        if len(self.parts) != len(self._blocks()):
            raise ValueError(f"layout '{self}' is not resolved: take it from resolve_layout(spec, shape, name)")
        views = []
        for offset, section, start, size in self._blocks():
            rows = p.narrow(0, offset, section.rows)
            if section.repeat == 1:
                views.append(rows.narrow(0, start, size))
            else:
                views.append(rows.unflatten(0, (section.repeat, sum(section.sizes))).narrow(1, start, size))
        return list(zip(views, self.parts))

    def piece_shapes(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[int, ...]]:
        rest = tuple(shape[1:])
        return [
            ((size,) if section.repeat == 1 else (section.repeat, size)) + rest
            for _, section, _, size in self._blocks()
        ]

    def stack_shapes(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[int, int, int]]:
        return [part.stack_shape(s) for part, s in zip(self.parts, self.piece_shapes(shape))]

    def stack_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        raise self._no_stack("stack_shape")

    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        raise self._no_stack("matrices")

    def from_matrices(self, stack: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        raise self._no_stack("from_matrices")

    def _no_stack(self, what: str) -> TypeError:
        return TypeError(
            f"layout '{self}' has blocks of different sizes, which make no single stack of matrices; "
            f"{what} applies to each of its pieces: for view, layout in layout.pieces(p)"
        )

    def check(self, shape: torch.Size | tuple[int, ...], name: str, mode: str = "soft") -> None:
        if len(shape) < 2:
            raise ValueError(
                f"{name}: layout '{self}' needs a parameter of 2 or more dimensions, got shape "
                f"{tuple(shape)}; put 0-D and 1-D parameters in a group with ortho=0"
            )
        total = sum(section.rows for section in self.sections)
        if total != shape[0]:
            held = " + ".join(
                f"{s.repeat} heads x ({' + '.join(map(str, s.sizes))})"
                if s.repeat > 1
                else " + ".join(map(str, s.sizes))
                for s in self.sections
            )
            raise ValueError(
                f"{name}: layout '{self}' has {held} = {total} rows, but the parameter has {shape[0]} "
                f"(shape {tuple(shape)}); give block sizes whose sum (times the heads) is {shape[0]}"
            )
        if len(self.parts) != len(self._blocks()):
            raise ValueError(f"{name}: layout '{self}' is not resolved: take it from resolve_layout")
        for k, (part, s, (_, section, _, size)) in enumerate(zip(self.parts, self.piece_shapes(shape), self._blocks())):
            part.check(s, f"{name} (block {k} of layout '{self}', {section.repeat * size} rows)", mode)


def _suggestion(layout: Layout) -> str:
    return {
        "rows": "Use ortho_layout='columns' (or 'auto').",
        "columns": "Use ortho_layout='rows' (or 'auto').",
        "group_axis": "Choose another group axis so that the matrices are tall (l >= n).",
        "column_groups": "Use fewer, larger groups only if they stay tall, or 'rows' instead.",
        "row_groups": "Leave 'tall' to resolve_layout, which picks the shorter side of each block.",
    }[layout.kind]


def _section(text: str) -> Section | None:
    """A section ``"a,b,~c"`` or ``"Hx(a,b,~c)"`` of a row_blocks layout; None if malformed."""
    repeat = "1"
    if text.endswith(")") and "x(" in text:
        repeat, _, text = text[:-1].partition("x(")
    items = text.split(",")
    sizes = [item.removeprefix("~") for item in items]
    if not repeat.isdigit() or not all(size.isdigit() for size in sizes) or int(repeat) < 1:
        return None
    if min(int(size) for size in sizes) < 1:
        return None
    free = tuple(j for j, item in enumerate(items) if item.startswith("~"))
    return Section(int(repeat), tuple(int(size) for size in sizes), free)


def _row_blocks(arg: str) -> RowBlocks | None:
    """The row_blocks layout of sections joined by '+'; None if malformed or all free."""
    sections = [_section(text) for text in arg.split("+")]
    if any(s is None for s in sections) or all(len(s.free) == len(s.sizes) for s in sections):
        return None
    return RowBlocks(sections=tuple(sections))


# The layouts parsed so far, by their text: a plain dict, not functools.lru_cache, which
# torch.compile warns about when it traces the step's plan.
_PARSED: dict[str, Layout] = {}
_PARSED_MAX = 256


def _parse(spec: str) -> Layout:
    if torch.compiler.is_compiling():
        return _read(spec)  # a trace parses the constant text itself, leaving the dict alone
    layout = _PARSED.get(spec)
    if layout is None:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        layout = _PARSED[spec] = _read(spec)
    return layout


def _read(spec: str) -> Layout:
    kind, _, arg = spec.partition(":")
    if kind in ("auto", "rows", "columns", "filters") and not arg:
        return Layout("rows" if kind == "filters" else kind)
    if kind in ("group_axis", "column_groups", "row_groups") and arg.lstrip("-").isdigit():
        return Layout(kind, int(arg))
    if kind == "row_blocks" and (parsed := _row_blocks(arg.replace(" ", ""))) is not None:
        return parsed
    raise ValueError(
        f"unknown layout {spec!r}; expected one of {', '.join(LAYOUT_NAMES)} (D an axis, H and G numbers of "
        "groups or heads, a, b, ... block sizes of at least 1 row, ~c a free block, one block at least constrained)"
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
    is an error.  Empty parameters have nothing to constrain and are skipped.  The returned
    layout has been checked against ``shape``; a row_blocks layout comes with the simple
    layout of each of its blocks.
    """
    layout = _parse(canonical_layout(spec))
    if len(shape) >= 2 and math.prod(shape) == 0:
        return None  # an empty parameter has no vectors to constrain
    if layout.kind == "auto":
        if len(shape) < 2:
            return None
        layout = _auto(shape)
    elif layout.kind == "group_axis" and len(shape) == 3 and -3 <= layout.arg < 0:
        layout = Layout("group_axis", layout.arg + 3)  # below -3 is left for check to refuse
    elif layout.kind == "row_groups" and len(shape) >= 2 and layout.arg >= 1 and shape[0] % layout.arg == 0:
        # each block by init.orthogonal_'s rule: its rows unless it is taller than wide
        layout = Layout("row_groups", layout.arg, tall=shape[0] // layout.arg > math.prod(shape[1:]))
    elif layout.composite and len(shape) >= 2:
        folds = [1 if section.repeat == 1 else 2 for _, section, _, _ in layout._blocks()]
        layout = replace(layout, parts=tuple(_auto(s, fold) for s, fold in zip(layout.piece_shapes(shape), folds)))
    layout.check(shape, name)
    return layout


def _auto(shape: torch.Size | tuple[int, ...], fold: int = 1) -> Layout:
    """init.orthogonal_'s rule: the rows (the first ``fold`` axes) orthonormal unless there are more rows than columns."""
    rows, cols = math.prod(shape[:fold]), math.prod(shape[fold:])
    return Layout("rows" if rows <= cols else "columns", fold=fold)


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
