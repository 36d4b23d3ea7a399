"""Parameter layouts: views, inverses, 'auto', and errors that name the parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt.layout import LAYOUT_NAMES, Layout, as_matrices, canonical_layout, resolve_layout
from orthoopt.penalty import polar


def shares_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


CASES = [
    # spec, shape, stack shape (m, l, n)
    ("rows", (3, 8), (1, 8, 3)),
    ("columns", (8, 3), (1, 8, 3)),
    ("filters", (4, 3, 2, 2), (1, 12, 4)),
    ("rows", (4, 3, 2, 2), (1, 12, 4)),
    ("column_groups:2", (8, 6), (2, 8, 3)),
    ("row_groups:4", (8, 6), (4, 6, 2)),  # wide blocks (2, 6): their rows
    ("row_groups:2", (8, 3), (2, 4, 3)),  # tall blocks (4, 3): their columns
    ("row_groups:2", (6, 3), (2, 3, 3)),  # square blocks: their rows
    ("row_groups:2", (8, 3, 3, 3), (2, 27, 4)),  # a conv of 2 groups: (out/2, in/2·3·3) per group
    ("row_groups:4", (64, 2, 1, 1), (4, 16, 2)),  # tall groups of a grouped 1x1 conv: their columns
    ("group_axis:0", (5, 7, 3), (5, 7, 3)),
    ("group_axis:1", (7, 5, 3), (5, 7, 3)),
    ("group_axis:2", (7, 3, 5), (5, 7, 3)),
    ("group_axis:-1", (7, 3, 5), (5, 7, 3)),
]


@pytest.mark.parametrize("spec,shape,stack", CASES)
def test_matrices_are_views_and_invertible(spec, shape, stack):
    p = torch.randn(shape)
    layout = resolve_layout(spec, p.shape, "w")
    mats = layout.matrices(p)
    assert tuple(mats.shape) == stack == layout.stack_shape(p.shape)
    assert shares_storage(mats, p)
    torch.testing.assert_close(layout.from_matrices(mats.clone(), p.shape), p, rtol=0, atol=0)
    # an in-place update of the stack is an update of the parameter
    mats.mul_(2)
    torch.testing.assert_close(layout.matrices(p), mats, rtol=0, atol=0)


def test_matrix_contents():
    w = torch.arange(6.0).reshape(2, 3)  # (out, in), rows orthonormal
    torch.testing.assert_close(resolve_layout("rows", w.shape, "w").matrices(w)[0], w.T)
    w = torch.arange(8.0).reshape(2, 4)
    heads = resolve_layout("column_groups:2", w.shape, "w").matrices(w)
    torch.testing.assert_close(heads[1], w[:, 2:])
    phi = torch.randn(4, 3, 2)
    torch.testing.assert_close(resolve_layout("group_axis:1", phi.shape, "phi").matrices(phi)[2], phi[:, 2, :])
    torch.testing.assert_close(as_matrices(phi, 1), resolve_layout("group_axis:1", phi.shape, "phi").matrices(phi))


def test_channels_last_conv_round_trips():
    w = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    layout = resolve_layout("auto", w.shape, "conv")
    mats = layout.matrices(w)
    torch.testing.assert_close(layout.from_matrices(mats, w.shape), w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,kind",
    [((3, 8), "rows"), ((8, 3), "columns"), ((5, 5), "rows"), ((4, 3, 3, 3), "rows"), ((64, 3, 2, 2), "columns")],
)
def test_auto_picks_the_shorter_side(shape, kind):
    assert resolve_layout("auto", shape, "w").kind == kind


@pytest.mark.parametrize("shape", [(), (5,)])
def test_auto_skips_vectors_but_explicit_layout_refuses(shape):
    assert resolve_layout("auto", shape, "bias") is None
    with pytest.raises(ValueError, match="'bias'.*2 or more dimensions"):
        resolve_layout("rows", shape, "'bias'")


@pytest.mark.parametrize(
    "spec,shape,match",
    [
        ("rows", (8, 3), "8 orthonormal vectors of length 3.*'columns'"),
        ("columns", (3, 8), "8 orthonormal vectors of length 3.*'rows'"),
        ("filters", (64, 3, 2, 2), "64 orthonormal vectors of length 12"),
        ("column_groups:4", (8, 6), "does not divide"),
        ("column_groups:1", (3, 8), "8 orthonormal vectors of length 3"),
        ("row_groups:3", (8, 6), "8 rows into 3 equal blocks"),
        ("row_groups:0", (8, 6), "8 rows into 0 equal blocks"),
        ("row_groups:3", (8, 6, 3), "8 rows into 3 equal blocks"),
        ("row_blocks:4,2,2", (9, 6), r"has 4 \+ 2 \+ 2 = 8 rows, but the parameter has 9"),
        ("row_blocks:2+2x(2,1)", (9, 6), r"has 2 \+ 2 heads x \(2 \+ 1\) = 8 rows, but the parameter has 9"),
        ("row_blocks:2x(2,1,1)", (9, 6), r"2 heads x \(2 \+ 1 \+ 1\) = 8 rows, but the parameter has 9"),
        ("row_blocks:4,8", (12,), "2 or more dimensions"),
        ("group_axis:3", (4, 3, 2), "axis 3"),
        ("group_axis:1", (4, 3), "3-D"),
        ("group_axis:1", (2, 3, 4), "4 orthonormal vectors of length 2"),
    ],
)
def test_infeasible_or_wrong_layouts_name_the_parameter(spec, shape, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve_layout(spec, shape, "layer.weight")
    assert "layer.weight" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        "diagonal",
        "rows:2",
        "group_axis:x",
        "",
        "group_axis",
        "row_groups",
        "row_blocks",
        "row_blocks:",
        "row_blocks:4,0",
        "row_blocks:4,-2",
        "row_blocks:0x(2,2)",
        "row_blocks:2x(2,2",
        "row_blocks:~2,~2",
        "row_blocks:a,b",
        "row_blocks:2+",
        "row_blocks:~2+~3",
        "row_blocks:2++3",
    ],
)
def test_unknown_layout_string(bad):
    with pytest.raises(ValueError, match="unknown layout"):
        canonical_layout(bad)


def test_layout_objects_and_strings():
    assert canonical_layout(Layout("group_axis", 1)) == "group_axis:1"
    assert canonical_layout(Layout("row_groups", 4, tall=True)) == "row_groups:4"
    assert canonical_layout("filters") == "rows"
    with pytest.raises(TypeError, match="layout string"):
        canonical_layout(3)


def _orthogonal_blocks(out: int, cols: int, blocks: int) -> torch.Tensor:
    """A weight whose ``blocks`` row blocks are each ``torch.nn.init.orthogonal_``."""
    w = torch.empty(out, cols, dtype=torch.float64)
    for block in w.chunk(blocks):
        torch.nn.init.orthogonal_(block)
    return w


@pytest.mark.parametrize(
    "out,cols,blocks",
    [(32, 8, 4), (32, 16, 4), (12, 10, 3), (30, 10, 3), (16, 4, 1), (6, 10, 2)],
)
def test_row_groups_is_init_orthogonal_per_block(out, cols, blocks):
    """Each block is on target exactly when ``init.orthogonal_`` made it so (its shorter side),
    and the whole-matrix 'auto' layout is not what a per-block init gives."""
    w = _orthogonal_blocks(out, cols, blocks)
    layout = resolve_layout(f"row_groups:{blocks}", w.shape, "w")
    mats = layout.matrices(w)
    eye = torch.eye(mats.shape[-1], dtype=w.dtype)
    assert (mats.mT @ mats - eye).abs().max() < 1e-12
    for block, mat in zip(w.chunk(blocks), mats):
        # the same vectors init.orthogonal_ made orthonormal: rows of a wide block, columns of a tall one
        torch.testing.assert_close(mat, block if block.shape[0] > block.shape[1] else block.T, rtol=0, atol=0)
    if blocks > 1 and out // blocks < cols:
        whole = resolve_layout("auto", w.shape, "w").matrices(w)
        assert (whole.mT @ whole - torch.eye(whole.shape[-1], dtype=w.dtype)).abs().max() > 0.05
    # a random weight is far from it; the polar factor of the stack makes each block, read
    # directly off the weight, orthonormal on its shorter side
    v = torch.randn(out, cols, dtype=torch.float64)
    vm = layout.matrices(v)
    assert (vm.mT @ vm - eye).abs().max() > 0.1
    snapped = layout.from_matrices(polar(vm), v.shape)
    for block in snapped.chunk(blocks):
        short = block if block.shape[0] <= block.shape[1] else block.T
        torch.testing.assert_close(short @ short.T, torch.eye(short.shape[0], dtype=w.dtype), rtol=0, atol=1e-12)


def test_row_groups_orientation_follows_each_block():
    """LSTM(10, 20)'s weight_ih (80, 10): blocks (20, 10) are tall, columns orthonormal;
    LSTM(30, 20)'s (80, 30): blocks (20, 30) are wide, rows orthonormal."""
    tall = resolve_layout("row_groups:4", (80, 10), "weight_ih_l0")
    wide = resolve_layout("row_groups:4", (80, 30), "weight_ih_l0")
    assert tall.tall and tall.stack_shape((80, 10)) == (4, 20, 10)
    assert not wide.tall and wide.stack_shape((80, 30)) == (4, 30, 20)


