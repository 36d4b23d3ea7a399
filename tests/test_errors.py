"""Bad input: a clear error that names the parameter and the fix, and nothing changed."""

from __future__ import annotations

import copy
import fractions

import numpy as np
import pytest
import torch
from torch import nn

import orthoopt


def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    return params, copy.deepcopy(opt.state_dict())


def assert_step_refused(opt, error, match):
    """``opt.step()`` raises ``error`` (matching ``match``) and changes no weight and no state."""
    snap = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, snap)


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
    assert_step_refused(opt, TypeError, "'w' has a sparse gradient")


def test_sparse_gradient_of_a_hard_parameter_is_refused_before_any_change():
    w = nn.Parameter(torch.linalg.qr(torch.randn(8, 3)).Q)
    v = nn.Parameter(torch.linalg.qr(torch.randn(8, 3)).Q)
    opt = orthoopt.OrthoSGD([("v", v), ("w", w)], lr=0.1, ortho=1.0, ortho_mode="hard")
    v.grad = torch.randn_like(v)
    w.grad = torch.randn_like(w).to_sparse()
    assert_step_refused(opt, TypeError, "'w' has a sparse gradient")


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
    assert_step_refused(opt, FloatingPointError, "'b'.*nothing was changed")


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


# -- hard mode follows ortho_nonfinite --------------------------------------------------
def _reference_step(opt_cls, w_rows, grad_rows):
    """The hard step of the finite matrices alone, as a (2, 8, 4) parameter."""
    w = nn.Parameter(w_rows.clone())
    opt = opt_cls([w], lr=1e-2, ortho=1.0, ortho_mode="hard", ortho_layout="group_axis:0")
    w.grad = grad_rows.clone()
    opt.step()
    return w.detach(), opt.state[w]


@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_hard_mode_skips_a_non_finite_matrix_at_the_first_step(policy):
    w = nn.Parameter(torch.linalg.qr(torch.randn(3, 8, 4, dtype=torch.float64))[0])
    opt = orthoopt.OrthoAdam(
        [("w", w)], lr=1e-2, ortho=1.0, ortho_mode="hard", ortho_layout="group_axis:0", ortho_nonfinite=policy
    )
    with torch.no_grad():
        w[1, 2, 3] = float("inf")
    w.grad = torch.randn_like(w)
    keep = torch.tensor([True, False, True])
    before = w.detach().clone()
    if policy == "warn":
        with pytest.warns(RuntimeWarning, match="'w' holds NaN or Inf: hard mode takes no step") as rec:
            opt.step()
        assert rec[0].filename == __file__
    else:
        opt.step()  # was an SVD error ("linalg.svd: The algorithm failed to converge")
    assert torch.equal(w[1], before[1])  # untouched, Inf and all
    expected, state = _reference_step(orthoopt.OrthoAdam, before[keep], w.grad[keep])
    torch.testing.assert_close(w[keep], expected, rtol=0, atol=0)
    mine = opt.state[w]
    for key in ("stiefel_exp_avg", "stiefel_exp_avg_sq"):
        assert torch.isfinite(mine[key]).all()
        assert torch.equal(mine[key][1], torch.zeros_like(mine[key][1]))  # no step, no state
        torch.testing.assert_close(mine[key][keep], state[key], rtol=0, atol=0)


