r"""The soft orthogonality step for parameters sharded by FSDP2 (``fully_shard``).

``fully_shard`` turns each parameter into a :class:`~torch.distributed.tensor.DTensor` whose
rows (dim 0) are split over the ranks, ``Shard(0)``, in ``torch.chunk`` pieces (uneven, and
empty on the last ranks when there are fewer rows than ranks).  The penalty step needs the
Gram matrices of whole :math:`\Phi_i`; where dim 0 of the parameter lands in the stack
:math:`(m, l, n)` (:mod:`orthoopt.layout`) decides how much of :math:`\Phi_i` a rank holds,
and what a rank sends per step (docs/distributed.md has the same in a table):

* dim 0 is ``m`` (``group_axis:0``): whole groups; the step is local, nothing is sent;
* dim 0 is ``l`` (``columns``, ``column_groups:H``, ``group_axis:1``, ``group_axis:2``): row blocks
  :math:`\Phi_i^{(r)}`; the Gram is a sum over ranks, all-reduced (``m·n·n`` numbers, fp32 for
  fp32 and half parameters);
* dim 0 is ``n`` (``rows``, ``filters``): a slice of the vectors; the parameter is all-gathered
  and the local slice of the step kept (the parameter's size);
* dim 0 holds ``m`` and ``n`` or ``l`` (``row_groups:G``: the blocks and, within each, the
  vectors' index or their rows): a shard may end inside a block, so it is gathered, as for
  ``n``.

On the ``l`` path, with :math:`W` ranks,

.. math::
    R_i = \sum_{r=1}^{W} \big(\Phi_i^{(r)\top}\Phi_i^{(r)} - I\big) + (W-1)\,I,
    \qquad \Delta\Phi_i^{(r)} = -\eta_i\, \Phi_i^{(r)} S_i,

where :math:`S_i = h'(R_i)` and :math:`\eta_i` come from the whole :math:`R_i` and so are the
same on every rank: each rank updates its own rows and nothing else is sent.  A target whose
lengths are free (``ortho_target='orthogonal'``) all-reduces the Gram matrices themselves and
forms its residual from their sum (:func:`orthoopt.penalty.orthogonal_from_gram`).  The penalty
math itself is :func:`orthoopt.penalty.residual`, :func:`~orthoopt.penalty.direction` and
:func:`~orthoopt.penalty.safe_step_size`, as for unsharded parameters.

With ``ortho='auto'`` (:mod:`orthoopt.auto`) β comes from the base update: after the base
step, each rank forms :math:`\Phi^{(r)\top} u^{(r)}` of its rows and the same all-reduce sums
it (the gather path gathers the old and new values instead; the local path needs nothing).

The optimizer routes every DTensor parameter here (:class:`ShardedBucket`), in the same
order on every rank, so that the collectives match.  Replicated mesh dimensions (HSDP) are
not reduced over; any placement other than ``Shard(0)`` and ``Replicate`` takes the gather
path, which is correct for every placement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import auto, penalty
from .layout import Layout
from .pieces import is_dtensor, pieces

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


def sharded_axis(layout: Layout) -> str:
    """Which axes of the stack ``(m, l, n)`` dim 0 of the parameter becomes: 'm', 'l' or 'n',
    or two of them ('mn', 'ml') for a row-block layout, whose dim 0 is (block, row in block)."""
    if layout.kind == "row_groups":
        return "ml" if layout.tall else "mn"
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


def _all_reduce_sums(mesh: Any, dims: tuple[int, ...], parts: list[torch.Tensor]) -> int:
    """Sum each tensor over the ranks of the mesh dims, in place, in one all-reduce per mesh
    dim; returns how many ranks were summed over."""
    flat = torch.cat([t.reshape(-1) for t in parts])
    world = 1
    for d in dims:
        dist.all_reduce(flat, group=mesh.get_group(d))
        world *= mesh.size(d)
    for t, part in zip(parts, flat.split([t.numel() for t in parts])):
        t.copy_(part.view_as(t))
    return world


def _all_reduce_residuals(mesh: Any, dims: tuple[int, ...], residuals: list[torch.Tensor]) -> None:
    """``R_i ← Σ_ranks (Φ_i^{(r)ᵀ}Φ_i^{(r)} - I) + (W-1) I`` in place: one all-reduce per mesh dim."""
    world = _all_reduce_sums(mesh, dims, residuals)
    for r in residuals:
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
    if dims is None or sharded_axis(layout) not in ("m", "l"):
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

    @functools.cached_property
    def path(self) -> str:
        # Read several times per step; the parameter's placements do not change while the plan holds.
        return path(self.param, self.layout)

    @property
    def auto(self) -> bool:
        return self.group["ortho"] == "auto"

    @property
    def free(self) -> bool:
        """Whether the target leaves the lengths free (orthoopt.penalty.orthogonal_step)."""
        return self.group["ortho_target"] != "orthonormal"

    def matrices(self, local: torch.Tensor | None = None) -> torch.Tensor:
        """What this rank steps, of the parameter or of an earlier copy of its shard
        (``local``): the whole matrices (gathered) on the gather path, else its own row
        blocks or whole groups, as views of the shard."""
        p = self.param
        if self.path == "gather":
            whole = p if local is None else _with_shard(p, local)
            return self.layout.matrices(whole.full_tensor())
        return _local_matrices(self.layout, p.to_local() if local is None else local)


def _with_shard(p: Any, local: torch.Tensor) -> Any:
    """The DTensor laid out like ``p`` whose shard on this rank is ``local``."""
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


@dataclass
class _Staged:
    """An ``ortho='auto'`` entry between the residual and the base step (β needs its update).
    It keeps this rank's shard, not gathered matrices, so that nothing whole outlives its use."""

    r: torch.Tensor  # the whole matrices' residual
    shard: torch.Tensor  # a copy of the local shard before the step


