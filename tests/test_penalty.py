"""The math: closed-form gradients against torch.autograd, kinks, smoothing, error metric."""

from __future__ import annotations

import math

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
    # and it is the 3-D group tensor with one group
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
    # the spectral cap: ‖ηS‖₂ <= 1/4 of the padded estimate; an all-ones 8x8 block has ‖S‖₂ = 8,
    # which one power iteration finds exactly (rank one)
    big = torch.full((1, 8, 8), 3.0, dtype=torch.float64)
    assert penalty.safe_step_size(big, big.sign(), 1e9).item() == pytest.approx(0.25 / (8 * penalty.SPECTRAL_PAD))
    # at the manifold there is nothing to do
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    assert penalty.safe_step_size(zero, zero.sign(), 1.0).item() == 0


def test_spectral_norm_estimate():
    """Within the measured factor [0.65, 1.25] of the true norm on random sign matrices."""
    torch.manual_seed(0)
    s = torch.randn(6, 20, 20, dtype=torch.float64).sign()
    s = torch.triu(s) + torch.triu(s, 1).mT
    ratio = penalty.spectral_norm(s) / torch.linalg.matrix_norm(s, 2)
    assert torch.all(ratio >= 0.65) and torch.all(ratio <= penalty.SPECTRAL_PAD * (1 + 1e-12))


def _frobenius_by_hand(phi: torch.Tensor, beta: float) -> torch.Tensor:
    mats = phi.movedim(1, 0)
    r = mats.mT @ mats - torch.eye(mats.shape[-1], dtype=phi.dtype)
    return beta * (r * r).sum()


def test_frobenius_default_beta_is_one():
    phi = torch.randn(6, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(orthoopt.frobenius_orthogonality(phi), _frobenius_by_hand(phi, 1.0))
    torch.testing.assert_close(
        orthoopt.frobenius_orthogonality_grad(phi), orthoopt.frobenius_orthogonality_grad(phi, 1.0), rtol=0, atol=0
    )
    leaf = phi.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_frobenius_by_hand(leaf, 1.0), leaf)
    torch.testing.assert_close(orthoopt.frobenius_orthogonality_grad(phi), grad)


@pytest.mark.parametrize("bad, name", [([[1.0]], "list"), (None, "NoneType"), (3.0, "float")])
def test_a_non_tensor_is_named_by_its_type(bad, name):
    with pytest.raises(TypeError, match=rf"phi must be a torch.Tensor, got {name}$"):
        orthoopt.l1_orthogonality(bad)


def _one_power_iteration(s: torch.Tensor) -> torch.Tensor:
    """The documented estimate, by hand: w = S·cos(2.399963·k), ‖S·w/‖w‖‖ padded by 1.25."""
    v = torch.cos(torch.arange(s.shape[-1], dtype=torch.float64) * 2.399963).expand(*s.shape[:-1]).unsqueeze(-1)
    w = s @ v
    return (s @ (w / w.norm(dim=-2, keepdim=True))).norm(dim=(-2, -1)) * 1.25


