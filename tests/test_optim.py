"""The optimizer contract: drop-in subclasses, the decoupled step, stability, helpers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt.optim import param_key

BASES = [
    (torch.optim.SGD, orthoopt.OrthoSGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.SGD, orthoopt.OrthoSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (torch.optim.Adam, orthoopt.OrthoAdam, dict(lr=1e-2)),
    (torch.optim.AdamW, orthoopt.OrthoAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.AdamW, orthoopt.OrthoAdamW, dict(lr=1e-2, amsgrad=True)),
]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 4), (4,), (5, 3, 2), (3, 7)]]


def run(cls, params, steps, seed=1, **kw):
    opt = cls(params, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in [p for group in opt.param_groups for p in group["params"]]:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def test_true_subclasses():
    p = [nn.Parameter(torch.randn(3, 3))]
    assert isinstance(orthoopt.OrthoAdamW(p), torch.optim.AdamW)
    assert isinstance(orthoopt.OrthoAdam(p), torch.optim.Adam)
    assert isinstance(orthoopt.OrthoSGD(p, lr=0.1), torch.optim.SGD)
    RMS = orthoopt.orthogonalize(torch.optim.RMSprop)
    assert RMS.__name__ == "OrthoRMSprop" and issubclass(RMS, torch.optim.RMSprop)
    assert orthoopt.orthogonalize(orthoopt.OrthoAdamW) is orthoopt.OrthoAdamW
    with pytest.raises(TypeError, match="Optimizer subclass"):
        orthoopt.orthogonalize(nn.Linear)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("base,ortho_cls,kw", BASES)
def test_ortho_zero_is_bitwise_the_base(base, ortho_cls, kw, foreach):
    a, b = make_params(), make_params()
    run(base, a, 5, foreach=foreach, **kw)
    run(ortho_cls, b, 5, foreach=foreach, ortho=0.0, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ortho_zero_group_next_to_penalized_group_is_bitwise_the_base():
    a, b = make_params(), make_params()
    extra = nn.Parameter(torch.randn(8, 3))
    ref = torch.optim.AdamW(a, lr=1e-2)
    opt = orthoopt.OrthoAdamW([{"params": b}, {"params": [extra], "ortho": 1.0}], lr=1e-2)
    for _ in range(4):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        extra.grad = torch.randn_like(extra)
        ref.step()
        opt.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("layout,shape", [("group_axis:1", (9, 3, 4)), ("rows", (3, 9)), ("column_groups:2", (9, 4))])
def test_penalty_step_is_minus_lr_times_gradient(layout, shape):
    # With lr small the caps are inactive, and the step is exactly -lr·∂L/∂Φ on top of SGD.
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    lr, beta = 1e-4, 0.7
    opt = orthoopt.OrthoSGD([w], lr=lr, ortho=beta, ortho_layout=layout)
    opt.step()
    lay = orthoopt.layout.resolve_layout(layout, shape, "w")
    mats = lay.matrices(before)
    expected = lay.from_matrices(-lr * orthoopt.l1_orthogonality_grad(mats, beta, group_dim=0), shape)
    torch.testing.assert_close(w.detach() - before, expected, rtol=1e-12, atol=1e-15)


def test_penalty_is_decoupled_from_the_moments():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=5.0)
    ref = torch.optim.AdamW([nn.Parameter(w.detach().clone())], lr=1e-2)
    for _ in range(3):
        w.grad = torch.ones_like(w)
        ref.param_groups[0]["params"][0].grad = torch.ones_like(w)
        opt.step()
        ref.step()
    torch.testing.assert_close(opt.state[w]["exp_avg"], ref.state[ref.param_groups[0]["params"][0]]["exp_avg"])
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], ref.state[ref.param_groups[0]["params"][0]]["exp_avg_sq"])


@pytest.mark.parametrize("beta", [1.0, 10.0, 1e3])
@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("smoothing", [0.0, 1e-2])
def test_bounded_step_is_stable_at_any_beta_and_lr(beta, lr, smoothing):
    # Penalty alone from matrices with singular values in [0.3, 2]: the error never exceeds
    # where it started, a single step grows it by at most a few percent (the step is exact
    # only in the linearisation; measured worst 1.04x), and it converges, to rounding once
    # lr·β is not tiny.
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(8, 48, 24, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 24, 24, dtype=torch.float64))
    sv = torch.empty(8, 24, dtype=torch.float64).uniform_(0.3, 2.0)
    w = nn.Parameter((u * sv[:, None, :]) @ v.mT)
    opt = orthoopt.OrthoSGD([w], lr=lr, ortho=beta, ortho_smoothing=smoothing, ortho_layout="group_axis:0")
    start = err = orthoopt.orthogonality_error(w.detach(), group_dim=0)
    for _ in range(100):
        w.grad = torch.zeros_like(w)
        opt.step()
        new = orthoopt.orthogonality_error(w.detach(), group_dim=0)
        assert torch.all(new <= start)
        assert torch.all((new <= 1.1 * err) | (err < 1e-10))
        err = new
    assert torch.isfinite(w).all()
    assert torch.all(err < 0.9 * start)
    if lr * beta >= 0.01:
        assert torch.all(err < 1e-12)


def test_unbounded_sign_step_would_diverge():
    # The reason for the caps: the raw step -lr·2βΦS at lr·β·n of order one blows up.
    torch.manual_seed(0)
    phi = torch.randn(1, 64, 64, dtype=torch.float64) / 8
    for _ in range(50):
        phi = phi - 0.5 * phi @ orthoopt.penalty.direction(orthoopt.penalty.residual(phi), 0.0)
    assert not torch.isfinite(phi).all() or orthoopt.orthogonality_error(phi, group_dim=0).max() > 1e3


def test_no_blow_up_on_a_wide_mlp_at_large_beta():
    # The plain sign step (no caps) turns NaN here within a few hundred steps.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=10.0, exclude=["4"]), lr=1e-2)
    x, y = torch.randn(256, 64), torch.randn(256, 1)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(opt.orthogonality_errors().values()) < 0.1


def test_seed_setting_lands_with_smoothing_and_decaying_lr():
    # The (l, m, n) = (32, 8, 16) group tensor with the penalty alone.
    torch.manual_seed(0)
    phi = nn.Parameter(torch.randn(32, 8, 16) / 32**0.5)
    opt = orthoopt.OrthoAdamW(
        [phi], lr=1e-2, weight_decay=0.0, ortho=1.0, ortho_smoothing=1e-3, ortho_layout="group_axis:1"
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    start = orthoopt.orthogonality_error(phi).max()
    for _ in range(1000):
        phi.grad = torch.zeros_like(phi)
        opt.step()
        sched.step()
    assert start > 0.5
    assert orthoopt.orthogonality_error(phi).max() < 1e-4


def test_one_line_swap_on_a_small_mlp():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = torch.sin(x @ torch.randn(16, 1))

    def train(make_opt):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        opt = make_opt(model)
        first = None
        for _ in range(400):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        return first, loss.item(), orthoopt.named_orthogonality_errors(model, exclude=["4"])

    _, plain_loss, plain_err = train(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3))
    first, loss, err = train(
        lambda m: orthoopt.OrthoAdamW(orthoopt.param_groups(m, ortho=3.0, ortho_smoothing=1e-2, exclude=["4"]), lr=3e-3)
    )
    assert set(err) == {"0.weight", "2.weight"}
    assert min(plain_err.values()) > 0.3  # O(1) without the penalty
    assert max(err.values()) < 0.05
    assert loss < 0.5 * first


def test_param_groups_routes_parameters():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 4, 3), nn.Linear(8, 2))
    model.register_parameter("phi", nn.Parameter(torch.randn(6, 2, 3)))
    # A raw parameter is constrained only when include names it (timm's cls_token/pos_embed stay free).
    assert orthoopt.param_groups(model, ortho=2.0, exclude=["4"])[0]["param_names"] == ["1.weight", "3.weight"]
    groups = orthoopt.param_groups(model, ortho=2.0, include=["phi", "1", "3"], ortho_smoothing=0.1)
    on, off = groups
    assert on["param_names"] == ["phi", "1.weight", "3.weight"]
    assert on["ortho"] == 2.0 and on["ortho_smoothing"] == 0.1
    assert set(off["param_names"]) == {"0.weight", "1.bias", "2.weight", "2.bias", "3.bias", "4.weight", "4.bias"}
    assert off["ortho"] == 0.0
    only = orthoopt.param_groups(model, include=["1.*"])
    assert only[0]["param_names"] == ["1.weight"]
    opt = orthoopt.OrthoAdamW(groups, lr=1e-3)
    assert set(opt.orthogonality_errors()) == {"phi", "1.weight", "3.weight"}


def test_project_snaps_to_the_polar_factor():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 16), nn.Conv2d(2, 3, 2))
    orthoopt.project_(model)
    assert max(orthoopt.named_orthogonality_errors(model).values()) < 1e-6
    w = nn.Parameter(torch.randn(5, 3, 2))
    opt = orthoopt.OrthoSGD([w], lr=0.1, ortho=1.0, ortho_layout="group_axis:1")
    orthoopt.project_(opt)
    assert max(opt.orthogonality_errors().values()) < 1e-6
    # the polar factor is the nearest orthonormal matrix: it equals U Vᵀ
    a = torch.randn(6, 3, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    b = a.clone()
    orthoopt.project_([b], layout="columns")
    torch.testing.assert_close(b, u @ vh)


def test_grad_none_is_skipped_and_frozen_params_untouched():
    w = nn.Parameter(torch.randn(8, 3))
    frozen = nn.Parameter(torch.randn(8, 3), requires_grad=False)
    opt = orthoopt.OrthoAdamW([w, frozen], lr=1e-2, ortho=1.0)
    w0, f0 = w.detach().clone(), frozen.detach().clone()
    opt.step()
    assert torch.equal(w, w0) and torch.equal(frozen, f0)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert not torch.equal(w, w0) and torch.equal(frozen, f0)


def test_lr_scheduler_scales_the_penalty_step():
    def delta(lr_factor):
        w = nn.Parameter(torch.randn(9, 4, dtype=torch.float64))
        w0 = w.detach().clone()
        opt = orthoopt.OrthoSGD([w], lr=1e-4, ortho=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_factor)
        w.grad = torch.zeros_like(w)
        opt.step()
        sched.step()
        return w.detach() - w0

    torch.manual_seed(0)
    full = delta(1.0)
    torch.manual_seed(0)
    half = delta(0.5)
    torch.testing.assert_close(half, full / 2, rtol=1e-10, atol=1e-16)


def test_closure_add_param_group_and_deepcopy():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0
    v = nn.Parameter(torch.randn(3, 7))
    opt.add_param_group({"params": [v], "ortho": 2.0, "ortho_layout": "rows"})
    assert opt.param_groups[1]["ortho_smoothing"] == 0.0 and opt.param_groups[1]["lr"] == 1e-2
    clone = copy.deepcopy(opt)
    assert clone.param_groups[1]["ortho"] == 2.0 and isinstance(clone, orthoopt.OrthoAdamW)
    with pytest.raises(ValueError, match="group2.param0.*'columns'"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 7))], "ortho": 1.0, "ortho_layout": "columns"})
    assert len(opt.param_groups) == 2


def test_grad_scaler_skips_the_penalty_on_inf_steps():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w0 = w.detach().clone()
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w, w0)  # the scaler skipped the whole step, penalty included
    w.grad = None
    scaler.scale((w * 0).sum()).backward()
    scaler.step(opt)
    assert not torch.equal(w, w0)


def test_param_key_names():
    assert param_key({"param_names": ["a", "b"]}, 1, 0) == "b"
    assert param_key({}, 2, 3) == "group3.param2"


def test_auto_beta_estimates_the_exact_penalty_threshold():
    # Class-wise PCA in miniature: f = -½ Σ tr(ΦᵢᵀCᵢΦᵢ).  At a constrained optimum the base
    # update per unit lr is CᵢΦᵢ, so the threshold is max|ΦᵢᵀCᵢΦᵢ|/2 (at most λ_max(Cᵢ)/2,
    # reached when Φᵢ is aligned with the eigenvectors).
    torch.manual_seed(0)
    m, l, k = 3, 10, 3
    a = torch.randn(m, l, l, dtype=torch.float64)
    cov = a @ a.mT / l
    evals = torch.linalg.eigvalsh(cov)
    fstar = -0.5 * evals[:, -k:].sum()
    phi = nn.Parameter(orthoopt.penalty.polar(torch.randn(m, l, k, dtype=torch.float64)))
    opt = orthoopt.OrthoSGD([phi], lr=0.02, ortho="auto", ortho_layout="group_axis:0")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2000)
    for _ in range(2000):
        opt.zero_grad()
        f = -0.5 * torch.einsum("mlk,mlj,mjk->", phi, cov, phi)
        f.backward()
        opt.step()
        sched.step()
    estimate = opt.state[phi]["ortho_multiplier"]
    threshold = (phi.detach().mT @ cov @ phi.detach()).abs().amax((-2, -1)) / 2
    torch.testing.assert_close(estimate, threshold, rtol=0.05, atol=0)
    assert torch.all(threshold <= evals[:, -1] / 2 * (1 + 1e-6))
    assert orthoopt.orthogonality_error(phi, group_dim=0).max() < 1e-5
    assert abs(f.item() - fstar.item()) < 1e-4 * abs(fstar.item())
    # the estimate is part of the checkpoint
    assert "ortho_multiplier" in opt.state_dict()["state"][0]


@pytest.mark.parametrize("lr", [0.0, torch.tensor(0.0)], ids=["float", "tensor"])
def test_zero_lr_leaves_weights_unchanged_even_at_exact_zeros_of_r(lr):
    """A warm-up from lr 0 (a tensor lr under torch.compile) at a point where R has exact
    zeros: the step is 0, not 0/0 (which turned every weight NaN once)."""
    w = nn.Parameter(torch.zeros(6, 3))
    with torch.no_grad():
        w[:3] = torch.eye(3)
        w[0, 0] = 1.5  # R = diag(1.25, 0, 0): exact zeros everywhere else
    before = w.detach().clone()
    opt = orthoopt.OrthoAdamW([w], lr=lr, ortho=1.0, ortho_layout="columns")
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("ortho", [1.0, "auto"])
def test_channels_last_conv_weights_step_like_contiguous_ones(ortho):
    """A channels_last weight's filter matrices are a copy, not a view: the step must re-read
    them every step (a cached copy went stale and the error grew to 390)."""

    def run(memory_format):
        torch.manual_seed(0)
        convs = [nn.Conv2d(3, 4, 3).to(memory_format=memory_format) for _ in range(2)]
        convs[1].to(memory_format=torch.contiguous_format)  # a bucket of two, one of each
        params = [c.weight for c in convs]
        opt = orthoopt.OrthoSGD(params, lr=0.05, ortho=ortho)
        for _ in range(100):
            for p in params:
                p.grad = 1e-3 * torch.ones_like(p)
            opt.step()
        return [p.detach().contiguous() for p in params], opt.orthogonality_errors()

    ref, ref_errors = run(torch.contiguous_format)
    got, errors = run(torch.channels_last)
    if ortho != "auto":  # 'auto' starts from a small β here; the comparison is what matters
        assert max(ref_errors.values()) < 1e-3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert errors == pytest.approx(ref_errors, abs=1e-6)


def _penalized_step(w: torch.Tensor, **options) -> torch.Tensor:
    """``w`` after one OrthoSGD step with a zero gradient: the penalty step alone."""
    ref = nn.Parameter(w.detach().clone())
    ref.grad = torch.zeros_like(ref)
    orthoopt.OrthoSGD([ref], lr=0.05, ortho=1.0, **options).step()
    return ref.detach()


# -- how a group gives its parameters ------------------------------------------------------
def test_a_group_may_give_one_tensor_or_a_reiterable_collection():
    g = torch.Generator().manual_seed(0)
    w, v = nn.Parameter(torch.randn(8, 3, generator=g)), nn.Parameter(torch.randn(8, 3, generator=g))
    expected = [_penalized_step(w, ortho_layout="columns"), _penalized_step(v)]
    opt = orthoopt.OrthoSGD(
        [{"params": w, "ortho_layout": "columns"}, {"params": {"v": v}.values()}], lr=0.05, ortho=1.0
    )
    assert opt.param_groups[0]["params"] == [w] and opt.param_groups[1]["params"] == [v]
    w.grad, v.grad = torch.zeros_like(w), torch.zeros_like(v)
    opt.step()
    assert torch.equal(w.detach(), expected[0]) and torch.equal(v.detach(), expected[1])


def test_positional_arguments_reach_the_base_optimizer():
    w = nn.Parameter(torch.randn(8, 3))
    assert orthoopt.OrthoSGD([w], 0.3, 0.9).param_groups[0]["lr"] == 0.3
    group = orthoopt.OrthoAdamW([w], 0.02, (0.8, 0.9)).param_groups[0]
    assert group["lr"] == 0.02 and group["betas"] == (0.8, 0.9)


def test_bad_defaults_and_complex_parameters_are_named_with_the_fix():
    with pytest.raises(ValueError, match=r"^optimizer defaults: ortho must be a finite number >= 0"):
        orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3))], lr=0.1, ortho=-1.0)
    with pytest.raises(TypeError) as info:
        orthoopt.OrthoSGD([("z", nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)))], lr=0.1, ortho=1.0)
    assert str(info.value).endswith(
        "orthoopt's orthogonality is for real parameters: put it in a group with ortho=0, or use torch.view_as_real"
    )


# -- load_state_dict -----------------------------------------------------------------------
def _adamw_state(w: torch.Tensor, **options) -> dict:
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0, **options)
    w.grad = torch.randn_like(w)
    opt.step()
    return copy.deepcopy(opt.state_dict())


def test_a_layout_that_resolves_the_same_does_not_end_the_checks():
    """Saved with 'columns' and the Frobenius penalty, loaded under 'auto' (which resolves to
    'columns' here) and L1: the penalty still differs, and is refused with the fix."""
    saved = _adamw_state(nn.Parameter(torch.randn(8, 3)), ortho_layout="columns", ortho_penalty="frobenius")
    fresh = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(8, 3))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(saved)
    assert str(info.value) == (
        "param group 0: the checkpoint was saved with ortho_penalty='frobenius' but this optimizer has "
        "ortho_penalty='l1'; construct the optimizer with ortho_penalty='frobenius' to resume, or start "
        "from a fresh optimizer state"
    )


def test_scalar_state_of_other_base_optimizers_loads_and_resumes_bitwise():
    """ASGD keeps 0-dim 'eta' and 'mu' besides 'step': not a parameter-shaped state to check."""
    ASGD = orthoopt.orthogonalize(torch.optim.ASGD)

    def run(opt, w, steps, g):
        for _ in range(steps):
            w.grad = torch.randn(w.shape, generator=g)
            opt.step()

    w = nn.Parameter(torch.randn(8, 3))
    opt = ASGD([w], lr=0.01, ortho=1.0)
    g = torch.Generator().manual_seed(1)
    run(opt, w, 3, g)
    saved, start = copy.deepcopy(opt.state_dict()), w.detach().clone()
    run(opt, w, 3, torch.Generator().manual_seed(2))
    v = nn.Parameter(start)
    resumed = ASGD([v], lr=0.01, ortho=1.0)
    resumed.load_state_dict(saved)
    run(resumed, v, 3, torch.Generator().manual_seed(2))
    assert torch.equal(v, w)


def test_state_of_another_shape_is_refused_for_vectors_and_behind_orthoopt_keys():
    w, b = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(5))
    opt = orthoopt.OrthoAdamW([w, b], lr=1e-2, ortho=1.0)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(4))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError, match=r"state 'exp_avg' for parameter 1 has shape \(5,\).*\(4,\)"):
        other.load_state_dict(saved)
    # orthoopt's own per-matrix keys are skipped, and the keys after them still checked
    state = saved["state"][0]
    saved["state"][0] = {"ortho_multiplier": torch.ones(1), **{k: v for k, v in state.items()}}
    saved["state"][0]["exp_avg"] = torch.zeros(7, 3)
    fresh = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(5))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError, match=r"state 'exp_avg' for parameter 0 has shape \(7, 3\)"):
        fresh.load_state_dict(saved)


def test_a_float32_checkpoint_resumes_a_float64_model_in_float64():
    """torch casts the state to the parameter's dtype; only half-precision parameters keep float32."""
    saved = _adamw_state(nn.Parameter(torch.randn(8, 3)))
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0)
    opt.load_state_dict(saved)
    assert opt.state[w]["exp_avg"].dtype == torch.float64 and opt.state[w]["exp_avg_sq"].dtype == torch.float64
    w.grad = torch.randn_like(w)
    opt.step()


