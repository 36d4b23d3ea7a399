"""Mixed precision: bfloat16/float16 parameters, autocast, GradScaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_land_with_the_penalty(dtype):
    torch.manual_seed(0)
    phi = nn.Parameter((torch.randn(32, 4, 8) / 32**0.5).to(dtype))
    # SGD: torch's Adam itself turns float16 NaN on zero gradients (eps=1e-8 underflows)
    opt = orthoopt.OrthoSGD([phi], lr=1e-2, ortho=1.0, ortho_smoothing=1e-2, ortho_layout="group_axis:1")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        phi.grad = torch.zeros_like(phi)
        opt.step()
        sched.step()
    assert phi.dtype == dtype
    err = orthoopt.orthogonality_error(phi)
    assert err.dtype == torch.float32  # accumulated in float32
    # a bf16 matrix cannot be more orthonormal than its rounding: eps·sqrt(l)-ish
    assert err.max() < 40 * torch.finfo(dtype).eps


def test_bfloat16_step_is_the_float32_step_rounded():
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(16, 6) / 4).to(torch.bfloat16))
    w32 = nn.Parameter(w.detach().float())
    opt, ref = orthoopt.OrthoSGD([w], lr=1e-2, ortho=1.0), orthoopt.OrthoSGD([w32], lr=1e-2, ortho=1.0)
    w.grad, w32.grad = torch.zeros_like(w), torch.zeros_like(w32)
    start = w32.detach().clone()
    opt.step()
    ref.step()
    ulp = torch.finfo(torch.bfloat16).eps * w32.detach().abs().clamp_min(1e-2)
    assert ((w.float() - w32.detach()).abs() <= 2 * ulp).all()
    assert (w32.detach() - start).abs().max() > 4 * ulp.max()  # the step is well above rounding


def test_autocast_and_grad_scaler_train_a_bf16_autocast_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=3.0, exclude=["2"]), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    start = orthoopt.named_orthogonality_errors(model, exclude=["2"])["0.weight"]
    for _ in range(50):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert start > 0.5 and opt.orthogonality_errors()["0.weight"] < start / 4


def test_penalty_never_sees_scaled_gradients():
    # The penalty step reads parameters only: the same step with a huge loss scale.
    def run(scale):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 3))
        opt = orthoopt.OrthoSGD([w], lr=1e-2, ortho=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale((w * torch.arange(24.0).reshape(8, 3)).sum() * 1e-3).backward()
        scaler.step(opt)
        return w.detach()

    torch.testing.assert_close(run(2.0), run(2.0**14), rtol=1e-6, atol=1e-7)
