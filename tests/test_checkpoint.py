"""Checkpoints: bitwise resume through torch.save / torch.load(weights_only=True), old states."""

from __future__ import annotations

import copy

import torch
from torch import nn

import orthoopt


def test_state_dict_round_trip_is_bitwise(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
        opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=1.0, exclude=["2"]), lr=1e-2)
        return model, opt

    x, y = torch.randn(64, 6), torch.randn(64, 1)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = fresh()
    steps(model, opt, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    steps(model, opt, 10)
    model2, opt2 = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    steps(model2, opt2, 10)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_old_checkpoint_without_ortho_keys_gets_defaults():
    w = nn.Parameter(torch.randn(8, 3))
    plain = torch.optim.AdamW([w], lr=1e-2)
    w.grad = torch.randn_like(w)
    plain.step()
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=3.0)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["ortho"] == 3.0 and opt.param_groups[0]["ortho_layout"] == "auto"
    # The next step continues the plain optimizer's moments and adds the default penalty step
    # (decoupled, from the value before the step): the same as the two taken apart.
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    continued = nn.Parameter(before.clone())
    reference = torch.optim.AdamW([continued], lr=1e-2)
    reference.load_state_dict(copy.deepcopy(plain.state_dict()))  # torch's load shares the tensors
    continued.grad = w.grad.clone()
    reference.step()
    penalized = nn.Parameter(before.clone())
    penalized.grad = torch.zeros_like(penalized)
    orthoopt.OrthoSGD([penalized], lr=1e-2, ortho=3.0).step()  # SGD with a zero gradient: the penalty step alone
    opt.step()
    assert opt.state[w]["step"].item() == 2
    torch.testing.assert_close(w.detach(), continued.detach() + (penalized.detach() - before), rtol=0, atol=1e-7)
    assert (penalized.detach() - before).abs().max() > 1e-3  # the penalty step is there


def test_float32_state_of_bfloat16_parameters_stays_float32():
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))
    opt = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].float() * 1.001
    saved = opt.state_dict()
    plain = torch.optim.SGD([nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))], lr=0.1, momentum=0.9)
    plain.load_state_dict(saved)
    (q,) = plain.param_groups[0]["params"]
    assert plain.state[q]["momentum_buffer"].dtype == torch.bfloat16  # what torch alone does
    fresh = orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))], lr=0.1, momentum=0.9, ortho=1.0)
    fresh.load_state_dict(saved)
    (p,) = fresh.param_groups[0]["params"]
    assert fresh.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


def test_auto_state_round_trip_is_bitwise(tmp_path):
    """ortho='auto' keeps its running threshold estimate in the state ('ortho_multiplier'): a
    resumed run continues from it, bitwise, instead of estimating β afresh."""

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
        opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho="auto", exclude=["2"]), lr=1e-2)
        return model, opt

    x, y = torch.randn(64, 6), torch.randn(64, 1)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = fresh()
    steps(model, opt, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = opt.state[model[0].weight]["ortho_multiplier"].clone()
    steps(model, opt, 10)
    model2, opt2 = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert torch.equal(opt2.state[model2[0].weight]["ortho_multiplier"], saved)
    steps(model2, opt2, 10)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # The estimate steers the step: a run resumed without it ends elsewhere.
    model3, opt3 = fresh()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    del opt3.state[model3[0].weight]["ortho_multiplier"]
    steps(model3, opt3, 10)
    assert (model3[0].weight - model[0].weight).abs().max() > 1e-5
