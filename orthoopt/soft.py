r"""The soft step of unsharded parameters: buckets of same-shaped matrices, one batched matmul each.

The optimizer's plan (:mod:`orthoopt.plan`) asks :func:`buckets` for the buckets of the soft
pieces (:mod:`orthoopt.pieces`: parameters, or blocks of them) and keeps them, with their
workspaces, while it holds.  Each :class:`Bucket` stacks the matrices of its pieces (views
where the layout allows) and computes :func:`orthoopt.penalty.penalty_step` for all of them
at once; sharded (FSDP2) parameters go to :class:`orthoopt.distributed.ShardedBucket`
instead, which has the same interface: ``due()``, ``before(optimizer)``, ``after(optimizer)``.

A step of a bucket runs in two halves around the base optimizer's update:

- :meth:`Bucket.prepare`, before it: gather :math:`\Phi^-`, form :math:`R = \Phi^{-\top}\Phi^- - I`
  and :math:`\max|R|`, check that it is finite, and (unless β is ``'auto'``) write the step
  :math:`-\eta_i \Phi^- S_i` into the bucket's update buffer;
- :meth:`Bucket.finish`, after it: for ``'auto'``, β from the base update and then the step
  (:mod:`orthoopt.auto`); then the update is added to the parameters.

:math:`S` is formed in place of :math:`R`, and a bucket of several parameters is gathered
in chunks (:data:`CHUNK_SHARE`), so that the workspaces besides the update itself stay a
fraction of the parameters.  The update must be held from before the base step to after
it (the penalty is taken at the pre-step value), so it is the one buffer of the
parameters' size.  With ``ortho_every=k`` a group's buckets take the step on every k-th
call of ``step()`` only, with k times the step size; the count lives in the group
(``ortho_steps``), so that it is saved and restored with the optimizer's state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from . import auto, distributed, penalty
from .layout import Layout
from .options import check_step_size, is_number, penalized, report_nonfinite
from .pieces import Piece

__all__ = ["Bucket", "Chunk", "buckets", "check_gradient", "view_or_none", "advance", "STEPS_KEY"]

# A bucket of several parameters is gathered (copied into one stack) in chunks of at most
# this share of its bytes, or MIN_CHUNK_BYTES where that is more: below that, the calls
# of one more chunk cost more time than the memory they save is worth.
CHUNK_SHARE = 0.25
MIN_CHUNK_BYTES = 1 << 20
# The group's count of step() calls, kept for ortho_every > 1 (saved with the groups).
STEPS_KEY = "ortho_steps"


def buckets(soft_pieces: list[Piece], workspaces: bool) -> list[Bucket | distributed.ShardedBucket]:
    """Group the soft pieces (with a gradient) into buckets that share one batched matmul;
    sharded (FSDP2) parameters go to one :class:`~orthoopt.distributed.ShardedBucket`."""
    found: dict[Any, Any] = {}
    for piece in soft_pieces:
        group, p = piece.group, piece.view
        every = group["ortho_every"]
        if distributed.is_dtensor(p):  # FSDP2: the Gram needs the other ranks' shards
            if every != 1:
                raise NotImplementedError(
                    f"{piece.name} is sharded (FSDP2), where ortho_every={every} is not supported; "
                    "use ortho_every=1 for its group"
                )
            found.setdefault("dtensor", distributed.ShardedBucket()).add(p, piece.layout, group)
            continue
        m, l, n = piece.layout.stack_shape(p.shape)
        options = (group["ortho_smoothing"], group["ortho_penalty"], group["ortho_nonfinite"], group["ortho"] == "auto")
        # Groups that skip steps keep their own buckets: each has its own count.
        key = (l, n, p.dtype, p.device, *options, every, piece.group_index if every > 1 else None)
        if key not in found:
            found[key] = Bucket(*options, every=every)
        found[key].add(piece, m)
    plan = list(found.values())
    if workspaces:
        for bucket in plan:
            if isinstance(bucket, Bucket):
                bucket.allocate()
    return plan


def check_gradient(piece: Piece) -> None:
    """Refuse a sparse gradient of a constrained parameter, naming it."""
    if piece.param.grad is not None and piece.param.grad.is_sparse:
        raise TypeError(f"{piece.name} has a sparse gradient, which orthoopt does not support; use a dense one")


def advance(param_groups: list[dict]) -> None:
    """Count one call of ``step()`` in each soft group that takes its step every k > 1 calls."""
    for group in param_groups:
        if penalized(group) and group["ortho_mode"] == "soft" and group["ortho_every"] > 1:
            group[STEPS_KEY] = group.get(STEPS_KEY, 0) + 1


@dataclass(frozen=True)
class Chunk:
    """Consecutive parameters of a bucket, gathered together: ``params`` index the bucket's
    parameters, ``rows`` its matrices (in the stack and the update); ``r``, ``stack`` and
    ``delta`` are its views of the bucket's workspaces (None without them)."""

    params: slice
    rows: slice
    names: list[str]
    counts: list[int]
    nonfinite: str  # the bucket's policy, for the optimizer's report
    r: torch.Tensor | None = None
    stack: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    scratch: torch.Tensor | None = None  # like r, in the update's memory (free until the product)