def test_hard_mode_skips_a_non_finite_gradient_later_and_keeps_its_state():
    w = nn.Parameter(torch.linalg.qr(torch.randn(3, 8, 4, dtype=torch.float64))[0])
    start = w.detach().clone()
    kwargs = dict(lr=1e-2, momentum=0.9, ortho=1.0, ortho_mode="hard", ortho_layout="group_axis:0")
    opt = orthoopt.OrthoSGD([("w", w)], ortho_nonfinite="raise", **kwargs)
    first = torch.randn_like(w)
    w.grad = first.clone()
    opt.step()
    opt.param_groups[0]["ortho_nonfinite"] = "skip"
    momentum_before = opt.state[w]["stiefel_momentum_buffer"].clone()
    point_before = w.detach().clone()
    grad = torch.randn_like(w)
    grad[1, 0, 0] = float("nan")
    w.grad = grad.clone()
    opt.step()  # was silent even with "raise", and made the matrix's state non-finite
    assert torch.equal(w[1], point_before[1])
    assert torch.equal(opt.state[w]["stiefel_momentum_buffer"][1], momentum_before[1])
    keep = torch.tensor([True, False, True])
    ref = nn.Parameter(start[keep].clone())
    ref_opt = orthoopt.OrthoSGD([ref], **kwargs)
    for g in (first[keep], grad[keep]):
        ref.grad = g.clone()
        ref_opt.step()
    torch.testing.assert_close(w[keep], ref, rtol=0, atol=0)
    torch.testing.assert_close(
        opt.state[w]["stiefel_momentum_buffer"][keep], ref_opt.state[ref]["stiefel_momentum_buffer"], rtol=0, atol=0
    )
    opt.param_groups[0]["ortho_nonfinite"] = "raise"
    w.grad = grad.clone()
    with pytest.raises(FloatingPointError, match="'w' holds NaN or Inf"):
        opt.step()


@pytest.mark.parametrize("when", ["first step", "later"])
def test_hard_mode_raise_policy_changes_nothing(when):
    w = nn.Parameter(torch.linalg.qr(torch.randn(3, 8, 4, dtype=torch.float64))[0])
    v = nn.Parameter(torch.randn(5))  # a plain parameter the base step would move
    opt = orthoopt.OrthoAdam(
        [{"params": [w], "param_names": ["w"], "ortho": 1.0}, {"params": [v], "param_names": ["v"]}],
        lr=1e-2,
        ortho_mode="hard",
        ortho_layout="group_axis:0",
        ortho_nonfinite="raise",
    )
    if when == "later":
        w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
        opt.step()
    with torch.no_grad():
        w[2, 0, 0] = float("-inf")
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    assert_step_refused(opt, FloatingPointError, "'w' holds NaN or Inf.*nothing was changed")
    assert (w in opt.state) == (when == "later")  # no empty state entry left behind


# -- differentiable=True ----------------------------------------------------------------
def test_differentiable_with_a_penalized_group_is_refused():
    w, v = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(16, 4))
    with pytest.raises(ValueError, match="param group 0: differentiable=True with ortho=1.0.*ortho=0"):
        orthoopt.OrthoSGD([w], lr=0.1, ortho=1.0, differentiable=True)
    opt = orthoopt.OrthoSGD([w], lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="param group 1: differentiable=True with ortho='auto'"):
        opt.add_param_group({"params": [v], "ortho": "auto"})
    w.grad = torch.randn_like(w)
    snap = snapshot(opt)
    opt.param_groups[0]["ortho"] = 1.0  # switched on after construction: refused at the step
    with pytest.raises(ValueError, match="param group 0: differentiable=True"):
        opt.step()
    opt.param_groups[0]["ortho"] = 0.0
    assert_unchanged(opt, snap)


def test_differentiable_with_ortho_zero_differentiates_as_the_base():
    # Autograd through step() (SGD, lr 0.1, a 16x4 float64 weight).
    def through_step(cls, **kwargs):
        gen = torch.Generator().manual_seed(3)
        w0 = torch.randn(16, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        grads = [torch.randn(16, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2)]
        w = w0.clone()
        opt = cls([w], lr=0.1, momentum=0.9, differentiable=True, **kwargs)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach(), torch.autograd.grad(w.square().sum(), [w0, *grads], allow_unused=True)

    got, grads = through_step(orthoopt.OrthoSGD, ortho=0.0)
    want, want_grads = through_step(torch.optim.SGD)
    assert torch.equal(got, want)
    assert grads[0] is not None
    for a, b in zip(grads, want_grads):
        assert (a is None and b is None) or torch.equal(a, b)


# -- where the non-finite warning points --------------------------------------------------
def test_non_finite_warning_points_at_the_callers_step_line():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("w", w)], lr=1e-2, ortho=1.0)
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # torch's hook wrapper on the base class too
    with torch.no_grad():
        w[0, 0] = float("nan")
    w.grad = torch.zeros_like(w)
    with pytest.warns(RuntimeWarning, match="'w' holds NaN") as rec:
        opt.step()
    assert rec[0].filename == __file__, rec[0].filename


