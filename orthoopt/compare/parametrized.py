r"""Orthogonal parametrizations compared with the optimizer: Björck's iteration and torch's own.

``bjorck``: :math:`W = \operatorname{Björck}(V)`, the order-1 iteration of Björck and Bowie
(1971) that Anil, Lucas and Grosse (2019) run inside every forward pass of their 1-Lipschitz
networks ("LNets": β = 0.5, 20 iterations, gradients through all of them),

.. math::
    W_{k+1} = (1 + \beta) W_k - \beta\, W_k W_k^\top W_k,

on the tall orientation of ``V`` (``Vᵀ`` for a wide one), started from ``V / ‖V‖_F``.  The
iteration converges to the polar factor :math:`U V^\top` of the SVD whenever every singular
value of the start lies in :math:`(0, \sqrt{3})`; ``‖V‖_F ≥ σ_max`` puts them in (0, 1] for any
``V`` (LNets divides by :math:`\sqrt{mn}`, a bound for its small-gain initialization), and the
polar factor does not depend on the scale.

``torch-orthogonal``: :func:`torch.nn.utils.parametrizations.orthogonal` with its defaults (the
matrix exponential of a skew matrix for square weights, Householder reflectors otherwise; the
dynamic trivialization, whose base is the initial weight).

Each ``register_*`` gives ``module.attr`` its parametrization so that the weight the module
computes with is ``start`` (to the rounding of one Björck pass for ``bjorck``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["BJORCK_ITERS", "bjorck", "Bjorck", "register_bjorck", "register_based_at", "register_torch_orthogonal"]

BJORCK_ITERS = 20  # LNets' bjorck_iter while training


def bjorck(v: torch.Tensor, iters: int = BJORCK_ITERS, beta: float = 0.5) -> torch.Tensor:
    """``iters`` order-1 Björck steps from ``v / ‖v‖_F`` (differentiable): near the polar factor of ``v``."""
    wide = v.shape[-2] < v.shape[-1]
    w = v.mT if wide else v
    w = w / torch.linalg.matrix_norm(w, keepdim=True)
    for _ in range(iters):
        w = (1 + beta) * w - beta * w @ (w.mT @ w)
    return w.mT if wide else w


class Bjorck(nn.Module):
    """The parametrization ``W = bjorck(V)``."""

    def __init__(self, iters: int = BJORCK_ITERS):
        super().__init__()
        self.iters = iters

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return bjorck(v, self.iters)


def register_bjorck(module: nn.Module, attr: str, start: torch.Tensor) -> None:
    """``module.attr = bjorck(V)`` with ``V = start`` (an orthogonal start is its own polar factor)."""
    parametrize.register_parametrization(module, attr, Bjorck())
    with torch.no_grad():  # V = start, whatever the module held
        getattr(module.parametrizations, attr).original.copy_(start)


def register_based_at(
    orthogonal: Callable[[nn.Module, str], object], module: nn.Module, attr: str, start: torch.Tensor
) -> None:
    """``orthogonal(module, attr)`` (torch's or geotorch's), its trivialization based at ``start``.

    A non-square weight is completed to a square base with random columns, which the run's
    path depends on: they come from a generator of their own, the same in every run, so that
    the global random state stays as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        orthogonal(module, attr)
        setattr(module, attr, start)  # right_inverse: base = start (orthogonal) and A = 0, so W = start


def register_torch_orthogonal(module: nn.Module, attr: str, start: torch.Tensor) -> None:
    """torch's ``orthogonal`` on ``module.attr``, its trivialization based at ``start``."""
    register_based_at(torch.nn.utils.parametrizations.orthogonal, module, attr, start)