@pytest.mark.parametrize(
    "spec, shape, fix",
    [
        ("rows", (8, 3), "Use ortho_layout='columns' (or 'auto')."),
        ("columns", (3, 8), "Use ortho_layout='rows' (or 'auto')."),
        ("group_axis:1", (2, 3, 4), "Choose another group axis so that the matrices are tall (l >= n)."),
        ("column_groups:1", (3, 8), "Use fewer, larger groups only if they stay tall, or 'rows' instead."),
    ],
)
def test_an_impossible_layout_ends_with_its_fix(spec, shape, fix):
    with pytest.raises(ValueError) as info:
        resolve_layout(spec, shape, "layer.weight")
    assert str(info.value).endswith(" can be orthonormal. " + fix)


def test_a_hand_made_row_groups_layout_of_the_wrong_side_is_refused_with_its_fix():
    """resolve_layout always picks each block's shorter side; a Layout made by hand may not."""
    with pytest.raises(ValueError) as info:
        Layout("row_groups", 2, tall=True).check((4, 12), "w")  # blocks 2 x 12: their 12 columns
    assert str(info.value).endswith(
        " can be orthonormal. Leave 'tall' to resolve_layout, which picks the shorter side of each block."
    )


@pytest.mark.parametrize("spec, shape", [("column_groups:2", (4, 6, 2)), ("column_groups:1", (4, 6, 1, 1))])
def test_column_groups_needs_a_matrix(spec, shape):
    with pytest.raises(ValueError) as info:
        resolve_layout(spec, shape, "w")
    assert str(info.value) == (
        f"w: layout '{spec}' needs a 2-D parameter, got shape {shape}; "
        f"use ortho_layout='auto' or one of {', '.join(LAYOUT_NAMES)}"
    )


