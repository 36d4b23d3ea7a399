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

A bucket of ``ortho_target='orthogonal'`` forms that target's residual and step instead
(:func:`orthoopt.penalty.orthogonal_residual`, :func:`~orthoopt.penalty.orthogonal_step`).
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

from . import auto, distributed, guard, host, penalty
from .layout import Layout
from .options import STEPS_KEY, check_step_size, is_number, penalized, report_nonfinite, step_size_limit
from .pieces import Piece

__all__ = ["Bucket", "Chunk", "buckets", "view_or_none", "advance", "STEPS_KEY", "CORRECTIONS"]

# A bucket of several parameters is gathered (copied into one stack) in chunks of at most
# this share of its bytes, or MIN_CHUNK_BYTES where that is more: below that, the calls
# of one more chunk cost more time than the memory they save is worth.
CHUNK_SHARE = 0.25
MIN_CHUNK_BYTES = 1 << 20
# The optimizer-state key of ortho_tol's count of corrections, per matrix of a piece.
CORRECTIONS = "ortho_corrections"


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
            if group.get("ortho_tol") is not None:
                raise NotImplementedError(
                    f"{piece.name} is sharded (FSDP2), where ortho_tol={group['ortho_tol']} is not supported (its "
                    "correction needs each whole Gram on every rank); use ortho_tol=None for its group"
                )
            found.setdefault("dtensor", distributed.ShardedBucket()).add(p, piece.layout, group)
            continue
        m, l, n = piece.layout.stack_shape(p.shape)
        options = (
            group["ortho_smoothing"],
            group["ortho_penalty"],
            group["ortho_nonfinite"],
            group["ortho"] == "auto",
            group["ortho_target"],
            group["ortho_normalize"],
        )
        tol = group.get("ortho_tol")
        # Groups that skip steps keep their own buckets: each has its own count.
        key = (l, n, p.dtype, p.device, *options, every, tol, piece.group_index if every > 1 else None)
        if key not in found:
            found[key] = Bucket(*options, every=every, tol=tol)
        found[key].add(piece, m)
    plan = list(found.values())
    if workspaces:
        for bucket in plan:
            if isinstance(bucket, Bucket):
                bucket.allocate()
    return plan


def advance(param_groups: list[dict]) -> None:
    """Count one call of ``step()`` in each soft group that takes its step every k > 1 calls."""
    for group in param_groups:
        if penalized(group) and group["ortho_mode"] == "soft" and group["ortho_every"] > 1:
            group[STEPS_KEY] = group.get(STEPS_KEY, 0) + 1


@dataclass(frozen=True)
class Chunk:
    """Consecutive pieces of a bucket, gathered together: ``params`` index the bucket's pieces,
    ``rows`` its matrices (in the stack and the update).  The rest are its views of the
    bucket's workspaces, made once (None without workspaces): ``r`` (R, then S in its place),
    ``stack`` (the gathered matrices of several pieces), ``mats``/``mats_t`` (the matrices and
    their transpose, where they are views that stay current), ``delta`` (the update),
    ``scratch`` (like ``r``, in the update's memory, free until the product) and ``start``
    (the power iteration's start vector)."""

    params: slice
    rows: slice
    names: list[str]
    counts: list[int]
    r: torch.Tensor | None = None
    stack: torch.Tensor | None = None
    mats: torch.Tensor | None = None
    mats_t: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    start: torch.Tensor | None = None


