"""The benchmark's smoke test, and the soft step's fast path: bucketing, caching, compile."""

import json

import pytest
import torch

from orthoopt import OrthoAdamW, OrthoSGD, bench, l1_orthogonality


def _near_orthonormal(*shape, noise=0.1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=dtype)).Q
    return (q + noise * torch.randn(*shape, generator=g, dtype=dtype) / shape[-2] ** 0.5).contiguous()


# -- the benchmark ----------------------------------------------------------------------
def test_quick_benchmark_writes_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "targets", "results"}
    assert report["meta"]["device"] == "cpu" and report["meta"]["quick"] is True
    assert set(report["targets"]) >= {"overhead_over_floor", "autograd_over_soft", "many_over_stacked"}
    for target in ("overhead_over_floor", "autograd_over_soft", "many_over_stacked"):
        assert report["targets"][target]["met"] in (True, False)
    cases = [r["case"] for r in report["results"]]
    assert len(cases) == len(bench.QUICK_SHAPES) + 1
    for r in report["results"]:
        for name in ("floor", "base", "soft", "autograd", "geoopt-E", "geoopt-C"):
            assert r["median_ms"][name] > 0, (r["case"], name, r["n/a"])
        # The hard mode is either timed or says why not.
        assert (r["median_ms"]["hard"] is not None) != ("hard" in r["n/a"])
        assert set(r["ratios"]) >= {"overhead_ms", "overhead_over_floor", "autograd_over_soft"}
        assert set(r["memory"]) == {"base", "soft", "autograd"}
        assert set(r["memory"]["soft"]) >= {"allocations_per_step", "peak_extra_x_params", "workspace_x_params"}
        assert r["memory"]["soft"]["workspace_x_params"] > 0
    many = report["results"][-1]
    assert many["many"] and many["ratios"]["many_over_stacked"] > 0
    assert many["median_ms"]["soft-stacked"] > 0
    table = capsys.readouterr().out
    assert "ovh/floor" in table and "target overhead_over_floor" in table


def test_benchmark_flags():
    cfg = bench._config(["--device", "cpu", "--shapes", "4x16x4, many:3x8x2", "--repeats", "7", "--out", "x.json"])
    assert cfg.cases == [bench.Case(4, 16, 4), bench.Case(3, 8, 2, many=True)]
    assert cfg.repeats == 7 and cfg.hard_repeats == 3 and cfg.dtypes == [torch.float32]
    with pytest.raises(SystemExit, match="n=8 > l=4"):
        bench._config(["--device", "cpu", "--shapes", "2x4x8"])
    with pytest.raises(SystemExit, match="--dtype"):
        bench._config(["--device", "cpu", "--dtype", "int8"])
    with pytest.raises(SystemExit, match="--contenders"):
        bench._config(["--device", "cpu", "--contenders", "soft,nope"])


# -- the fast path ----------------------------------------------------------------------
def _bucketed_params():
    """Five parameters whose matrices are all 12 x 4, through four layouts."""
    base = _near_orthonormal(8, 12, 4)
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
    (bucket,) = opt._soft_plan()
    assert len(bucket.params) == 5 and bucket.stack is not None and sum(bucket.counts) == 8
    for p, q, (x, _) in zip(together, alone, specs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
        assert (p.detach() - x).abs().max() > 1e-3  # moved from the initial value, far beyond the tolerance


def test_cached_step_is_minus_lr_times_the_autograd_gradient():
    # Caps inactive (2 lr β far below both), no task gradient, no weight decay: the soft
    # step is exactly -lr ∂(βL)/∂Φ, on the first (planning) and later (cached) steps.
    lr, beta = 1e-4, 0.5
    stack = torch.nn.Parameter(_near_orthonormal(3, 12, 4, seed=1))
    matrix = torch.nn.Parameter(_near_orthonormal(12, 4, seed=2))
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
    a = torch.nn.Parameter(_near_orthonormal(2, 12, 4, seed=4))
    b = torch.nn.Parameter(_near_orthonormal(2, 12, 4, seed=5))
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
    plan = opt._soft_plan()
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
    assert opt._soft_plan() is plan
    opt.param_groups[0]["ortho"] = 0.0
    expected_a = a.detach() - 1e-2 * a.grad
    opt.step()
    torch.testing.assert_close(a.detach(), expected_a, rtol=0, atol=0)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert getattr(opt, "_soft_cache", None) is None


def test_cached_step_allocates_nothing_of_the_parameters_size():
    from torch.profiler import ProfilerActivity, profile

    p = torch.nn.Parameter(_near_orthonormal(8, 256, 32, dtype=torch.float32))
    p.grad = torch.zeros_like(p)
    opt = OrthoSGD([p], lr=1e-3, ortho=1.0, ortho_layout="group_axis:0")
    opt.step()
    (bucket,) = opt._soft_plan()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()  # the whole step: torch's SGD update, the cached plan and the penalty
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    size = p.numel() * p.element_size()
    assert allocated < 0.05 * size, f"{allocated} bytes allocated for a {size}-byte parameter"
    # ...while the workspaces it reuses are there: residual, direction and product.
    assert bucket.workspace_bytes() >= size


@pytest.mark.compile
# The layout parsers are lru_cached pure functions of a string: dynamo tracing through the
# cache, as it says it does, is correct for them.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiled_step_matches_eager_and_lr_schedule_does_not_recompile():
    torch._dynamo.reset()

    def make():
        g = torch.Generator().manual_seed(0)
        ps = [
            torch.nn.Parameter(torch.randn(8, 4, generator=g) / 3),
            torch.nn.Parameter(torch.randn(3, 8, 4, generator=g) / 3),
        ]
        # Two groups in one bucket (matrices 8 x 4), a tensor lr as torch documents for compile.
        groups = [{"params": [ps[0]], "ortho_layout": "columns"}, {"params": [ps[1]], "ortho_layout": "group_axis:0"}]
        opt = OrthoAdamW(groups, lr=torch.tensor(0.01), ortho=1.0, ortho_smoothing=0.01)
        return ps, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))

    eager, eager_opt, eager_sched = make()
    compiled, compiled_opt, compiled_sched = make()

    @torch.compile(fullgraph=False)
    def step():
        compiled_opt.step()

    g = torch.Generator().manual_seed(1)
    try:
        for k in range(4):
            for p, q in zip(eager, compiled):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            eager_opt.step()
            eager_sched.step()
            step()
            compiled_sched.step()
            if k == 1:  # compiled by now: a new lr must not compile again
                torch.compiler.set_stance("fail_on_recompile")
            for p, q in zip(eager, compiled):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
    assert not torch.equal(compiled[1], make()[0][1])  # it moved