# -- the step's parts ------------------------------------------------------------------------
def test_auto_multiplier_of_a_non_finite_matrix_is_zero():
    """A matrix whose residual is not finite says nothing about the multiplier: its estimate
    stays 0 (and finite), while the other matrix of the parameter gets its own."""
    w = nn.Parameter(torch.randn(2, 8, 3))
    with torch.no_grad():
        w[0, 0, 0] = 1e20  # its Gram overflows float32
    w.grad = torch.randn_like(w)
    opt = orthoopt.OrthoSGD([w], lr=0.05, ortho="auto", ortho_layout="group_axis:0", ortho_nonfinite="skip")
    opt.step()
    multiplier = opt.state[w]["ortho_multiplier"]
    assert multiplier[0] == 0 and multiplier[1] > 0


def test_hard_parameters_behind_one_without_a_gradient_take_the_hard_step():
    c, w = nn.Parameter(torch.randn(8, 3)), nn.Parameter(orthoopt.penalty.polar(torch.randn(8, 3)))
    opt = orthoopt.OrthoSGD([{"params": [c, w], "ortho": 1.0, "ortho_mode": "hard", "ortho_layout": "columns"}], lr=0.1)
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    assert orthoopt.orthogonality_error(w.detach(), group_dim=None).item() < 1e-5
    assert "step" in opt.state[w]


