r"""The soft step at the optimizer level, against the penalty's gradient by autograd (float64).

Each expected value is computed without the optimizer's own step math: the gradient of
:func:`orthoopt.l1_orthogonality` or :func:`orthoopt.frobenius_orthogonality` by autograd at
the value *before* the step, plus the base step of SGD without momentum, ``-lr·g``, which is
exact.  Each test states its regime:

* where no cap of :func:`orthoopt.penalty.safe_step_size` binds and every entry of ``R`` is
  at least ``2η`` (η = 2·lr·β) or the Huber threshold δ is at least ``2η``, the penalty step
  is exactly ``-lr·∂(βL)/∂Φ``;
* where a cap binds, the capped step is computed here from the cap's formula.

A nonzero task gradient makes "the penalty at the value before the base step" differ from
"after it" by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt import frobenius_orthogonality, l1_orthogonality, penalty


def _penalty_grad(phi: torch.Tensor, beta: float, kind: str, smoothing: float, matrices) -> torch.Tensor:
    """``∂(β L)/∂phi`` by autograd, with ``matrices(phi)`` the stack ``(m, l, n)`` of ``phi``."""
    phi = phi.detach().clone().requires_grad_()
    mats = matrices(phi)
    if kind == "l1":
        loss = l1_orthogonality(mats, beta, group_dim=0, smoothing=smoothing)
    else:
        loss = frobenius_orthogonality(mats, beta, group_dim=0)
    (grad,) = torch.autograd.grad(loss, phi)
    return grad


def _residual(mats: torch.Tensor) -> torch.Tensor:
    return mats.mT @ mats - torch.eye(mats.shape[-1], dtype=mats.dtype)


# Two parameters whose matrices are both 12 x 4 (so they share one bucket), through two
# layouts: a (3, 12, 4) stack and a (4, 12) weight whose rows are orthonormal.
SPECS = [
    ((3, 12, 4), "group_axis:0", lambda p: p),
    ((4, 12), "rows", lambda p: p.t().unsqueeze(0)),
]


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed_lr_beta", "same_lr_beta"])
@pytest.mark.parametrize("kind,smoothing", [("l1", 0.0), ("l1", 0.05), ("frobenius", 0.0)])
def test_sgd_step_is_base_step_plus_penalty_gradient_before_it(kind, smoothing, mixed):
    """θ⁺ = θ - lr·g - lr·∂(βL)/∂Φ(θ), for two groups with different lr and β in one bucket.

    Regime: lr·β ≤ 3e-6 (η ≤ 6e-6), so no cap binds (the no-overshoot bound is at least
    max|R|/2 for L1 and 1/4 for Frobenius; the spectral bound is at least 1/(4·2·n·max|R|)),
    and every entry of R is above 2η for the exact sign (checked below), or δ = 0.05 > 2η
    makes the cutoff the Huber threshold, under which S = clamp(R/δ) is h'(R) exactly.
    """
    g = torch.Generator().manual_seed(7)
    settings = [(0.1, 1e-5), (0.05, 6e-5)] if mixed else [(0.1, 1e-5), (0.1, 1e-5)]
    params, groups = [], []
    for (shape, layout, _), (lr, beta) in zip(SPECS, settings):
        p = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64) / 12**0.5)
        p.grad = torch.randn(shape, generator=g, dtype=torch.float64)
        params.append(p)
        groups.append({"params": [p], "lr": lr, "ortho": beta, "ortho_layout": layout, "ortho_smoothing": smoothing})
    before = [p.detach().clone() for p in params]
    residuals = torch.cat([_residual(matrices(b)) for b, (_, _, matrices) in zip(before, SPECS)])
    two_eta = max(4 * lr * beta for lr, beta in settings)
    if kind == "l1" and smoothing == 0:
        assert residuals.abs().min() > two_eta  # every entry gets the full sign
    if smoothing > 0:
        assert smoothing > two_eta  # the cutoff is δ: S is the Huber derivative
        assert (residuals.abs() < smoothing).any() and (residuals.abs() > smoothing).any()  # both branches

    opt = orthoopt.OrthoSGD(groups, lr=0.1, ortho_penalty=kind)
    opt.step()
    (bucket,) = opt._plan().buckets
    assert len(bucket.params) == 2  # one bucket: one η per matrix where the groups differ

    for p, b, (lr, beta), (_, _, matrices) in zip(params, before, settings, SPECS):
        grad = _penalty_grad(b, beta, kind, smoothing, matrices)
        expected = b - lr * p.grad - lr * grad
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
        # The penalty's part is well above the tolerance, and so is its change over the base step.
        assert (lr * grad).abs().max() > 1e-7
        later = _penalty_grad(b - lr * p.grad, beta, kind, smoothing, matrices)
        assert (lr * (later - grad)).abs().max() > 1e-9


def test_frobenius_step_is_capped_where_it_would_overshoot():
    """Frobenius, η = 2·lr·β = 1 on a near-orthonormal matrix: the no-overshoot bound
    max|R| / (2·max|2R|) = 1/4 binds (the spectral bound 1/(4‖2R‖₂) is far above it), so the
    step is Φ⁻(I - ¼·2R) = Φ⁻ - ⅛·∂‖R‖_F²/∂Φ, not the full -lr·∂(βL)/∂Φ (4x longer)."""
    g = torch.Generator().manual_seed(2)
    q = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64)).Q
    w = nn.Parameter(q + 1e-3 * torch.randn(12, 4, generator=g, dtype=torch.float64))
    w.grad = 1e-3 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    before = w.detach().clone()
    r = _residual(before)
    assert 0.25 < 1 / (4 * torch.linalg.matrix_norm(2 * r, ord=2))  # only the no-overshoot cap binds
    opt = orthoopt.OrthoSGD([w], lr=1.0, ortho=0.5, ortho_penalty="frobenius", ortho_layout="columns")
    opt.step()
    grad = _penalty_grad(before, 1.0, "frobenius", 0.0, lambda p: p.unsqueeze(0))  # 4·Φ R
    expected = before - w.grad - grad / 8
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)
    assert (grad / 8).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["l1", "frobenius"])
def test_shrunk_matrix_grows_when_its_residual_is_all_negative(kind):
    """Φ = c·E (E: 4 columns of the identity, rows permuted), R = (c² - 1)·I exactly, every
    nonzero entry negative: the step must read max|R| from the negative entries.

    L1, η = 0.02 < max|R|/2: R/(2η) is below -1 on the diagonal and 0 elsewhere, so S = -I and
    no cap binds: Φ⁺ = Φ - lr·∂(βL)/∂Φ = (1 + η)Φ.  Frobenius, η = 1: the no-overshoot
    bound is 1/4 and the spectral one 1/(4‖2R‖₂) = 1/(8·0.36) is above it: Φ⁺ = Φ(I - ¼·2R).
    """
    c = 0.8
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    phi = c * torch.eye(12, dtype=torch.float64)[perm, :4]
    w = nn.Parameter(phi.clone())
    w.grad = torch.zeros_like(w)
    lr, beta = (0.1, 0.1) if kind == "l1" else (1.0, 0.5)
    opt = orthoopt.OrthoSGD([w], lr=lr, ortho=beta, ortho_penalty=kind, ortho_layout="columns")
    opt.step()
    grad = _penalty_grad(phi, beta if kind == "l1" else 1.0, kind, 0.0, lambda p: p.unsqueeze(0))
    expected = phi - lr * grad if kind == "l1" else phi - grad / 8
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)
    growth = 1 + 2 * lr * beta if kind == "l1" else 1 + 2 * (1 - c**2) / 4
    torch.testing.assert_close(w.detach(), growth * phi, rtol=0, atol=1e-15)


@pytest.mark.parametrize("c, lr, factor", [(0.5, 1.0, 1.2), (2.0, 0.05, 0.8)], ids=["shrunk_eta_1", "grown_eta_0.05"])
def test_scaled_orthonormal_matrix_step_is_capped_by_its_spectral_norm(c, lr, factor):
    """Frobenius, Φ = c·Q (Q orthonormal, R ≈ (c² - 1)·I), η = 2·lr·β: the spectral bound
    1/(4·SPECTRAL_PAD·‖2R‖₂) binds, below the no-overshoot bound 1/4 and below η, so
    Φ⁺ = Φ(I - ¼·S/(1.25‖S‖₂)) = (1 ∓ ⅕)·Φ.  Shrunk, c = ½: 2/15 < 1/4 (every large entry of R
    negative).  Grown, c = 2: 1/30 < η = 0.05, with large residuals.  (S = 2R is a multiple of
    I up to rounding, where the power iteration's estimate of ‖S‖₂, before its padding, is
    exact.)"""
    g = torch.Generator().manual_seed(4)
    phi = c * torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64)).Q
    w = nn.Parameter(phi.clone())
    w.grad = torch.zeros_like(w)
    opt = orthoopt.OrthoSGD([w], lr=lr, ortho=0.5, ortho_penalty="frobenius", ortho_layout="columns")
    opt.step()
    cap = 1 / (4 * penalty.SPECTRAL_PAD * torch.linalg.matrix_norm(2 * _residual(phi), ord=2))
    assert cap < min(0.25, 2 * lr * 0.5)
    grad = _penalty_grad(phi, 1.0, "frobenius", 0.0, lambda p: p.unsqueeze(0))  # 4·Φ R = 2·Φ S
    torch.testing.assert_close(w.detach(), phi - cap * grad / 2, rtol=0, atol=1e-14)
    torch.testing.assert_close(w.detach(), factor * phi, rtol=0, atol=1e-14)


def test_frobenius_step_of_large_weights_keeps_the_singular_values_within_a_quarter():
    """Float32 weights of column norm 1e10 (R ≈ 1e20, ‖S‖₂ = ‖2R‖₂ far above √(float max), where
    squares overflow): the spectral cap still binds, so every singular value moves by at most
    25% up to the estimate of ‖S‖₂ (4 power iterations padded by 10%, documented within a factor
    1.43 of the norm: 25%·1.43/1.1 < 33%), instead of by the whole step η·Φ·2R (which would grow them by 8e17 to 7e18)."""
    g = torch.Generator().manual_seed(8)
    w = nn.Parameter(1e10 * torch.randn(40, 12, generator=g) / 40**0.5)
    w.grad = torch.zeros_like(w)
    before = torch.linalg.svdvals(w.detach().double())
    opt = orthoopt.OrthoSGD([w], lr=0.01, ortho=1.0, ortho_penalty="frobenius", ortho_layout="columns")
    opt.step()
    ratio = torch.linalg.svdvals(w.detach().double()) / before
    assert ratio.min() >= 0.67 and ratio.max() <= 1.33, ratio
    assert ratio.min() < 0.8  # the capped step is taken, not skipped


def test_frobenius_matrix_whose_direction_overflows_is_named_and_left_as_it_was():
    """Float32, R finite but 2R not (max|R| between half the float's max and the max): the
    Frobenius direction cannot be formed, so the matrix is reported like a non-finite one and
    left exactly as it was, while the other matrix of the parameter takes its step; the
    sharded path's call (no finite mask given) leaves it too."""
    b = nn.Parameter(torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(9)) / 8**0.5)
    with torch.no_grad():
        b[0, 0, 0] = 1.5e19  # R[0, 0] ≈ 2.25e38: finite, and 2R is not
    r = orthoopt.penalty.residual(b.detach())
    assert torch.isfinite(r).all() and not torch.isfinite(2 * r).all()
    before = b.detach().clone()
    b.grad = torch.zeros_like(b)
    opt = orthoopt.OrthoSGD([("b", b)], lr=0.1, ortho=1.0, ortho_penalty="frobenius", ortho_layout="group_axis:0")
    with pytest.warns(RuntimeWarning, match="'b' holds NaN or Inf"):
        opt.step()
    assert torch.equal(b.detach()[0], before[0])
    assert (b.detach()[1] - before[1]).abs().max() > 1e-3
    step = orthoopt.penalty.penalty_step(r, before, 0.0, "frobenius", 0.2)
    assert torch.equal(step[0], torch.zeros_like(step[0])) and step[1].abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_matrix_with_a_non_finite_residual_is_left_exactly_as_it_was(policy):
    """A matrix whose residual is not finite (here finite entries whose Gram overflows float32)
    gets a zero penalty step: all its entries stay as they were, the finite ones included,
    while the other matrix of the same parameter takes its step."""
    b = nn.Parameter(torch.randn(2, 8, 3))  # group_axis:0: two 8x3 matrices
    with torch.no_grad():
        b[0, 0, 0] = 1e20  # (1e20)² overflows float32: R of matrix 0 holds inf
    before = b.detach().clone()
    b.grad = torch.zeros_like(b)  # SGD's own step is exactly zero
    opt = orthoopt.OrthoSGD([("b", b)], lr=0.1, ortho=1.0, ortho_layout="group_axis:0", ortho_nonfinite=policy)
    if policy == "warn":
        with pytest.warns(RuntimeWarning, match="'b' holds NaN or Inf"):
            opt.step()
    else:
        opt.step()
    assert torch.equal(b.detach()[0], before[0])
    assert (b.detach()[1] - before[1]).abs().max() > 1e-3
