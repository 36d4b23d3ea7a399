"""ortho='auto': the threshold estimate's math (orthoopt.auto)."""

from __future__ import annotations

import torch

from orthoopt import auto


def test_threshold_is_half_the_largest_entry_of_sym_phi_t_u():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(3, 9, 4, dtype=torch.float64, generator=g)
    u = torch.randn(3, 9, 4, dtype=torch.float64, generator=g)
    lr = torch.tensor([1e-3, 1e-2, 0.0], dtype=torch.float64)
    after = before + lr[:, None, None] * u
    products = auto.update_products(before, after, lr)
    torch.testing.assert_close(products[:2], (before.mT @ u)[:2], rtol=1e-9, atol=1e-9)
    lam = auto.threshold(products, lr > 0)
    sym = (before.mT @ u + u.mT @ before) / 2
    expected = sym.abs().amax((-2, -1)) / 2
    torch.testing.assert_close(lam[:2], expected[:2], rtol=1e-9, atol=0)
    assert lam[2] == 0  # a zero lr says nothing about the update


def test_row_blocks_sum_to_the_whole_products():
    """What the FSDP2 path relies on: Φᵀu is a sum over row blocks, all-reduced between ranks."""
    g = torch.Generator().manual_seed(1)
    before = torch.randn(2, 7, 3, dtype=torch.float64, generator=g)
    after = before + 0.01 * torch.randn(2, 7, 3, dtype=torch.float64, generator=g)
    lr = torch.full((2,), 0.01, dtype=torch.float64)
    whole = auto.update_products(before, after, lr)
    parts = [auto.update_products(b, a, lr) for b, a in zip(before.split([4, 3], 1), after.split([4, 3], 1))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)


def test_half_precision_products_are_float32():
    before = torch.randn(2, 6, 3).to(torch.bfloat16)
    products = auto.update_products(before, before, torch.full((2,), 1e-3))
    assert products.dtype == torch.float32 and products.abs().max() == 0


def test_running_estimate_decays_and_follows_a_larger_value():
    state: dict = {}
    first = auto.remember(state, torch.tensor([1.0, 2.0]))
    assert torch.equal(first, torch.tensor([1.0, 2.0]))
    second = auto.remember(state, torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(second, torch.tensor([auto.AUTO_DECAY, 3.0]))
    assert state["ortho_multiplier"] is second


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
