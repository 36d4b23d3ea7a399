"""The (l, m, n) group tensor: m matrices Φ_i = phi[:, i, :] of l × n in one parameter, each kept
orthonormal, by the functional L1 loss or by the optimizer's decoupled step.

The task: the Φ_i nearest to given matrices T_i, min ½ Σ_i ‖Φ_i - T_i‖², whose constrained
solution is known in closed form (the polar factor U Vᵀ of each T_i = U Σ Vᵀ).  β = 1 is above
this problem's exactness threshold (0.23), so the penalized problem has the same solution.
Through autograd the loss's subgradient step diverges at the optimizer's lr of 0.2 (to NaN; it
holds at 0.1); the optimizer's decoupled step caps its own size.

    python examples/group_tensor.py [--steps 500]

It prints, for each way, max |ΦᵀΦ - I| and the distance to the solution (OrthoSGD: both below
1e-5; the loss through autograd at its smaller lr: 2e-5 and 1e-2).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import orthoopt

L, M, N = 32, 8, 16  # 8 groups of 32 × 16 matrices


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A start, the targets T (l, m, n) and the constrained solution, the polar factor of each T_i."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(L, M, N, generator=g) / L**0.5
    target = torch.randn(L, M, N, generator=g) / L**0.5
    u, _, vh = torch.linalg.svd(target.movedim(1, 0), full_matrices=False)  # the m matrices, (m, l, n)
    return start, target, (u @ vh).movedim(0, 1)


def with_the_loss(steps: int, beta: float = 1.0) -> nn.Parameter:
    """A plain optimizer on the task loss plus orthoopt.l1_orthogonality, through autograd."""
    start, target, _ = problem()
    phi = nn.Parameter(start.clone())
    optimizer = torch.optim.SGD([phi], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = 0.5 * ((phi - target) ** 2).sum() + orthoopt.l1_orthogonality(phi, beta, group_dim=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return phi


def with_the_optimizer(steps: int, beta: float = 1.0) -> nn.Parameter:
    """OrthoSGD: the task loss alone, the same penalty as a decoupled step on the group layout."""
    start, target, _ = problem()
    phi = nn.Parameter(start.clone())
    optimizer = orthoopt.OrthoSGD([phi], lr=0.2, ortho=beta, ortho_layout="group_axis:1")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = 0.5 * ((phi - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return phi


def main(steps: int = 500) -> dict[str, tuple[float, float]]:
    *_, solution = problem()
    out = {}
    for name, train in (("l1_orthogonality + SGD", with_the_loss), ("OrthoSGD", with_the_optimizer)):
        phi = train(steps).detach()
        error = orthoopt.orthogonality_error(phi, group_dim=1).max().item()  # max_jk |Φ_iᵀΦ_i - I|_jk
        distance = (phi - solution).abs().max().item()
        print(f"{name}: max |ΦᵀΦ - I| = {error:.1e}, max |Φ - polar(T)| = {distance:.1e}")
        out[name] = (error, distance)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    main(parser.parse_args().steps)
