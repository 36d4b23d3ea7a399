"""The math: closed-form gradients against torch.autograd, kinks, smoothing, error metric."""

from __future__ import annotations

import pytest
import torch
from conftest import orthonormal
from hypothesis import given
from hypothesis import strategies as st

import orthoopt
from orthoopt import penalty

shapes = st.tuples(st.integers(1, 9), st.integers(1, 5), st.integers(1, 9))  # (l, m, n)


def autograd_grad(fn, phi, **kw):
    x = phi.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, **kw), x)
    return g


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@given(shape=shapes, beta=st.floats(0.01, 100.0), seed=st.integers(0, 2**31 - 1))
def test_l1_grad_matches_autograd_float64(shape, beta, seed):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(*shape, dtype=torch.float64, generator=g)
    closed = orthoopt.l1_orthogonality_grad(phi, beta)
    auto = autograd_grad(orthoopt.l1_orthogonality, phi, beta=beta)
    assert closed.shape == phi.shape
    assert rel_err(closed, auto) <= 1e-12 or (closed - auto).abs().max() <= 1e-12


@given(shape=shapes, beta=st.floats(0.01, 100.0), delta=st.floats(1e-3, 2.0), seed=st.integers(0, 2**31 - 1))
def test_huber_grad_matches_autograd_float64(shape, beta, delta, seed):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(*shape, dtype=torch.float64, generator=g)
    closed = orthoopt.l1_orthogonality_grad(phi, beta, smoothing=delta)
    auto = autograd_grad(orthoopt.l1_orthogonality, phi, beta=beta, smoothing=delta)
    assert rel_err(closed, auto) <= 1e-12 or (closed - auto).abs().max() <= 1e-12


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_frobenius_grad_matches_autograd_float64(shape, seed):
    phi = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    closed = orthoopt.frobenius_orthogonality_grad(phi, 0.7)
    auto = autograd_grad(orthoopt.frobenius_orthogonality, phi, beta=0.7)
    assert rel_err(closed, auto) <= 1e-12 or (closed - auto).abs().max() <= 1e-12


@pytest.mark.parametrize("group_dim", [0, 1, 2, -1])
def test_every_group_axis_matches_autograd(group_dim):
    phi = torch.randn(6, 4, 3, dtype=torch.float64)
    closed = orthoopt.l1_orthogonality_grad(phi, 2.0, group_dim=group_dim)
    auto = autograd_grad(orthoopt.l1_orthogonality, phi, beta=2.0, group_dim=group_dim)
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)


def test_single_matrix_with_group_dim_none():
    phi = torch.randn(7, 3, dtype=torch.float64)
    closed = orthoopt.l1_orthogonality_grad(phi, group_dim=None)
    auto = autograd_grad(orthoopt.l1_orthogonality, phi, group_dim=None)
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)
    # and it is the seed's 3-D case with one group
    torch.testing.assert_close(closed, orthoopt.l1_orthogonality_grad(phi[:, None, :])[:, 0, :])


def test_kink_gives_sign_zero_subgradient():
    # Columns e1, e2 and a third column orthogonal to both: R has exact zeros off the
    # (3,3) entry, where autograd's abs'(0) = 0 and ours must agree.
    phi = torch.zeros(5, 1, 3, dtype=torch.float64)
    phi[0, 0, 0] = 1.0
    phi[1, 0, 1] = 1.0
    phi[2, 0, 2] = 2.0
    r = phi[:, 0, :].T @ phi[:, 0, :] - torch.eye(3, dtype=torch.float64)
    assert (r == 0).sum() == 8  # the kink is really hit
    closed = orthoopt.l1_orthogonality_grad(phi, 1.5)
    auto = autograd_grad(orthoopt.l1_orthogonality, phi, beta=1.5)
    torch.testing.assert_close(closed, auto, rtol=0, atol=0)
    expected = torch.zeros_like(phi)
    expected[2, 0, 2] = 2 * 1.5 * 2.0  # 2β Φ sign(R): only the (3,3) entry is nonzero
    torch.testing.assert_close(closed, expected, rtol=0, atol=0)
    # exactly orthonormal: the chosen subgradient is 0 everywhere
    eye = torch.eye(4, 3, dtype=torch.float64)[:, None, :]
    assert orthoopt.l1_orthogonality_grad(eye).abs().max() == 0


