"""torch.compile of the optimizer's step: the compiled step does everything the eager one does.

A traced step plans its own buckets (without workspaces: the compiler plans its buffers) and
leaves what reads values on the host to the optimizer's shadow plan, run eagerly at two graph
breaks: the start of new pieces (``ortho_init``, its first-step projection) before the soft
step, and after it the guard and the monitor (the drift check, the deferred non-finite
report).  Compared with the eager step over several steps, with torch's ``aot_eager`` and
inductor backends.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import near_orthonormal

import orthoopt
from orthoopt import OrthoAdamW, guard

pytestmark = [
    pytest.mark.compile,
    # The layout parsers are lru_cached pure functions of a string: dynamo tracing through the
    # cache, as it says it does, is correct for them.
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def _error(p: torch.Tensor) -> float:
    return orthoopt.orthogonality_error(p.detach().unsqueeze(1), group_dim=1).max().item()


def _optimizer():
    """A soft group, an 'auto' group, a group stepping every 2nd call, and a group whose
    weight starts far from orthonormal under ortho_init='project' (snapped after its first
    step); a tensor lr, as torch documents for a compiled step."""
    params = [torch.nn.Parameter(near_orthonormal(16, 4, seed=k, dtype=torch.float32)) for k in range(3)]
    far = torch.nn.Parameter(0.05 * torch.randn(16, 4, generator=torch.Generator().manual_seed(9)))
    groups = [
        {"params": [params[0]]},
        {"params": [params[1]], "ortho": "auto"},
        {"params": [params[2]], "ortho_every": 2},
        {"params": [far], "ortho_init": "project"},
    ]
    return [*params, far], OrthoAdamW(groups, lr=torch.tensor(0.02), ortho=1.0, ortho_layout="columns")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_is_the_eager_step_with_its_first_step_projection(backend):
    eager, eager_opt = _optimizer()
    compiled, compiled_opt = _optimizer()
    step = torch.compile(compiled_opt.step, backend=backend)
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        for p, q in zip(eager, compiled):
            p.grad = 0.1 * torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        eager_opt.step()
        step()
        for i, (p, q) in enumerate(zip(eager, compiled)):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=f"step {k}, parameter {i}")
        if k == 0:  # the far weight was projected after its first step, compiled as eager
            assert _error(compiled[3]) < 1e-5 and _error(eager[3]) < 1e-5
    assert compiled_opt.param_groups[2][orthoopt.soft.STEPS_KEY] == 6
    torch.testing.assert_close(
        compiled_opt.state[compiled[1]]["ortho_multiplier"], eager_opt.state[eager[1]]["ortho_multiplier"]
    )
    # Dynamo runs a frame eagerly where tracing it fails: the compiled step must have planned
    # in the trace, not cached an eager plan with workspaces on the optimizer.
    assert getattr(compiled_opt, "_ortho_plan", None) is None and eager_opt._ortho_plan is not None


def test_compiled_step_reports_drift_and_non_finite_matrices_as_the_accelerator_path_does():
    """The monitor runs for a compiled step: a drifting weight is reported within 10 steps of
    its error passing FAR, and a weight holding NaN (its matrix skipped on the device) at the
    monitor's first check (read at the step after it), once each."""
    torch.manual_seed(0)
    drifting = torch.nn.Parameter(torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64)).Q)
    broken = torch.nn.Parameter(near_orthonormal(8, 3))
    with torch.no_grad():
        broken[0, 0] = float("nan")
    opt = orthoopt.OrthoSGD([("drifting", drifting), ("broken", broken)], lr=2e-3, ortho=1e-4)
    step = torch.compile(opt.step, backend="aot_eager")
    errors, records = [], []
    for k in range(60):
        drifting.grad, broken.grad = -drifting.detach().clone(), torch.zeros_like(broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        errors.append(_error(drifting))
        records.extend((k + 1, str(w.message)) for w in caught)
    passed = next(k for k, e in enumerate(errors, 1) if e > guard.FAR)
    drift = [k for k, m in records if "'drifting' is moving away" in m]
    nonfinite = [k for k, m in records if "'broken' holds NaN or Inf" in m]
    assert len(drift) == 1 and passed < drift[0] <= passed + 10
    assert len(nonfinite) == 1 and nonfinite[0] <= guard.WATCH_EVERY + 1
    assert torch.isnan(broken[0, 0]) and torch.isfinite(broken.detach().flatten()[1:]).all()  # a NaN stays where it is


def test_a_compiled_step_under_an_lr_schedule_does_not_recompile():
    """Two groups in one bucket, a tensor lr under LambdaLR: once compiled, a new lr compiles
    nothing again (the guard's and the monitor's graph breaks neither)."""

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
    for k in range(12):
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
    assert not torch.equal(compiled[1], make()[0][1])  # it moved
    # Dynamo runs a frame eagerly where tracing it fails, so matching eager alone would not show
    # that the compiled step took its own plan: eager's would have been cached on the optimizer.
    assert getattr(compiled_opt, "_ortho_plan", None) is None and eager_opt._ortho_plan is not None
