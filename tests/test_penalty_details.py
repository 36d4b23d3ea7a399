"""Details of orthoopt.penalty that the math tests left open (found by mutation testing):
defaults, the messages of refused inputs, and the exact estimate of the spectral cap."""

from __future__ import annotations

import pytest
import torch

import orthoopt
from orthoopt import penalty


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


def test_spectral_norm_is_four_power_iterations_padded_by_a_tenth():
    """The documented estimate: 4 power iterations from the fixed start cos(2.399963·k),
    the norm of S·v padded by 10%, and never above the max-row-sum bound.  Symmetric
    matrices whose two largest eigenvalues are close, so that the iteration count shows."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g, dtype=torch.float64)).Q
    eig = torch.tensor([3.0, -2.9, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)
    s = q @ torch.diag_embed(eig.expand(3, 6)) @ q.mT

    def estimate(iters, s=s):
        v = torch.cos(torch.arange(6, dtype=torch.float64) * 2.399963).expand(3, 6).unsqueeze(-1)
        for _ in range(iters):
            w = s @ v
            v = w / w.norm(dim=-2, keepdim=True)
        return (s @ v).norm(dim=(-2, -1)) * 1.1

    rowsum = s.abs().sum(-1).amax(-1)
    assert torch.all(estimate(4) < rowsum)  # the estimate, not the bound, is what is compared
    assert (estimate(5) - estimate(4)).abs().min() > 1e-4  # another count would show (by 1e9 x the tolerance)
    # Bit for bit at every magnitude: the iteration's rescaling (by a power of two) is exact.
    for c in (1.0, 0.37, 1.9, 5.3, 77.7, 1234.5):
        expected = torch.minimum(estimate(4, c * s), (c * s).abs().sum(-1).amax(-1))
        assert torch.equal(penalty.spectral_norm(c * s), expected), c
    # and the row-sum bound where the padded estimate exceeds it
    ones = torch.ones(2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(penalty.spectral_norm(ones), torch.full((2,), 5.0, dtype=torch.float64))


def test_spectral_norm_bound_is_each_matrix_own_row_sum():
    """The max-row-sum bound is per matrix: a stack of all-ones 5x5 blocks scaled by 1 and 2
    (‖S‖₂ = row sum = 5 and 10; the padded estimate 5.5 and 11 exceeds it)."""
    ones = torch.ones(1, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        penalty.spectral_norm(torch.cat([ones, 2 * ones])), torch.tensor([5.0, 10.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("kind, smoothing", [("l1", 0.0), ("l1", 0.05), ("frobenius", 0.0)])
@pytest.mark.parametrize(
    "eta", [1e-3, 0.5, torch.tensor([1e-3, 0.5, 0.2], dtype=torch.float64)], ids=["small", "large", "tensor"]
)
def test_penalty_step_optional_arguments_change_nothing(kind, smoothing, eta):
    """``penalty_step`` with only its required arguments computes r_max, the finite mask and its
    workspaces itself, and gives what the optimizer's call with all of them gives; without
    ``s_out`` it leaves ``r`` as it was (only with ``s_out`` is ``r`` spent as scratch).  The
    large η reaches the spectral cap's pass, which uses the scratch."""
    g = torch.Generator().manual_seed(1)
    mats = torch.randn(3, 7, 4, generator=g, dtype=torch.float64) / 7**0.5
    mats[1, 2, 3] = float("nan")  # its matrix gets a zero step, the others their own
    r = penalty.residual(mats)
    kept = r.clone()
    plain = penalty.penalty_step(r, mats, smoothing, kind, eta)
    assert torch.equal(r.nan_to_num(), kept.nan_to_num()) and torch.equal(r.isnan(), kept.isnan())
    assert torch.equal(plain[1], torch.zeros_like(plain[1]))
    assert plain[0].abs().max() > 0 and plain[2].abs().max() > 0
    r_max = penalty.max_abs(r)
    full = penalty.penalty_step(
        r.clone(),
        mats,
        smoothing,
        kind,
        eta,
        s_out=torch.empty_like(r),
        out=torch.empty_like(mats),
        finite=torch.isfinite(r_max),
        r_max=r_max,
    )
    assert torch.equal(plain, full)