def test_index_form_of_the_seed():
    # ∂L/∂Φ_{:,a,b} = 2β Σ_j Φ_{:,a,j} sign(Φ_aᵀΦ_a − I)_{jb}, an l-vector, by loops.
    l, m, n, beta = 5, 3, 4, 0.8
    phi = torch.randn(l, m, n, dtype=torch.float64)
    grad = orthoopt.l1_orthogonality_grad(phi, beta)
    for a in range(m):
        s = torch.sign(phi[:, a, :].T @ phi[:, a, :] - torch.eye(n, dtype=torch.float64))
        for b in range(n):
            vec = sum(phi[:, a, j] * s[j, b] for j in range(n)) * 2 * beta
            torch.testing.assert_close(grad[:, a, b], vec, rtol=1e-13, atol=1e-13)


def test_gradcheck_smoothed_loss():
    phi = (0.6 * torch.randn(5, 3, 4, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: orthoopt.l1_orthogonality(x, 1.3, smoothing=0.5), (phi,))
    assert torch.autograd.gradcheck(lambda x: orthoopt.l1_orthogonality_grad(x, 1.3, smoothing=0.5).sum(), (phi,))


def test_huber_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        penalty.huber(x, 1.0), torch.tensor([1.5, 0.125, 0.0, 0.03125, 2.5], dtype=torch.float64)
    )
    # smoothing -> 0 recovers the L1 loss
    phi = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(
        orthoopt.l1_orthogonality(phi, smoothing=1e-9), orthoopt.l1_orthogonality(phi), rtol=1e-8, atol=1e-8
    )


def test_loss_value_by_definition():
    phi = torch.randn(6, 3, 2, dtype=torch.float64)
    by_hand = sum((phi[:, i, :].T @ phi[:, i, :] - torch.eye(2, dtype=torch.float64)).abs().sum() for i in range(3))
    torch.testing.assert_close(orthoopt.l1_orthogonality(phi, 2.5), 2.5 * by_hand)


