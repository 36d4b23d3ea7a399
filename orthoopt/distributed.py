r"""The soft orthogonality step for parameters sharded by FSDP2 (``fully_shard``).

``fully_shard`` turns each parameter into a :class:`~torch.distributed.tensor.DTensor` whose
rows (dim 0) are split over the ranks, ``Shard(0)``, in ``torch.chunk`` pieces (uneven, and
empty on the last ranks when there are fewer rows than ranks).  The penalty step needs the
Gram matrices of whole :math:`\Phi_i`; where dim 0 of the parameter lands in the stack
:math:`(m, l, n)` (:mod:`orthoopt.layout`) decides how much of :math:`\Phi_i` a rank holds:

===========  =====================================  =============================================
dim 0 is     layouts                                 what a rank does (communication per step)
===========  =====================================  =============================================
``m``        ``group_axis:0``                        whole groups: the step is local (none)
``l``        ``columns``, ``column_groups:H``,       row blocks :math:`\Phi_i^{(r)}`: the Gram is a
             ``group_axis:1``, ``group_axis:2``      sum over ranks, all-reduced (``m·n·n``, fp32
                                                     for fp32 and half parameters)
``n``        ``rows`` (``filters``)                  a slice of the vectors: all-gather the
                                                     parameter, keep the local slice (its size)
===========  =====================================  =============================================

On the ``l`` path, with :math:`W` ranks,

.. math::
    R_i = \sum_{r=1}^{W} \big(\Phi_i^{(r)\top}\Phi_i^{(r)} - I\big) + (W-1)\,I,
    \qquad \Delta\Phi_i^{(r)} = -\eta_i\, \Phi_i^{(r)} S_i,

where :math:`S_i = h'(R_i)` and :math:`\eta_i` come from the whole :math:`R_i` and so are the
same on every rank: each rank updates its own rows and nothing else is sent.  The penalty
math itself is :func:`orthoopt.penalty.residual`, :func:`~orthoopt.penalty.direction` and
:func:`~orthoopt.penalty.safe_step_size`, as for unsharded parameters.

The optimizer routes every DTensor parameter here (:class:`ShardedBucket`), in the same
order on every rank, so that the collectives match.  Replicated mesh dimensions (HSDP) are
not reduced over; any placement other than ``Shard(0)`` and ``Replicate`` takes the gather
path, which is correct for every placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import penalty
from .layout import Layout

__all__ = [
    "is_dtensor",
    "sharded_axis",
    "shard_dims",
    "path",
    "ShardedBucket",
    "communication_per_step",
    "max_error",
    "project_",
    "refuse_hard",
]

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(p: torch.Tensor) -> bool:
    """True for a :class:`~torch.distributed.tensor.DTensor` (e.g. a ``fully_shard`` parameter)."""
    return DTensor is not None and isinstance(p, DTensor)


def sharded_axis(layout: Layout) -> str:
    """Which axis of the stack ``(m, l, n)`` dim 0 of the parameter becomes: 'm', 'l' or 'n'."""
    if layout.kind == "rows":
        return "n"
    if layout.kind == "group_axis" and layout.arg == 0:
        return "m"
    return "l"


def refuse_hard(p: torch.Tensor, name: str) -> None:
    """Hard mode needs whole matrices (a QR or Cayley retraction, a second moment per matrix):
    refuse a sharded parameter before the step changes anything, naming it and the way out."""
    if is_dtensor(p):
        raise NotImplementedError(
            f"{name} is a DTensor (placements {tuple(p.placements)}, e.g. from FSDP2's fully_shard), "
            "and ortho_mode='hard' needs each whole matrix on one rank for its retraction; orthoopt "
            "does not gather them. Use ortho_mode='soft' for sharded parameters (it supports FSDP2), "
            "or train with DistributedDataParallel, under which hard mode works unchanged"
        )


def _local_matrices(layout: Layout, local: torch.Tensor) -> torch.Tensor:
    # An empty shard cannot be reshaped with -1; it holds no rows of Φ and adds 0 to the Gram.
    if local.numel() == 0:
        return local.new_zeros(layout.stack_shape(local.shape))
    return layout.matrices(local)


def _all_reduce_residuals(mesh: Any, dims: tuple[int, ...], residuals: list[torch.Tensor]) -> None:
    """``R_i ← Σ_ranks (Φ_i^{(r)ᵀ}Φ_i^{(r)} - I) + (W-1) I`` in place: one all-reduce per mesh dim."""
    flat = torch.cat([r.reshape(-1) for r in residuals])
    world = 1
    for d in dims:
        dist.all_reduce(flat, group=mesh.get_group(d))
        world *= mesh.size(d)
    for r, part in zip(residuals, flat.split([r.numel() for r in residuals])):
        r.copy_(part.view_as(r))
        # Every rank subtracted I once; the whole residual subtracts it once.
        r.diagonal(dim1=-2, dim2=-1).add_(world - 1)


def shard_dims(p: Any) -> tuple[int, ...] | None:
    """Mesh dims that split dim 0 of DTensor ``p``; None when a placement is not Shard(0)/Replicate."""
    dims = []
    for d, placement in enumerate(p.placements):
        if type(placement) is Shard and placement.dim == 0:  # not a _StridedShard subclass
            dims.append(d)
        elif not isinstance(placement, Replicate):
            return None
    return tuple(dims)


def path(p: Any, layout: Layout) -> str:
    """How the step of DTensor ``p`` is computed: 'local', 'all_reduce' or 'gather' (see the table)."""
    dims = shard_dims(p)
    if dims == ():
        return "local"
    if dims is None or sharded_axis(layout) == "n":
        return "gather"
    return "local" if sharded_axis(layout) == "m" else "all_reduce"


@dataclass
class _Entry:
    param: Any  # a DTensor
    layout: Layout
    group: dict  # read at every step: a scheduled lr or β applies at once

    @property
    def eta(self) -> Any:
        return 2 * self.group["lr"] * self.group["ortho"]

    @property
    def smoothing(self) -> float:
        return self.group["ortho_smoothing"]

    @property
    def kind(self) -> str:
        return self.group["ortho_penalty"]

    @property
    def path(self) -> str:
        return path(self.param, self.layout)


class ShardedBucket:
    """The soft step of every DTensor parameter of one optimizer step.

    :meth:`delta` runs before the base optimizer's step (the penalty is taken at the
    pre-step value) and returns the local deltas; :meth:`apply` adds them after it.
    The Gram matrices of all ``all_reduce`` parameters on the same mesh dims and dtype
    travel in one all-reduce.
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def add(self, p: torch.Tensor, layout: Layout, group: dict) -> None:
        self.entries.append(_Entry(p, layout, group))

    @torch.no_grad()
    def delta(self) -> list[torch.Tensor | None]:
        deltas: list[torch.Tensor | None] = [None] * len(self.entries)
        reduced: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for k, e in enumerate(self.entries):
            how = e.path
            if how == "gather":
                deltas[k] = self._gathered_delta(e)
                continue
            mats = _local_matrices(e.layout, e.param.to_local())
            r = penalty.residual(mats)
            if how == "local":
                deltas[k] = penalty.penalty_step(r, mats, e.smoothing, e.kind, e.eta)
            else:
                key = (id(e.param.device_mesh), shard_dims(e.param), r.dtype)
                reduced.setdefault(key, []).append((k, mats, r))
        for items in reduced.values():
            first = self.entries[items[0][0]]
            _all_reduce_residuals(first.param.device_mesh, shard_dims(first.param), [r for _, _, r in items])
            for k, mats, r in items:
                e = self.entries[k]
                deltas[k] = penalty.penalty_step(r, mats, e.smoothing, e.kind, e.eta)
        return deltas

    @staticmethod
    def _gathered_delta(e: _Entry) -> torch.Tensor:
        """The whole parameter's delta, computed on every rank from an all-gather; the local slice."""
        p = e.param
        full = p.full_tensor()
        mats = e.layout.matrices(full)
        stack = penalty.penalty_step(penalty.residual(mats), mats, e.smoothing, e.kind, e.eta)
        return _local_part(p, e.layout.from_matrices(stack, full.shape))

    @torch.no_grad()
    def apply(self, deltas: list[torch.Tensor | None]) -> None:
        for e, d in zip(self.entries, deltas):
            local = e.param.to_local()
            if local.numel() == 0:
                continue
            if e.path != "gather":
                d = e.layout.from_matrices(d, local.shape)
            local.add_(d)


