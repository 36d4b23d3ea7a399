"""The ortho options of a group (orthoopt.options): layouts stored in canonical form, which
group a refusal names, the fallback names of parameters, and what counts as the same layout
when a checkpoint loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt.layout import Layout
from orthoopt.options import param_key, same_layout


def test_layouts_are_stored_as_canonical_strings():
    """An alias or a Layout object becomes the layout's string (what state_dict saves)."""
    w = nn.Parameter(torch.randn(4, 3, 2, 2))
    v = nn.Parameter(torch.randn(5, 3, 2))
    opt = orthoopt.OrthoSGD(
        [{"params": [w], "ortho_layout": "filters"}, {"params": [v], "ortho_layout": Layout("group_axis", 1)}],
        lr=0.1,
        ortho=1.0,
    )
    assert opt.param_groups[0]["ortho_layout"] == "rows"
    assert opt.param_groups[1]["ortho_layout"] == "group_axis:1"


def test_a_bad_layout_is_refused_in_an_unpenalized_group_too_naming_the_group():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"^param group 1: ortho_layout: unknown layout 'diagonal'"):
        orthoopt.OrthoSGD([{"params": [w]}, {"params": [v], "ortho": 0.0, "ortho_layout": "diagonal"}], lr=0.1)


def test_param_key_falls_back_past_the_given_names():
    assert param_key({"param_names": ["a"]}, 0, 2) == "a"
    assert param_key({"param_names": ["a"]}, 1, 2) == "group2.param1"


def test_a_saved_layout_that_does_not_fit_is_not_the_same_layout():
    assert not same_layout("column_groups:3", "auto", (4, 8))  # 8 columns do not split into 3
    assert same_layout("auto", "rows", (4, 8))
    w = nn.Parameter(torch.randn(4, 8))
    opt = orthoopt.OrthoAdamW([w], lr=1e-3, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["ortho_layout"] = "column_groups:3"  # e.g. written by another model
    fresh = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(4, 8))], lr=1e-3, ortho=1.0)
    with pytest.raises(ValueError, match="saved with ortho_layout='column_groups:3'"):
        fresh.load_state_dict(saved)
