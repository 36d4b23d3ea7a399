"""Details of orthoopt.penalty that the math tests left open (found by mutation testing):
defaults, the messages of refused inputs, and the exact estimate of the spectral cap."""

from __future__ import annotations

import pytest
import torch

import orthoopt
from orthoopt import penalty


def _frobenius_by_hand(phi: torch.Tensor, beta: float) -> torch.Tensor:
    mats = phi.movedim(1, 0)
    r = mats.mT @ mats - torch.eye(mats.shape[-1], dtype=phi.dtype)
    return beta * (r * r).sum()


def test_frobenius_default_beta_is_one():
    phi = torch.randn(6, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(orthoopt.frobenius_orthogonality(phi), _frobenius_by_hand(phi, 1.0))
    torch.testing.assert_close(
        orthoopt.frobenius_orthogonality_grad(phi), orthoopt.frobenius_orthogonality_grad(phi, 1.0), rtol=0, atol=0
    )
    leaf = phi.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_frobenius_by_hand(leaf, 1.0), leaf)
    torch.testing.assert_close(orthoopt.frobenius_orthogonality_grad(phi), grad)


@pytest.mark.parametrize("bad, name", [([[1.0]], "list"), (None, "NoneType"), (3.0, "float")])
def test_a_non_tensor_is_named_by_its_type(bad, name):
    with pytest.raises(TypeError, match=rf"phi must be a torch.Tensor, got {name}$"):
        orthoopt.l1_orthogonality(bad)


def test_spectral_norm_is_four_power_iterations_padded_by_a_tenth():
    """The documented estimate: 4 power iterations from the fixed start cos(2.399963·k),
    the norm of S·v padded by 10%, and never above the max-row-sum bound.  Symmetric
    matrices whose two largest eigenvalues are close, so that the iteration count shows."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g, dtype=torch.float64)).Q
    eig = torch.tensor([3.0, -2.9, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)
    s = q @ torch.diag_embed(eig.expand(3, 6)) @ q.mT

    def estimate(iters):
        v = torch.cos(torch.arange(6, dtype=torch.float64) * 2.399963).expand(3, 6).unsqueeze(-1)
        for _ in range(iters):
            w = s @ v
            v = w / w.norm(dim=-2, keepdim=True)
        return (s @ v).norm(dim=(-2, -1)) * 1.1

    rowsum = s.abs().sum(-1).amax(-1)
    expected = torch.minimum(estimate(4), rowsum)
    assert torch.all(estimate(4) < rowsum)  # the estimate, not the bound, is what is compared
    assert (estimate(5) - estimate(4)).abs().min() > 1e-4  # another count would show (by 1e9 x the tolerance)
    torch.testing.assert_close(penalty.spectral_norm(s), expected, rtol=1e-13, atol=0)
    # and the row-sum bound where the padded estimate exceeds it
    ones = torch.ones(2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(penalty.spectral_norm(ones), torch.full((2,), 5.0, dtype=torch.float64))