# -- 2·lr·ortho the step cannot take --------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,ortho,lr",
    [(torch.float32, 1e300, 0.1), (torch.float32, 1e38, 1.0), (torch.float64, 1e308, 10.0), (torch.bfloat16, 1e20, 1)],
)
def test_an_overflowing_step_size_is_refused_at_construction(dtype, ortho, lr):
    w = nn.Parameter(torch.randn(8, 3, dtype=dtype))
    with pytest.raises(ValueError, match="param group 0: parameter 'w': 2·lr·ortho = .* use a smaller ortho"):
        orthoopt.OrthoSGD([("w", w)], lr=lr, ortho=ortho)
    orthoopt.OrthoSGD([("w", w)], lr=lr, ortho=ortho, ortho_mode="hard")  # hard mode has no η: fine


def test_an_overflowing_step_size_set_later_is_refused_before_any_change():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([("w", w)], lr=0.1, ortho=1e18)
    opt.param_groups[0]["lr"] = 100.0  # e.g. a scheduler
    w.grad = torch.randn_like(w)
    assert_step_refused(opt, ValueError, "parameter 'w': 2·lr·ortho = 2e\\+20")


def test_the_largest_step_size_takes_the_same_step_as_any_large_one():
    # What the refusal's message promises: beyond max|R|, a larger 2·lr·ortho changes nothing.
    start = torch.randn(8, 3, dtype=torch.float64)

    def step(ortho):
        w = nn.Parameter(start.clone())
        opt = orthoopt.OrthoSGD([w], lr=1.0, ortho=ortho)
        w.grad = torch.zeros_like(w)
        opt.step()
        return w.detach()

    limit = orthoopt.options.step_size_limit(torch.float64)
    torch.testing.assert_close(step(limit / 2), step(1e3), rtol=1e-12, atol=0)


# -- project_ ---------------------------------------------------------------------------
def test_project_checks_every_parameter_before_changing_any():
    a, b = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with torch.no_grad():
        b[3, 1] = float("nan")
    before = a.detach().clone()
    with pytest.raises(ValueError, match="parameter 1 holds NaN or Inf.*nothing was changed"):
        orthoopt.project_([a, b])
    assert torch.equal(a, before)
    opt = orthoopt.OrthoSGD([("a", a), ("b", b)], lr=0.1, ortho=1.0)
    with pytest.raises(ValueError, match="parameter 'b' holds NaN"):
        orthoopt.project_(opt)
    assert torch.equal(a, before)


# -- the meta device ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("policy", ["warn", "skip", "raise"])
def test_meta_parameters_step(mode, policy):
    w = nn.Parameter(torch.empty(8, 4, device="meta"))
    opt = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0, ortho_mode=mode, ortho_nonfinite=policy)
    w.grad = torch.empty_like(w)
    opt.step()
    opt.step()
    assert w.is_meta and w.shape == (8, 4)


# -- numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [np.float32(0.5), np.int64(2), np.float64(0.5), fractions.Fraction(1, 2), torch.tensor(0.5), torch.tensor(2)],
)
def test_any_real_number_is_an_ortho(value, tmp_path):
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([w], lr=0.1, ortho=value, ortho_smoothing=value)
    group = opt.param_groups[0]
    assert group["ortho"] == float(value) and type(group["ortho"]) in (int, float)
    assert group["ortho_smoothing"] == float(value) and type(group["ortho_smoothing"]) in (int, float)
    w.grad = torch.randn_like(w)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.load(tmp_path / "opt.pt", weights_only=True)  # a NumPy scalar in a group would not load


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor([0.5]), torch.tensor(1j), np.bool_(True), "0.5"])
def test_non_real_ortho_is_refused(value):
    with pytest.raises(TypeError, match="ortho must be a number"):
        orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3))], lr=0.1, ortho=value)


