"""The optimizer contract: drop-in subclasses, the decoupled step, stability, helpers."""

from __future__ import annotations

import copy

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
    # The seed's (l, m, n) = (32, 8, 16) tensor with the penalty alone.
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
    # A raw parameter is constrained only when include names it (issue 9: timm's cls_token/pos_embed).
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
