"""Hard mode (ortho_mode='hard'): Riemannian steps on the Stiefel manifold with geoopt."""

from __future__ import annotations

import copy
import io
import warnings

import geoopt
import pytest
import torch
from conftest import HARD, quadratic_grad, run_pair, stack_error
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
    """The seed's (l, m, n) tensor, contracted with the input over l and m."""

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
    opt = orthoopt.OrthoAdamW(param_groups(lin, ortho=1.0, ortho_mode="hard"), lr=1e-2)
    lin.weight.grad = torch.randn(4, 12)
    with pytest.warns(UserWarning, match=r"projected onto the Stiefel manifold.*'weight' \(max \|XᵀX - I\| = ") as rec:
        opt.step()
    assert f"{error_before:.3g}" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller of step()
    assert stack_error("rows", lin.weight) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # only once


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
