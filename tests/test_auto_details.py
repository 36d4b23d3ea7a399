"""Details of ortho='auto' (orthoopt.auto) that its tests left open (found by mutation testing)."""

from __future__ import annotations

import torch

from orthoopt import auto


def test_running_estimate_decays_geometrically():
    """max(λ, 0.99·previous): an estimate above every new λ decays by AUTO_DECAY per step."""
    state: dict = {}
    auto.remember(state, torch.tensor([1.0, 4.0], dtype=torch.float64))
    for step in range(1, 4):
        est = auto.remember(state, torch.tensor([0.0, 0.5], dtype=torch.float64))
        torch.testing.assert_close(est, torch.tensor([auto.AUTO_DECAY**step, 4 * auto.AUTO_DECAY**step]).double())


def test_update_products_of_half_matrices_take_an_lr_of_any_dtype():
    """Φᵀu in float32 for bfloat16 matrices, whatever the dtype of the per-matrix lr."""
    g = torch.Generator().manual_seed(2)
    before = torch.randn(2, 6, 3, generator=g).to(torch.bfloat16)
    after = (before.float() + 1e-2 * torch.randn(2, 6, 3, generator=g)).to(torch.bfloat16)
    for lr in (torch.full((2,), 1e-2, dtype=torch.float64), torch.full((2,), 1e-2, dtype=torch.bfloat16)):
        products = auto.update_products(before, after, lr)
        assert products.dtype == torch.float32
        expected = before.float().mT @ ((after.float() - before.float()) / lr.float()[:, None, None])
        torch.testing.assert_close(products, expected, rtol=1e-6, atol=1e-6)


def test_update_products_of_half_matrices_widen_whatever_workspace_is_given():
    """The optimizer passes its update buffer (of the parameters' dtype, possibly ``after``
    itself) as ``out``: for half matrices u must still be formed in float32, not in it."""
    g = torch.Generator().manual_seed(3)
    before = torch.randn(2, 6, 3, generator=g).to(torch.bfloat16)
    after = (before.float() + 1e-2 * torch.randn(2, 6, 3, generator=g)).to(torch.bfloat16)
    lr = torch.full((2,), 1e-2)
    expected = before.float().mT @ ((after.float() - before.float()) / lr[:, None, None])
    spare = after.clone()
    for moved, out in ((after, torch.empty_like(before)), (spare, spare)):
        products = auto.update_products(before, moved, lr, out=out)
        assert products.dtype == torch.float32
        torch.testing.assert_close(products, expected, rtol=1e-6, atol=1e-6)
