"""Hard mode's details that the mutation run of issue 12 left untested (tests/MUTATION.md,
stiefel.py): amsgrad's maximum, momentum 1 and momentum 0 with dampening, the canonical
half-precision re-projection, the state's dtypes (widened after a load, torch's float32 step),
the non-finite policy's order and message, the Cayley-solve fallback and its warnings, and the
first-step projection's threshold and message.  Kept free of checks on a warning's file, so
that mutmut (one more frame) can run them."""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch
from conftest import HARD, near_orthonormal, run_pair, stack_error
from torch import nn

import orthoopt
from orthoopt import stiefel
from orthoopt.penalty import polar


def recorded(step) -> list[str]:
    """The messages of the warnings that ``step()`` emits."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        step()
    return [str(w.message) for w in rec]


# -- the update rules against geoopt -------------------------------------------------------
@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
def test_amsgrad_keeps_the_largest_second_moment_as_geoopt(manifold):
    """With β₂ = 0.5 the second moment follows the shrinking gradient down, so amsgrad's
    maximum is what sets the step (test_stiefel's run at β₂ = 0.99 cannot tell amsgrad apart in
    its 30 steps).  geoopt keeps the per-matrix maximum broadcast over the matrix's entries."""
    kw = {"lr": 3e-2, "betas": (0.8, 0.5), "eps": 1e-6}
    ours = {
        "ortho_layout": "columns",
        "ortho_manifold": manifold,
        "ortho_stabilize": None,
        "ortho_second_moment": "sum",
    }
    opt, ref = run_pair(
        lambda ps: orthoopt.OrthoAdam(ps, **kw, amsgrad=True, **HARD, **ours),
        lambda ps: geoopt.optim.RiemannianAdam(ps, **kw, amsgrad=True),
        manifold,
    )
    state = opt.state[opt.param_groups[0]["params"][0]]
    theirs = ref.state[ref.param_groups[0]["params"][0]]
    assert set(state) == {stiefel.STEP, stiefel.EXP_AVG, stiefel.EXP_AVG_SQ, stiefel.MAX_EXP_AVG_SQ}
    torch.testing.assert_close(theirs["max_exp_avg_sq"], state[stiefel.MAX_EXP_AVG_SQ].reshape(1, 1).expand(10, 4))
    assert state[stiefel.MAX_EXP_AVG_SQ].item() > 1.2 * state[stiefel.EXP_AVG_SQ].item()  # the maximum matters
    # Without amsgrad the run leaves geoopt's amsgrad path, and keeps no maximum (as torch's Adam).
    with pytest.raises(AssertionError, match="step"):
        run_pair(
            lambda ps: orthoopt.OrthoAdam(ps, **kw, amsgrad=False, **HARD, **ours),
            lambda ps: geoopt.optim.RiemannianAdam(ps, **kw, amsgrad=True),
            manifold,
        )
    plain, _ = run_pair(
        lambda ps: orthoopt.OrthoAdam(ps, **kw, amsgrad=False, **HARD, **ours),
        lambda ps: geoopt.optim.RiemannianAdam(ps, **kw, amsgrad=False),
        manifold,
    )
    assert set(plain.state[plain.param_groups[0]["params"][0]]) == {stiefel.STEP, stiefel.EXP_AVG, stiefel.EXP_AVG_SQ}


@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
@pytest.mark.parametrize("momentum,dampening", [(1.0, 0.0), (0.0, 0.5)])
def test_sgd_momentum_one_and_zero_match_geoopt(manifold, momentum, dampening):
    """momentum = 1 (legal in torch's SGD) keeps the whole buffer; momentum = 0 has no buffer, so
    its dampening does nothing (torch's and geoopt's rule).  In float64, to 1e-13."""
    kw = {"lr": 2e-2, "momentum": momentum, "dampening": dampening}
    opt, _ = run_pair(
        lambda ps: orthoopt.OrthoSGD(
            ps, **kw, **HARD, ortho_layout="columns", ortho_manifold=manifold, ortho_stabilize=None
        ),
        lambda ps: geoopt.optim.RiemannianSGD(ps, **kw),
        manifold,
        seed_buffer=momentum > 0,
        dtype=torch.float64,
        atol=1e-13,
    )
    keys = {stiefel.STEP, stiefel.MOMENTUM} if momentum else {stiefel.STEP}
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == keys


