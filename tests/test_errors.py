"""Bad input: a clear error that names the parameter and the fix, and nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthoopt


def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    return params, copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, snap):
    params, state = snap
    for p, q in zip([p for g in opt.param_groups for p in g["params"]], params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    assert now["state"].keys() == state["state"].keys()
    for k in state["state"]:
        for key, value in state["state"][k].items():
            assert torch.equal(torch.as_tensor(now["state"][k][key]), torch.as_tensor(value))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ortho=-1.0), ValueError, "ortho must be a finite number >= 0"),
        (dict(ortho=float("nan")), ValueError, "ortho must be a finite number"),
        (dict(ortho="big"), TypeError, "ortho must be a number >= 0.*'auto'"),
        (dict(ortho=True), TypeError, "ortho must be a number"),
        (dict(ortho=1.0, ortho_smoothing=-0.1), ValueError, "ortho_smoothing must be a finite number >= 0"),
        (dict(ortho=1.0, ortho_smoothing="x"), TypeError, "ortho_smoothing must be a number"),
        (dict(ortho=1.0, ortho_mode="strict"), ValueError, "ortho_mode must be one of"),
        (dict(ortho=1.0, ortho_penalty="l2"), ValueError, "ortho_penalty must be one of"),
        (dict(ortho=1.0, ortho_nonfinite="ignore"), ValueError, "ortho_nonfinite must be one of"),
        (dict(ortho=1.0, ortho_layout="diagonal"), ValueError, "unknown layout"),
        (dict(ortho=1.0, ortho_layout=7), TypeError, "layout string"),
    ],
)
def test_bad_options_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        orthoopt.OrthoAdamW([nn.Parameter(torch.randn(8, 3))], lr=1e-3, **kwargs)
    assert "optimizer defaults" in str(info.value) or "ortho_layout" in str(info.value)


def test_bad_group_option_names_the_group():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match="param group 1: ortho must be"):
        orthoopt.OrthoAdamW([{"params": [w]}, {"params": [v], "ortho": -2.0}], lr=1e-3)


@pytest.mark.parametrize(
    "shape,layout,match",
    [
        ((), "rows", "'w'.*2 or more dimensions"),
        ((5,), "columns", "'w'.*2 or more dimensions"),
        ((4, 3, 2), "group_axis:5", "'w'.*axis 5"),
        ((8, 6), "column_groups:4", "'w'.*does not divide"),
        ((8, 3), "rows", "'w'.*8 orthonormal vectors of length 3.*'columns'"),
        ((3, 4, 5), "group_axis:1", "'w'.*5 orthonormal vectors of length 3"),
    ],
)
def test_layout_errors_name_the_parameter(shape, layout, match):
    w = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        orthoopt.OrthoAdamW([("w", w)], lr=1e-3, ortho=1.0, ortho_layout=layout)
    with pytest.raises(ValueError, match="parameter 0 of|group0.param0"):
        orthoopt.OrthoAdamW([w], lr=1e-3, ortho=1.0, ortho_layout=layout)


def test_auto_leaves_vectors_alone():
    b = nn.Parameter(torch.randn(5))
    opt = orthoopt.OrthoAdamW([b, nn.Parameter(torch.randn(()))], lr=1e-3, ortho=1.0)
    assert opt.orthogonality_errors() == {}


def test_complex_parameter():
    with pytest.raises(TypeError, match="'z' is complex.*ortho=0"):
        orthoopt.OrthoAdamW([("z", nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)))], lr=1e-3, ortho=1.0)
    orthoopt.OrthoAdamW([nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))], lr=1e-3)  # unpenalized: fine


def test_parameter_given_twice():
    w = nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match="appears twice"):
        orthoopt.OrthoAdamW([w, w], lr=1e-3, ortho=1.0)
    with pytest.raises(ValueError, match="more than one parameter group"):
        orthoopt.OrthoAdamW([{"params": [w]}, {"params": [w]}], lr=1e-3, ortho=1.0)


def test_sparse_gradient_is_refused_before_any_change():
    w = nn.Parameter(torch.randn(8, 3))
    v = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([("v", v), ("w", w)], lr=0.1, ortho=1.0)
    v.grad = torch.randn_like(v)
    w.grad = torch.randn_like(w).to_sparse()
    snap = snapshot(opt)
    with pytest.raises(TypeError, match="'w' has a sparse gradient"):
        opt.step()
    assert_unchanged(opt, snap)


def test_layout_changed_after_construction_fails_at_step_without_changes():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("w", w)], lr=1e-3, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    snap = snapshot(opt)
    opt.param_groups[0]["ortho_layout"] = "rows"
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="'w'.*impossible"):
        opt.step()
    opt.param_groups[0]["ortho_layout"] = "auto"
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("where", ["param", "grad"])
def test_non_finite_values_stay_where_they_are(where):
    a = nn.Parameter(torch.randn(8, 3))
    b = nn.Parameter(torch.randn(5, 2, 3))  # two matrices along axis 1
    c = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD(
        [
            {"params": [a, c], "param_names": ["a", "c"]},
            {"params": [b], "param_names": ["b"], "ortho_layout": "group_axis:1"},
        ],
        lr=0.1,
        ortho=1.0,
    )
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    if where == "param":
        with torch.no_grad():
            b[0, 0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="'b' holds NaN or Inf"):
            opt.step()
        assert torch.isfinite(b[:, 1, :]).all()  # b's other matrix still stepped, finite
        assert torch.isnan(b[:, 0, :]).sum() == 1  # the NaN did not spread inside its matrix
    else:
        b.grad[0, 0, 0] = float("inf")
        opt.step()  # the base SGD spreads it into b; the penalty does not spread it further
    assert torch.isfinite(a).all() and torch.isfinite(c).all()


def test_non_finite_raise_policy_changes_nothing():
    a = nn.Parameter(torch.randn(8, 3))
    b = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("a", a), ("b", b)], lr=0.1, ortho=1.0, ortho_nonfinite="raise")
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    with torch.no_grad():
        b[1, 1] = float("inf")
    snap = snapshot(opt)
    with pytest.raises(FloatingPointError, match="'b'.*nothing was changed"):
        opt.step()
    assert_unchanged(opt, snap)


def test_load_state_dict_from_another_layout_mode_or_shape_is_refused():
    w = nn.Parameter(torch.randn(6, 6))
    opt = orthoopt.OrthoAdamW([w], lr=1e-3, ortho=1.0, ortho_layout="columns")
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()

    same = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 6))], lr=1e-3, ortho=1.0, ortho_layout="columns")
    same.load_state_dict(saved)
    tall = nn.Parameter(torch.randn(6, 3))
    tall_opt = orthoopt.OrthoAdamW([tall], lr=1e-3, ortho=1.0, ortho_layout="columns")
    tall.grad = torch.randn_like(tall)
    tall_opt.step()
    orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 3))], lr=1e-3, ortho=1.0).load_state_dict(
        tall_opt.state_dict()
    )  # 'auto' resolves to the saved 'columns': accepted

    for kwargs, match in [
        (dict(ortho_layout="rows"), "ortho_layout='columns'.*construct the optimizer with"),
        (dict(ortho_layout="columns", ortho_penalty="frobenius"), "ortho_penalty='l1'"),
        (dict(ortho_layout="columns", ortho_mode="hard"), "ortho_mode='soft'"),
    ]:
        other = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 6))], lr=1e-3, ortho=1.0, **kwargs)
        snap = snapshot(other)
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(saved)
        assert_unchanged(other, snap)

    wrong = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(8, 5))], lr=1e-3, ortho=1.0, ortho_layout="columns")
    with pytest.raises(ValueError, match="shape \\(6, 6\\).*another model"):
        wrong.load_state_dict(saved)
