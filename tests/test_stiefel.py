"""Hard mode (ortho_mode='hard'): Riemannian steps on the Stiefel manifold with geoopt."""

from __future__ import annotations

import copy
import io
import warnings

import geoopt
import pytest
import torch
from conftest import HARD, near_orthonormal, quadratic_grad, run_pair, stack_error
from torch import nn

import orthoopt
from orthoopt import stiefel
from orthoopt.optim import param_groups
from orthoopt.penalty import polar


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: with 2 intra-op threads on a shared 2-core machine the steps
    # ran up to 50x slower (thread contention), with 1 they take milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_tangent(x: torch.Tensor, v: torch.Tensor, atol: float = 1e-5) -> bool:
    sym = x.mT @ v + v.mT @ x
    return sym.abs().max().item() < atol


# -- every layout stays on the manifold under a real loss ---------------------------------
class Raw3D(nn.Module):
    """The (l, m, n) group tensor, contracted with the input over l and m."""

    def __init__(self, shape):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        a, b = x
        return torch.tanh(torch.einsum("lmn,bl,bm->bn", self.phi, a, b))


def make_case(kind: str):
    """(model, input, layout, name of the constrained parameter)."""
    if kind == "rows":
        return nn.Linear(24, 8), torch.randn(64, 24), "rows", "weight"
    if kind == "columns":
        return nn.Linear(8, 24), torch.randn(64, 8), "columns", "weight"
    if kind == "filters":
        return nn.Conv2d(3, 8, 3), torch.randn(8, 3, 6, 6), "filters", "weight"
    if kind == "column_groups":
        return nn.Linear(16, 32), torch.randn(64, 16), "column_groups:4", "weight"
    axis = int(kind[-1])
    return Raw3D((12, 10, 3)), (torch.randn(64, 12), torch.randn(64, 10)), f"group_axis:{axis}", "phi"


LAYOUT_CASES = ["rows", "columns", "filters", "column_groups", "group_axis:0", "group_axis:1", "group_axis:2"]


@pytest.mark.parametrize("kind", LAYOUT_CASES)
@pytest.mark.parametrize("cls", [orthoopt.OrthoAdamW, orthoopt.OrthoSGD])
def test_every_layout_stays_on_the_manifold(kind, cls):
    torch.manual_seed(0)
    model, x, layout, pname = make_case(kind)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.data.normal_()
    with torch.no_grad():
        target = teacher(x)
    groups = param_groups(model, ortho=1.0, include=[pname], ortho_layout=layout, ortho_mode="hard")
    kw = {"lr": 1e-2} if cls is orthoopt.OrthoAdamW else {"lr": 1e-2, "momentum": 0.9, "nesterov": True}
    opt = cls(groups, **kw)
    orthoopt.project_(opt)
    p = dict(model.named_parameters())[pname]
    start = p.detach().clone()
    losses = []
    for _ in range(500):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert stack_error(layout, p) < 1e-5
    assert max(opt.orthogonality_errors().values()) < 1e-5
    # it did optimize: the constrained parameter moved and the loss went down
    assert (p.detach() - start).abs().max() > 0.05
    assert losses[-1] < 0.9 * losses[0]


def test_canonical_layouts_stay_on_the_manifold_with_the_default_stabilize():
    torch.manual_seed(0)
    model, x, layout, pname = make_case("group_axis:1")
    target = torch.randn(64, 3)
    opt = orthoopt.OrthoAdam(
        param_groups(
            model, ortho=1.0, include=[pname], ortho_layout=layout, ortho_mode="hard", ortho_manifold="canonical"
        ),
        lr=1e-2,
    )
    orthoopt.project_(opt)
    for _ in range(300):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    assert stiefel.stabilize_period(opt.param_groups[0]) == stiefel.CANONICAL_STABILIZE
    assert stack_error(layout, model.phi) < 1e-5