class Bucket:
    """Matrices of one shape, dtype, device and penalty options: one batched matmul.

    :meth:`allocate` gives the bucket the workspaces of its step (residual, the stack of
    several pieces, the update, and the small constants), so that a cached bucket allocates
    nothing of the parameters' size, and makes no view, from its second step on.

    Where reading a tensor is free (:func:`orthoopt.host.reads_free`: on CPU), the step reads
    the matrices' ``max|R|`` to skip the mask of non-finite matrices and to report them at
    once; elsewhere it reads nothing: the mask is applied on the device, and the errors go to
    the optimizer's monitor (:mod:`orthoopt.guard`), which reads them at its cadence.
    """

    def __init__(
        self,
        smoothing: float,
        kind: str,
        nonfinite: str,
        auto: bool,
        target: str = "orthonormal",
        normalize: bool = False,
        every: int = 1,
        tol: float | None = None,
    ):
        self.tol = tol
        self.smoothing = smoothing
        self.kind = kind
        self.nonfinite = nonfinite
        self.auto = auto
        # The orthonormal target's residual and step, or those of free lengths (orthoopt.penalty).
        self.target = target
        self.normalize = normalize
        self.every = every
        self.params: list[torch.Tensor] = []
        self.layouts: list[Layout] = []
        self.counts: list[int] = []
        self.groups: list[dict] = []
        self.names: list[str] = []
        self.pieces: list[Piece] = []
        self.views: list[torch.Tensor] | None = None
        self.r = self.stack = self.delta = self.kept = self.minus_eye = None
        self.updates: list[torch.Tensor | None] | None = None
        self.chunks: list[Chunk] | None = None
        self.errors: list[torch.Tensor] = []  # max|R| per matrix of this step, per chunk (the monitor's)
        self._pending: tuple | None = None  # 'auto': what the step needs after the base update
        self._delta: torch.Tensor | None = None  # the update of this step, when not in a workspace
        self._skipped = False  # this step's found_inf was read on the host (no step at all)

    def add(self, piece: Piece, count: int) -> None:
        """A piece of ``count`` matrices: the bucket steps its view as it would a parameter."""
        self.params.append(piece.view)
        self.layouts.append(piece.layout)
        self.counts.append(count)
        self.groups.append(piece.group)
        self.names.append(piece.name)
        self.pieces.append(piece)

    # -- the step protocol (the same for orthoopt.distributed.ShardedBucket) --------------
    def due(self) -> bool:
        """Whether the bucket takes its step at this call of ``step()`` (``ortho_every``)."""
        return self.every == 1 or self.groups[0].get(STEPS_KEY, 0) % self.every == 0

    def before(self, optimizer: Any, amp: Any = None) -> None:
        """Before the base update: the step at the pre-step weights, and the ``ortho_nonfinite``
        policy for the matrices that cannot take it (at once where reading is free)."""
        self._pending = self._delta = None
        self.errors = []
        self._skipped = amp is not None and amp.skipped is True
        if self._skipped:
            return  # found_inf read on the host: the base step skips this step, and so do we
        for chunk in self.chunks or [self.whole()]:
            mats = self.gather(chunk)
            r, squares = self.residual(mats, chunk)
            r_max, finite = self._check(r, chunk, optimizer)
            self.errors.append(r_max)
            if self.auto:  # β comes from this step's base update: finish after it
                self._pending = (self._keep(mats), r, r_max, finite)
            else:
                eta, top = self.eta(chunk, r)
                if isinstance(eta, float) and eta > step_size_limit(mats.dtype):  # a tensor lr: not read
                    check_step_size(eta, mats.dtype, chunk.names, None)
                self._step(chunk, mats, r, r_max, finite, eta, top, squares)

    def residual(self, mats: torch.Tensor, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual of the bucket's target into the chunk's workspace, with the columns'
        squared lengths where the lengths are free (:func:`orthoopt.penalty.orthogonal_residual`),
        else None."""
        if self.target == "orthonormal":
            return penalty.residual(mats, out=chunk.r, transposed=chunk.mats_t, minus_eye=self.minus_eye), None
        return penalty.orthogonal_residual(mats, self.normalize, out=chunk.r)

    def after(self, optimizer: Any, amp: Any = None) -> None:
        """After the base update: the 'auto' step, then the update added to the pieces (none
        where ``found_inf`` is set: masked on the device, or skipped where it was read)."""
        if self._skipped:
            return
        if self.auto:
            before, r, r_max, finite = self._pending
            self._pending = None
            lr = self.lrs(r)
            beta = self._auto_beta(optimizer.state, before, finite, lr, amp)
            eta = 2 * lr * beta if self.every == 1 else 2 * lr * beta * self.every
            self._step(self.whole(), before, r, r_max, finite, eta, None)
        self.apply(self.delta if self._delta is None else self._delta, None if amp is None else amp.keep)
        self._delta = None

    # -- workspaces ---------------------------------------------------------------------
    def allocate(self) -> None:
        """Workspaces, views of the pieces and constants, for every later step."""
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
        self.minus_eye = torch.eye(n, dtype=wide, device=first.device).neg_()
        self.start = penalty.start_vector(self.r)
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
        # (l·n >= n·n per matrix) serves for |R|.
        scratch = update.view(-1)[: size * n * n].view(size, n, n) if update.dtype == self.r.dtype else None
        if chunk.params.stop - chunk.params.start == 1:  # one piece: its own view, where it is one
            mats, stack = self.views[chunk.params.start], None
        else:
            mats = stack = self.stack[:size]
        wide = mats is not None and mats.dtype == self.r.dtype  # half matrices are widened per step
        return replace(
            chunk,
            r=self.r[:size],
            stack=stack,
            mats=mats,
            mats_t=mats.mT if wide else None,
            delta=self.delta if self.stack is None else self.delta[chunk.rows],
            scratch=scratch,
            start=self.start[:size],
        )

    def _chunk(self, matrix_bytes: int) -> list[Chunk]:
        """Consecutive pieces whose stack fits the chunk size; one chunk for 'auto' (its
        Φ⁻ is kept whole across the base update) and for a single piece (no stack)."""
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

    def whole(self) -> Chunk:
        """The one chunk of an 'auto' bucket, or of a bucket without workspaces."""
        return self.chunks[0] if self.chunks else self._make_chunk(0, len(self.params), 0)

    def _make_chunk(self, start: int, stop: int, row: int) -> Chunk:
        counts = self.counts[start:stop]
        return Chunk(slice(start, stop), slice(row, row + sum(counts)), self.names[start:stop], counts)

    def workspace_bytes(self) -> int:
        held = [self.r, self.stack, self.kept, self.updates[0] if self.stack is None else self.delta]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # -- the step -----------------------------------------------------------------------
    def gather(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's matrices: a kept view, views of a single piece, else a stack (into the
        chunk's workspace)."""
        if chunk.mats is not None and chunk.stack is None:
            return chunk.mats
        views = self.views or [None] * len(self.params)
        mats = [
            layout.matrices(p) if v is None else v
            for v, p, layout in zip(views[chunk.params], self.params[chunk.params], self.layouts[chunk.params])
        ]
        if len(mats) == 1:
            return mats[0]
        return torch.cat(mats, out=chunk.stack)

    def _check(self, r: torch.Tensor, chunk: Chunk, optimizer: Any) -> tuple[torch.Tensor, torch.Tensor | bool]:
        """``max|R|`` per matrix, ``(m, 1, 1)``, and which matrices can take a step (True: all).

        Where reading is free, the maxima are read: all finite needs no mask, and non-finite
        matrices are reported at once (``ortho_nonfinite``).  Elsewhere the mask stays on the
        device, unless the policy is 'raise', which must read it to stop before any change."""
        if r.is_meta:  # no values to look at
            return r.new_zeros((r.shape[0], 1, 1)), True
        r_max = self._max_abs(r, chunk)
        if host.reads_free(r):
            limit = penalty.largest_residual(self.kind, r_max.dtype)
            ok = [t <= limit for t in host.read(r_max)]  # False for NaN
            if all(ok):
                return r_max, True
            self._report(optimizer, chunk, ok)
            return r_max, penalty.steppable(r_max, self.kind)
        finite = penalty.steppable(r_max, self.kind)
        if self.nonfinite == "raise":
            self._report(optimizer, chunk, host.read(finite))
        return r_max, finite

    @staticmethod
    def _max_abs(r: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """``max|R|`` per matrix, ``(m, 1, 1)``: where reading is free through ``|R|`` in the
        chunk's scratch (faster on CPU), elsewhere in one reduction (one operation)."""
        if host.reads_free(r):
            scratch = chunk.scratch if chunk.scratch is not None else torch.empty_like(r)
            return torch.abs(r, out=scratch).amax((-2, -1), keepdim=True)
        return torch.linalg.vector_norm(r, float("inf"), dim=(-2, -1), keepdim=True)

    def _report(self, optimizer: Any, chunk: Chunk, finite: list[bool]) -> None:
        bad, row = [], 0
        for name, count in zip(chunk.names, chunk.counts):
            if not all(finite[row : row + count]):
                bad.append(name)
            row += count
        if bad:
            report_nonfinite(optimizer, bad, self.nonfinite, guard.NONFINITE_WHAT)

    def _step(
        self, chunk: Chunk, mats: torch.Tensor, r: torch.Tensor, r_max, finite, eta, eta_top, squares=None
    ) -> None:
        if squares is None:
            # S in place of R: R is not needed once the step sizes are known.
            delta = penalty.penalty_step(
                r,
                mats,
                self.smoothing,
                self.kind,
                eta,
                out=chunk.delta,
                finite=finite,
                r_max=r_max,
                in_place=True,
                eta_top=eta_top,
                start=chunk.start,
            )
        else:  # free lengths ('auto', which steps after the base update without them, is refused there)
            delta = penalty.orthogonal_step(
                r,
                squares,
                mats,
                self.smoothing,
                self.kind,
                eta,
                self.normalize,
                out=chunk.delta,
                finite=finite if finite is True else finite.reshape(-1),
                r_max=r_max.reshape(-1),
                scratch=chunk.scratch,
            )
        if chunk.delta is None:
            self._delta = delta  # no workspaces (torch.compile plans its own buffers): one chunk

    def _keep(self, mats: torch.Tensor) -> torch.Tensor:
        """Φ⁻ for after the base update: the stack or a layout's copy as they are, else a copy."""
        if len(self.params) > 1:
            return mats
        if torch.compiler.is_compiling():  # a trace cannot compare storages: it copies
            return mats.clone()
        if view_or_none(mats, self.params[0]) is None:
            return mats
        return mats.clone() if self.kept is None else self.kept.copy_(mats)

    def _auto_beta(self, state: Any, before: torch.Tensor, finite, lr: torch.Tensor, amp: Any) -> torch.Tensor:
        """β per matrix for ``ortho='auto'`` (:mod:`orthoopt.auto`), from this step's base update;
        where ``found_inf`` is set the estimate stays as it was."""
        after = self.gather_after()
        products = auto.update_products(before, after, lr, out=self.delta)
        ok = lr > 0 if finite is True else finite.reshape(-1) & (lr > 0)
        lam = auto.threshold(products, ok)
        states = [state[piece.param] for piece in self.pieces]
        keys = [auto.STATE + piece.suffix for piece in self.pieces]
        skipped = None if amp is None else amp.found
        return auto.AUTO_SAFETY * auto.remember_all(states, lam, self.counts, keys, skipped=skipped)

    def gather_after(self) -> torch.Tensor:
        """The matrices after the base update, for 'auto' (into the update's workspace, which
        the step overwrites afterwards)."""
        chunk = self.whole()
        return self.gather(replace(chunk, stack=self.delta if self.stack is not None else None))

    def lrs(self, like: torch.Tensor) -> torch.Tensor:
        """The learning rate of each matrix."""
        if all(g is self.groups[0] for g in self.groups):
            lr = self.groups[0]["lr"]
            return torch.as_tensor(lr, dtype=like.dtype, device=like.device).expand(sum(self.counts))
        return self.per_matrix([g["lr"] for g in self.groups], like)

    def eta(self, chunk: Chunk, like: torch.Tensor) -> tuple[torch.Tensor | float, float | None]:
        """``2γβ`` (times ``ortho_every``): one number for the bucket, or one per matrix of the
        chunk when the bucket's groups differ (with the largest, where they are numbers).  The
        choice is the bucket's, not the chunk's, so that a chunked bucket steps bitwise as a
        whole one."""
        if all(g is self.groups[0] for g in self.groups):
            return self._eta(self.groups[0]), None
        etas = [self._eta(g) for g in self.groups]
        first = etas[0]
        # Tensor learning rates are never compared: that would sync, and break torch.compile.
        if is_number(first) and all(is_number(e) and e == first for e in etas):
            return first, None
        top = max(etas) if all(is_number(e) for e in etas) else None
        return self.per_matrix(etas[chunk.params], like, chunk), top

    def _eta(self, group: dict) -> Any:
        eta = 2 * group["lr"] * group["ortho"]
        return eta if self.every == 1 else eta * self.every

    def per_matrix(self, values: list[Any], like: torch.Tensor, chunk: Chunk | None = None) -> torch.Tensor:
        """One value per piece (of ``chunk``), repeated for each of its matrices."""
        counts = self.counts if chunk is None else chunk.counts
        return torch.cat(
            [torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(c) for v, c in zip(values, counts)]
        )

    # -- ortho_tol ------------------------------------------------------------------------
    def correct(self, optimizer: Any) -> None:
        """``ortho_tol``: after the step, every matrix whose ``max|ΦᵀΦ - I|`` is above the
        tolerance moves to (nearly) its polar factor, :func:`orthoopt.penalty.polar_correction`.

        On the device the correction is computed for every matrix, with a fixed number of
        iterations, and masked (no read); where reading is free a bucket with no matrix above
        the tolerance does no more than its Gram, the iterations stop once every matrix is within
        half the tolerance, and a matrix they leave above it gets its polar factor by SVD.  How
        many times each matrix was corrected is counted in the optimizer state
        (``ortho_corrections``, suffixed for a later piece)."""
        delta = self.delta
        corrected = []
        for chunk in self.chunks or [self.whole()]:
            mats = self.gather(chunk)
            r = penalty.residual(mats, out=chunk.r, transposed=chunk.mats_t, minus_eye=self.minus_eye)
            error = self._max_abs(r, chunk)
            free = host.reads_free(r)
            if free and not any(e > self.tol for e in host.read(error)):  # False for NaN: not corrected
                corrected.append(None)
                continue
            mask = error > self.tol
            # where reading is free, as few iterations as bring every matrix within half the tolerance
            z, after = penalty.polar_correction(r, until=self.tol / 2 if free else None)
            z.diagonal(dim1=-2, dim2=-1).sub_(1)
            out = chunk.delta if chunk.delta is not None else torch.empty_like(mats)
            torch.bmm(mats, z.to(mats.dtype), out=out)
            if free:
                self._polar_where_unconverged(mats, out, mask, after)
            torch.where(mask, out, penalty._zero(out), out=out)
            corrected.append((chunk, mask, out))
        if all(c is None for c in corrected):
            return
        if delta is None:  # no workspaces: one chunk
            delta = corrected[0][2]
        for item, chunk in zip(corrected, self.chunks or [self.whole()]):
            if item is None:  # its rows still hold the soft step's update
                (delta if self.stack is None else delta[chunk.rows]).zero_()
        self.apply(delta)
        self._count(optimizer.state, [(c, m) for c, m, _ in filter(None, corrected)])

    def _polar_where_unconverged(self, mats: torch.Tensor, out: torch.Tensor, mask, after) -> None:
        # Where reading is free: a matrix the fixed iterations leave above the tolerance (a start
        # far from the manifold) takes the polar factor itself, by SVD.
        rows = [i for i, (m, e) in enumerate(zip(host.read(mask), host.read(after))) if m and not e <= self.tol]
        if rows:
            index = torch.tensor(rows, device=mats.device)
            out.index_copy_(0, index, penalty.polar(mats[index]) - mats[index])

    def _count(self, state: Any, corrected: list[tuple[Chunk, torch.Tensor]]) -> None:
        for chunk, mask in corrected:
            counts = []
            for piece, count in zip(self.pieces[chunk.params], chunk.counts):
                key = CORRECTIONS + piece.suffix
                own = state[piece.param]
                if key not in own:
                    own[key] = torch.zeros(count, dtype=torch.int64, device=mask.device)
                counts.append(own[key])
            torch._foreach_add_(counts, list(mask.reshape(-1).split(chunk.counts)))

    def apply(self, delta: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add ``delta`` to the pieces (through cached views where they exist), times ``keep``
        (0 where the step is skipped: ``found_inf``) where it is given."""
        updates = self.updates
        if updates is None or any(u is None for u in updates):
            cached = updates or [None] * len(self.params)
            updates = [
                layout.from_matrices(chunk, p.shape) if u is None else u
                for u, p, layout, chunk in zip(cached, self.params, self.layouts, delta.split(self.counts))
            ]
        if len(updates) == 1:  # a foreach call costs more than it saves on one tensor
            if keep is None:
                self.params[0].add_(updates[0])
            else:
                self.params[0].addcmul_(updates[0], keep)
        elif keep is None:
            torch._foreach_add_(self.params, updates)
        else:
            torch._foreach_addcmul_(self.params, updates, [keep] * len(updates))


def view_or_none(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """``t`` if it shares ``base``'s memory (a view that stays current), else None."""
    return t if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else None