class ShardedBucket:
    """The soft step of every DTensor parameter of one optimizer step.

    :meth:`delta` runs before the base optimizer's step (the penalty is taken at the
    pre-step value) and returns the local deltas; :meth:`finish` computes those of the
    ``ortho='auto'`` parameters after it, from the update, and :meth:`apply` adds them all.
    The Gram matrices of all ``all_reduce`` parameters on the same mesh dims and dtype
    travel in one all-reduce.
    """

    every = 1  # ortho_every > 1 is refused for sharded parameters

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._deltas: list[Any] | None = None

    def add(self, p: torch.Tensor, layout: Layout, group: dict) -> None:
        self.entries.append(_Entry(p, layout, group))

    # -- the step protocol (the same for orthoopt.soft.Bucket) ---------------------------
    def due(self) -> bool:
        return True

    def before(self, optimizer: Any, amp: Any = None) -> None:
        """Before the base step: the deltas at the pre-step weights (:meth:`delta`); none where
        a GradScaler's ``found_inf`` was read on the host (:class:`orthoopt.plan.Amp`)."""
        self._deltas = None if amp is not None and amp.skipped is True else self.delta()

    def after(self, optimizer: Any, amp: Any = None) -> None:
        """After the base step: the 'auto' deltas (:meth:`finish`), then all of them added,
        times ``amp.keep`` (0 where ``found_inf`` is set, on the device)."""
        deltas, self._deltas = self._deltas, None
        if deltas is None:
            return
        keep = None if amp is None else amp.keep
        self.finish(deltas, optimizer.state, None if amp is None else amp.found)
        self.apply(deltas, keep)

    @torch.no_grad()
    def delta(self) -> list[Any]:
        """Before the base step: each entry's delta, or for ``ortho='auto'`` what
        :meth:`finish` needs to compute it after the step.  Gathered matrices are used and
        dropped one parameter at a time."""
        deltas: list[Any] = [None] * len(self.entries)
        reduced: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for k, e in enumerate(self.entries):
            mats = e.matrices()
            # Free lengths: the Gram itself (a plain sum over row shards), made a residual after it.
            r = penalty.gram_matrix(mats) if e.free else penalty.residual(mats)
            if e.path == "all_reduce":
                key = (id(e.param.device_mesh), shard_dims(e.param), r.dtype, e.free)
                reduced.setdefault(key, []).append((k, r, mats))
            else:
                deltas[k] = self._before_step(e, r, mats)
        for (_, _, _, free), items in reduced.items():
            p = self.entries[items[0][0]].param
            reduce = _all_reduce_sums if free else _all_reduce_residuals
            reduce(p.device_mesh, shard_dims(p), [r for _, r, _ in items])
            for k, r, mats in items:
                deltas[k] = self._before_step(self.entries[k], r, mats)
        return deltas

    def _before_step(self, e: _Entry, r: torch.Tensor, mats: torch.Tensor) -> Any:
        if mats.shape[0] == 0:  # an empty shard on the local path holds no matrix to step
            return mats.new_zeros(mats.shape)
        if e.free:  # 'auto' is refused for these targets
            return self._step(e, r, mats, e.eta)
        return _Staged(r, e.param.to_local().clone()) if e.auto else self._step(e, r, mats, e.eta)

    @torch.no_grad()
    def finish(self, deltas: list[Any], state: Any, skipped: torch.Tensor | None = None) -> None:
        """After the base step: β of the ``'auto'`` entries from their update, and their deltas
        (``state``: the optimizer's, for the running estimate, which stays where ``skipped``)."""
        for k, (e, staged) in enumerate(zip(self.entries, deltas)):
            if not isinstance(staged, _Staged):
                continue
            before = e.matrices(staged.shard)
            lr = torch.as_tensor(e.group["lr"], dtype=staged.r.dtype, device=before.device).expand(before.shape[0])
            products = auto.update_products(before, e.matrices(), lr)
            if e.path == "all_reduce":  # a sum over rows, like the Gram
                _all_reduce_sums(e.param.device_mesh, shard_dims(e.param), [products])
            lam = auto.threshold(products, torch.isfinite(penalty.max_abs(staged.r)) & (lr > 0))
            beta = auto.AUTO_SAFETY * auto.remember(state[e.param], lam, skipped=skipped)
            deltas[k] = self._step(e, staged.r, before, 2 * lr * beta)

    @staticmethod
    def _step(e: _Entry, r: torch.Tensor, mats: torch.Tensor, eta: Any) -> torch.Tensor:
        """The penalty step of this rank's matrices; on the gather path, its part of the whole.
        ``r``: the residual, or for free lengths the Gram of the whole matrices."""
        if e.free:
            r, squares = penalty.orthogonal_from_gram(r, e.group["ortho_normalize"])
            stack = penalty.orthogonal_step(r, squares, mats, e.smoothing, e.kind, eta, e.group["ortho_normalize"])
        else:
            stack = penalty.penalty_step(r, mats, e.smoothing, e.kind, eta)
        if e.path != "gather":
            return stack
        return _local_part(e.param, e.layout.from_matrices(stack, e.param.shape))

    @torch.no_grad()
    def apply(self, deltas: list[torch.Tensor | None], keep: torch.Tensor | None = None) -> None:
        """Add each local delta to its shard (times ``keep`` where it is given)."""
        for e, d in zip(self.entries, deltas):
            local = e.param.to_local()
            if local.numel() == 0:
                continue
            if e.path != "gather":
                d = e.layout.from_matrices(d, local.shape)
            if keep is None:
                local.add_(d)
            else:
                local.addcmul_(d, keep)