@pytest.mark.parametrize("axis", [-4, -5, -6])
def test_group_axis_below_minus_three_is_refused(axis):
    """Was silently taken as axis axis % 3 (-4 as 2): resolve_layout wrapped negative axes before the check."""
    with pytest.raises(ValueError) as info:
        resolve_layout(f"group_axis:{axis}", (5, 4, 3), "w")
    assert str(info.value) == (
        f"w: layout 'group_axis:{axis}' names axis {axis}, but the parameter has 3 axes "
        "(-3..2: 0, 1, 2, or -3, -2, -1 from the end); use group_axis:0, group_axis:1 or group_axis:2"
    )
    w = nn.Parameter(torch.randn(5, 4, 3))
    with pytest.raises(ValueError, match=rf"'w'.*names axis {axis}.*-3\.\.2"):
        orthoopt.OrthoSGD([("w", w)], lr=0.1, ortho=1.0, ortho_layout=f"group_axis:{axis}")


def test_negative_group_axes_that_exist_are_the_positive_ones():
    for axis in (-1, -2, -3):
        assert resolve_layout(f"group_axis:{axis}", (5, 4, 3), "w") == resolve_layout(
            f"group_axis:{axis + 3}", (5, 4, 3), "w"
        )


def test_functional_group_dim_range():
    phi = torch.randn(5, 4, 3, dtype=torch.float64)
    for dim in (-3, -2, -1):
        torch.testing.assert_close(
            orthoopt.l1_orthogonality(phi, group_dim=dim), orthoopt.l1_orthogonality(phi, group_dim=dim + 3)
        )
    for dim in (-4, 3):
        with pytest.raises(ValueError, match=f"group_dim={dim} is not an axis of a 3-D tensor; use 0, 1 or 2"):
            orthoopt.l1_orthogonality(phi, group_dim=dim)
    with pytest.raises(ValueError, match=r"group_dim=None needs a 2-D matrix, got shape \(5, 4, 3\)"):
        orthoopt.l1_orthogonality(phi, group_dim=None)


