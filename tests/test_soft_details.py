"""Details of the soft step's buckets (orthoopt.soft) that the fast-path tests left open (found by
mutation testing)."""

from __future__ import annotations

import torch
from torch import nn

import orthoopt


def test_workspace_bytes_count_the_buffers_a_bucket_holds():
    """r and S (m, n, n), and the stacked matrices with their delta (m, l, n) for a bucket of
    several parameters, or one parameter-sized update for a bucket of one (the benchmark's
    'workspace_x_params')."""
    a = nn.Parameter(torch.randn(3, 12, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(12, 4, dtype=torch.float64))
    groups = [{"params": [a], "ortho_layout": "group_axis:0"}, {"params": [b], "ortho_layout": "columns"}]
    for params, m, stacked in ((groups, 4, True), ([b], 1, False)):
        opt = orthoopt.OrthoSGD(params, lr=0.1, ortho=1.0)
        for p in (a, b):
            p.grad = torch.zeros_like(p)
        opt.step()
        (bucket,) = opt._soft_plan()
        grams, mats = 2 * m * 4 * 4, m * 12 * 4
        expected = 8 * (grams + (2 * mats if stacked else mats))
        assert bucket.workspace_bytes() == expected