def _local_part(p: Any, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (shaped like the global ``p``, the same on every rank)."""
    # Replicate -> any placement is a local slice, with no communication; the clone lets
    # ``whole`` go now.
    replicated = DTensor.from_local(whole, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements).to_local().clone()


@torch.no_grad()
def project_(p: Any, layout: Layout, target: str = "orthonormal") -> None:
    """Snap a DTensor parameter to the polar factor of its whole matrices (a collective), or to
    :func:`orthoopt.penalty.project`'s point of another ``target``.

    Every rank gathers the parameter and takes the same SVD (the same input on the same
    library: the same bits), then keeps its own part.
    """
    full = p.full_tensor()
    p.to_local().copy_(_local_part(p, layout.from_matrices(penalty.project(layout.matrices(full), target), full.shape)))


@torch.no_grad()
def max_error(layout: Layout, p: Any, target: str = "orthonormal", normalize: bool = False) -> float:
    """``max |Φ_iᵀΦ_i - I|`` over all of a DTensor's matrices, the same on every rank (of
    another ``target``: from the gathered matrices).

    A collective, by the step's paths: every rank of the mesh must call it.  (DTensor's own
    ops would reduce only the local shard's part here, a different number on each rank.)
    """
    how = path(p, layout)
    if how == "gather" or target != "orthonormal":
        return penalty.max_error(layout.matrices(p.full_tensor()), target, normalize)
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
    (``numel·itemsize``), gathered on every rank.  ``local``: 0.  With ``ortho='auto'`` the
    update's products ``Φᵀu`` travel too: twice the all-reduce, and on the gather path the
    parameter is gathered three times (before the step, then its old and new values after).
    (A ring all-reduce moves about twice its payload per rank, an all-gather ``(W-1)/W`` of it.)
    """
    out = {}
    for piece in pieces(optimizer.param_groups, mode="soft"):
        p, layout, group = piece.param, piece.layout, piece.group
        if not is_dtensor(p):
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
        if group["ortho"] == "auto":
            nbytes *= 2 if how == "all_reduce" else 3
        out[piece.key] = (how, nbytes)
    return out