# -- the proof that the rules are geoopt's -------------------------------------------------
@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_geoopt_riemannian_adam(manifold, amsgrad):
    kw = {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": amsgrad}
    run_pair(
        lambda ps: orthoopt.OrthoAdam(
            ps,
            **kw,
            **HARD,
            ortho_layout="columns",
            ortho_manifold=manifold,
            ortho_stabilize=None,
            ortho_second_moment="sum",
        ),
        lambda ps: geoopt.optim.RiemannianAdam(ps, **kw),
        manifold,
    )


@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_matches_geoopt_riemannian_sgd(manifold, momentum, nesterov):
    kw = {"lr": 2e-2, "momentum": momentum, "nesterov": nesterov, "weight_decay": 1e-2}
    run_pair(
        lambda ps: orthoopt.OrthoSGD(
            ps, **kw, **HARD, ortho_layout="columns", ortho_manifold=manifold, ortho_stabilize=None
        ),
        lambda ps: geoopt.optim.RiemannianSGD(ps, **kw),
        manifold,
        seed_buffer=momentum > 0,
    )


@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
def test_sgd_dampening_matches_geoopt_and_the_formula(manifold):
    """Dampening τ: b_t = μ T(b_{t-1}) + (1-τ) ξ_t from the second step on, b_1 = ξ_1 (torch's
    first step).  geoopt's buffer starts at the seed B and its first is μB + (1-τ)ξ_1: seeded
    with B = τξ_1/μ it is ξ_1 too, and every step must agree; the first against the formula.
    In float64: in float32 the Cayley steps drift apart by rounding (3e-6 after 30 steps)."""
    mu, tau, lr = 0.9, 0.6, 2e-2
    kw = {"lr": lr, "momentum": mu, "dampening": tau, "weight_decay": 1e-2}
    torch.manual_seed(0)
    x0 = polar(torch.randn(10, 4, dtype=torch.float64))
    a, b = torch.randn(12, 10, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    stiefel_m = stiefel.manifold(manifold)
    ours = nn.Parameter(x0.clone())
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=stiefel_m)
    opt = orthoopt.OrthoSGD([ours], **kw, **HARD, ortho_layout="columns", ortho_manifold=manifold, ortho_stabilize=None)
    ref = geoopt.optim.RiemannianSGD([theirs], **kw)
    for t in range(30):
        ours.grad = quadratic_grad(ours.detach(), a, b)
        theirs.grad = quadratic_grad(theirs.detach(), a, b)
        if t == 0:
            xi = stiefel_m.egrad2rgrad(x0, ours.grad + kw["weight_decay"] * x0)
            ref.state[theirs]["momentum_buffer"] = tau * xi / mu
        opt.step()
        ref.step()
        if t == 0:
            torch.testing.assert_close(ours.detach(), stiefel_m.retr(x0, -lr * xi), atol=1e-14, rtol=0)
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-13, rtol=0, msg=f"step {t}")
    assert (ours.detach() - x0).abs().max() > 1e-2
    # Without the dampening the buffer, hence the point, would be 1/(1-τ) = 2.5x as fast.
    free = nn.Parameter(x0.clone())
    undamped = orthoopt.OrthoSGD(
        [free], **{**kw, "dampening": 0.0}, **HARD, ortho_layout="columns", ortho_manifold=manifold
    )
    for _ in range(30):
        free.grad = quadratic_grad(free.detach(), a, b)
        undamped.step()
    assert (free.detach() - ours.detach()).abs().max() > 1e-2


def test_first_momentum_step_is_torch_sgds_not_geoopts():
    """Unseeded, geoopt's first momentum step differs (μ g₁ + ξ₁): this is the documented choice."""
    torch.manual_seed(0)
    x0 = polar(torch.randn(10, 4))
    g = torch.randn(10, 4)
    ours = nn.Parameter(x0.clone())
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    opt = orthoopt.OrthoSGD([ours], lr=0.1, momentum=0.9, **HARD, ortho_layout="columns")
    ref = geoopt.optim.RiemannianSGD([theirs], lr=0.1, momentum=0.9)
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    rgrad = geoopt.EuclideanStiefel().proju(x0, g)
    expected = geoopt.EuclideanStiefel().retr(x0, -0.1 * rgrad)
    torch.testing.assert_close(ours.detach(), expected, atol=1e-6, rtol=0)
    assert (ours.detach() - theirs.detach()).abs().max() > 1e-3


