"""The ortho options of a group (orthoopt.options): layouts stored in canonical form, which
group a refusal names, the fallback names of parameters, and what counts as the same layout
when a checkpoint loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt import options
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


# -- unknown options -------------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _added_later(model):
    opt = orthoopt.OrthoAdamW(model[0].parameters(), lr=1e-3)
    opt.add_param_group({"params": model[2].parameters(), "ortho": 1.0, "ortho_smothing": 1e-2})


ENTRIES = {
    "optimizer keyword": lambda m: orthoopt.OrthoAdamW(m.parameters(), lr=1e-3, ortho=1.0, ortho_smothing=1e-2),
    "orthogonalized keyword": lambda m: orthoopt.orthogonalize(torch.optim.Adagrad)(m.parameters(), ortho_smothing=1),
    "group dict": lambda m: orthoopt.OrthoSGD([{"params": m.parameters(), "ortho_smothing": 1e-2}], lr=0.1),
    "add_param_group": _added_later,
    "param_groups": lambda m: orthoopt.param_groups(m, ortho=1.0, ortho_smothing=1e-2),
    "constrain_": lambda m: orthoopt.constrain_(torch.optim.SGD(m.parameters(), lr=0.1), m, ortho_smothing=1e-2),
    "constrain_ of groups": lambda m: orthoopt.constrain_([{"params": m.parameters(), "ortho_smothing": 1e-2}], m),
}


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_misspelled_option_is_refused_naming_the_closest_known_one(entry):
    with pytest.raises(TypeError, match=r"unknown option 'ortho_smothing'; did you mean 'ortho_smoothing'\?"):
        ENTRIES[entry](_model())


def test_a_misspelled_option_set_in_a_group_later_is_refused_at_the_next_step():
    model = _model()
    opt = orthoopt.OrthoAdamW(model.parameters(), lr=1e-3, ortho=1.0)
    opt.param_groups[0]["ortho_mdoe"] = "hard"
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"^param group 0: unknown option 'ortho_mdoe'; did you mean 'ortho_mode'\?"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


def test_the_known_options_are_the_defaults_and_the_step_counter(monkeypatch):
    """Options added to ORTHO_DEFAULTS are known at once; an option far from every known one
    is answered with the list."""
    w = nn.Parameter(torch.randn(8, 3))
    with pytest.raises(TypeError, match=r"unknown option 'ortho_weight'; the options are ortho, ortho_every, .*"):
        orthoopt.OrthoSGD([{"params": [w], "ortho_weight": 1.0}], lr=0.1)
    monkeypatch.setitem(options.ORTHO_DEFAULTS, "ortho_weight", 1.0)
    options.check_options({"ortho_weight": 2.0, "ortho_steps": 3}, "here")
    with pytest.raises(TypeError, match="did you mean 'ortho_weight'"):
        options.check_options({"ortho_wieght": 2.0}, "here")
    options.check_options({"orthogonal": True, "lr": 1.0}, "here")  # not an ortho_ option: the base's business