def test_a_hard_layout_that_no_longer_fits_is_named_at_the_step():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([("w", w)], lr=0.1, ortho=1.0, ortho_mode="hard")
    opt.param_groups[0]["ortho_layout"] = "rows"  # 8 rows of length 3: impossible
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match=r"^parameter 'w': layout 'rows' asks for 8 orthonormal vectors"):
        opt.step()


_FIX = (
    " holds NaN or Inf: the orthogonality step skips its non-finite matrices (other matrices and "
    "parameters are unaffected). Lower the learning rate, or clip gradients"
)


def test_non_finite_message_names_only_the_bad_parameters_and_the_fix():
    a, b, c = (nn.Parameter(torch.randn(8, 3)) for _ in range(3))
    with torch.no_grad():
        b[0, 0] = c[1, 1] = float("nan")
    opt = orthoopt.OrthoSGD([("a", a), ("b", b), ("c", c)], lr=0.05, ortho=1.0)
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning) as rec:
        opt.step()
    assert [str(r.message) for r in rec] == [
        "parameter 'b', parameter 'c'" + _FIX + " (warned once per parameter; ortho_nonfinite='raise' to stop instead)"
    ]
    opt.param_groups[0]["ortho_nonfinite"] = "raise"
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    assert str(info.value) == "parameter 'b', parameter 'c'" + _FIX + "; nothing was changed by this step"