def test_adam_keeps_one_second_moment_per_matrix():
    p = nn.Parameter(polar(torch.randn(4, 10, 3)))
    opt = orthoopt.OrthoAdam([p], lr=1e-2, **HARD, ortho_layout="group_axis:0")
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state[stiefel.EXP_AVG].shape == (4, 10, 3)
    assert state[stiefel.EXP_AVG_SQ].shape == (4, 1, 1)
    assert is_tangent(p.detach(), state[stiefel.EXP_AVG])


def test_adamw_decoupled_weight_decay_is_ignored_for_hard_params_only():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    lin2 = copy.deepcopy(lin)
    opt = orthoopt.OrthoAdamW(param_groups(lin, ortho=1.0, ortho_mode="hard"), lr=1e-2, weight_decay=0.5)
    opt2 = orthoopt.OrthoAdam(param_groups(lin2, ortho=1.0, ortho_mode="hard"), lr=1e-2, weight_decay=0.0)
    orthoopt.project_(opt)
    orthoopt.project_(opt2)
    for _ in range(5):
        g = torch.randn(4, 12)
        lin.weight.grad, lin2.weight.grad = g.clone(), g.clone()
        lin.bias.grad, lin2.bias.grad = torch.ones(4), torch.ones(4)
        opt.step()
        opt2.step()
    assert torch.equal(lin.weight, lin2.weight)
    assert not torch.equal(lin.bias, lin2.bias)  # the bias still decays


@pytest.mark.parametrize(
    "cls,options", [(orthoopt.OrthoSGD, {"momentum": 0.5}), (orthoopt.OrthoAdam, {}), (orthoopt.OrthoAdamW, {})]
)
def test_maximize_flips_the_gradient(cls, options):
    torch.manual_seed(0)
    x0, g = polar(torch.randn(10, 4)), torch.randn(10, 4)
    a, b = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
    opt_a = cls([a], lr=0.1, maximize=True, **options, **HARD, ortho_layout="columns")
    opt_b = cls([b], lr=0.1, **options, **HARD, ortho_layout="columns")
    for _ in range(3):
        a.grad, b.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert (a - x0).abs().max() > 1e-2  # it moved


# -- checkpoints ---------------------------------------------------------------------------
def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))


def make_opt(net, kind: str):
    if kind == "adamw":
        groups = param_groups(net, ortho=1.0, ortho_mode="hard")
        return orthoopt.OrthoAdamW(groups, lr=1e-2, amsgrad=True)
    groups = param_groups(net, ortho=1.0, ortho_mode="hard", ortho_manifold="canonical", ortho_stabilize=3)
    return orthoopt.OrthoSGD(groups, lr=1e-2, momentum=0.9)


