"""ortho_every=k: the soft step on every k-th call of step(), k times as large: its reference,
checkpoints, 'auto', and its refusals."""

import pytest
import torch
from conftest import near_orthonormal

import orthoopt
from orthoopt import OrthoAdamW, guard


def _every_k_run(every, steps, *, ortho=1.0, save_at=None, tmp_path=None):
    params = [torch.nn.Parameter(near_orthonormal(24, 6, seed=i)) for i in range(3)]

    def make(ps):
        opt = OrthoAdamW(ps, lr=1e-2, ortho=ortho, ortho_every=every, ortho_layout="columns", weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    opt, sched = make(params)
    g = torch.Generator().manual_seed(8)
    for k in range(steps):
        if k == save_at:  # a checkpoint mid-cycle, resumed in a fresh optimizer
            path = tmp_path / "ckpt.pt"
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": params}, path)
            saved = torch.load(path, weights_only=True)
            params = [torch.nn.Parameter(p.detach().clone()) for p in saved["params"]]
            opt, sched = make(params)
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
        for p in params:
            p.grad = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
        sched.step()
    return params, opt


def test_every_k_steps_is_k_times_the_step_on_every_kth_call():
    every, steps = 3, 7
    got, opt = _every_k_run(every, steps)
    # The reference: ortho = k·β on the calls 0, k, 2k, ... and 0 (the base step alone) between.
    params = [torch.nn.Parameter(near_orthonormal(24, 6, seed=i)) for i in range(3)]
    ref = OrthoAdamW(params, lr=1e-2, ortho=0.0, ortho_layout="columns", weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(8)
    for k in range(steps):
        ref.param_groups[0]["ortho"] = float(every) if k % every == 0 else 0.0
        for p in params:
            p.grad = 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        ref.step()
        sched.step()
    for p, q in zip(got, params):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["ortho_steps"] == steps


@pytest.mark.parametrize("ortho", [1.0, "auto"])
def test_every_k_steps_resumes_bitwise_from_a_checkpoint(tmp_path, ortho):
    straight, _ = _every_k_run(4, 9, ortho=ortho)
    resumed, opt = _every_k_run(4, 9, ortho=ortho, save_at=5, tmp_path=tmp_path)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["ortho_steps"] == 9


def test_every_k_auto_updates_its_estimate_on_its_steps_only():
    params = [torch.nn.Parameter(near_orthonormal(24, 6, seed=1))]
    opt = OrthoAdamW(params, lr=1e-2, ortho="auto", ortho_every=2, ortho_layout="columns")
    g = torch.Generator().manual_seed(9)
    seen = []
    for _ in range(4):
        params[0].grad = 0.1 * torch.randn(params[0].shape, generator=g, dtype=params[0].dtype)
        opt.step()
        seen.append(opt.state[params[0]]["ortho_multiplier"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[1], seen[2])


def test_every_k_option_is_checked():
    p = torch.nn.Parameter(near_orthonormal(12, 4, seed=0))
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="ortho_every must be a whole number >= 1"):
            OrthoAdamW([p], ortho=1.0, ortho_every=bad)
    with pytest.raises(ValueError, match="ortho_every=2 applies to the soft step"):
        OrthoAdamW([p], ortho=1.0, ortho_every=2, ortho_mode="hard")
    opt = OrthoAdamW([p], ortho=1.0)
    with pytest.raises(ValueError, match="ortho_every"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 2))], "ortho_every": 0})


def test_every_k_is_refused_on_sharded_parameters_before_any_change(monkeypatch):
    from orthoopt import distributed

    p = torch.nn.Parameter(near_orthonormal(12, 4, seed=0))
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt = OrthoAdamW([p], lr=1e-2, ortho=1.0, ortho_every=2, ortho_layout="columns")
    monkeypatch.setattr(distributed, "is_dtensor", lambda t: t is p)  # as if FSDP2 had sharded it
    with pytest.raises(NotImplementedError, match="parameter 'group0.param0' is sharded .* ortho_every=2"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_drift_warning_under_every_k_advises_every_step():
    # At a constant high lr a k-fold step meets the step caps and holds less than k steps
    # (README, ortho_every): the drift warning says so, and does not advise the 'auto' in use.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Linear(32, 2))
    x, y = torch.randn(256, 16), torch.randint(0, 2, (256,))
    opt = orthoopt.constrain_(
        torch.optim.AdamW(net.parameters(), lr=1e-2), net, ortho="auto", exclude=["3"], ortho_every=2
    )
    with pytest.warns(guard.OrthogonalityWarning) as record:
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    drift = [str(w.message) for w in record if "moving away" in str(w.message)]
    assert drift and all("use ortho_every=1" in m and "ortho='auto'" not in m for m in drift)