def test_orthogonalized_class_names_its_base_in_its_doc():
    # (its module and name, orthoopt.optim.OrthoRMSprop, are test_torch_contract's)
    RMSprop = orthoopt.orthogonalize(torch.optim.RMSprop)
    assert RMSprop.__doc__.startswith("RMSprop with a decoupled group-orthogonality step")
    assert ":class:`torch.optim.RMSprop`" in RMSprop.__doc__


# -- mutants of optim.py that survived the rest of the suite (docs/development/mutation.md) ----
def test_module_getattr_makes_the_class_of_a_torch_optimizer_by_name():
    """What unpickling a generated class calls in a process that has not made it yet
    (test_torch_contract checks that in a child process, which mutmut does not see)."""
    cls = orthoopt.optim.__getattr__("OrthoAdagrad")
    assert cls is orthoopt.orthogonalize(torch.optim.Adagrad) and cls.__name__ == "OrthoAdagrad"
    for name in ("OrthoNoSuchOptimizer", "Adagrad", "Orthoswa_utils", "OrthoOrthoSGD"):
        with pytest.raises(AttributeError) as info:
            orthoopt.optim.__getattr__(name)
        assert str(info.value) == f"module 'orthoopt.optim' has no attribute {name!r}"


class _OwnSGD(torch.optim.SGD):
    """A user's optimizer outside torch.optim: its generated class exists only where it was made."""