def train(net, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd-canonical"])
def test_state_dict_round_trip_is_bitwise(kind):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 2, 6, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first step's projection warning
        net = make_net()
        opt = make_opt(net, kind)
        train(net, opt, batches)

        net_a = make_net()
        opt_a = make_opt(net_a, kind)
        train(net_a, opt_a, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": net_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net_b = make_net(seed=123)
    opt_b = make_opt(net_b, kind)
    net_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups[0]["ortho_mode"] == "hard"
    assert any(k.startswith("stiefel_") for k in opt_b.state[net_b[0].weight])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second projection after a resume
        train(net_b, opt_b, batches[5:])
    for (name, p), q in zip(net.named_parameters(), net_b.parameters()):
        assert torch.equal(p, q), name


# -- mixed models: soft, hard and unpenalized groups in one optimizer ------------------------
def test_mixed_model_steps_each_group_correctly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 2))
    soft_net, plain_net = copy.deepcopy(net), copy.deepcopy(net)
    w_soft, w_hard = net[0].weight, net[2].weight
    off = [p for n, p in net.named_parameters() if n not in ("0.weight", "2.weight")]
    opt = orthoopt.OrthoAdamW(
        [
            {"params": [w_soft], "ortho": 0.1},
            {"params": [w_hard], "ortho": 1.0, "ortho_mode": "hard"},
            {"params": off},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    # References: the soft layer alone in a soft optimizer; the rest in plain torch AdamW.
    ref_soft = orthoopt.OrthoAdamW([soft_net[0].weight], lr=1e-2, weight_decay=0.1, ortho=0.1)
    ref_off = [p for n, p in plain_net.named_parameters() if n not in ("0.weight", "2.weight")]
    ref_plain = torch.optim.AdamW(ref_off, lr=1e-2, weight_decay=0.1)
    orthoopt.project_([w_hard])  # (project_(opt) would snap the soft layer too)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen) for p in net.parameters()]
        for model in (net, soft_net, plain_net):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        hard_grad = w_hard.grad
        opt.step()
        assert w_hard.grad is hard_grad and torch.equal(hard_grad, grads[2])  # grads are given back
        ref_soft.step()
        ref_plain.step()
    assert torch.equal(w_soft, soft_net[0].weight)
    for p, q in zip(off, ref_off):
        assert torch.equal(p, q)
    assert stack_error("rows", w_hard) < 1e-5
    assert set(opt.orthogonality_errors()) == {"group0.param0", "group1.param0"}


def test_auto_layout_leaves_1d_params_of_a_hard_group_to_the_base_update():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    ref = copy.deepcopy(lin)
    opt = orthoopt.OrthoAdamW(lin.parameters(), lr=1e-2, **HARD)  # bias in the hard group
    ref_opt = torch.optim.AdamW([ref.bias], lr=1e-2)
    orthoopt.project_(opt)
    for _ in range(5):
        g, gb = torch.randn(4, 12), torch.randn(4)
        lin.weight.grad, lin.bias.grad, ref.bias.grad = g, gb.clone(), gb.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(lin.bias, ref.bias)
    assert stack_error("rows", lin.weight) < 1e-5


def test_grads_restored_when_the_base_step_raises(monkeypatch):
    lin = nn.Linear(12, 4)
    opt = orthoopt.OrthoAdamW(lin.parameters(), lr=1e-2, **HARD)
    g = torch.randn(4, 12)
    lin.weight.grad, lin.bias.grad = g, torch.randn(4)
    before = lin.weight.detach().clone()

    def boom(self, closure=None):
        raise RuntimeError("base step failed")

    monkeypatch.setattr(torch.optim.AdamW, "step", boom)
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.step()
    assert lin.weight.grad is g
    assert torch.equal(lin.weight, before)


def test_param_without_grad_is_skipped():
    a, b = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(10, 4))
    before = b.detach().clone()
    opt = orthoopt.OrthoSGD([a, b], lr=0.1, **HARD, ortho_layout="columns")
    a.grad = torch.randn(10, 4)
    with pytest.warns(UserWarning, match="group0.param0"):
        opt.step()
    assert torch.equal(b, before) and len(opt.state[b]) == 0


# -- the initial projection ----------------------------------------------------------------
def test_initial_projection_is_reported():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4, bias=False)
    error_before = stack_error("rows", lin.weight)
    opt = orthoopt.OrthoAdamW(param_groups(lin, ortho=1.0, ortho_mode="hard", ortho_init="warn"), lr=1e-2)
    lin.weight.grad = torch.randn(4, 12)
    with pytest.warns(UserWarning, match=r"projected onto the Stiefel manifold.*'weight' \(max \|XᵀX - I\| = ") as rec:
        opt.step()
    assert f"{error_before:.3g}" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller of step()
    assert stack_error("rows", lin.weight) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # only once