def test_canonical_layout_names_the_option_by_default():
    with pytest.raises(ValueError, match=r"^ortho_layout: unknown layout 'diagonal'"):
        orthoopt.layout.canonical_layout("diagonal")
    with pytest.raises(TypeError, match=r"^ortho_layout must be a layout string"):
        orthoopt.layout.canonical_layout(3)


@pytest.mark.parametrize(
    "spec, shape, message",
    [
        (
            "row_groups:3",
            (8, 5),
            "splits 8 rows into 3 equal blocks, which does not divide; choose a number of blocks that divides 8",
        ),
        (
            "column_groups:3",
            (5, 8),
            "splits 8 columns into 3 equal groups, which does not divide; choose a number of groups that divides 8",
        ),
    ],
)
def test_groups_that_do_not_divide_name_the_side_to_divide(spec, shape, message):
    with pytest.raises(ValueError) as info:
        resolve_layout(spec, shape, "w")
    assert str(info.value) == f"w: layout '{spec}' {message}"


# -- composite layouts: blocks of unequal sizes, per-head interleaving ---------------------------------
def _rows_of(layout, shape) -> list[list[int]]:
    """The rows of a parameter of ``shape`` that each piece of ``layout`` covers, in its order."""
    index = torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()
    return [view.reshape(-1, *shape[1:]).flatten(1)[:, 0].tolist() for view, _ in layout.pieces(index)]


COMPOSITE = [
    # spec, shape, the rows of each piece, the (m, l, n) of each piece
    ("row_blocks:6,2,2", (10, 4), [range(0, 6), range(6, 8), range(8, 10)], [(1, 6, 4), (1, 4, 2), (1, 4, 2)]),
    (
        "row_blocks:2x(1,1,3)",
        (10, 4),
        [[0, 5], [1, 6], [2, 3, 4, 7, 8, 9]],
        [(1, 4, 2), (1, 4, 2), (1, 6, 4)],
    ),
    ("row_blocks:3x(2,2)", (12, 2, 3, 3), [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]], [(1, 18, 6), (1, 18, 6)]),
    ("row_blocks:4,~2,4", (10, 5), [range(0, 4), range(6, 10)], [(1, 5, 4), (1, 5, 4)]),
    (  # sections: a differential attention's parallel block, MLP rows, q1/q2 and k1/k2 by heads, v
        "row_blocks:3+2x(1,1)+2x(1,1)+~2",
        (13, 4),
        [[0, 1, 2], [3, 5], [4, 6], [7, 9], [8, 10]],
        [(1, 4, 3), (1, 4, 2), (1, 4, 2), (1, 4, 2), (1, 4, 2)],
    ),
]