def _local_part(p: Any, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (shaped like the global ``p``, the same on every rank)."""
    # Replicate -> any placement is a local slice, with no communication; the clone lets
    # ``whole`` go now.
    replicated = DTensor.from_local(whole, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements).to_local().clone()


@torch.no_grad()
def project_(p: Any, layout: Layout) -> None:
    """Snap a DTensor parameter to the polar factor of its whole matrices (a collective).

    Every rank gathers the parameter and takes the same SVD (the same input on the same
    library: the same bits), then keeps its own part.
    """
    full = p.full_tensor()
    p.to_local().copy_(_local_part(p, layout.from_matrices(penalty.polar(layout.matrices(full)), full.shape)))


@torch.no_grad()
def max_error(layout: Layout, p: Any) -> float:
    """``max |Φ_iᵀΦ_i - I|`` over all of a DTensor's matrices, the same on every rank.

    A collective, by the step's paths: every rank of the mesh must call it.  (DTensor's own
    ops would reduce only the local shard's part here, a different number on each rank.)
    """
    how = path(p, layout)
    if how == "gather":
        return penalty.residual(layout.matrices(p.full_tensor())).abs().max().item()
    r = penalty.residual(_local_matrices(layout, p.to_local()))
    if how == "all_reduce":
        _all_reduce_residuals(p.device_mesh, shard_dims(p), [r])
    worst = r.abs().amax() if r.numel() else r.new_zeros(())
    if how == "local":
        for d in shard_dims(p):
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group(d))
    return worst.item()


def communication_per_step(optimizer: torch.optim.Optimizer) -> dict[str, tuple[str, int]]:
    """``{name: (path, bytes)}``: the payload each sharded penalized parameter adds per step.

    ``all_reduce``: the residuals, ``m·n·n`` elements in the Gram's dtype (fp32 for half
    parameters), per mesh dim that shards dim 0.  ``gather``: the whole parameter
    (``numel·itemsize``), gathered on every rank.  ``local``: 0.  (A ring all-reduce moves
    about twice its payload per rank, an all-gather ``(W-1)/W`` of it.)
    """
    from .optim import _param_name, _penalized, param_key  # optim imports this module

    out = {}
    for gi, group in enumerate(optimizer.param_groups):
        if not _penalized(group) or group.get("ortho_mode") != "soft":
            continue
        for i, p in enumerate(group["params"]):
            if not is_dtensor(p):
                continue
            layout = optimizer._resolve(group, p, _param_name(group, i, gi))
            if layout is None:
                continue
            how = path(p, layout)
            m, _, n = layout.stack_shape(p.shape)
            if how == "all_reduce":
                gram = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                nbytes = m * n * n * gram.itemsize * len(shard_dims(p))
            elif how == "gather":
                nbytes = p.numel() * p.dtype.itemsize
            else:
                nbytes = 0
            out[param_key(group, i, gi)] = (how, nbytes)
    return out