def test_a_projection_the_group_asked_for_is_silent():
    """ortho_init='project' (the default of param_groups and constrain_) asks for the first-step
    projection: hard mode takes it without a word, as the soft step does."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 4, bias=False)
    opt = orthoopt.OrthoAdamW(param_groups(lin, ortho=1.0, ortho_mode="hard"), lr=1e-2)
    lin.weight.grad = torch.randn(4, 12)
    assert stack_error("rows", lin.weight) > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert stack_error("rows", lin.weight) < 1e-5


def test_no_warning_when_already_on_the_manifold():
    lin = nn.Linear(12, 4, bias=False)
    opt = orthoopt.OrthoAdamW(param_groups(lin, ortho=1.0, ortho_mode="hard"), lr=1e-2)
    orthoopt.project_(opt)
    lin.weight.grad = torch.randn(4, 12)
    before = lin.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not torch.equal(lin.weight, before)  # it stepped, silently
    assert max(opt.orthogonality_errors().values()) < 1e-5


# -- the traps -------------------------------------------------------------------------------
def run_canonical(stabilize, steps=500):
    torch.manual_seed(0)
    lin, teacher = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
    x = torch.randn(256, 64)
    opt = orthoopt.OrthoAdam(lin.parameters(), lr=1e-2, **HARD, ortho_manifold="canonical", ortho_stabilize=stabilize)
    orthoopt.project_(opt)
    for _ in range(steps):
        opt.zero_grad()
        (lin(x) - teacher(x)).pow(2).mean().backward()
        opt.step()
    return lin.weight, opt


def test_canonical_drifts_without_stabilize_and_not_with_it():
    drifted, _ = run_canonical(None)
    kept, opt = run_canonical(7)
    err_drift, err_kept = stack_error("rows", drifted), stack_error("rows", kept)
    assert err_kept < 1e-5
    assert err_drift > 10 * err_kept  # measured: 6e-5 vs 1e-6 on x86 CPU
    # stabilizing re-projects the moment too (last stabilized at step 497, then 3 transports)
    x = kept.detach().t()  # the 'rows' layout's matrix
    assert is_tangent(x, opt.state[kept][stiefel.EXP_AVG].squeeze(0), atol=1e-4)


def test_stabilize_keeps_a_canonical_moment_bounded():
    """geoopt's stabilize re-applies CanonicalStiefel.proju, which doubles the X·skew part of a
    tangent vector: re-projecting every step made RiemannianAdam's moment overflow."""
    weight, opt = run_canonical(1, steps=100)
    moment = opt.state[weight][stiefel.EXP_AVG]
    assert torch.isfinite(moment).all() and moment.norm() < 10
    x = weight.detach().t().unsqueeze(0)
    again = stiefel._stabilize(stiefel.manifold("canonical"), x, {stiefel.EXP_AVG: moment.clone()})
    torch.testing.assert_close(again, x, atol=1e-6, rtol=0)
    state = {stiefel.EXP_AVG: moment.clone()}
    stiefel._stabilize(stiefel.manifold("canonical"), x, state)
    torch.testing.assert_close(state[stiefel.EXP_AVG], moment, atol=1e-6, rtol=0)  # idempotent


def test_stabilize_period_rules():
    assert stiefel.stabilize_period({"ortho_stabilize": "auto", "ortho_manifold": "canonical"}) == 10
    assert stiefel.stabilize_period({"ortho_stabilize": "auto", "ortho_manifold": "euclidean"}) is None
    assert stiefel.stabilize_period({"ortho_stabilize": 5, "ortho_manifold": "euclidean"}) == 5
    half = {"ortho_stabilize": "auto", "ortho_manifold": "canonical"}
    assert stiefel.stabilize_period(half, torch.bfloat16) == 1


def test_other_solve_errors_are_not_swallowed(monkeypatch):
    p = nn.Parameter(polar(torch.randn(10, 4)))
    opt = orthoopt.OrthoSGD([p], lr=0.1, **HARD, ortho_layout="columns", ortho_manifold="canonical")
    p.grad = torch.randn(10, 4)

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch.linalg, "solve", broken)
    with pytest.raises(RuntimeError, match="something else"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
def test_half_precision_steps_in_float32_and_writes_back(dtype, manifold):
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False).to(dtype)
    x = torch.randn(64, 32, dtype=dtype)
    target = torch.randn(64, 8, dtype=dtype)
    opt = orthoopt.OrthoAdam(lin.parameters(), lr=1e-2, **HARD, ortho_manifold=manifold)
    orthoopt.project_(opt)
    start = lin.weight.detach().clone()
    for _ in range(100):
        opt.zero_grad()
        (lin(x) - target).float().pow(2).mean().backward()
        opt.step()
    assert lin.weight.dtype == dtype
    assert opt.state[lin.weight][stiefel.EXP_AVG].dtype == torch.float32
    assert (lin.weight.float() - start.float()).abs().max() > 0.05
    # as orthonormal as the dtype allows (measured: 3.2e-3 bf16, 4.5e-4 fp16)
    assert stack_error("rows", lin.weight) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    # torch's load_state_dict would cast the state to the parameter's dtype; ours keeps float32
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert opt.state[lin.weight][stiefel.EXP_AVG].dtype == torch.float32
    assert torch.equal(opt.state[lin.weight][stiefel.EXP_AVG], saved["state"][0][stiefel.EXP_AVG])
    opt.step()
    assert opt.state[lin.weight][stiefel.EXP_AVG].dtype == torch.float32