def test_an_ortho_beyond_the_float_range_is_refused_as_not_finite():
    with pytest.raises(ValueError, match="ortho must be a finite number"):
        orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3))], lr=0.1, ortho=10**400)
    with pytest.raises(ValueError, match="2·lr·ortho = inf"):
        orthoopt.OrthoSGD([("w", nn.Parameter(torch.randn(8, 3)))], lr=10**300, ortho=10**300)


# -- options changed after construction -------------------------------------------------------
@pytest.mark.parametrize(
    "change,exc,match",
    [
        ({"ortho_mode": "hard"}, ValueError, "param group 0: ortho_every=2 applies to the soft step"),
        ({"ortho": -1.0}, ValueError, "param group 0: ortho must be a finite number"),
        ({"ortho_penalty": "l2"}, ValueError, "param group 0: ortho_penalty must be one of"),
        ({"ortho_every": 0}, ValueError, "param group 0: ortho_every must be a whole number"),
        ({"ortho_layout": "group_axis:5"}, ValueError, "'w'.*needs a 3-D parameter"),
    ],
)
def test_options_changed_after_construction_are_checked_at_the_next_step(change, exc, match):
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("w", w)], lr=1e-3, ortho=1.0, ortho_every=2)
    w.grad = torch.randn_like(w)
    opt.step()
    snap = snapshot(opt)
    opt.param_groups[0].update(change)
    with pytest.raises(exc, match=match):
        opt.step()
    with pytest.raises(exc, match=match):  # and again, until it is fixed
        opt.step()
    for key in change:
        opt.param_groups[0][key] = {"ortho_every": 2, "ortho": 1.0}.get(key, orthoopt.options.ORTHO_DEFAULTS[key])
    assert_unchanged(opt, snap)
    opt.step()


def test_options_changed_after_construction_are_canonicalised_as_at_construction():
    w = nn.Parameter(torch.randn(4, 3, 2, 2))
    opt = orthoopt.OrthoSGD([("w", w)], lr=0.1, ortho=1.0)
    w.grad = torch.zeros_like(w)
    opt.param_groups[0].update(ortho=np.float32(2.0), ortho_layout="filters")
    opt.step()
    assert opt.param_groups[0]["ortho"] == 2.0 and type(opt.param_groups[0]["ortho"]) is float
    assert opt.param_groups[0]["ortho_layout"] == "rows"


def test_hard_modes_projection_notice_is_an_orthogonality_warning_at_the_callers_line():
    assert orthoopt.OrthogonalityWarning is orthoopt.guard.OrthogonalityWarning
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("w", w)], lr=1e-2, ortho=1.0, ortho_mode="hard")
    w.grad = torch.randn_like(w)
    with pytest.warns(orthoopt.OrthogonalityWarning, match="projected onto the Stiefel manifold.*'w'") as rec:
        opt.step()
    assert rec[0].filename == __file__, rec[0].filename


@pytest.mark.parametrize(
    "framework",
    [
        "accelerate.optimizer",
        "transformers.trainer",
        "lightning.pytorch.loops",
        "pytorch_lightning.core",
        "lightning_fabric.wrappers",
    ],
)
def test_warnings_point_past_the_frameworks_frames(framework):
    """A framework's code between the user's line and ``step()`` (accelerate's wrapper, the
    Trainer's loop) is passed over as orthoopt's and torch's own frames are."""
    namespace = {"__name__": framework}
    exec(compile("def train(opt):\n    opt.step()\n", f"<{framework}>", "exec"), namespace)
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([("w", w)], lr=1e-2, ortho=1.0, ortho_mode="hard")
    w.grad = torch.randn_like(w)
    with pytest.warns(orthoopt.OrthogonalityWarning) as rec:
        namespace["train"](opt)
    assert rec[0].filename == __file__, rec[0].filename
