"""Details of orthoopt.layout that the layout tests left open (found by mutation testing): the
fix each refusal suggests, the dimensions each layout needs, and the axes the functional API takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt.layout import LAYOUT_NAMES, Layout, resolve_layout


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