def test_a_generated_class_of_a_users_optimizer_unpickles_where_it_was_never_made(monkeypatch):
    cls = orthoopt.orthogonalize(_OwnSGD)
    w = nn.Parameter(torch.randn(8, 3))
    opt = cls([w], lr=0.1, momentum=0.9, ortho=2.0)
    w.grad = torch.randn_like(w)
    opt.step()
    blob = pickle.dumps(opt)
    # a fresh process: neither the module attribute nor the cache holds the class
    monkeypatch.delattr(orthoopt.optim, cls.__name__)
    monkeypatch.delitem(orthoopt.optim._ORTHO_CLASSES, _OwnSGD)
    other = pickle.loads(blob)
    assert isinstance(other, _OwnSGD) and type(other).__name__ == cls.__name__
    assert other.param_groups[0]["ortho"] == 2.0
    (v,) = other.param_groups[0]["params"]
    assert torch.equal(other.state[v]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_a_pickle_without_the_newer_ortho_keys_gets_this_optimizers_defaults():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([w], lr=0.1, ortho=2.0, ortho_smoothing=0.01, ortho_every=2)
    state = opt.__getstate__()
    state["param_groups"] = [
        {k: v for k, v in g.items() if k not in ("ortho_smoothing", "ortho_every", "ortho_nonfinite")}
        for g in state["param_groups"]
    ]
    del state["defaults"]["ortho_nonfinite"]  # a key the pickle's orthoopt did not have at all
    old = orthoopt.OrthoSGD.__new__(orthoopt.OrthoSGD)
    old.__setstate__(state)
    group = old.param_groups[0]
    assert (group["ortho"], group["ortho_smoothing"], group["ortho_every"]) == (2.0, 0.01, 2)
    assert group["ortho_nonfinite"] == orthoopt.optim.ORTHO_DEFAULTS["ortho_nonfinite"] == "warn"
    w.grad = torch.zeros_like(w)
    old.step()


def test_plain_optimizers_and_a_models_layout_in_named_orthogonality_errors():
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError) as info:
        orthoopt.named_orthogonality_errors(torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(info.value) == (
        "named_orthogonality_errors got a plain SGD, which constrains nothing: turn it into an orthoopt "
        "optimizer first with orthoopt.constrain_(optimizer, model, ortho=...)"
    )
    # the (8, 3) weight: 'auto' takes its 3 columns, 'rows' cannot (8 rows of length 3) and is refused
    auto = orthoopt.named_orthogonality_errors(model)
    with torch.no_grad():
        expected = orthoopt.orthogonality_error(model[0].weight, group_dim=None).item()
    assert auto["0.weight"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="'0.weight'.*layout 'rows'"):
        orthoopt.named_orthogonality_errors(model, "rows")


def test_differentiable_groups_are_refused_with_the_whole_reason():
    w = nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError) as info:
        orthoopt.OrthoSGD([w], lr=0.1, ortho=1.0, differentiable=True)
    assert str(info.value) == (
        "param group 0: differentiable=True with ortho=1.0: orthoopt's orthogonality step is not "
        "differentiable, so autograd through step() would treat it as a constant and give wrong "
        "gradients. Put the parameters you differentiate through in a group with ortho=0, or use "
        "differentiable=False"
    )


