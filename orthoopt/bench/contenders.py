r"""The contenders of the whole-iteration benchmark: one way each to train a model of
:mod:`orthoopt.bench.models` under the constraint.

====================  =====================================================================
``plain``             the model's optimizer, unswapped
``soft``              orthoopt's soft step, ``Ortho<Optimizer>`` with ``ortho=β``
``soft-auto``         the same with ``ortho='auto'``
``soft-every``        ``ortho=β`` with ``ortho_every=k`` (the penalty step every k steps,
``auto-every``        k times as large), and the same with ``ortho='auto'``
``hard``              ``ortho_mode='hard'`` (geoopt's Stiefel manifold)
``torch-orthogonal``  ``torch.nn.utils.parametrizations.orthogonal`` with the plain optimizer
``geotorch``          geotorch's ``orthogonal`` (0.4) with the plain optimizer
``frobenius``         the plain optimizer on ``loss + β Σ‖ΦᵀΦ - I‖²_F`` through autograd, as
                      one writes it by hand
====================  =====================================================================

A weight of more than two dimensions (a conv filter bank) is flattened to the matrix
orthoopt constrains before torch's or geotorch's parametrization (both would otherwise make
each kernel's last two axes orthogonal, another constraint).  :func:`held_bytes` is what a
method keeps between iterations: optimizer state, orthoopt's workspaces and the
parametrizations' buffers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layout import Layout
from ..optim import orthogonalize
from ..options import ORTHO_DEFAULTS
from ..selection import param_groups
from .memory import workspace_bytes
from .models import ModelSpec, NotAvailable, Weight

__all__ = ["CONTENDERS", "RISKY", "Contender", "make_contender", "held_bytes", "peak_bytes"]

CONTENDERS = (
    "plain",
    "soft",
    "soft-auto",
    "soft-every",
    "auto-every",
    "hard",
    "torch-orthogonal",
    "geotorch",
    "frobenius",
)
# Parametrizations whose first iteration may take minutes: probed in a child process first.
RISKY = ("torch-orthogonal", "geotorch")


# -- contenders ------------------------------------------------------------------------
@dataclass
class Contender:
    """One way to train the model: its copy of the model, optimizer and extra loss term."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    weights: list[Weight]
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def iteration(self, batch: tuple) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.model, batch).backward()
        self.optimizer.step()


def _ortho_optimizer(spec: ModelSpec, model: nn.Module, **options) -> torch.optim.Optimizer:
    cls = orthogonalize(spec.optimizer)
    return cls(param_groups(model, exclude=spec.exclude, **options), lr=spec.lr)


def _frobenius_loss(spec: ModelSpec, weights: list[Weight]):
    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        total = spec.loss(model, batch)
        for w in weights:
            mats = w.layout.matrices(w.value(model))
            r = mats.mT @ mats - torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
            total = total + spec.beta * (r * r).sum()
        return total

    return loss


class _InLayout(nn.Module):
    """A parametrization of a weight through the stack ``(m, l, n)`` of its layout: the
    constraint orthoopt puts on it (whole matrix, filters, gate blocks, ...)."""

    def __init__(self, inner: nn.Module, layout: Layout, shape: torch.Size):
        super().__init__()
        self.inner = inner
        self.layout = layout
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.from_matrices(self.inner(x), self.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self.inner.right_inverse(self.layout.matrices(w))


def _whole_matrix(w: torch.Tensor, layout: Layout) -> bool:
    """Whether ``layout`` constrains ``w`` as it is: one matrix, its rows or its columns."""
    return w.dim() == 2 and layout.kind in ("rows", "columns")


def _torch_orthogonal(owner: nn.Module, attr: str, layout: Layout) -> None:
    from torch.nn.utils.parametrizations import orthogonal

    w = getattr(owner, attr)
    if _whole_matrix(w, layout):
        orthogonal(owner, attr)
        return
    holder = nn.Module()
    holder.weight = nn.Parameter(layout.matrices(w.detach()).clone())
    orthogonal(holder, "weight")
    inner = holder.parametrizations.weight[0]
    parametrize.register_parametrization(owner, attr, _InLayout(inner, layout, w.shape), unsafe=True)


def _geotorch_orthogonal(owner: nn.Module, attr: str, layout: Layout) -> None:
    import geotorch

    w = getattr(owner, attr)
    if _whole_matrix(w, layout):
        geotorch.orthogonal(owner, attr)
        return
    inner = geotorch.Stiefel(size=layout.stack_shape(w.shape)).to(w)
    with torch.no_grad():
        w.copy_(layout.from_matrices(inner.sample(), w.shape))  # as geotorch.orthogonal starts: on the manifold
    parametrize.register_parametrization(owner, attr, _InLayout(inner, layout, w.shape), unsafe=True)


def _parametrized(spec, model, weights, register) -> torch.optim.Optimizer:
    for w in weights:
        register(w.owner(model), w.attr, w.layout)
    return spec.optimizer(model.parameters(), lr=spec.lr)


def make_contender(name: str, spec: ModelSpec, model: nn.Module, weights: list[Weight], every: int) -> Contender:
    """``name`` on a copy of ``model`` (which stays untouched)."""
    model = copy.deepcopy(model)
    loss = spec.loss
    if name == "plain":
        opt = spec.optimizer(model.parameters(), lr=spec.lr)
    elif name in ("soft", "soft-auto", "soft-every", "auto-every"):
        ortho = "auto" if "auto" in name else spec.beta
        options = {"ortho_every": every} if name.endswith("every") else {}
        if options and "ortho_every" not in ORTHO_DEFAULTS:
            raise NotAvailable("this orthoopt has no ortho_every option")
        opt = _ortho_optimizer(spec, model, ortho=ortho, **options)
    elif name == "hard":
        try:
            opt = _ortho_optimizer(spec, model, ortho=spec.beta, ortho_mode="hard")
        except TypeError as e:
            raise NotAvailable(str(e)) from None
    elif name == "torch-orthogonal":
        opt = _parametrized(spec, model, weights, _torch_orthogonal)
    elif name == "geotorch":
        try:
            import geotorch  # noqa: F401
        except ImportError as e:
            raise NotAvailable(f"geotorch is not installed ({e})") from None
        opt = _parametrized(spec, model, weights, _geotorch_orthogonal)
    elif name == "frobenius":
        opt = spec.optimizer(model.parameters(), lr=spec.lr)
        loss = _frobenius_loss(spec, weights)
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    model.train()
    return Contender(name, model, opt, loss, weights)


# -- memory ----------------------------------------------------------------------------
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def held_bytes(c: Contender) -> int:
    """Bytes the method holds between iterations: optimizer state, orthoopt's workspaces,
    and the parametrizations' buffers (e.g. torch's completed orthogonal ``base``)."""
    state = [v for s in c.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    buffers = [
        b
        for m in c.model.modules()
        if parametrize.is_parametrized(m)
        for b in m.parametrizations.buffers()
        if b is not None
    ]
    return _tensor_bytes(state) + workspace_bytes(c.optimizer) + _tensor_bytes(buffers)


def peak_bytes(c: Contender, batch, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    c.iteration(batch)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
