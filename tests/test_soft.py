"""The soft step's buckets (orthoopt.soft): one batched step per bucket equal to the
per-parameter reference bitwise, chunks, the cached plan and what invalidates it, workspaces
and allocations, the compiled step, and the parameters a plan skips and tracks."""

from __future__ import annotations

import pytest
import torch
from conftest import near_orthonormal
from torch import nn

import orthoopt
from orthoopt import OrthoAdamW, OrthoSGD, l1_orthogonality, soft
from orthoopt.layout import resolve_layout
from orthoopt.testing import RowBlocks, resolving


def test_workspace_bytes_count_the_buffers_a_bucket_holds():
    """R (m, n, n; S is formed in its place), and the stacked matrices with their delta
    (m, l, n) for a bucket of several parameters, or one parameter-sized update for a bucket
    of one, with Φ⁻ (m, l, n) kept across the base update for 'auto' (the benchmark's
    'workspace_x_params')."""
    a = nn.Parameter(torch.randn(3, 12, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(12, 4, dtype=torch.float64))
    groups = [{"params": [a], "ortho_layout": "group_axis:0"}, {"params": [b], "ortho_layout": "columns"}]
    for params, beta, m, mats_held in ((groups, 1.0, 4, 2), ([b], 1.0, 1, 1), ([b], "auto", 1, 2)):
        opt = orthoopt.OrthoSGD(params, lr=0.1, ortho=beta)
        for p in (a, b):
            p.grad = torch.zeros_like(p)
        opt.step()
        (bucket,) = opt._plan().buckets
        grams, mats = m * 4 * 4, m * 12 * 4
        assert bucket.workspace_bytes() == 8 * (grams + mats_held * mats)


def _mixed_model_params():
    """Buckets of several parameters through different layouts (some of whose matrices or
    updates are not views), a bucket of one, a channels_last conv weight, and 'auto'."""
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    conv = randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    specs = [
        (randn(12, 4), "columns", 1.0),
        (randn(4, 12), "rows", 1.0),
        (randn(3, 12, 4), "group_axis:0", 1.0),
        (randn(12, 2, 4), "group_axis:1", 1.0),
        (conv, "rows", 1.0),
        (randn(9, 3), "columns", 0.5),
        (randn(10, 4), "columns", "auto"),
        (randn(4, 10), "rows", "auto"),
    ]
    return [(nn.Parameter(x.clone(memory_format=torch.preserve_format)), lay, beta) for x, lay, beta in specs]


def _run(specs, steps=3):
    groups = [{"params": [p], "ortho_layout": lay, "ortho": beta} for p, lay, beta in specs]
    opt = orthoopt.OrthoSGD(groups, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(6)
    for _ in range(steps):
        for p, _, _ in specs:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return opt


def test_the_plan_without_workspaces_steps_like_the_cached_plan(monkeypatch):
    """torch.compile plans its own buffers (no workspaces, no cached views or updates); the same
    plan in eager mode takes bitwise the cached plan's steps."""
    cached = _mixed_model_params()
    opt = _run(cached)
    assert any(b.stack is not None for b in opt._plan().buckets)  # a bucket of several parameters
    real = soft.buckets
    monkeypatch.setattr(soft, "buckets", lambda pieces, workspaces: real(pieces, workspaces=False))
    bare = _mixed_model_params()
    opt = _run(bare)
    assert all(b.updates is None and b.views is None for b in opt._plan().buckets)
    for (p, lay, _), (q, _, _) in zip(bare, cached):
        assert torch.equal(p, q), lay


def test_groups_and_parameters_after_skipped_ones_are_planned_and_tracked():
    """The plan reaches past an unpenalized group, a parameter without a gradient and one its
    layout skips (a bias under 'auto'); and the cached plan follows a later group's options,
    here its β switched to 'auto', as a fresh optimizer's plan would."""
    g = torch.Generator().manual_seed(7)
    a, c = nn.Parameter(torch.randn(8, 3, generator=g)), nn.Parameter(torch.randn(8, 3, generator=g))
    bias, w = nn.Parameter(torch.randn(3, generator=g)), nn.Parameter(torch.randn(8, 3, generator=g))
    w_ref = nn.Parameter(w.detach().clone())
    opt = orthoopt.OrthoSGD([{"params": [a]}, {"params": [c, bias, w], "ortho": 1.0}], lr=0.05)
    ref = orthoopt.OrthoSGD([w_ref], lr=0.05, ortho=1.0)
    for _ in range(2):
        a.grad, bias.grad = torch.zeros_like(a), torch.zeros_like(bias)
        w.grad = torch.randn(8, 3, generator=g)
        w_ref.grad = w.grad.clone()
        opt.step()
        ref.step()
        assert torch.equal(w, w_ref)
        opt.param_groups[1]["ortho"] = ref.param_groups[0]["ortho"] = "auto"
    assert "ortho_multiplier" in opt.state[w] and c not in opt.state


def test_a_non_finite_parameter_of_an_unnamed_group_is_named_by_its_group():
    a, b = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([{"params": [a]}, {"params": [b], "ortho": 1.0}], lr=0.05)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    with torch.no_grad():
        b[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"parameter 'group1\.param0' holds NaN or Inf"):
        opt.step()


# -- the fast path ----------------------------------------------------------------------
def _bucketed_params():
    """Five parameters whose matrices are all 12 x 4, through four layouts."""
    base = near_orthonormal(8, 12, 4)
    return [
        (base[0].clone(), "columns"),  # (12, 4): its 4 columns
        (base[1].t().contiguous(), "rows"),  # (4, 12): its 4 rows
        (base[2:5].clone(), "group_axis:0"),  # (3, 12, 4)
        (base[5:7].transpose(0, 1).contiguous(), "group_axis:1"),  # (12, 2, 4)
        (base[7].t().reshape(4, 3, 2, 2).contiguous(), "rows"),  # a conv weight's 4 filters
    ]


def test_many_parameters_bucket_equals_separate_steps():
    # Each group its own lr and β (so its own η = 2·lr·β): one bucket must still step each
    # parameter as its own optimizer would.
    specs = _bucketed_params()
    settings = [(1e-2, 1.0), (2e-2, 0.5), (5e-3, 3.0), (1e-2, 2.0), (3e-2, 1.0)]
    together = [torch.nn.Parameter(x.clone()) for x, _ in specs]
    groups = [
        {"params": [p], "ortho_layout": lay, "lr": lr, "ortho": beta}
        for p, (_, lay), (lr, beta) in zip(together, specs, settings)
    ]
    opt = OrthoAdamW(groups, lr=1e-2, ortho=1.0, weight_decay=0.1)
    alone = [torch.nn.Parameter(x.clone()) for x, _ in specs]
    opts = [
        OrthoAdamW([p], lr=lr, ortho=beta, weight_decay=0.1, ortho_layout=lay)
        for p, (_, lay), (lr, beta) in zip(alone, specs, settings)
    ]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(together, alone):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        for o in opts:
            o.step()
    (bucket,) = opt._plan().buckets
    assert len(bucket.params) == 5 and bucket.stack is not None and sum(bucket.counts) == 8
    for p, q, (x, _) in zip(together, alone, specs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
        assert (p.detach() - x).abs().max() > 1e-3  # moved from the initial value, far beyond the tolerance


def test_cached_step_is_minus_lr_times_the_autograd_gradient():
    # Caps inactive (2 lr β far below both), no task gradient, no weight decay: the soft
    # step is exactly -lr ∂(βL)/∂Φ, on the first (planning) and later (cached) steps.
    lr, beta = 1e-4, 0.5
    stack = torch.nn.Parameter(near_orthonormal(3, 12, 4, seed=1))
    matrix = torch.nn.Parameter(near_orthonormal(12, 4, seed=2))
    opt = OrthoSGD(
        [{"params": [stack], "ortho_layout": "group_axis:0"}, {"params": [matrix], "ortho_layout": "columns"}],
        lr=lr,
        ortho=beta,
    )
    for _ in range(3):
        expected = []
        for p, dim in ((stack, 0), (matrix, None)):
            phi = p.detach().clone().requires_grad_()
            (grad,) = torch.autograd.grad(l1_orthogonality(phi, beta, group_dim=dim), phi)
            expected.append(phi.detach() - lr * grad)
            p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(stack.detach(), expected[0], rtol=0, atol=1e-15)
        torch.testing.assert_close(matrix.detach(), expected[1], rtol=0, atol=1e-15)


def _sgd_reference(param_specs, options):
    """One step of a fresh OrthoSGD (stateless, so comparable to a long-lived one)."""
    params = [torch.nn.Parameter(p.detach().clone()) for p, _ in param_specs]
    for q, (p, _) in zip(params, param_specs):
        q.grad = None if p.grad is None else p.grad.clone()
    groups = [{"params": [q], **opt} for q, (_, opt) in zip(params, param_specs)]
    OrthoSGD(groups, lr=1e-2, **options).step()
    return params


def test_plan_cache_follows_groups_grads_and_options():
    a = torch.nn.Parameter(near_orthonormal(2, 12, 4, seed=4))
    b = torch.nn.Parameter(near_orthonormal(2, 12, 4, seed=5))
    a.grad = torch.ones_like(a)
    opt = OrthoSGD([{"params": [a], "ortho_layout": "group_axis:0"}], lr=1e-2, ortho=1.0)
    opt.step()

    def check(specs):
        expected = _sgd_reference(specs, {"ortho": 1.0})
        opt.step()
        for (p, _), q in zip(specs, expected):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-15)

    b.grad = torch.ones_like(b)
    opt.add_param_group({"params": [b], "ortho_layout": "group_axis:0", "ortho_smoothing": 0.05})
    check([(a, {"ortho_layout": "group_axis:0"}), (b, {"ortho_layout": "group_axis:0", "ortho_smoothing": 0.05})])
    a.grad = None  # skipped entirely, penalty included
    before = a.detach().clone()
    check([(b, {"ortho_layout": "group_axis:0", "ortho_smoothing": 0.05})])
    assert torch.equal(a, before)
    a.grad = torch.ones_like(a)
    opt.param_groups[1]["ortho_penalty"] = "frobenius"
    check(
        [
            (a, {"ortho_layout": "group_axis:0"}),
            (b, {"ortho_layout": "group_axis:0", "ortho_smoothing": 0.05, "ortho_penalty": "frobenius"}),
        ]
    )
    plan = opt._plan()
    opt.param_groups[1]["ortho"] = 2.0  # a scheduled β: same plan, new step
    opt.param_groups[1]["lr"] = 3e-2
    check(
        [
            (a, {"ortho_layout": "group_axis:0"}),
            (
                b,
                {
                    "ortho_layout": "group_axis:0",
                    "ortho_smoothing": 0.05,
                    "ortho_penalty": "frobenius",
                    "ortho": 2.0,
                    "lr": 3e-2,
                },
            ),
        ]
    )
    assert opt._plan() is plan
    opt.param_groups[0]["ortho"] = 0.0
    expected_a = a.detach() - 1e-2 * a.grad
    opt.step()
    torch.testing.assert_close(a.detach(), expected_a, rtol=0, atol=0)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert getattr(opt, "_ortho_plan", None) is None


def test_cached_step_allocates_nothing_of_the_parameters_size():
    from torch.profiler import ProfilerActivity, profile

    p = torch.nn.Parameter(near_orthonormal(8, 256, 32, dtype=torch.float32))
    p.grad = torch.zeros_like(p)
    opt = OrthoSGD([p], lr=1e-3, ortho=1.0, ortho_layout="group_axis:0")
    opt.step()
    (bucket,) = opt._plan().buckets
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()  # the whole step: torch's SGD update, the cached plan and the penalty
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    size = p.numel() * p.element_size()
    assert allocated < 0.05 * size, f"{allocated} bytes allocated for a {size}-byte parameter"
    # ...while the workspaces it reuses are there: residual, direction and product.
    assert bucket.workspace_bytes() >= size


# -- the step's structure: reference, chunks, 'auto', every k steps -------------------------
def _reference_sgd_step(params, layouts, lr, beta, **penalty_options):
    """The soft step of plain SGD written out per parameter with the pure functions of
    orthoopt.penalty: fresh tensors, no buckets, no workspaces, no host checks."""
    from orthoopt import penalty
    from orthoopt.layout import resolve_layout

    deltas = []
    for p, spec in zip(params, layouts):
        layout = resolve_layout(spec, p.shape, "p")
        mats = layout.matrices(p.detach())
        r = penalty.residual(mats)
        delta = penalty.penalty_step(r, mats, penalty_options.get("smoothing", 0.0), "l1", 2 * lr * beta)
        deltas.append(layout.from_matrices(delta, p.shape))
    return [p.detach().add(p.grad, alpha=-lr).add_(d) for p, d in zip(params, deltas)]  # SGD's own update, then ours


def _layout_zoo(dtype=torch.float64):
    """Parameters of every layout (and a channels_last conv weight), all 12 x 4 matrices."""
    specs = _bucketed_params()
    conv = near_orthonormal(18, 8, seed=9, dtype=dtype).t().contiguous().reshape(8, 2, 3, 3)
    specs = [(x.to(dtype), lay) for x, lay in specs]
    specs.append((conv.to(memory_format=torch.channels_last), "rows"))
    return specs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_is_bitwise_the_per_parameter_reference(dtype):
    specs = _layout_zoo(dtype)
    params = [torch.nn.Parameter(x.clone()) for x, _ in specs]
    layouts = [lay for _, lay in specs]
    opt = OrthoSGD([{"params": [p], "ortho_layout": lay} for p, lay in zip(params, layouts)], lr=1e-2, ortho=1.0)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in params:
            p.grad = (0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype)
        expected = _reference_sgd_step(params, layouts, 1e-2, 1.0)
        opt.step()
        for p, e in zip(params[:-1], expected):
            assert torch.equal(p.detach(), e)
        # The channels_last weight's product is written through a parameter-shaped buffer
        # in another memory order (a transposed matmul output): equal to its rounding.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(params[-1].detach(), expected[-1], rtol=0, atol=4 * eps)
        assert not torch.equal(params[-1].detach(), specs[-1][0])  # it moved


@pytest.mark.parametrize("share, chunks", [(0.25, 4), (1 / 16, 16)], ids=["four_pieces_a_chunk", "one_piece_a_chunk"])
def test_chunked_bucket_is_bitwise_the_whole_bucket_and_holds_a_quarter(monkeypatch, share, chunks):
    """A chunk of one piece steps that piece's own view (no stack), as a chunk of several
    steps their stack: both bitwise as the whole bucket."""
    from orthoopt import soft

    def run(chunked):
        monkeypatch.setattr(soft, "CHUNK_SHARE", share)
        if chunked:
            monkeypatch.setattr(soft, "MIN_CHUNK_BYTES", 0)
        else:
            monkeypatch.setattr(soft, "MIN_CHUNK_BYTES", 1 << 40)
        params = [torch.nn.Parameter(near_orthonormal(64, 16, seed=i)) for i in range(16)]
        # two groups of different lr in one bucket: per-matrix step sizes within a chunk
        groups = [{"params": params[:5], "lr": 2e-2}, {"params": params[5:]}]
        opt = OrthoAdamW(groups, lr=1e-2, ortho=1.0, ortho_layout="columns", weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            for p in params:
                p.grad = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
            sched.step()
        return params, opt

    whole, whole_opt = run(False)
    chunked, chunked_opt = run(True)
    (bucket,) = chunked_opt._plan().buckets
    assert len(bucket.chunks) == chunks and len(whole_opt._plan().buckets[0].chunks) == 1
    for p, q in zip(whole, chunked):
        assert torch.equal(p, q)
    size = sum(p.numel() * p.element_size() for p in chunked)
    # The stack of Φ⁻ and the residual are a chunk's; the update (which must live across
    # the base step) is the one buffer of the parameters' size.
    assert bucket.stack.numel() * bucket.stack.element_size() <= share * size
    assert bucket.workspace_bytes() - size <= share * size + bucket.r.numel() * bucket.r.element_size()


def test_auto_step_is_bitwise_the_reference():
    from orthoopt import auto, penalty

    specs = [(near_orthonormal(24, 6, seed=i), "columns") for i in range(3)] + [
        (near_orthonormal(2, 24, 6, seed=7), "group_axis:0")
    ]
    params = [torch.nn.Parameter(x.clone()) for x, _ in specs]
    shadow = [torch.nn.Parameter(x.clone()) for x, _ in specs]
    opt = OrthoSGD([{"params": [p], "ortho_layout": lay} for p, (_, lay) in zip(params, specs)], lr=1e-2, ortho="auto")
    states = [{} for _ in params]
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        for p, q in zip(params, shadow):
            p.grad = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        for q, state, (_, lay) in zip(shadow, states, specs):
            layout = resolve_layout(lay, q.shape, "q")
            before = layout.matrices(q.detach()).clone()
            q.detach().add_(q.grad, alpha=-1e-2)  # SGD's step
            lr = torch.full((before.shape[0],), 1e-2, dtype=q.dtype)
            lam = auto.threshold(auto.update_products(before, layout.matrices(q.detach()), lr), lr > 0)
            eta = 2 * lr * (auto.AUTO_SAFETY * auto.remember(state, lam))
            delta = penalty.penalty_step(penalty.residual(before), before, 0.0, "l1", eta)
            q.detach().add_(layout.from_matrices(delta, q.shape))
        for p, q, state in zip(params, shadow, states):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["ortho_multiplier"], state["ortho_multiplier"])


@pytest.mark.parametrize("many", [False, True])
def test_cached_step_allocates_nothing_of_the_parameters_size_where_the_cap_is_checked(many):
    # lr·β large enough for the cap's row sums (n·η > 1/4): they need a workspace like R,
    # which S (formed in place of R) does not leave free; the update's memory serves.
    from torch.profiler import ProfilerActivity, profile

    stack = near_orthonormal(4, 256, 128, dtype=torch.float32)
    params = [torch.nn.Parameter(x.clone()) for x in (stack.unbind(0) if many else [stack])]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = OrthoSGD(params, lr=1e-2, ortho=1.0, ortho_layout="columns" if many else "group_axis:0")
    opt.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    size = sum(p.numel() * p.element_size() for p in params)
    assert allocated < 0.05 * size, f"{allocated} bytes allocated for {size} bytes of parameters"
    assert any(e.name == "aten::abs" for e in prof.events())  # the row sums did run


# -- a layout of blocks of unequal sizes: its pieces step as separate parameters ---------------
BLOCKS = RowBlocks(sizes=(7, 5))  # a (12, 16) weight: blocks of 7 and 5 rows, each with orthonormal rows


def _blocks(seed=0):
    """A (12, 16) weight whose two row blocks are near orthonormal, and the blocks apart."""
    a = near_orthonormal(16, 7, seed=seed).T.contiguous()
    b = near_orthonormal(16, 5, seed=seed + 1).T.contiguous()
    return nn.Parameter(torch.cat([a, b])), [nn.Parameter(a.clone()), nn.Parameter(b.clone())]


@pytest.mark.parametrize("ortho", [1.0, "auto"])
def test_a_composite_layouts_pieces_step_bitwise_as_separate_parameters(ortho):
    w, (a, b) = _blocks()
    start = w.detach().clone()
    g = torch.Generator().manual_seed(2)
    with resolving("row_groups:1", BLOCKS):
        opt = OrthoAdamW([w], lr=1e-2, ortho=ortho, ortho_layout="row_groups:1", weight_decay=0.1)
        ref = OrthoAdamW([a, b], lr=1e-2, ortho=ortho, ortho_layout="rows", weight_decay=0.1)
        for _ in range(3):
            a.grad, b.grad = (
                torch.randn(7, 16, generator=g, dtype=a.dtype),
                torch.randn(5, 16, generator=g, dtype=a.dtype),
            )
            w.grad = torch.cat([a.grad, b.grad])
            opt.step()
            ref.step()
            assert torch.equal(w[:7], a) and torch.equal(w[7:], b)
        assert len(opt._plan().buckets) == 2  # one per block: their matrices differ in shape
        errors, ref_errors = opt.orthogonality_errors(), ref.orthogonality_errors()
    assert errors == {"group0.param0": max(ref_errors.values())}
    if ortho == "auto":  # each block's estimate, the second under its suffixed key
        assert torch.equal(opt.state[w]["ortho_multiplier"], ref.state[a]["ortho_multiplier"])
        assert torch.equal(opt.state[w]["ortho_multiplier.1"], ref.state[b]["ortho_multiplier"])
    assert (w.detach() - start).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:ortho_mode='hard'")
def test_the_plan_is_built_once_and_again_at_each_structural_change(monkeypatch):
    """Steady steps resolve no layout (soft and hard); add_param_group, load_state_dict, a
    gradient that disappears, a group's option and a parameter's new storage each give a new
    plan, and the step after a new storage moves the new storage, as a fresh optimizer would."""
    from orthoopt import pieces

    resolved = []
    real = pieces.resolve_layout
    monkeypatch.setattr(pieces, "resolve_layout", lambda *args: resolved.append(args) or real(*args))
    soft_w, hard_w = nn.Parameter(near_orthonormal(12, 4, seed=1)), nn.Parameter(near_orthonormal(12, 4, seed=2))
    opt = OrthoSGD([{"params": [soft_w]}, {"params": [hard_w], "ortho_mode": "hard"}], lr=1e-2, ortho=1.0)

    def step():
        for p in (soft_w, hard_w):
            p.grad = torch.ones_like(p)
        opt.step()
        return opt._plan()

    plan = step()
    resolved.clear()
    assert step() is plan and step() is plan and resolved == []
    changes = {
        "add_param_group": lambda: opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]}),
        "load_state_dict": lambda: opt.load_state_dict(opt.state_dict()),
        "option": lambda: opt.param_groups[0].update(ortho_smoothing=0.01),
        "auto": lambda: opt.param_groups[0].update(ortho="auto"),
        "storage": lambda: setattr(soft_w, "data", soft_w.data.clone()),
    }
    for what, change in changes.items():
        change()
        new = step()
        assert new is not plan, what
        plan = new
    soft_w.grad = None  # a gradient that disappears
    opt.step()
    assert opt._plan() is not plan
    opt.param_groups[0].update(ortho=1.0)
    step()
    before = soft_w.detach().clone()
    soft_w.data = soft_w.data.clone()
    fresh = nn.Parameter(before.clone())
    fresh.grad = torch.ones_like(fresh)
    step()
    OrthoSGD([fresh], lr=1e-2, ortho=1.0, ortho_smoothing=0.01).step()
    assert torch.equal(soft_w, fresh) and not torch.equal(soft_w, before)


def test_a_bucket_of_one_group_forms_its_step_size_once_whatever_its_number_of_pieces():
    """With a tensor learning rate every product of 2·lr·β is an operation: a bucket of one
    group forms it once, not once per parameter."""

    def muls(count: int) -> int:
        params = [nn.Parameter(torch.linalg.qr(torch.randn(16, 4)).Q) for _ in range(count)]
        opt = OrthoSGD(params, lr=torch.tensor(1e-3), ortho=1.0)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()  # the plan and its workspaces
        (bucket,) = opt._plan().buckets
        assert len(bucket.params) == count
        return orthoopt.testing.count_ops(opt.step).ops["mul"]

    assert muls(6) == muls(1)