@pytest.mark.slow
def test_torch_compile_takes_the_same_stiefel_step():
    """geoopt's own optimizers turn Euclidean under torch.compile; ours must not."""

    def run(compiled):
        torch.manual_seed(0)
        p = nn.Parameter(polar(torch.randn(3, 8, 4)))
        opt = orthoopt.OrthoAdam([p], lr=5e-2, **HARD, ortho_layout="group_axis:0", ortho_manifold="canonical")
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            p.grad = torch.randn(3, 8, 4, generator=gen)
            step()
        return p.detach().clone()

    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's graph-break chatter
            compiled = run(True)
    finally:
        torch._dynamo.reset()
    eager = run(False)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert stack_error("group_axis:0", compiled) < 1e-5
    assert (compiled - polar(compiled)).abs().max() < 1e-5


# -- validation ---------------------------------------------------------------------------
def test_unsupported_base_optimizer_is_named():
    OrthoRMSprop = orthoopt.orthogonalize(torch.optim.RMSprop)
    lin = nn.Linear(12, 4)
    with pytest.raises(TypeError, match=r"OrthoRMSprop \(bases: RMSprop, Optimizer\) is neither"):
        OrthoRMSprop(lin.parameters(), lr=1e-2, **HARD)
    with pytest.raises(TypeError, match="OrthoRMSprop"):
        OrthoRMSprop([{"params": [lin.weight], **HARD}, {"params": [lin.bias]}], lr=1e-2)
    OrthoRMSprop(lin.parameters(), lr=1e-2, ortho=1.0)  # soft mode is fine
    OrthoRMSprop(lin.parameters(), lr=1e-2, ortho=0.0, ortho_mode="hard")  # nothing constrained


@pytest.mark.parametrize(
    "options,match",
    [
        ({"ortho_manifold": "poincare"}, "ortho_manifold must be one of"),
        ({"ortho_stabilize": 0}, "ortho_stabilize must be"),
        ({"ortho_stabilize": True}, "ortho_stabilize must be"),
        ({"ortho_stabilize": 2.5}, "ortho_stabilize must be"),
        ({"ortho_stabilize": "sometimes"}, "ortho_stabilize must be"),
    ],
)
def test_options_are_validated(options, match):
    lin = nn.Linear(12, 4)
    with pytest.raises(ValueError, match=match):
        orthoopt.OrthoSGD(lin.parameters(), lr=0.1, **HARD, **options)
    with pytest.raises(ValueError, match=f"param group 0: {match}"):
        orthoopt.OrthoSGD([{"params": lin.parameters(), **options}], lr=0.1)


def test_sparse_grad_is_refused_before_anything_changes():
    a = nn.Parameter(polar(torch.randn(10, 4)))
    b = nn.Parameter(torch.randn(5))
    opt = orthoopt.OrthoSGD([{"params": [a], **HARD, "ortho_layout": "columns"}, {"params": [b]}], lr=0.1)
    a.grad = torch.randn(10, 4).to_sparse()
    b.grad = torch.randn(5)
    before = b.detach().clone()
    with pytest.raises(TypeError, match="group0.param0.*sparse"):
        opt.step()
    assert torch.equal(b, before)