def test_spectral_norm_is_one_power_iteration_padded_by_a_quarter():
    """The documented estimate: one power iteration from the fixed start cos(2.399963·k),
    the norm of S·ŵ padded by 25%.  Symmetric matrices whose two largest eigenvalues are
    close, so that the iteration count shows."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g, dtype=torch.float64)).Q
    eig = torch.tensor([3.0, -2.9, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)
    s = q @ torch.diag_embed(eig.expand(3, 6)) @ q.mT
    v = torch.cos(torch.arange(6, dtype=torch.float64) * 2.399963).expand(3, 6).unsqueeze(-1)
    two = (s @ s @ s @ v).norm(dim=(-2, -1)) / (s @ s @ v).norm(dim=(-2, -1)) * 1.25
    assert (two - _one_power_iteration(s)).abs().min() > 1e-4  # another count would show
    for c in (1.0, 0.37, 1.9, 5.3, 77.7, 1234.5):
        torch.testing.assert_close(penalty.spectral_norm(c * s), _one_power_iteration(c * s), rtol=1e-14, atol=0)


def test_spectral_norm_is_each_matrix_own():
    """All-ones 5x5 blocks scaled by 1 and 2: ‖S‖₂ = 5 and 10, found exactly (rank one), padded."""
    ones = torch.ones(1, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        penalty.spectral_norm(torch.cat([ones, 2 * ones])), torch.tensor([6.25, 12.5], dtype=torch.float64)
    )


@pytest.mark.parametrize("kind, smoothing", [("l1", 0.0), ("l1", 0.05), ("frobenius", 0.0)])
@pytest.mark.parametrize(
    "eta", [1e-3, 0.5, torch.tensor([1e-3, 0.5, 0.2], dtype=torch.float64)], ids=["small", "large", "tensor"]
)
def test_penalty_step_optional_arguments_change_nothing(kind, smoothing, eta):
    """``penalty_step`` with only its required arguments computes r_max, the finite mask and its
    workspaces itself, and gives what the optimizer's call with all of them gives; it leaves
    ``r`` as it was unless ``in_place``.  The large η reaches the spectral cap."""
    g = torch.Generator().manual_seed(1)
    mats = torch.randn(3, 7, 4, generator=g, dtype=torch.float64) / 7**0.5
    mats[1, 2, 3] = float("nan")  # its matrix gets a zero step, the others their own
    r = penalty.residual(mats)
    kept = r.clone()
    plain = penalty.penalty_step(r, mats, smoothing, kind, eta)
    assert torch.equal(r.nan_to_num(), kept.nan_to_num()) and torch.equal(r.isnan(), kept.isnan())
    assert torch.equal(plain[1], torch.zeros_like(plain[1]))
    assert plain[0].abs().max() > 0 and plain[2].abs().max() > 0
    r_max = penalty.max_abs(r)[:, None, None]
    full = penalty.penalty_step(
        r.clone(),
        mats,
        smoothing,
        kind,
        eta,
        out=torch.full_like(mats, float("nan")),
        finite=torch.isfinite(r_max),
        r_max=r_max,
        in_place=True,
        start=penalty.start_vector(r),
    )
    assert torch.equal(plain, full)


@pytest.mark.parametrize("kind", ["l1", "frobenius"])
def test_the_cap_runs_its_power_iteration_only_where_it_can_bind(monkeypatch, kind):
    """For L1 and Huber, |S| <= 1 bounds ‖S‖₂ by n: with 4·SPECTRAL_PAD·n·η <= 1 the cap cannot
    bind and its power iteration does not run, on any device (a host check of η and n only);
    beyond, it runs, as it always does for Frobenius (S = 2R has no such bound).  Skipping
    changes the step by rounding only."""
    calls = []
    real = penalty._power_norm
    monkeypatch.setattr(penalty, "_power_norm", lambda *a: calls.append(1) or real(*a))
    mats = torch.randn(2, 9, 5, dtype=torch.float64) / 3
    r = penalty.residual(mats)
    below, above = (f / (4 * penalty.SPECTRAL_PAD * 5) for f in (0.99, 1.01))
    skipped = penalty.penalty_step(r, mats, 0.0, kind, below)
    assert calls == ([] if kind == "l1" else [1])
    calls.clear()
    penalty.penalty_step(r, mats, 0.0, kind, above)
    assert calls == [1]
    monkeypatch.setattr(penalty, "_CAP_MARGIN", 0.0)  # the same η, through the cap's pass
    torch.testing.assert_close(penalty.penalty_step(r, mats, 0.0, kind, below), skipped, rtol=1e-14, atol=0)


def test_direction_defaults_to_the_sign_and_writes_where_it_says():
    """``direction(R)`` is sign(R) (δ = 0, L1), written into R itself; with ``out`` it is
    written there (the optimizer's workspace), for every penalty."""
    r = penalty.residual(torch.randn(2, 6, 3, dtype=torch.float64))
    expected = {"sign": r.sign(), "huber": (r / 0.1).clamp(-1, 1), "frobenius": 2 * r}
    inplace = r.clone()
    assert penalty.direction(inplace) is inplace and torch.equal(inplace, expected["sign"])
    for name, smoothing, kind in (("sign", 0.0, "l1"), ("huber", 0.1, "l1"), ("frobenius", 0.0, "frobenius")):
        inplace = r.clone()
        assert penalty.direction(inplace, smoothing, kind) is inplace
        assert torch.equal(inplace, expected[name])
        same = r.clone()
        assert penalty.direction(same, smoothing, kind, out=same) is same and torch.equal(same, expected[name])
        out = torch.full_like(r, float("nan"))
        assert penalty.direction(r.clone(), smoothing, kind, out=out) is out
        assert torch.equal(out, expected[name])


def test_max_abs_is_per_matrix():
    x = torch.tensor(
        [[[1.0, -3.0], [0.5, 2.0]], [[0.1, 0.2], [-0.05, 0.0]], [[-7.0, 1.0], [1.0, 6.0]]], dtype=torch.float64
    )
    assert torch.equal(penalty.max_abs(x), torch.tensor([3.0, 0.2, 7.0], dtype=torch.float64))
    x[1, 0, 0] = float("nan")
    got = penalty.max_abs(x)
    assert torch.isnan(got[1]) and torch.equal(got[[0, 2]], torch.tensor([3.0, 7.0], dtype=torch.float64))


def test_spectral_cap_uses_each_matrix_own_norm():
    """All-ones 5x5 blocks scaled by 1 and 2 as R and S (so the no-overshoot bound is 1/2): the
    spectral cap is 1/4 over each one's padded ‖S‖₂, 1.25·5 and 1.25·10."""
    ones = torch.ones(1, 5, 5, dtype=torch.float64)
    s = torch.cat([ones, 2 * ones])
    expected = torch.tensor([0.25 / 6.25, 0.25 / 12.5], dtype=torch.float64)
    torch.testing.assert_close(penalty.safe_step_size(s.clone(), s.clone(), 1.0), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_polar_keeps_the_dtype(dtype):
    """The SVD of a half-precision stack runs in float32; the polar factor comes back in its dtype."""
    mats = torch.randn(2, 6, 3, dtype=torch.float64).to(dtype)
    q = penalty.polar(mats)
    assert q.dtype == dtype
    u, _, vh = torch.linalg.svd(mats.double(), full_matrices=False)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(q.double(), u @ vh, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_residual_is_written_into_the_workspace(dtype):
    """The optimizer reuses one (m, n, n) workspace per bucket: ``residual(out=...)`` fills it
    (float32 for half-precision matrices) and returns it."""
    mats = torch.randn(3, 7, 4, dtype=torch.float64).to(dtype)
    wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    out = torch.full((3, 4, 4), float("nan"), dtype=wide)
    assert penalty.residual(mats, out=out) is out
    expected = mats.double().mT @ mats.double() - torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 if wide == torch.float32 else 1e-14)


def _documented_step(r: torch.Tensor, mats: torch.Tensor, smoothing: float, kind: str, eta):
    """``-η_i Φ_i S_i`` from the formulas of the docstrings alone (float64): S = 2R (Frobenius) or
    clamp(R / max(δ, 2η)) (L1), and η_i = min(η, max|R|/(2 max|S|), ¼/‖S‖₂) with the
    documented estimate of ‖S‖₂.  Also returns the spectral bound and the smaller of the others."""
    eta = torch.as_tensor(eta, dtype=r.dtype).expand(r.shape[0])
    if kind == "frobenius":
        s = 2 * r
    else:
        s = (r / (2 * eta).clamp(min=smoothing)[:, None, None]).clamp(-1, 1)
    others = torch.minimum(eta, r.abs().amax((-2, -1)) / (2 * s.abs().amax((-2, -1))))
    spectral = 0.25 / _one_power_iteration(s)
    eta_i = torch.minimum(others, spectral)
    return -eta_i[:, None, None] * (mats @ s), spectral, others


def _stack(scales, seed: int) -> torch.Tensor:
    """Three 9x4 matrices ``c·Q + noise``, whose residuals are of the order of c² - 1 and the noise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=torch.float64)).Q
    c, noise = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in zip(*scales))
    return c * q + noise * torch.randn(3, 9, 4, generator=g, dtype=torch.float64)


# (c, noise) per matrix, kind, δ, η.  In the "cap" cases the spectral cap binds, and the CPU's host
# checks must not skip it: a wrong bound of max|S| from max|R|, or of η, would.
STEP_CASES = {
    # R ≈ 3I: max|S| = 2·max|R| ≈ 6, and n·max|S|·η ≈ 1.2 is above the cap: ‖S‖₂ ≥ 6 binds.
    "frobenius_far_float_eta_cap": ([(2.0, 0.02), (2.0, 0.05), (1.0, 0.05)], "frobenius", 0.0, 0.05),
    # η ≥ 2 per matrix, S = R/(2η): n·max|S|·η = 2·max|R| is above the cap for max|R| ≈ 0.3.
    "l1_per_matrix_eta_above_one_cap": ([(1.0, 0.08), (1.0, 0.1), (1.0, 0.12)], "l1", 0.0, [2.0, 2.5, 3.0]),
    "l1_float_eta_cap": ([(1.0, 0.3), (1.5, 0.3), (0.5, 0.3)], "l1", 0.0, 0.4),
    "l1_sign_float_eta": ([(1.0, 0.1), (1.2, 0.05), (0.9, 0.2)], "l1", 0.0, 1e-3),
    "huber_float_eta": ([(1.0, 0.1), (1.2, 0.05), (0.9, 0.2)], "l1", 0.05, 0.01),
    "frobenius_per_matrix_eta": ([(1.0, 0.1), (1.2, 0.05), (0.9, 0.2)], "frobenius", 0.0, [0.5, 0.01, 2.0]),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_penalty_step_is_the_documented_step_with_and_without_the_callers_hints(case):
    """The step of each matrix is the docstrings' formula, whether ``penalty_step`` computes
    max|R| and its host copy itself or takes the optimizer's (``r_max``, ``r_top``, ``s_out``,
    ``finite=True``), and for η as one float or one per matrix.  Those hints feed the CPU's
    host checks that skip the spectral cap where it cannot bind; in the "cap" cases it binds."""
    scales, kind, smoothing, eta = STEP_CASES[case]
    mats = _stack(scales, seed=len(case))
    eta = torch.tensor(eta, dtype=torch.float64) if isinstance(eta, list) else eta
    r = penalty.residual(mats)
    expected, spectral, others = _documented_step(r, mats, smoothing, kind, eta)
    if case.endswith("_cap"):
        assert (spectral < 0.9 * others).any()  # binds, by 10% at least
    r_max = penalty.max_abs(r)[:, None, None]
    hints = {"finite": True, "r_max": r_max, "start": penalty.start_vector(r), "out": torch.empty_like(mats)}
    plain = penalty.penalty_step(r.clone(), mats, smoothing, kind, eta)
    hinted = penalty.penalty_step(r.clone(), mats, smoothing, kind, eta, **hints)
    in_place = r.clone()  # as the optimizer calls it: S formed in place of R
    optimizers = penalty.penalty_step(in_place, mats, smoothing, kind, eta, in_place=True, **hints)
    general = penalty.general_step(r.clone(), mats, smoothing, kind, eta)  # through safe_step_size
    for got in (plain, hinted, optimizers, general):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("smoothing", [0.0, 0.05])
@pytest.mark.parametrize("workspace", [False, True])
def test_a_zero_step_size_gives_a_zero_step_where_the_residual_has_exact_zeros(workspace, smoothing):
    """η = 0 (lr = 0, as at the first step of a warmup) is a step of exactly zero, also where
    entries of R are exactly zero (columns with disjoint supports, here of the identity), as a
    number and as a tensor (the sharded step's), with or without the optimizer's workspaces."""
    mats = torch.eye(6, 3, dtype=torch.float64).repeat(2, 1, 1)
    mats[1] *= 2  # R = 3I: zero off the diagonal, as R = 0 is in matrix 0
    for eta in (0.0, torch.zeros(2, dtype=torch.float64)):
        r = penalty.residual(mats)
        hints = {"in_place": True, "out": torch.full_like(mats, float("nan"))} if workspace else {}
        step = penalty.penalty_step(r, mats, smoothing, "l1", eta, **hints)
        assert torch.equal(step, torch.zeros_like(mats))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA branch of residual needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_of_half_matrices_on_cuda_is_float32_into_the_workspace(dtype):
    """On CUDA a half-precision stack's Gram comes from one bmm with a float32 output (float32
    accumulation, no float32 copy of the matrices), written into the optimizer's workspace."""
    mats = torch.randn(3, 64, 16, dtype=torch.float64).to(dtype)
    expected = mats.double().mT @ mats.double() - torch.eye(16, dtype=torch.float64)
    out = torch.full((3, 16, 16), float("nan"), dtype=torch.float32, device="cuda")
    assert penalty.residual(mats.cuda(), out=out) is out
    fresh = penalty.residual(mats.cuda())
    assert fresh.dtype == torch.float32 and torch.equal(fresh, out)
    # float32 sums of 64 products (each exact in float32): a sum rounded to bf16 would be ~0.25 off
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_scales_with_s_up_to_the_floats_max(dtype):
    """‖2^k·S‖₂ is 2^k·‖S‖₂ up to where the norm itself overflows: the power iteration's squares
    must not (they would from ‖S‖₂ ≈ 1.8e19 in float32, and read 0).  Bit for bit while the
    rescaled iterates stay normal numbers; near the float's max, to its rounding."""
    r = penalty.residual(torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    exact, top = (100, 120) if dtype == torch.float32 else (900, 1000)  # 2^top·‖S‖₂ below the max
    for s in (r.sign(), 2 * r):
        s = s.to(dtype)
        base = penalty.spectral_norm(s)
        for k in (1, 30, 70, exact):
            assert torch.equal(penalty.spectral_norm(s * 2.0**k), base * 2.0**k), k
        torch.testing.assert_close(penalty.spectral_norm(s * 2.0**top), base * 2.0**top, rtol=1e-5, atol=0)
    huge = torch.full((1, 4, 4), torch.finfo(dtype).max / 2, dtype=dtype)  # ‖S‖₂ = 2·max: inf
    assert penalty.spectral_norm(huge).isinf().all()


def test_steppable_is_a_finite_direction():
    """A matrix can take a step where max|R| is finite, and for the Frobenius penalty where
    2·max|R| is too (half the float's max is the largest such max|R|)."""
    top = torch.finfo(torch.float32).max
    r_max = torch.tensor([1.0, top / 2, top * 0.75, float("inf"), float("nan")])
    assert penalty.largest_residual("l1", torch.float32) == top
    assert penalty.largest_residual("frobenius", torch.float32) == top / 2
    assert penalty.steppable(r_max, "l1").tolist() == [True, True, True, False, False]
    assert penalty.steppable(r_max, "frobenius").tolist() == [True, True, False, False, False]


# -- the targets: orthonormal, orthogonal (lengths free), and the cosines (normalize) ------------------

CONVENTIONS = [("orthonormal", False), ("orthogonal", False), ("orthogonal", True)]


def _reference_loss(phi, beta, target, normalize, h, group_dim=1):
    """The loss from its definition, group by group: the Gram of the columns (of the columns over
    their lengths with ``normalize``), minus I or without its diagonal, summed through ``h``."""
    mats = [phi] if group_dim is None else phi.movedim(group_dim, 0)
    total = phi.new_zeros(())
    for m in mats:
        if normalize:
            m = m / torch.linalg.vector_norm(m, dim=0)
        gram = m.T @ m
        eye = torch.eye(gram.shape[0], dtype=phi.dtype)
        r = gram - eye if target == "orthonormal" else gram * (1 - eye)
        total = total + h(r).sum()
    return beta * total


def _reference(kind, smoothing):
    if kind == "frobenius":
        return lambda r: r * r
    return (lambda r: penalty.huber(r, smoothing)) if smoothing > 0 else torch.abs


def _closed_form(kind):
    return orthoopt.frobenius_orthogonality_grad if kind == "frobenius" else orthoopt.l1_orthogonality_grad


def _loss(kind):
    return orthoopt.frobenius_orthogonality if kind == "frobenius" else orthoopt.l1_orthogonality


def _options(kind, smoothing, target, normalize):
    options = {"target": target, "normalize": normalize}
    return options if kind == "frobenius" else {**options, "smoothing": smoothing}


PENALTIES_SMOOTHING = [("l1", 0.0), ("l1", 0.3), ("frobenius", 0.0)]


@pytest.mark.parametrize("target, normalize", CONVENTIONS)
@pytest.mark.parametrize("kind, smoothing", PENALTIES_SMOOTHING)
@given(
    shape=shapes,
    beta=st.floats(0.01, 100.0),
    scale=st.sampled_from([1e-3, 0.3, 1.0, 7.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_target_loss_and_grad_match_the_definition_under_autograd_float64(
    target, normalize, kind, smoothing, shape, beta, scale, seed
):
    """Loss and closed-form gradient of every target against the definition, written group by
    group with autograd (random columns of every length: none is zero)."""
    phi = scale * torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    options = _options(kind, smoothing, target, normalize)
    reference = _reference(kind, smoothing)
    leaf = phi.clone().requires_grad_(True)
    expected_loss = _reference_loss(leaf, beta, target, normalize, reference)
    (expected,) = torch.autograd.grad(expected_loss, leaf)
    torch.testing.assert_close(_loss(kind)(phi, beta, **options), expected_loss.detach(), rtol=1e-12, atol=1e-300)
    closed = _closed_form(kind)(phi, beta, **options)
    assert closed.shape == phi.shape
    # The gradient's rounding is of the size of its terms: 2β·n·|Φ|³ (|Φ|: the longest column), or
    # 2β·n/|φ| for the cosines (|φ|: the shortest), where cancellation can leave it far smaller.
    lengths = torch.linalg.vector_norm(phi, dim=0)
    size = 2 * beta * shape[-1] * (1 / lengths.min() if normalize else lengths.max() ** 3 + 1)
    assert (closed - expected).abs().max() <= 1e-13 * size


@pytest.mark.parametrize("target, normalize", CONVENTIONS)
@pytest.mark.parametrize("group_dim", [0, 1, 2, -1, None])
def test_target_grad_on_every_group_axis(target, normalize, group_dim):
    phi = torch.randn(6, 4, 3, dtype=torch.float64) if group_dim is not None else torch.randn(6, 3).double()
    closed = orthoopt.l1_orthogonality_grad(phi, 2.0, group_dim=group_dim, target=target, normalize=normalize)
    leaf = phi.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        _reference_loss(leaf, 2.0, target, normalize, torch.abs, group_dim=group_dim), leaf
    )
    torch.testing.assert_close(closed, expected, rtol=1e-12, atol=1e-12)


class _ClosedFormLoss(torch.autograd.Function):
    """The loss with the closed-form gradient as its backward, for gradcheck's finite differences."""

    @staticmethod
    def forward(ctx, phi, kind, options):
        ctx.save_for_backward(phi)
        ctx.kind, ctx.options = kind, options
        return _loss(kind)(phi, 1.3, **options)

    @staticmethod
    def backward(ctx, grad_output):
        (phi,) = ctx.saved_tensors
        return grad_output * _closed_form(ctx.kind)(phi, 1.3, **ctx.options), None, None


@pytest.mark.parametrize("target, normalize", CONVENTIONS)
@pytest.mark.parametrize("kind, smoothing", [("l1", 0.5), ("frobenius", 0.0)])
def test_gradcheck_closed_form_of_the_smooth_targets(target, normalize, kind, smoothing):
    """The smooth losses (Frobenius, Huber) against finite differences: through autograd, and
    with the closed-form gradient as the backward."""
    g = torch.Generator().manual_seed(3)
    phi = (0.6 * torch.randn(5, 3, 4, dtype=torch.float64, generator=g)).requires_grad_(True)
    options = _options(kind, smoothing, target, normalize)
    assert torch.autograd.gradcheck(lambda x: _loss(kind)(x, 1.3, **options), (phi,))
    assert torch.autograd.gradcheck(lambda x: _ClosedFormLoss.apply(x, kind, options), (phi,))


def test_orthogonal_target_at_its_kinks():
    """Exact zeros of the off-diagonal Gram (orthogonal columns of lengths 2 and 3) and of the
    cosines: the closed form picks sign(0) = 0, as autograd's abs does."""
    phi = torch.zeros(4, 3, dtype=torch.float64)
    phi[0, 0], phi[1, 1] = 2.0, 3.0  # columns 0 and 1 orthogonal: a kink
    phi[:, 2] = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    for normalize in (False, True):
        r = penalty.target_residual(phi[None], "orthogonal", normalize)[0]
        assert (r == 0).sum() == 5  # the diagonal and the pair (0, 1)
        leaf = phi.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(_reference_loss(leaf, 1.5, "orthogonal", normalize, torch.abs, None), leaf)
        closed = orthoopt.l1_orthogonality_grad(phi, 1.5, group_dim=None, target="orthogonal", normalize=normalize)
        torch.testing.assert_close(closed, expected, rtol=1e-15, atol=1e-15)
    # without normalize: 2βΦS with S = sign(R), zero on the diagonal and at (0, 1)
    s = torch.sign(phi.T @ phi) * (1 - torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(
        orthoopt.l1_orthogonality_grad(phi, 1.5, group_dim=None, target="orthogonal"), 3.0 * phi @ s, rtol=0, atol=0
    )
    # orthogonal columns of any lengths: the loss and the gradient are exactly zero
    diagonal = torch.diag(torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64))
    for normalize in (False, True):
        assert orthoopt.l1_orthogonality(diagonal, group_dim=None, target="orthogonal", normalize=normalize) == 0
        grad = orthoopt.l1_orthogonality_grad(diagonal, group_dim=None, target="orthogonal", normalize=normalize)
        assert grad.abs().max() == 0
    assert orthoopt.l1_orthogonality(diagonal, group_dim=None) > 1000  # not orthonormal


@pytest.mark.parametrize("kind", ["l1", "frobenius"])
def test_normalized_grad_is_orthogonal_to_each_column_and_scales_inversely(kind):
    """The cosines do not change with the lengths: each column's gradient is orthogonal to the
    column, and scaling a column by c scales its gradient by 1/c."""
    phi = torch.randn(9, 5, dtype=torch.float64)
    grad = _closed_form(kind)(phi, 1.0, group_dim=None, target="orthogonal", normalize=True)
    along = (grad * phi).sum(0) / (grad.norm(dim=0) * phi.norm(dim=0))
    assert along.abs().max() < 1e-14
    scales = torch.tensor([1e-3, 1.0, 10.0, 1e5, 0.5], dtype=torch.float64)
    scaled = _closed_form(kind)(phi * scales, 1.0, group_dim=None, target="orthogonal", normalize=True)
    torch.testing.assert_close(scaled * scales, grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["l1", "frobenius"])
@pytest.mark.parametrize("length", [0.0, 1e-160, 1e-310, 1e-320])
def test_zero_length_columns_have_zero_cosines_and_a_zero_gradient(kind, length):
    """normalize=True: a column of zeros, or one shorter than √tiny (1.5e-154 in float64; its
    squared length underflows), counts as zero-length, by the documented convention: its cosine
    with every column is 0, the loss is that of the other columns alone, its gradient is 0, and
    nothing is NaN, autograd included."""
    phi = torch.randn(6, 4, dtype=torch.float64)
    phi[:, 2] = length
    phi[0, 2] = length  # a subnormal column is not a multiple of another one
    options = {"group_dim": None, "target": "orthogonal", "normalize": True}
    r = penalty.target_residual(phi[None], "orthogonal", True)[0]
    assert torch.equal(r[2], torch.zeros(4, dtype=torch.float64)) and torch.equal(r[:, 2], r[2])
    others = phi[:, [0, 1, 3]]
    torch.testing.assert_close(_loss(kind)(phi, 2.0, **options), _loss(kind)(others, 2.0, **options), rtol=0, atol=0)
    grad = _closed_form(kind)(phi, 2.0, **options)
    assert torch.isfinite(grad).all() and grad[:, 2].abs().max() == 0
    torch.testing.assert_close(grad[:, [0, 1, 3]], _closed_form(kind)(others, 2.0, **options), rtol=0, atol=0)
    leaf = phi.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(_loss(kind)(leaf, 2.0, **options), leaf)
    torch.testing.assert_close(auto, grad, rtol=1e-13, atol=1e-15)
    assert orthoopt.orthogonality_error(phi, **options) == orthoopt.orthogonality_error(others, **options)


@pytest.mark.parametrize("dtype, exponents", [(torch.float64, (-505, 1000)), (torch.float32, (-60, 100))])
def test_cosines_at_every_magnitude(dtype, exponents):
    """The unit columns are the columns over their lengths taken after an exact rescaling by a
    power of two: the same bits as ``x / ‖x‖`` where that is finite, and the same bits again at
    magnitudes where the plain norm overflows to inf, or is just above the zero-length line."""
    phi = torch.randn(3, 8, 5, dtype=dtype)
    unit, inverse = penalty.unit_columns(phi)
    assert torch.equal(unit, phi / torch.linalg.vector_norm(phi, dim=-2, keepdim=True))
    assert torch.equal(inverse, 1 / torch.linalg.vector_norm(phi, dim=-2))
    options = {"group_dim": 0, "target": "orthogonal", "normalize": True}
    error = orthoopt.orthogonality_error(phi, **options)
    grad = orthoopt.l1_orthogonality_grad(phi, **options)
    small, large = (2.0**e for e in exponents)
    assert (torch.linalg.vector_norm(phi * large, dim=-2) == math.inf).all()  # where x / ‖x‖ fails
    assert (torch.linalg.vector_norm(phi * small, dim=-2) > penalty.shortest_length(dtype)).all()
    for c in (small, large):
        assert torch.equal(penalty.unit_columns(phi * c)[0], unit)
        assert torch.equal(orthoopt.orthogonality_error(phi * c, **options), error)
        assert torch.equal(orthoopt.l1_orthogonality_grad(phi * c, **options) * c, grad)


def test_target_residual_and_error_by_definition():
    phi = torch.randn(3, 7, 4, dtype=torch.float64) * 3
    gram = phi.mT @ phi
    eye = torch.eye(4, dtype=torch.float64)
    unit = phi / phi.norm(dim=-2, keepdim=True)
    expected = {
        ("orthonormal", False): gram - eye,
        ("orthogonal", False): gram * (1 - eye),
        ("orthogonal", True): (unit.mT @ unit) * (1 - eye),
    }
    for (target, normalize), r in expected.items():
        torch.testing.assert_close(penalty.target_residual(phi, target, normalize), r, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(
            orthoopt.orthogonality_error(phi, group_dim=0, target=target, normalize=normalize),
            r.abs().amax((-2, -1)),
            rtol=1e-14,
            atol=1e-14,
        )
    out = torch.full((3, 4, 4), float("nan"), dtype=torch.float64)
    assert penalty.target_residual(phi, "orthogonal", True, out=out) is out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cosines_of_low_precision_inputs(dtype):
    """Half-precision columns are normalised in float32; the gradient comes back in their dtype."""
    phi = torch.randn(12, 3, 6, dtype=torch.float64).to(dtype)
    options = {"target": "orthogonal", "normalize": True, "smoothing": 0.1}
    got = orthoopt.l1_orthogonality_grad(phi, **options)
    assert got.dtype == dtype
    expected = orthoopt.l1_orthogonality_grad(phi.double(), **options)
    eps = torch.finfo(dtype).eps
    assert (got.double() - expected).abs().max() <= 8 * eps * expected.abs().max()
    error = orthoopt.orthogonality_error(phi, target="orthogonal", normalize=True)
    assert error.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(
        error.double(),
        orthoopt.orthogonality_error(phi.double(), target="orthogonal", normalize=True),
        rtol=1e-6,
        atol=1e-6,
    )


def test_bad_target_and_normalize_are_named():
    phi = torch.randn(3, 2, 2)
    for fn in (orthoopt.l1_orthogonality, orthoopt.frobenius_orthogonality_grad, orthoopt.orthogonality_error):
        with pytest.raises(ValueError, match=r"target must be one of \('orthonormal', 'orthogonal'\).*'orthogonl'"):
            fn(phi, target="orthogonl")
        with pytest.raises(TypeError, match="normalize must be True or False, got 'yes'"):
            fn(phi, target="orthogonal", normalize="yes")
        with pytest.raises(ValueError, match="normalize=True .* use target='orthogonal' with normalize=True"):
            fn(phi, normalize=True)


def test_project_to_orthogonal_columns_keeps_the_lengths_and_is_nearest():
    """The norms-free projection: orthogonal columns of the same lengths (a zero column stays
    zero), nearer to Φ than any other point QD with those lengths; polar for orthonormal."""
    g = torch.Generator().manual_seed(5)
    phi = torch.randn(2, 8, 4, dtype=torch.float64, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0]).double()
    phi[1, :, 0] = 0
    q = penalty.project(phi, "orthogonal")
    lengths = torch.linalg.vector_norm(phi, dim=-2)
    torch.testing.assert_close(torch.linalg.vector_norm(q, dim=-2), lengths, rtol=1e-14, atol=0)
    assert penalty.max_error(q, "orthogonal") <= 1e-13 * 100  # entries of ΦᵀΦ up to 10²
    assert q[1, :, 0].abs().max() == 0
    distance = (q - phi).square().sum((-2, -1))
    for _ in range(50):
        turn = torch.linalg.matrix_exp(0.05 * (lambda a: a - a.mT)(torch.randn(2, 4, 4, generator=g).double()))
        other = penalty.polar(q) @ turn * lengths[:, None, :]  # orthonormal directions, the same lengths
        assert ((other - phi).square().sum((-2, -1)) >= distance - 1e-12).all()
    assert torch.equal(penalty.project(phi, "orthonormal"), penalty.polar(phi))
    for dtype in (torch.float32, torch.bfloat16):
        assert penalty.project(phi.to(dtype), "orthogonal").dtype == dtype


def test_max_error_of_each_target():
    phi = torch.randn(3, 7, 4, dtype=torch.float64) * 2
    for target, normalize in CONVENTIONS:
        expected = orthoopt.orthogonality_error(phi, group_dim=0, target=target, normalize=normalize).max().item()
        assert penalty.max_error(phi, target, normalize) == expected
    assert penalty.max_error(phi) == (phi.mT @ phi - torch.eye(4, dtype=torch.float64)).abs().max().item()


# -- the soft step of target='orthogonal' ----------------------------------------------------------------


def _documented_orthogonal_step(mats, normalize, smoothing, kind, eta):
    """``-η_i Φ_i S_i`` from orthogonal_step's docstring alone (float64): q = ‖φ‖² or ‖φ‖⁻², W = q_j + q_k,
    G = 2R or clamp(R / max(δ, ηW)), η_i = min(η, max|R| / max W|G|, ¼/‖S‖₂), S = G or D⁻¹(G - Diag ρ)D⁻¹.
    Also returns the spectral bound and the smaller of the others."""
    eta = torch.as_tensor(eta, dtype=mats.dtype).expand(mats.shape[0])
    gram = mats.mT @ mats
    lengths = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    eye = torch.eye(gram.shape[-1], dtype=mats.dtype)
    if normalize:
        r = gram / (lengths[:, :, None] * lengths[:, None, :]) * (1 - eye)
        q = lengths**-2
    else:
        r = gram * (1 - eye)
        q = lengths**2
    w = q[:, :, None] + q[:, None, :]
    if kind == "frobenius":
        g = 2 * r
    else:
        g = (r / (eta[:, None, None] * w).clamp(min=max(smoothing, 1e-300))).clamp(-1, 1)
    others = torch.minimum(eta, r.abs().amax((-2, -1)) / (w * g).abs().amax((-2, -1)))
    if normalize:
        s = (g - torch.diag_embed((r * g).sum(-1))) / (lengths[:, :, None] * lengths[:, None, :])
    else:
        s = g
    spectral = 0.25 / penalty.spectral_norm(s)
    eta_i = torch.minimum(others, spectral)
    return -eta_i[:, None, None] * (mats @ s), spectral, others


def _free_stack(lengths, noise, seed):
    """Three 9x4 matrices Q·diag(lengths) + noise: orthogonal columns of the given lengths, perturbed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=torch.float64)).Q
    scale = torch.tensor(lengths, dtype=torch.float64)[:, None, :]
    return q * scale + noise * scale * torch.randn(3, 9, 4, generator=g, dtype=torch.float64)


# lengths per matrix, noise, kind, δ, η; in the "cap" cases the spectral cap binds.
FREE_CASES = {
    "l1_small_eta": ([[1.0, 2.0, 0.5, 3.0]] * 3, 0.05, "l1", 0.0, 1e-5),
    "l1_moderate_eta": ([[1.0, 2.0, 0.5, 3.0], [1.0] * 4, [0.1, 0.2, 0.3, 0.4]], 0.1, "l1", 0.0, 0.01),
    "huber": ([[1.0, 2.0, 0.5, 3.0]] * 3, 0.1, "l1", 0.05, 0.01),
    "l1_per_matrix_eta_cap": ([[1.0, 2.0, 0.5, 3.0]] * 3, 1.0, "l1", 0.0, [1.0, 10.0, 100.0]),
    "frobenius": ([[1.0, 2.0, 0.5, 3.0], [1.0] * 4, [0.1, 0.2, 0.3, 0.4]], 0.1, "frobenius", 0.0, 1e-3),
    "frobenius_cap": ([[1.0, 2.0, 0.5, 3.0]] * 3, 1.0, "frobenius", 0.0, 10.0),
}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("case", FREE_CASES)
def test_orthogonal_step_is_the_documented_step(case, normalize):
    """orthogonal_step is its docstring's formula, without workspaces and with the optimizer's
    (``scratch`` in the memory of ``out``, as a bucket passes them), for η a float or per matrix."""
    lengths, noise, kind, smoothing, eta = FREE_CASES[case]
    mats = _free_stack(lengths, noise, seed=len(case))
    eta = torch.tensor(eta, dtype=torch.float64) if isinstance(eta, list) else eta
    expected, spectral, others = _documented_orthogonal_step(mats, normalize, smoothing, kind, eta)
    if case.endswith("_cap"):
        assert (spectral < 0.9 * others).any()
    r, squares = penalty.orthogonal_residual(mats, normalize)
    plain = penalty.orthogonal_step(r.clone(), squares, mats, smoothing, kind, eta, normalize)
    out = torch.full(mats.shape, float("nan"), dtype=mats.dtype)
    scratch = out.view(-1)[: r.numel()].view_as(r)
    r_max = penalty.max_abs(r)
    hinted = penalty.orthogonal_step(
        r.clone(), squares, mats, smoothing, kind, eta, normalize, out=out, scratch=scratch, finite=True, r_max=r_max
    )
    assert hinted is out
    for got in (plain, hinted):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("case", FREE_CASES)
def test_orthogonal_step_does_not_grow_the_residual_to_first_order(case, normalize):
    """The step's first-order change of the residual (the exact derivative along it, by forward
    mode AD) leaves no entry further from zero than the largest was, up to the terms of the size
    of R times the step that the linearisation leaves out; and Φ changes by at most about a
    quarter of its spectral norm (the estimate of ‖S‖₂ is within a factor 1.43 of it)."""
    lengths, noise, kind, smoothing, eta = FREE_CASES[case]
    mats = _free_stack(lengths, noise / 10, seed=len(case))  # near the target: |R| small
    eta = torch.tensor(eta, dtype=torch.float64) if isinstance(eta, list) else eta
    r, squares = penalty.orthogonal_residual(mats, normalize)
    step = penalty.orthogonal_step(r.clone(), squares, mats, smoothing, kind, eta, normalize)
    _, change = torch.func.jvp(lambda x: penalty.orthogonal_residual(x, normalize)[0], (mats,), (step,))
    before = penalty.max_abs(r)
    after = penalty.max_abs(r + change)
    relative = (torch.linalg.matrix_norm(step, 2) / torch.linalg.matrix_norm(mats, 2)).max()
    assert (after <= before * (1 + 4 * relative)).all(), (after / before, relative)
    assert relative <= 0.25 * 1.43


def test_orthogonal_step_of_zero_length_columns_and_non_finite_matrices():
    """A zero-length column takes no step and keeps the others' finite; a matrix holding NaN
    gets a zero step where ``finite`` says so; η = 0 is a zero step."""
    mats = _free_stack([[1.0, 2.0, 0.5, 3.0]] * 3, 0.1, seed=1)
    mats[0, :, 1] = 0
    mats[2, 0, 0] = float("nan")
    for normalize in (False, True):
        for kind in ("l1", "frobenius"):
            r, squares = penalty.orthogonal_residual(mats, normalize)
            step = penalty.orthogonal_step(r, squares, mats, 0.0, kind, 0.01, normalize)
            assert torch.isfinite(step[:2]).all() and step[0, :, 1].abs().max() == 0
            assert step[0].abs().max() > 0 and torch.equal(step[2], torch.zeros_like(step[2]))
            r, squares = penalty.orthogonal_residual(mats, normalize)
            assert torch.equal(penalty.orthogonal_step(r, squares, mats, 0.0, kind, 0.0, normalize)[:2], 0 * mats[:2])