@pytest.mark.parametrize("shape", [(8, 4, 8), (16, 3, 5), (5, 1, 1)])
def test_error_is_zero_on_orthonormal(shape):
    l, m, n = shape
    phi = orthonormal(m, l, n).permute(1, 0, 2)  # (l, m, n)
    err = orthoopt.orthogonality_error(phi)
    assert err.shape == (m,)
    assert err.max() < 1e-14
    assert orthoopt.orthogonality_error(torch.eye(4, 3, dtype=torch.float64)[:, None, :]).max() == 0
    phi2 = phi.clone()
    phi2[0, 0, 0] += 0.5
    assert orthoopt.orthogonality_error(phi2)[0] > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    phi64 = torch.randn(12, 3, 6, dtype=torch.float64) / 12**0.5
    phi = phi64.to(dtype)
    assert penalty.residual(orthoopt.layout.as_matrices(phi, 1)).dtype == (
        torch.float32 if dtype != torch.float32 else dtype
    )
    ref = orthoopt.l1_orthogonality_grad(phi.double(), 1.0)
    got = orthoopt.l1_orthogonality_grad(phi, 1.0)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    # The signs are those of the float32 Gram of the rounded input (an entry of R within
    # rounding of zero may legitimately differ from float64's); given them, the product is
    # exact up to the output's rounding.
    mats = orthoopt.layout.as_matrices(phi, 1)
    signs = penalty.residual(mats).sign().double()
    expected = (2 * mats.double() @ signs).movedim(0, 1)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=4 * eps * expected.abs().max().item())
    # and no sign is flipped here, so the float64 gradient agrees to the dtype's precision
    assert torch.equal(signs, penalty.residual(orthoopt.layout.as_matrices(phi.double(), 1)).sign())
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    loss = orthoopt.l1_orthogonality(phi)
    assert loss.dtype == dtype
    assert abs(loss.double() - orthoopt.l1_orthogonality(phi.double())) <= 8 * tol * orthoopt.l1_orthogonality(
        phi.double()
    )


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="smoothing"):
        orthoopt.l1_orthogonality(torch.randn(3, 2, 2), smoothing=-1.0)
    with pytest.raises(TypeError, match="real floating"):
        orthoopt.l1_orthogonality(torch.randn(3, 2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="group_dim"):
        orthoopt.l1_orthogonality(torch.randn(3, 2, 2), group_dim=3)
    with pytest.raises(ValueError, match="group_dim=None"):
        orthoopt.l1_orthogonality(torch.randn(3, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        orthoopt.l1_orthogonality([[1.0]])


def test_safe_step_size_caps():
    r = torch.tensor([[[0.1, 0.02], [0.02, -0.05]]], dtype=torch.float64)
    s = r.sign()
    # no overshoot: the largest entry lands on zero in the linearisation R - 2ηS
    assert penalty.safe_step_size(r, s, 1e9).item() == pytest.approx(0.05)
    assert (r - 2 * 0.05 * s).abs().max() <= r.abs().max()
    assert penalty.safe_step_size(r, s, 1e-6).item() == 1e-6
    huber = penalty.direction(r.clone(), 0.5)  # clamp(R/δ): the max entry maps to 0.2
    assert penalty.safe_step_size(r, huber, 1e9).item() == pytest.approx(0.25)  # = δ/2
    # the spectral cap: ‖ηS‖₂ <= 1/4; an all-ones 8x8 block has ‖S‖₂ = 8
    big = torch.full((1, 8, 8), 3.0, dtype=torch.float64)
    assert penalty.safe_step_size(big, big.sign(), 1e9).item() == pytest.approx(0.25 / 8)
    # at the manifold there is nothing to do
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    assert penalty.safe_step_size(zero, zero.sign(), 1.0).item() == 0


def test_spectral_norm_estimate():
    torch.manual_seed(0)
    s = torch.randn(6, 20, 20, dtype=torch.float64).sign()
    s = torch.triu(s) + torch.triu(s, 1).mT
    est = penalty.spectral_norm(s)
    exact = torch.linalg.matrix_norm(s, 2)
    assert torch.all(est >= 0.85 * exact) and torch.all(est <= s.abs().sum(-1).amax(-1))


@pytest.mark.parametrize("kind, smoothing", [("l1", 0.0), ("l1", 0.05), ("frobenius", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direction_max_is_max_abs_of_the_direction_exactly(kind, smoothing, dtype):
    """The step reads max|S| off max|R| instead of a pass over S: the two are bitwise equal."""
    r = torch.randn(40, 7, 7, dtype=dtype) * torch.logspace(-8, 0, 40, dtype=dtype)[:, None, None]
    r[0] = 0  # sign's max is 0 there
    r = r + r.mT
    per_matrix_with_zeros = torch.logspace(-6, -1, 40, dtype=dtype) * (torch.arange(40) % 3 != 0)
    for eta in (
        0.0,
        1e-6,
        1e-3,
        torch.logspace(-6, -1, 40, dtype=dtype),
        torch.zeros((), dtype=dtype),
        per_matrix_with_zeros,
    ):
        cutoff = penalty._no_crossing(smoothing, kind, eta)
        s = penalty.direction(r.clone(), cutoff, kind)
        assert torch.equal(penalty._direction_max(penalty.max_abs(r), cutoff, kind), penalty.max_abs(s))


@pytest.mark.parametrize("eta", [1e-4, 1e-2, 0.05, 0.3, 10.0])
def test_safe_step_size_cpu_skips_only_where_the_cap_cannot_bind(eta):
    """Skipping the cap's work on CPU (where n·max|S| or the row sums are small) changes nothing."""
    r = torch.randn(30, 9, 9, dtype=torch.float64) * torch.logspace(-6, 0, 30, dtype=torch.float64)[:, None, None]
    r = r + r.mT
    for s in (r.sign(), penalty.direction(r.clone(), 0.1)):
        tiny = torch.finfo(r.dtype).tiny
        no_overshoot = penalty.max_abs(r) / (2 * penalty.max_abs(s)).clamp_min(tiny)
        rowsum = s.abs().sum(-1).amax(-1)
        capped = penalty.MAX_MULTIPLIER_STEP / penalty.spectral_norm(s, rowsum=rowsum).clamp_min(tiny)
        expected = torch.minimum(no_overshoot, capped).clamp_(max=eta)
        assert torch.equal(penalty.safe_step_size(r, s, eta), expected)