def test_soft_mode_is_unchanged_by_the_hard_hook():
    """With ortho=0 the optimizer is bitwise torch's; soft mode still runs its penalty step."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    a, b, c = copy.deepcopy(lin), copy.deepcopy(lin), copy.deepcopy(lin)
    opt_a = orthoopt.OrthoAdamW(a.parameters(), lr=1e-2, ortho=0.0, ortho_mode="hard")
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    opt_c = orthoopt.OrthoAdamW(param_groups(c, ortho=1.0), lr=1e-2)
    for _ in range(5):
        grads = [torch.randn(4, 12), torch.randn(4)]
        for m in (a, b, c):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        opt_a.step()
        opt_b.step()
        opt_c.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(c.weight, b.weight) and torch.equal(c.bias, b.bias)


@pytest.mark.parametrize("manifold", ["euclidean", "canonical"])
def test_the_mean_second_moment_is_geoopts_rule_at_sqrt_n_times_the_lr(manifold):
    # (10, 4): N = 40 entries; eps scaled with the moment, the two rules are the same steps.
    kw = {"betas": (0.8, 0.99), "weight_decay": 1e-2, "ortho_layout": "columns", "ortho_manifold": manifold}
    kw["ortho_stabilize"] = None
    n = 40
    run_pair(
        lambda ps: orthoopt.OrthoAdam(ps, lr=3e-2, eps=1e-6, **kw, **HARD),
        lambda ps: geoopt.optim.RiemannianAdam(
            ps, lr=3e-2 * n**0.5, eps=1e-6 * n**0.5, betas=(0.8, 0.99), weight_decay=1e-2
        ),
        manifold,
    )


def test_bad_second_moment_is_refused():
    with pytest.raises(ValueError, match="ortho_second_moment must be one of"):
        orthoopt.OrthoAdam([nn.Parameter(torch.randn(8, 4))], ortho=1.0, ortho_second_moment="per-entry")


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


# -- a layout of blocks of unequal sizes: one hard state per piece ------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_composite_layouts_pieces_take_hard_steps_as_separate_parameters_and_resume_bitwise(tmp_path, dtype):
    """Each block of a RowBlocks weight moves as a parameter of its own would (projected at its
    first hard step, its own Adam state under suffixed keys for the second block), and the
    state round-trips through torch.save / torch.load(weights_only=True): a resumed run is
    bitwise the uninterrupted one, its state dict too (torch keeps every 'step' uncast)."""
    from orthoopt.testing import RowBlocks, resolving

    blocks = RowBlocks(sizes=(7, 5))
    a0 = near_orthonormal(16, 7, seed=1, dtype=dtype).T.contiguous()
    b0 = near_orthonormal(16, 5, seed=2, dtype=dtype).T.contiguous()
    grads = [torch.randn(12, 16, generator=torch.Generator().manual_seed(k), dtype=dtype) for k in range(6)]

    def make(w):
        return orthoopt.OrthoAdam([w], lr=1e-2, ortho_layout="row_groups:1", **HARD)

    with resolving("row_groups:1", blocks):
        w = nn.Parameter(torch.cat([a0, b0]))
        a, b = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
        opt, ref = make(w), orthoopt.OrthoAdam([a, b], lr=1e-2, ortho_layout="rows", **HARD)
        with pytest.warns(UserWarning, match=r"block 0 of 2.*block 1 of 2"):
            for k in range(3):
                w.grad, (a.grad, b.grad) = grads[k], grads[k].split([7, 5])
                opt.step()
                ref.step()
                assert torch.equal(w[:7], a) and torch.equal(w[7:], b)
        for key, value in ref.state[a].items():
            assert torch.equal(opt.state[w][key], value)
            assert torch.equal(opt.state[w][key + ".1"], ref.state[b][key])
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        saved_w = w.detach().clone()
        for k in range(3, 6):
            w.grad = grads[k]
            opt.step()
        resumed = nn.Parameter(saved_w)
        again = make(resumed)
        again.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        for k in range(3, 6):
            resumed.grad = grads[k]
            again.step()
    assert torch.equal(resumed, w)
    assert stack_error("rows", w.detach()[:7]) < 1e-5 and stack_error("rows", w.detach()[7:]) < 1e-5
    state, state_again = opt.state_dict()["state"][0], again.state_dict()["state"][0]
    assert state.keys() == state_again.keys()
    for key, value in state.items():
        assert value.dtype == state_again[key].dtype and torch.equal(value, state_again[key]), key