class _NoClosureStep(torch.optim.Optimizer):
    """A user's optimizer whose step takes no closure (plain gradient descent)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_a_base_step_without_a_closure_argument_is_called_without_one():
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    v = nn.Parameter(w.detach().clone())
    w.grad = torch.randn_like(w)
    v.grad = w.grad.clone()
    orthoopt.orthogonalize(_NoClosureStep)([w], lr=0.05, ortho=1.0).step()
    orthoopt.OrthoSGD([v], lr=0.05, ortho=1.0).step()  # the same base update: p - lr·g
    assert torch.equal(w.detach(), v.detach()) and not torch.equal(w.detach(), w.grad)


def test_float32_state_of_a_half_parameter_is_a_copy_of_the_checkpoints():
    """Stepping a resumed optimizer must not write into the checkpoint it was loaded from
    (torch's cast to bfloat16 copies; orthoopt's kept float32 state must too)."""
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))
    opt = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].float()
    saved = opt.state_dict()
    kept = copy.deepcopy(saved)
    fresh = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    fresh.load_state_dict(saved)
    assert fresh.state[w]["momentum_buffer"].dtype == torch.float32
    fresh.step()
    assert not torch.equal(fresh.state[w]["momentum_buffer"], kept["state"][0]["momentum_buffer"])
    assert torch.equal(saved["state"][0]["momentum_buffer"], kept["state"][0]["momentum_buffer"])


def test_a_groups_own_differentiable_setting_decides_at_construction():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"^param group 1: differentiable=True with ortho=1.0"):
        orthoopt.OrthoSGD([{"params": [w]}, {"params": [v], "differentiable": True}], lr=0.1, ortho=1.0)
    # differentiable by default, but not the penalized group: accepted
    opt = orthoopt.OrthoSGD(
        [{"params": [w], "ortho": 0.0}, {"params": [v], "differentiable": False, "ortho": 1.0}],
        lr=0.1,
        differentiable=True,
    )
    assert [g["differentiable"] for g in opt.param_groups] == [True, False]


def test_the_step_size_check_takes_each_groups_own_lr():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"^param group 1: parameter 'v': 2·lr·ortho = 2e\+20 is beyond"):
        orthoopt.OrthoSGD([{"params": [("w", w)]}, {"params": [("v", v)], "lr": 1e20}], lr=0.1, ortho=1.0)
    opt = orthoopt.OrthoSGD([{"params": [w], "lr": 0.1}], lr=1e20, ortho=1.0)  # its own lr is fine
    assert opt.param_groups[0]["lr"] == 0.1
    # every 4th step with 4 times the step size: 2·lr·ortho·4 = 4e19 is checked, not 1e19
    with pytest.raises(ValueError, match=r"2·lr·ortho = 4e\+19 is beyond"):
        orthoopt.OrthoSGD([w], lr=5e18, ortho=1.0, ortho_every=4)


def test_a_set_of_parameters_is_refused_with_torchs_own_message():
    params = {nn.Parameter(torch.randn(8, 3))}
    with pytest.raises(TypeError) as plain:
        torch.optim.SGD([{"params": params}], lr=0.1)
    with pytest.raises(TypeError) as ortho:
        orthoopt.OrthoSGD([{"params": params}], lr=0.1, ortho=1.0)
    assert str(ortho.value) == str(plain.value)
