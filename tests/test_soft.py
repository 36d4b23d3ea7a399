"""The soft step's buckets (orthoopt.soft): workspaces, the uncached plan, the parameters a
plan skips and tracks, and the names of unnamed parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthoopt
from orthoopt import soft


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
        (bucket,) = opt._soft_plan()
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
    assert any(b.stack is not None for b in opt._soft_plan())  # a bucket of several parameters
    real = soft.build_plan
    monkeypatch.setattr(soft, "build_plan", lambda groups, workspaces: real(groups, workspaces=False))
    bare = _mixed_model_params()
    opt = _run(bare)
    assert all(b.updates is None and b.views is None for b in opt._soft_plan())
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
