r"""The soft step of unsharded parameters: buckets of same-shaped matrices, one batched matmul each.

The optimizer (:mod:`orthoopt.optim`) asks :func:`build_plan` for the buckets of a step and
keeps them, with their workspaces, while :func:`plan_key` stays the same.  Each
:class:`Bucket` stacks the matrices of its parameters (views where the layout allows) and
computes :func:`orthoopt.penalty.penalty_step` for all of them at once; sharded (FSDP2)
parameters go to :class:`orthoopt.distributed.ShardedBucket` instead.
"""

from __future__ import annotations

from typing import Any

import torch

from . import distributed, penalty
from .layout import Layout, resolve_layout
from .options import ORTHO_DEFAULTS, is_number, param_name, penalized

__all__ = ["Bucket", "build_plan", "plan_key", "view_or_none"]


def plan_key(param_groups: list[dict]) -> tuple:
    """What the plan depends on: the groups' ortho options, which grads are None, the storages."""
    key = []
    for group in param_groups:
        if not penalized(group) or group["ortho_mode"] != "soft":
            key.append(None)
            continue
        # β (unless 'auto') and lr only scale the step and are read at every step.
        options = tuple(group[k] for k in ORTHO_DEFAULTS if k != "ortho") + (group["ortho"] == "auto",)
        grads = tuple((p.data_ptr(), None if p.grad is None else p.grad.is_sparse) for p in group["params"])
        key.append((options, grads))
    return tuple(key)


def build_plan(param_groups: list[dict], workspaces: bool) -> list[Bucket | distributed.ShardedBucket]:
    """Group the penalized matrices into buckets that share one batched matmul."""
    buckets: dict[Any, Any] = {}
    for gi, group in enumerate(param_groups):
        if not penalized(group) or group["ortho_mode"] != "soft":
            continue
        auto = group["ortho"] == "auto"
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue  # as torch skips it, and its decoupled weight decay with it
            name = param_name(group, i, gi)
            if p.grad.is_sparse:
                raise TypeError(f"{name} has a sparse gradient, which orthoopt does not support; use a dense one")
            layout = resolve_layout(group["ortho_layout"], p.shape, name)
            if layout is None:
                continue
            if distributed.is_dtensor(p):  # FSDP2: the Gram needs the other ranks' shards
                buckets.setdefault("dtensor", distributed.ShardedBucket()).add(p, layout, group)
                continue
            m, l, n = layout.stack_shape(p.shape)
            options = (group["ortho_smoothing"], group["ortho_penalty"], group["ortho_nonfinite"], auto)
            key = (l, n, p.dtype, p.device, *options)
            if key not in buckets:
                buckets[key] = Bucket(*options)
            buckets[key].add(p, layout, m, group, name)
    plan = list(buckets.values())
    if workspaces:
        for bucket in plan:
            if isinstance(bucket, Bucket):
                bucket.allocate()
    return plan


class Bucket:
    """Matrices of one shape, dtype, device and penalty options: one batched matmul.

    :meth:`allocate` gives the bucket the workspaces of its step (residual, direction,
    product, and the stack of several parameters), so that a cached bucket allocates
    nothing of the parameters' size from its second step on.
    """

    def __init__(self, smoothing: float, kind: str, nonfinite: str, auto: bool):
        self.smoothing = smoothing
        self.kind = kind
        self.nonfinite = nonfinite
        self.auto = auto
        self.params: list[torch.Tensor] = []
        self.layouts: list[Layout] = []
        self.counts: list[int] = []
        self.groups: list[dict] = []
        self.names: list[str] = []
        self.views: list[torch.Tensor] | None = None
        self.r = self.s = self.stack = self.delta = None
        self.updates: list[torch.Tensor | None] | None = None

    def add(self, p: torch.Tensor, layout: Layout, count: int, group: dict, name: str) -> None:
        self.params.append(p)
        self.layouts.append(layout)
        self.counts.append(count)
        self.groups.append(group)
        self.names.append(name)

    def allocate(self) -> None:
        """Workspaces, and views of the parameters, for every later step."""
        mats = [layout.matrices(p) for p, layout in zip(self.params, self.layouts)]
        # A layout of a parameter in an unusual memory format (a channels_last conv weight)
        # gives a copy, not a view: a cached copy would go stale, so that one is re-read.
        self.views = [view_or_none(m, p) for m, p in zip(mats, self.params)]
        first = mats[0]
        m, l, n = sum(self.counts), first.shape[1], first.shape[2]
        wide = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
        self.r = first.new_empty((m, n, n), dtype=wide)
        self.s = torch.empty_like(self.r)
        if len(self.params) == 1:
            # The product goes straight into a parameter-shaped buffer, so that the update
            # is one contiguous addition whatever the layout.
            p, layout = self.params[0], self.layouts[0]
            update = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            self.delta = layout.matrices(update)
            self.updates = [update]
        else:
            self.stack = first.new_empty((m, l, n))
            self.delta = torch.empty_like(self.stack)
            chunks = self.delta.split(self.counts)
            self.updates = [
                view_or_none(layout.from_matrices(chunk, p.shape), self.delta)
                for p, layout, chunk in zip(self.params, self.layouts, chunks)
            ]

    def workspace_bytes(self) -> int:
        held = [self.r, self.s, self.stack, self.updates[0] if self.stack is None else self.delta]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def matrices(self) -> torch.Tensor:
        views = self.views or [None] * len(self.params)
        mats = [layout.matrices(p) if v is None else v for v, p, layout in zip(views, self.params, self.layouts)]
        return mats[0] if len(mats) == 1 else torch.cat(mats, out=self.stack)

    def step(
        self, r: torch.Tensor, mats: torch.Tensor, eta: Any, finite: torch.Tensor | bool, r_max: torch.Tensor
    ) -> torch.Tensor:
        return penalty.penalty_step(
            r, mats, self.smoothing, self.kind, eta, s_out=self.s, out=self.delta, finite=finite, r_max=r_max
        )

    def lrs(self) -> list[Any]:
        return [g["lr"] for g in self.groups]

    def eta(self, like: torch.Tensor) -> torch.Tensor | float:
        """``2γβ``: one number for the bucket, or one per matrix when its groups differ."""
        etas = [2 * g["lr"] * g["ortho"] for g in self.groups]
        first = etas[0]
        # Tensor learning rates are never compared: that would sync, and break torch.compile.
        if all(g is self.groups[0] for g in self.groups):
            return first
        if is_number(first) and all(is_number(e) and e == first for e in etas):
            return first
        return self.per_matrix(etas, like)

    def per_matrix(self, values: list[Any], like: torch.Tensor) -> torch.Tensor:
        """One value per parameter, repeated for each of its matrices."""
        return torch.cat(
            [torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(c) for v, c in zip(values, self.counts)]
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