# -- half precision --------------------------------------------------------------------------
def half_run(dtype, stabilize, steps=5):
    torch.manual_seed(0)
    p = nn.Parameter(polar(torch.randn(16, 4)).to(dtype))
    opt = orthoopt.OrthoAdam(
        [p], lr=5e-2, **HARD, ortho_layout="columns", ortho_manifold="canonical", ortho_stabilize=stabilize
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = torch.randn(16, 4, generator=gen).to(dtype)
        opt.step()
    return p.detach(), opt.state[p][stiefel.EXP_AVG]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_canonical_half_parameter_is_reprojected_every_step_by_default(dtype):
    """ortho_stabilize='auto' is every step for a half parameter on the canonical manifold."""
    point, moment = half_run(dtype, "auto")
    every_step, every_step_moment = half_run(dtype, 1)
    every_tenth, every_tenth_moment = half_run(dtype, 10)
    assert torch.equal(point, every_step) and torch.equal(moment, every_step_moment)
    assert not torch.equal(moment, every_tenth_moment)  # the period shows within 5 steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["adam-amsgrad", "sgd-momentum"])
def test_half_state_of_a_checkpoint_is_widened_to_float32_on_the_next_step(dtype, kind):
    """A checkpoint whose state is in the parameter's half dtype (as torch's own load leaves it)
    resumes as one with that state widened to float32: the state is float32 again after the next
    step, and the run is bitwise the same."""

    def make(p):
        if kind == "adam-amsgrad":
            return orthoopt.OrthoAdam([p], lr=1e-2, amsgrad=True, **HARD, ortho_layout="columns")
        return orthoopt.OrthoSGD([p], lr=1e-2, momentum=0.9, **HARD, ortho_layout="columns")

    torch.manual_seed(0)
    grads = [torch.randn(16, 4).to(dtype) for _ in range(6)]
    p = nn.Parameter(polar(torch.randn(16, 4)).to(dtype))
    opt = make(p)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()

    def checkpoint(cast):
        ckpt = copy.deepcopy(saved)
        for key, value in ckpt["state"][0].items():
            if key.startswith("stiefel_"):
                ckpt["state"][0][key] = cast(value)
        return ckpt

    resumed = []
    for cast in (lambda v: v.to(dtype), lambda v: v.to(dtype).float()):
        q = nn.Parameter(p.detach().clone())
        resumed.append((q, make(q)))
        resumed[-1][1].load_state_dict(checkpoint(cast))
    (q_half, opt_half), (q_wide, opt_wide) = resumed
    stiefel_keys = [k for k in opt_half.state[q_half] if k.startswith("stiefel_")]
    assert len(stiefel_keys) == (3 if kind == "adam-amsgrad" else 1)
    assert all(opt_half.state[q_half][k].dtype == dtype for k in stiefel_keys)  # as loaded
    assert all(opt_wide.state[q_wide][k].dtype == torch.float32 for k in stiefel_keys)
    for g in grads[3:]:
        q_half.grad, q_wide.grad = g.clone(), g.clone()
        opt_half.step()
        opt_wide.step()
    for k in stiefel_keys:
        assert opt_half.state[q_half][k].dtype == torch.float32, k
        assert torch.equal(opt_half.state[q_half][k], opt_wide.state[q_wide][k]), k
    assert torch.equal(q_half, q_wide) and not torch.equal(q_half, p)


@pytest.mark.parametrize("cls,options", [(orthoopt.OrthoSGD, {"momentum": 0.9}), (orthoopt.OrthoAdam, {})])
def test_step_counter_is_torchs_float32_scalar_for_a_float64_parameter(cls, options):
    """The hard state's "step" has the dtype of torch's own optimizers' (float32), whatever the
    parameter's dtype; the stack's state has the parameter's."""
    p = nn.Parameter(polar(torch.randn(10, 4, dtype=torch.float64)))
    opt = cls([p], lr=1e-2, **options, **HARD, ortho_layout="columns")
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    plain = nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    adam = torch.optim.Adam([plain], lr=1e-2)
    plain.grad = torch.randn_like(plain)
    adam.step()
    state = opt.state[p]
    assert state[stiefel.STEP].dtype == adam.state[plain]["step"].dtype == torch.float32
    assert state[stiefel.STEP].item() == 2.0
    assert all(v.dtype == torch.float64 for k, v in state.items() if k.startswith("stiefel_"))


# -- the non-finite policy -------------------------------------------------------------------
WHAT = (
    "hard mode takes no step on its matrices that are not finite (in the parameter or its gradient) "
    "and leaves their optimizer state as it was (other matrices and parameters are unaffected). "
    "Lower the learning rate, or clip gradients"
)


def nan_grad(p: torch.Tensor) -> torch.Tensor:
    g = torch.randn_like(p)
    g[0, 0] = float("nan")
    return g


def test_raise_goes_before_the_other_policies_and_spends_no_warning():
    """Groups with 'warn', 'skip' and 'raise' all holding a NaN: the step raises for the 'raise'
    group before it warns for the 'warn' group, so that nothing (not even the once-per-parameter
    warning) is spent by a step that did not happen."""
    ps = [nn.Parameter(polar(torch.randn(10, 4, dtype=torch.float64))) for _ in range(3)]
    groups = [
        {"params": [p], "param_names": [name], "ortho_nonfinite": policy}
        for p, name, policy in zip(ps, "abc", ["warn", "skip", "raise"])
    ]
    opt = orthoopt.OrthoSGD(groups, lr=0.1, **HARD, ortho_layout="columns")
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = nan_grad(p)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError) as raised:
            opt.step()
    assert rec == []
    assert str(raised.value) == f"parameter 'c' holds NaN or Inf: {WHAT}; nothing was changed by this step"
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and len(opt.state) == 0
    opt.param_groups[2]["ortho_nonfinite"] = "skip"
    assert recorded(opt.step) == [
        f"parameter 'a' holds NaN or Inf: {WHAT} (warned once per parameter; ortho_nonfinite='raise' to stop instead)"
    ]


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_non_finite_message_names_the_parameters_and_what_hard_mode_does(policy):
    a, b = (nn.Parameter(polar(torch.randn(2, 10, 4, dtype=torch.float64))) for _ in range(2))
    opt = orthoopt.OrthoAdam([("a", a), ("b", b)], lr=1e-2, **HARD, ortho_layout="group_axis:0", ortho_nonfinite=policy)
    a.grad, b.grad = nan_grad(a), nan_grad(b)
    names = "parameter 'a', parameter 'b'"
    if policy == "raise":
        with pytest.raises(FloatingPointError) as raised:
            opt.step()
        assert str(raised.value) == f"{names} holds NaN or Inf: {WHAT}; nothing was changed by this step"
    else:
        assert recorded(opt.step) == [
            f"{names} holds NaN or Inf: {WHAT} (warned once per parameter; ortho_nonfinite='raise' to stop instead)"
        ]
        assert recorded(opt.step) == []  # once per parameter