@pytest.mark.parametrize("spec,shape,rows,stacks", COMPOSITE)
def test_pieces_are_views_of_the_rows_of_each_block(spec, shape, rows, stacks):
    p = torch.randn(shape, dtype=torch.float64)
    layout = resolve_layout(spec, p.shape, "w")
    assert layout.composite and str(layout) == canonical_layout(spec) == spec
    pieces = layout.pieces(p)
    assert [list(r) for r in rows] == _rows_of(layout, shape)
    assert [piece.stack_shape(view.shape) for view, piece in pieces] == stacks == layout.stack_shapes(p.shape)
    assert [tuple(view.shape) for view, _ in pieces] == layout.piece_shapes(p.shape)
    for (view, piece), block_rows in zip(pieces, rows):
        assert shares_storage(view, p) and not piece.composite
        block = p[list(block_rows)].reshape(len(block_rows), -1)
        # each block by init.orthogonal_'s rule: rows unless taller than wide, the heads folded into rows
        assert piece.kind == ("rows" if block.shape[0] <= block.shape[1] else "columns")
        assert piece.fold == view.dim() - len(shape) + 1  # a (heads, rows, ...) view folds its heads into rows
        mats = piece.matrices(view)
        torch.testing.assert_close(piece.from_matrices(mats.clone(), view.shape), view, rtol=0, atol=0)
        # the block's rows, whatever their places in p, make one matrix
        torch.testing.assert_close(mats[0], block.T if piece.kind == "rows" else block, rtol=0, atol=0)


@pytest.mark.parametrize("spec,shape,rows,stacks", COMPOSITE)
def test_a_write_through_a_piece_reaches_the_parameter_and_nothing_else(spec, shape, rows, stacks):
    p = torch.randn(shape, dtype=torch.float64)
    before = p.clone()
    layout = resolve_layout(spec, p.shape, "w")
    for view, piece in layout.pieces(p):  # the projection, as project_ writes it: per piece
        view.copy_(piece.from_matrices(polar(piece.matrices(view)), view.shape))
    covered = sorted(r for block in rows for r in block)
    free = [r for r in range(shape[0]) if r not in covered]
    torch.testing.assert_close(p[free], before[free], rtol=0, atol=0)
    assert (p[covered] - before[covered]).abs().max() > 1e-3
    for view, piece in layout.pieces(p):
        mats = piece.matrices(view)
        eye = torch.eye(mats.shape[-1], dtype=p.dtype)
        torch.testing.assert_close(mats.mT @ mats, eye.expand_as(mats.mT @ mats), rtol=0, atol=1e-12)


def test_a_composite_layout_has_no_single_stack():
    layout = resolve_layout("row_blocks:4,2", (6, 8), "w")
    for call in (lambda: layout.matrices(torch.randn(6, 8)), lambda: layout.stack_shape((6, 8))):
        with pytest.raises(TypeError, match=r"'row_blocks:4,2' has blocks of different sizes.*layout\.pieces\(p\)"):
            call()
    with pytest.raises(ValueError, match="not resolved"):
        orthoopt.layout._parse("row_blocks:4,2").pieces(torch.randn(6, 8))


def test_layout_strings_survive_a_weights_only_load(tmp_path):
    """Composite layouts live in param groups as plain strings."""
    w = nn.Parameter(torch.randn(12, 4))
    opt = orthoopt.OrthoSGD([{"params": [w], "ortho": 1.0, "ortho_layout": "row_blocks:2x(2,~1,3)"}], lr=0.1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["ortho_layout"] == "row_blocks:2x(2,~1,3)"