class Bucket:
    """Matrices of one shape, dtype, device and penalty options: one batched matmul.

    :meth:`allocate` gives the bucket the workspaces of its step (residual, the stack of
    several parameters, the update), so that a cached bucket allocates nothing of the
    parameters' size from its second step on.
    """

    def __init__(self, smoothing: float, kind: str, nonfinite: str, auto: bool, every: int = 1):
        self.smoothing = smoothing
        self.kind = kind
        self.nonfinite = nonfinite
        self.auto = auto
        self.every = every
        self.params: list[torch.Tensor] = []
        self.layouts: list[Layout] = []
        self.counts: list[int] = []
        self.groups: list[dict] = []
        self.names: list[str] = []
        self.owners: list[torch.Tensor] = []  # the parameter each piece belongs to (its state's key)
        self.state_keys: list[str] = []  # the piece's key of the 'auto' estimate in that state
        self.views: list[torch.Tensor] | None = None
        self.r = self.stack = self.delta = self.kept = None
        self.updates: list[torch.Tensor | None] | None = None
        self.chunks: list[Chunk] | None = None
        self._pending: tuple | None = None  # 'auto': what the step needs after the base update
        self._delta: torch.Tensor | None = None  # the update of this step, when not in a workspace

    def add(self, piece: Piece, count: int) -> None:
        """A piece of ``count`` matrices: the bucket steps its view as it would a parameter."""
        self.params.append(piece.view)
        self.layouts.append(piece.layout)
        self.counts.append(count)
        self.groups.append(piece.group)
        self.names.append(piece.name)
        self.owners.append(piece.param)
        self.state_keys.append(auto.STATE + piece.suffix)

    # -- the step protocol (the same for orthoopt.distributed.ShardedBucket) --------------
    def due(self) -> bool:
        """Whether the bucket takes its step at this call of ``step()`` (``ortho_every``)."""
        return self.every == 1 or self.groups[0].get(STEPS_KEY, 0) % self.every == 0

    def before(self, optimizer: Any) -> None:
        """Before the base update: the step at the pre-step weights (:meth:`prepare`), and the
        ``ortho_nonfinite`` policy for the matrices that cannot take it."""
        for chunk, finite in self.prepare():
            bad = [name for name, ok in zip(chunk.names, finite.split(chunk.counts)) if not bool(ok.all())]
            report_nonfinite(optimizer, bad, self.nonfinite, "the orthogonality step skips its non-finite matrices")

    def after(self, optimizer: Any) -> None:
        """After the base update: 'auto', then the update added (:meth:`finish`)."""
        self.finish(optimizer.state)

    # -- workspaces ---------------------------------------------------------------------
    def allocate(self) -> None:
        """Workspaces, and views of the parameters, for every later step."""
        mats = [layout.matrices(p) for p, layout in zip(self.params, self.layouts)]
        # A layout of a parameter in an unusual memory format (a channels_last conv weight)
        # gives a copy, not a view: a cached copy would go stale, so that one is re-read.
        self.views = [view_or_none(m, p) for m, p in zip(mats, self.params)]
        first = mats[0]
        m, l, n = sum(self.counts), first.shape[1], first.shape[2]
        chunks = self._chunk(first.element_size() * l * n)
        rows = max(c.rows.stop - c.rows.start for c in chunks)
        wide = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
        self.r = first.new_empty((rows, n, n), dtype=wide)  # R, then S in its place
        if len(self.params) == 1:
            # The product goes straight into a parameter-shaped buffer, so that the update
            # is one contiguous addition whatever the layout.
            p, layout = self.params[0], self.layouts[0]
            update = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            self.delta = layout.matrices(update)
            self.updates = [update]
            if self.auto and self.views[0] is not None:
                self.kept = first.new_empty((m, l, n))  # Φ⁻, read after the base update
        else:
            self.stack = first.new_empty((rows, l, n))
            self.delta = first.new_empty((m, l, n))
            parts = self.delta.split(self.counts)
            self.updates = [
                view_or_none(layout.from_matrices(part, p.shape), self.delta)
                for p, layout, part in zip(self.params, self.layouts, parts)
            ]
        self.chunks = [self._views(c) for c in chunks]

    def _views(self, chunk: Chunk) -> Chunk:
        """The chunk with its views of the workspaces, made once rather than at every step."""
        size = chunk.rows.stop - chunk.rows.start
        update = self.updates[0] if self.stack is None else self.delta[chunk.rows]  # contiguous
        n = self.r.shape[-1]
        # The update is written by the step's last product only: before that its memory
        # (l·n >= n·n per matrix) serves the cap's row sums.
        scratch = update.view(-1)[: size * n * n].view(size, n, n) if update.dtype == self.r.dtype else None
        return replace(
            chunk,
            r=self.r[:size],
            stack=None if self.stack is None else self.stack[:size],
            delta=self.delta if self.stack is None else self.delta[chunk.rows],
            scratch=scratch,
        )

    def _chunk(self, matrix_bytes: int) -> list[Chunk]:
        """Consecutive parameters whose stack fits the chunk size; one chunk for 'auto' (its
        Φ⁻ is kept whole across the base update) and for a single parameter (no stack)."""
        total = sum(self.counts) * matrix_bytes
        limit = total if self.auto or len(self.params) == 1 else max(CHUNK_SHARE * total, MIN_CHUNK_BYTES)
        chunks, start, row = [], 0, 0
        for i in range(1, len(self.counts)):
            if sum(self.counts[start : i + 1]) * matrix_bytes > limit:
                chunks.append(self._make_chunk(start, i, row))
                row += sum(self.counts[start:i])
                start = i
        chunks.append(self._make_chunk(start, len(self.counts), row))
        return chunks

    def _whole(self) -> Chunk:
        """The one chunk of an 'auto' bucket, or of a bucket without workspaces."""
        return self.chunks[0] if self.chunks else self._make_chunk(0, len(self.params), 0)

    def _make_chunk(self, start: int, stop: int, row: int) -> Chunk:
        counts = self.counts[start:stop]
        return Chunk(slice(start, stop), slice(row, row + sum(counts)), self.names[start:stop], counts, self.nonfinite)

    def workspace_bytes(self) -> int:
        held = [self.r, self.stack, self.kept, self.updates[0] if self.stack is None else self.delta]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # -- the step -----------------------------------------------------------------------
    def gather(self, chunk: Chunk, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's matrices: views of a single parameter, else a stack (into ``out``)."""
        views = self.views or [None] * len(self.params)
        mats = [
            layout.matrices(p) if v is None else v
            for v, p, layout in zip(views[chunk.params], self.params[chunk.params], self.layouts[chunk.params])
        ]
        if len(mats) == 1:
            return mats[0]
        return torch.cat(mats, out=out)

    def prepare(self) -> list[tuple[Chunk, torch.Tensor]]:
        """Before the base update: R, its max, the finite check and (unless 'auto') the step.

        Returns the chunks holding NaN or Inf with which matrices are finite, for the
        optimizer to report (none where the policy is 'skip', which does not sync)."""
        self._pending = self._delta = None
        bad = []
        for chunk in self.chunks or [self._whole()]:
            mats = self.gather(chunk, chunk.stack)
            r = penalty.residual(mats, out=chunk.r)
            r_max = penalty.max_abs(r)  # the step needs it; NaN or Inf where a matrix is not finite
            finite, r_top = self._finite(r_max)
            if finite is not True and self.nonfinite != "skip":
                bad.append((chunk, finite))
            if self.auto:  # β comes from this step's base update: finish after it
                self._pending = (self._keep(mats), r, r_max, finite)
            else:
                eta = self.eta(chunk, r)
                if isinstance(eta, float):  # a tensor lr is not read back: that would sync
                    check_step_size(eta, mats.dtype, chunk.names, None)
                self._step(chunk, mats, r, r_max, finite, eta, r_top)
        return bad

    def _finite(self, r_max: torch.Tensor) -> tuple[torch.Tensor | bool, float | None]:
        """Which matrices can take a step (True: all; :func:`orthoopt.penalty.steppable`), and
        ``max|R|`` on the host where it is free."""
        if r_max.is_meta:  # no values to look at
            return True, None
        if r_max.device.type == "cpu" and not torch.compiler.is_compiling():
            top = float(r_max.max())  # one read serves the finite check and the cap's check
            if top <= penalty.largest_residual(self.kind, r_max.dtype):  # False for NaN
                return True, top
            return penalty.steppable(r_max, self.kind), None
        finite = penalty.steppable(r_max, self.kind)
        if self.nonfinite == "skip":  # no host sync
            return finite, None
        return (True, None) if bool(finite.all()) else (finite, None)

    def finish(self, state: Any) -> None:
        """After the base update: the 'auto' step, then the update added to the parameters."""
        if self.auto:
            before, r, r_max, finite = self._pending
            self._pending = None
            whole = self._whole()
            lr = self.lrs(r)
            beta = self._auto_beta(state, before, finite, lr)
            eta = 2 * lr * beta if self.every == 1 else 2 * lr * beta * self.every
            self._step(whole, before, r, r_max, finite, eta)
        self.apply(self.delta if self._delta is None else self._delta)
        self._delta = None

    def _step(self, chunk: Chunk, mats: torch.Tensor, r: torch.Tensor, r_max, finite, eta, r_top=None) -> None:
        # S in place of R: R is not needed once the step sizes are known.
        delta = penalty.penalty_step(
            r,
            mats,
            self.smoothing,
            self.kind,
            eta,
            s_out=r,
            out=chunk.delta,
            finite=finite,
            r_max=r_max,
            r_top=r_top,
            scratch=chunk.scratch,
        )
        if chunk.delta is None:
            self._delta = delta  # no workspaces (torch.compile plans its own buffers): one chunk

    def _keep(self, mats: torch.Tensor) -> torch.Tensor:
        """Φ⁻ for after the base update: the stack or a layout's copy as they are, else a copy."""
        if len(self.params) > 1 or view_or_none(mats, self.params[0]) is None:
            return mats
        return mats.clone() if self.kept is None else self.kept.copy_(mats)

    def _auto_beta(self, state: Any, before: torch.Tensor, finite, lr: torch.Tensor) -> torch.Tensor:
        """β per matrix for ``ortho='auto'`` (:mod:`orthoopt.auto`), from this step's base update."""
        after = self.gather(self._whole(), self.delta)
        products = auto.update_products(before, after, lr, out=self.delta)
        lam = auto.threshold(products, finite & (lr > 0))
        states = [state[p] for p in self.owners]
        return auto.AUTO_SAFETY * auto.remember_all(states, lam, self.counts, self.state_keys)

    def lrs(self, like: torch.Tensor) -> torch.Tensor:
        """The learning rate of each matrix."""
        if all(g is self.groups[0] for g in self.groups):
            lr = self.groups[0]["lr"]
            return torch.as_tensor(lr, dtype=like.dtype, device=like.device).expand(sum(self.counts))
        return self.per_matrix([g["lr"] for g in self.groups], like)

    def eta(self, chunk: Chunk, like: torch.Tensor) -> torch.Tensor | float:
        """``2γβ`` (times ``ortho_every``): one number for the chunk, or one per matrix when
        its groups differ."""
        groups = self.groups[chunk.params]
        etas = [2 * g["lr"] * g["ortho"] for g in groups]
        if self.every != 1:
            etas = [e * self.every for e in etas]
        first = etas[0]
        # Tensor learning rates are never compared: that would sync, and break torch.compile.
        if all(g is groups[0] for g in groups):
            return first
        if is_number(first) and all(is_number(e) and e == first for e in etas):
            return first
        return self.per_matrix(etas, like, chunk)

    def per_matrix(self, values: list[Any], like: torch.Tensor, chunk: Chunk | None = None) -> torch.Tensor:
        """One value per parameter (of ``chunk``), repeated for each of its matrices."""
        counts = self.counts if chunk is None else chunk.counts
        return torch.cat(
            [torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(c) for v, c in zip(values, counts)]
        )

    def apply(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the parameters (through cached views where they exist)."""
        updates = self.updates
        if updates is None or any(u is None for u in updates):
            cached = updates or [None] * len(self.params)
            updates = [
                layout.from_matrices(chunk, p.shape) if u is None else u
                for u, p, layout, chunk in zip(cached, self.params, self.layouts, delta.split(self.counts))
            ]
        if len(updates) == 1:
            self.params[0].add_(updates[0])  # a foreach call costs more than it saves on one tensor
        else:
            torch._foreach_add_(self.params, updates)


def view_or_none(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """``t`` if it shares ``base``'s memory (a view that stays current), else None."""
    return t if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else None