def test_a_meta_parameter_does_not_hide_a_non_finite_one_behind_it():
    m = nn.Parameter(torch.empty(10, 4, device="meta"))
    w = nn.Parameter(polar(torch.randn(10, 4, dtype=torch.float64)))
    opt = orthoopt.OrthoSGD([("m", m), ("w", w)], lr=0.1, **HARD, ortho_layout="columns", ortho_nonfinite="raise")
    before = w.detach().clone()
    m.grad, w.grad = torch.empty_like(m), nan_grad(w)
    with pytest.raises(FloatingPointError) as raised:
        opt.step()
    assert str(raised.value) == f"parameter 'w' holds NaN or Inf: {WHAT}; nothing was changed by this step"
    assert torch.equal(w, before) and w not in opt.state


# -- the Cayley solve's fallback -------------------------------------------------------------
# Two forms of MKL's batched-solve failure, each with one of the two marks the fallback knows.
LU_SOLVE_ONLY = "torch.linalg.lu_solve: the batched LAPACK solve returned info = 3"
PIVOTS_ONLY = "Pivots given to the batched solver must all be greater or equal to 1"
RULES = {
    "sgd": (orthoopt.OrthoSGD, {"lr": 0.1}),
    "sgd-momentum": (orthoopt.OrthoSGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (orthoopt.OrthoAdam, {"lr": 1e-2, "eps": 1e-8}),
}


@pytest.mark.parametrize("message", [LU_SOLVE_ONLY, PIVOTS_ONLY])
@pytest.mark.parametrize("fails", ["batched", "always"])
@pytest.mark.parametrize("rule", list(RULES))
def test_cayley_solve_failure_warns_with_the_parameter_and_the_error(monkeypatch, rule, fails, message):
    """Batched solve fails: the step is redone per matrix (the same step); per matrix too: the
    step is the Euclidean QR retraction of the canonical direction (the formula, first step).
    Either way one warning names the parameter and quotes the error."""
    cls, options = RULES[rule]
    x0 = polar(torch.randn(3, 10, 4, dtype=torch.float64))
    g = torch.randn(3, 10, 4, dtype=torch.float64)
    make = lambda q: cls([("w", q)], **options, **HARD, ortho_layout="group_axis:0", ortho_manifold="canonical")  # noqa: E731
    ref, p = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
    opt_ref, opt = make(ref), make(p)
    ref.grad, p.grad = g.clone(), g.clone()
    opt_ref.step()
    solve = torch.linalg.solve

    def flaky(a, b, *args, **kwargs):
        if fails == "always" or a.dim() > 2:
            raise RuntimeError(message)
        return solve(a, b, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", flaky)
    if fails == "batched":
        expected_warning = f"parameter 'w': geoopt's batched Cayley solve failed on this step ({message}); redid it one matrix at a time"
    else:
        expected_warning = (
            f"parameter 'w': geoopt's Cayley solve failed on this step ({message}), also one matrix at a time; "
            "took this step with the Euclidean QR retraction instead"
        )
    assert recorded(opt.step) == [expected_warning]
    if fails == "batched":
        torch.testing.assert_close(p.detach(), ref.detach(), atol=1e-13, rtol=0)
        return
    canonical, euclidean = geoopt.CanonicalStiefel(), geoopt.EuclideanStiefel()
    xi = canonical.egrad2rgrad(x0, g)
    if rule == "adam":  # first step: m̂ = ξ, v̂ = <ξ, ξ>_X / (l n)
        direction = xi / ((canonical.component_inner(x0, xi) / 40).sqrt() + options["eps"])
    else:
        direction = xi
    expected = euclidean.retr(x0, -options["lr"] * direction)
    torch.testing.assert_close(p.detach(), expected, atol=1e-13, rtol=0)
    moved = {"sgd": None, "sgd-momentum": (stiefel.MOMENTUM, xi), "adam": (stiefel.EXP_AVG, 0.1 * xi)}[rule]
    if moved is not None:  # transported as the Euclidean manifold's retr_transp does
        key, vector = moved
        torch.testing.assert_close(opt.state[p][key], euclidean.proju(expected, vector), atol=1e-13, rtol=0)


# -- the first hard step's projection --------------------------------------------------------
def test_projection_threshold_is_geoopts_tolerance():
    """An error of exactly PROJECTION_TOL is on the manifold for geoopt (``allclose`` with atol
    1e-5): projected silently; the next float above it is reported."""
    at = torch.tensor([[1.0, 1e-5], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    above = at.clone()
    above[0, 1] = torch.nextafter(above[0, 1], torch.tensor(1.0, dtype=torch.float64))
    euclidean = geoopt.EuclideanStiefel()
    assert stack_error("columns", at) == stiefel.PROJECTION_TOL and euclidean.check_point_on_manifold(at)
    assert stack_error("columns", above) > stiefel.PROJECTION_TOL and not euclidean.check_point_on_manifold(above)
    for x, reported in ((at, False), (above, True)):
        p = nn.Parameter(x.clone())
        opt = orthoopt.OrthoSGD([("w", p)], lr=1e-3, **HARD, ortho_layout="columns")
        p.grad = torch.randn_like(p)
        messages = recorded(opt.step)
        assert messages == (
            [
                "ortho_mode='hard': projected onto the Stiefel manifold (polar factor) at their first hard step: "
                "parameter 'w' (max |XᵀX - I| = 1e-05). Call orthoopt.project_(optimizer) before training to start there"
            ]
            if reported
            else []
        )
        assert stack_error("columns", p) < 1e-12  # projected either way


def test_half_parameter_is_reported_above_twice_its_rounding_error():
    """A bfloat16 parameter is as orthonormal as its polar factor rounded to bfloat16: reported
    only where its error is more than twice that one's ('a': 2.3 times, 'b': 1.7 times)."""

    def errors(x):
        return stack_error("columns", x), stack_error("columns", polar(x))

    a = nn.Parameter(near_orthonormal(8, 4, noise=3e-3).to(torch.bfloat16))
    b = nn.Parameter(near_orthonormal(8, 4, noise=2e-3).to(torch.bfloat16))
    (before_a, after_a), (before_b, after_b) = errors(a), errors(b)
    assert 2.2 * after_a < before_a < 2.5 * after_a and 1.5 * after_b < before_b < 1.8 * after_b
    assert min(before_a, before_b) > 100 * stiefel.PROJECTION_TOL
    opt = orthoopt.OrthoSGD([("a", a), ("b", b)], lr=1e-3, **HARD, ortho_layout="columns")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    assert recorded(opt.step) == [
        "ortho_mode='hard': projected onto the Stiefel manifold (polar factor) at their first hard step: "
        f"parameter 'a' (max |XᵀX - I| = {before_a:.3g}). Call orthoopt.project_(optimizer) before training to "
        "start there"
    ]


def test_projection_warning_lists_every_moved_parameter():
    a = nn.Parameter(near_orthonormal(10, 4, seed=0))
    b = nn.Parameter(near_orthonormal(10, 4, seed=1))
    errors = [stack_error("columns", p) for p in (a, b)]
    opt = orthoopt.OrthoAdam([("a", a), ("b", b)], lr=1e-3, **HARD, ortho_layout="columns")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    assert recorded(opt.step) == [
        "ortho_mode='hard': projected onto the Stiefel manifold (polar factor) at their first hard step: "
        f"parameter 'a' (max |XᵀX - I| = {errors[0]:.3g}), parameter 'b' (max |XᵀX - I| = {errors[1]:.3g}). "
        "Call orthoopt.project_(optimizer) before training to start there"
    ]
    assert max(opt.orthogonality_errors().values()) < 1e-12