def test_cpu_cap_check_skips_the_power_iteration_where_the_cap_cannot_bind(monkeypatch):
    """On CPU, where n·max|S|·η (or the row sums times η) is below the cap, the step does not run
    the power iteration at all (its result would not bind); where it could bind, it does."""
    calls = []
    real = penalty.spectral_norm
    monkeypatch.setattr(penalty, "spectral_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = penalty.residual(torch.randn(2, 9, 5, dtype=torch.float64))
    s = r.sign()
    penalty.safe_step_size(r, s, 1e-4)
    assert calls == []
    penalty.safe_step_size(r, s, 1.0)
    assert calls == [1]


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


def test_spectral_cap_uses_each_matrix_own_row_sum():
    """All-ones 5x5 blocks scaled by 1 and 2 as R and S (so the no-overshoot bound is 1/2): the
    spectral cap is 1/4 over each one's ‖S‖₂ = row sum, 5 and 10."""
    ones = torch.ones(1, 5, 5, dtype=torch.float64)
    s = torch.cat([ones, 2 * ones])
    expected = torch.tensor([0.25 / 5, 0.25 / 10], dtype=torch.float64)
    torch.testing.assert_close(penalty.safe_step_size(s.clone(), s.clone(), 1.0), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("eta", [1e-4, 1e-2, 0.3, 10.0, torch.tensor(0.05, dtype=torch.float64)])
def test_compiled_and_cuda_branch_of_the_cap_gives_the_cpu_result(monkeypatch, eta):
    """Under torch.compile (and on CUDA) the cap skips no work; the result is the CPU branch's.
    ``torch.compiler.is_compiling`` is patched to take that branch in eager mode."""
    g = torch.Generator().manual_seed(3)
    r = (
        torch.randn(12, 7, 7, generator=g, dtype=torch.float64)
        * torch.logspace(-6, 0, 12, dtype=torch.float64)[:, None, None]
    )
    r = r + r.mT
    for s in (r.sign(), penalty.direction(r.clone(), 0.1), 2 * r):
        cpu = penalty.safe_step_size(r.clone(), s.clone(), eta)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            compiled = penalty.safe_step_size(r.clone(), s.clone(), eta)
        assert torch.equal(compiled, cpu)
    ones = torch.ones(1, 5, 5, dtype=torch.float64)
    s = torch.cat([ones, 2 * ones])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(
        penalty.safe_step_size(s.clone(), s.clone(), 1.0),
        torch.tensor([0.05, 0.025], dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )


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
    spectral = 0.25 / penalty.spectral_norm(s)
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
    r_max = penalty.max_abs(r)
    hints = {"finite": True, "r_max": r_max, "r_top": float(r_max.max())}
    plain = penalty.penalty_step(r.clone(), mats, smoothing, kind, eta)
    hinted = penalty.penalty_step(r.clone(), mats, smoothing, kind, eta, s_out=torch.empty_like(r), **hints)
    in_place = r.clone()  # as the optimizer calls it: S formed in place of R
    optimizers = penalty.penalty_step(in_place, mats, smoothing, kind, eta, s_out=in_place, **hints)
    for got in (plain, hinted, optimizers):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("smoothing", [0.0, 0.05])
@pytest.mark.parametrize("workspace", [None, "r", "another"])
def test_a_zero_step_size_gives_a_zero_step_where_the_residual_has_exact_zeros(workspace, smoothing):
    """η = 0 (lr = 0, as at the first step of a warmup) is a step of exactly zero, also where
    entries of R are exactly zero (columns with disjoint supports, here of the identity), with
    or without a workspace for S (the sharded step has none)."""
    mats = torch.eye(6, 3, dtype=torch.float64).repeat(2, 1, 1)
    mats[1] *= 2  # R = 3I: zero off the diagonal, as R = 0 is in matrix 0
    r = penalty.residual(mats)
    s_out = {None: None, "r": r, "another": torch.empty_like(r)}[workspace]
    step = penalty.penalty_step(r, mats, smoothing, "l1", 0.0, s_out=s_out)
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
