"""torch.amp.GradScaler with fused base optimizers.

``fused=True`` sets ``_step_supports_amp_scaling``: the scaler then calls ``step()`` even on a
step it skips, and leaves the unscaling and the skip to the fused kernel (``grad_scale``,
``found_inf``).  orthoopt reads them as torch's fused kernels do: no soft and no hard step
where ``found_inf`` is set (masked on the device, no sync), and hard mode on unscaled
gradients.  Every fused input of torch's ``optim_db`` on CPU (Adam, AdamW, SGD, Adagrad), soft,
'auto' and hard, with planted overflows, against the unfused run (where the scaler unscales and
skips itself).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import optim_db

from orthoopt import orthogonalize, testing

STEPS = 8
OVERFLOWS = (0, 3, 4)  # the first step (the guard's first step), and two in a row
# torch's fused SGD with momentum leaves its momentum buffer uninitialised when its first step is
# skipped (with ortho=0, a plain SGD, the next step's weights are 1e34 off the unfused run's): no
# overflow at the first step there.
LATE_OVERFLOWS = (3, 4)
HARD_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _cases():
    for info in optim_db:
        if "cpu" not in info.supports_fused_on:
            continue
        for inp in info.optim_inputs_func(device="cpu"):
            for ortho in ("soft", "auto", "hard"):
                if ortho == "hard" and info.optim_cls not in HARD_BASES:
                    continue
                yield pytest.param(info.optim_cls, inp.kwargs, ortho, id=f"{info.name}-{inp.desc}-{ortho}")


def _params() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    mats = [torch.linalg.qr(torch.randn(s, generator=gen, dtype=torch.float64))[0].float() for s in ((8, 4), (5, 3))]
    return [nn.Parameter(t.contiguous()) for t in (*mats, torch.randn(4, generator=gen))]


def _overflows(cls, kwargs) -> tuple[int, ...]:
    return LATE_OVERFLOWS if cls is torch.optim.SGD and kwargs.get("momentum", 0) else OVERFLOWS


def _run(cls, kwargs, ortho, fused: bool) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The parameters after each step, and 'auto''s estimates at the end."""
    params = _params()
    options = {"ortho": 0.5} if ortho == "soft" else {"ortho": "auto"} if ortho == "auto" else {"ortho": 0.5}
    if ortho == "hard":
        options["ortho_mode"] = "hard"
    opt = orthogonalize(cls)(params, **kwargs, **options, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    history = []
    for t in range(STEPS):
        opt.zero_grad()
        loss = sum(0.5 * (p - y).square().sum() + 0.1 * p.sin().sum() for p, y in zip(params, targets))
        if t in _overflows(cls, kwargs):
            # every gradient Inf or NaN, or at step 3 only the unconstrained vector's: the
            # scaler skips the step all the same
            loss = loss + float("inf") * params[2].sum() if t == 3 else loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append([p.detach().clone() for p in params])
    return history, [opt.state[p]["ortho_multiplier"] for p in params[:2]] if ortho == "auto" else []


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("cls, kwargs, ortho", list(_cases()))
def test_fused_run_under_a_grad_scaler_is_the_unfused_run(cls, kwargs, ortho, path):
    """On CPU ``found_inf`` is read (free); on the accelerator path it masks the step on the
    device."""
    context = testing.accelerator_path() if path == "accelerator" else contextlib.nullcontext()
    with warnings.catch_warnings(), context:
        warnings.simplefilter("ignore")  # hard mode's first projection, the guard's start
        fused, fused_estimates = _run(cls, kwargs, ortho, fused=True)
        unfused, unfused_estimates = _run(cls, kwargs, ortho, fused=False)
    for x, y in zip(fused_estimates, unfused_estimates):  # a skipped step leaves them as they were
        torch.testing.assert_close(x, y, rtol=1e-4, atol=0)
    start = [p.detach() for p in _params()]
    for t, (a, b) in enumerate(zip(fused, unfused)):
        before = start if t == 0 else fused[t - 1]
        for k, (x, y) in enumerate(zip(a, b)):
            # torch's fused kernels round as its own tests allow; a skipped step moves nothing
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {t}, parameter {k}")
            if t in _overflows(cls, kwargs):
                assert torch.equal(x, before[k]), f"step {t} was skipped, but parameter {k} moved"
    moved = [(x - y).abs().max() for x, y in zip(fused[-1], start)]
    assert min(moved) > 1e-3  # and the steps that were taken moved every parameter


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_the_soft_step_under_a_fused_grad_scaler_reads_nothing_on_an_accelerator(path):
    """On the accelerator path, ``found_inf`` masks the soft step on the device: the step
    reads nothing on the host, skipped or not; on CPU it is read (free) and a skipped step
    costs no penalty work at all."""
    params = _params()
    opt = orthogonalize(torch.optim.AdamW)(params, lr=1e-3, ortho=0.5, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    context = testing.accelerator_path() if path == "accelerator" else contextlib.nullcontext()
    counts = []
    with context:
        for t in range(4):
            opt.zero_grad()
            loss = sum(p.square().sum() for p in params) * (float("inf") if t == 3 else 1.0)
            scaler.scale(loss).backward()
            counter = testing.count_ops(lambda: scaler.step(opt))
            scaler.update()
            counts.append(counter)
    reads = [c.host_reads for c in counts[1:]]
    assert reads == ([0, 0, 0] if path == "accelerator" else [1, 1, 1])
    if path == "cpu":
        assert "baddbmm" not in counts[3].ops  # found_inf read: no penalty work on the skipped step
