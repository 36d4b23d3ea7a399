r"""Optimizers with a decoupled group-orthogonality step.

:class:`OrthoMixin` turns any :class:`torch.optim.Optimizer` subclass into one that also
pulls chosen groups of weight vectors towards orthonormality.  For every penalized
parameter, with :math:`\Phi_i` its matrices (:mod:`orthoopt.layout`), step :math:`t` is

.. math::
    \begin{aligned}
    &\Phi^{-} \leftarrow \theta_{t-1}                                     && \text{(value before the step)}\\
    &\theta_t \leftarrow \textsc{BaseStep}(\theta_{t-1}, g_t)              && \text{(torch's own update)}\\
    &R_i = \Phi_i^{-\top}\Phi_i^{-} - I,\qquad \eta = 2\gamma\beta\\
    &S_i = \operatorname{clamp}\big(R_i / \max(\delta, 2\eta), -1, 1\big)   && \text{(sign}(R_i)\text{ where } |R_i| \ge 2\eta)\\
    &\eta_i = \min\big(\eta,\ \max|R_i| / 2\max|S_i|,\ \tfrac14/\|S_i\|_2\big)\\
    &\Phi_i(\theta_t) \mathrel{+}= -\eta_i\, \Phi_i^{-} S_i
    \end{aligned}

with :math:`\gamma` the group's (scheduled) learning rate, :math:`\beta` its ``ortho`` and
:math:`\delta` its ``ortho_smoothing``.  As AdamW decouples weight decay, the base
optimizer's moments never see the penalty.  Where every entry of :math:`R_i` is at least
:math:`2\eta` and the caps are inactive, the step is exactly
:math:`-\gamma\,\partial\mathcal{L}/\partial\Phi`; smaller entries are moved to zero instead
of across it (the linearised proximal step of :math:`|\cdot|`), and the caps keep the step
from overshooting or diverging (:func:`orthoopt.penalty.safe_step_size`).  With
``ortho = 0`` everywhere the optimizer is bitwise the base class.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import auto, distributed, penalty, stiefel
from .layout import Layout, canonical_layout, resolve_layout

__all__ = [
    "OrthoMixin",
    "OrthoSGD",
    "OrthoAdam",
    "OrthoAdamW",
    "orthogonalize",
    "param_groups",
    "project_",
    "ORTHO_DEFAULTS",
]

ORTHO_DEFAULTS: dict[str, Any] = {
    "ortho": 0.0,
    "ortho_smoothing": 0.0,
    "ortho_layout": "auto",
    "ortho_mode": "soft",
    "ortho_penalty": "l1",
    "ortho_nonfinite": "warn",
    "ortho_manifold": "euclidean",
    "ortho_stabilize": "auto",
}
MODES = ("soft", "hard")
PENALTIES = ("l1", "frobenius")
NONFINITE = ("warn", "skip", "raise")
MANIFOLDS = tuple(stiefel.MANIFOLDS)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate the ortho options of a group (or the defaults); return them canonicalised."""
    out = dict(options)
    ortho = out.get("ortho", 0.0)
    if not (_is_number(ortho) or ortho == "auto"):
        raise TypeError(f"{where}: ortho must be a number >= 0 (the penalty weight β) or 'auto', got {ortho!r}")
    if _is_number(ortho) and not (ortho >= 0 and math.isfinite(ortho)):
        raise ValueError(f"{where}: ortho must be a finite number >= 0 (0 switches the penalty off), got {ortho!r}")
    smoothing = out.get("ortho_smoothing", 0.0)
    if not _is_number(smoothing):
        raise TypeError(f"{where}: ortho_smoothing must be a number >= 0 (the Huber threshold δ), got {smoothing!r}")
    if not (smoothing >= 0 and math.isfinite(smoothing)):
        raise ValueError(
            f"{where}: ortho_smoothing must be a finite number >= 0 (0 means exact sign()), got {smoothing!r}"
        )
    mode = out.get("ortho_mode", "soft")
    if mode not in MODES:
        raise ValueError(f"{where}: ortho_mode must be one of {MODES}, got {mode!r}")
    pen = out.get("ortho_penalty", "l1")
    if pen not in PENALTIES:
        raise ValueError(f"{where}: ortho_penalty must be one of {PENALTIES}, got {pen!r}")
    policy = out.get("ortho_nonfinite", "warn")
    if policy not in NONFINITE:
        raise ValueError(f"{where}: ortho_nonfinite must be one of {NONFINITE}, got {policy!r}")
    manifold = out.get("ortho_manifold", "euclidean")
    if manifold not in MANIFOLDS:
        raise ValueError(
            f"{where}: ortho_manifold must be one of {MANIFOLDS} (hard mode's geoopt manifold), got {manifold!r}"
        )
    period = out.get("ortho_stabilize", "auto")
    if not (
        period is None or period == "auto" or (isinstance(period, int) and not isinstance(period, bool) and period >= 1)
    ):
        raise ValueError(
            f"{where}: ortho_stabilize must be 'auto', None (never) or a whole number >= 1 of hard steps "
            f"between re-projections, got {period!r}"
        )
    if "ortho_layout" in out:
        out["ortho_layout"] = canonical_layout(out["ortho_layout"], f"{where}: ortho_layout")
    return out


def param_key(group: dict, index: int, group_index: int) -> str:
    """The parameter's name when the optimizer was given names, else ``group{g}.param{i}``."""
    names = group.get("param_names")
    if names is not None and index < len(names):
        return names[index]
    return f"group{group_index}.param{index}"


def _param_name(group: dict, index: int, group_index: int) -> str:
    return f"parameter '{param_key(group, index, group_index)}'"


def _same_layout(a: str, b: str, shape: torch.Size) -> bool:
    try:
        return resolve_layout(a, shape, "") == resolve_layout(b, shape, "")
    except ValueError:
        return False


def _penalized(group: dict) -> bool:
    return group["ortho"] == "auto" or group["ortho"] > 0


class OrthoMixin:
    """Adds ``ortho``, ``ortho_smoothing``, ``ortho_layout``, ``ortho_mode`` and
    ``ortho_penalty`` to a torch optimizer, as defaults and per parameter group."""

    def __init__(
        self,
        params,
        *args,
        ortho: float | str = 0.0,
        ortho_smoothing: float = 0.0,
        ortho_layout: str | Layout = "auto",
        ortho_mode: str = "soft",
        ortho_penalty: str = "l1",
        ortho_nonfinite: str = "warn",
        ortho_manifold: str = "euclidean",
        ortho_stabilize: int | str | None = "auto",
        **kwargs,
    ):
        self._ortho_defaults = check_options(
            {
                "ortho": ortho,
                "ortho_smoothing": ortho_smoothing,
                "ortho_layout": ortho_layout,
                "ortho_mode": ortho_mode,
                "ortho_penalty": ortho_penalty,
                "ortho_nonfinite": ortho_nonfinite,
                "ortho_manifold": ortho_manifold,
                "ortho_stabilize": ortho_stabilize,
            },
            "optimizer defaults",
        )
        super().__init__(params, *args, **kwargs)
        self.defaults.update(self._ortho_defaults)

    # -- construction and checkpoints -------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(getattr(self, "param_groups", ()))
        where = f"param group {index}"
        for key, value in self._ortho_defaults.items():
            param_group.setdefault(key, value)
        param_group.update(check_options(param_group, where))
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, (list, tuple)):
            params = list(params)
        candidate = {**param_group, "params": params}
        if params and isinstance(params[0], tuple):
            candidate["param_names"] = [n for n, _ in params]
            candidate["params"] = [p for _, p in params]
        self._check_params(candidate, index)
        super().add_param_group(param_group)
        self._soft_cache = None

    def _check_params(self, group: dict, group_index: int) -> None:
        seen: set[int] = set()
        for i, p in enumerate(group["params"]):
            name = _param_name(group, i, group_index)
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names the offending type
            if id(p) in seen:
                raise ValueError(f"{name} appears twice in param group {group_index}; pass each parameter once")
            seen.add(id(p))
            if _penalized(group) and p.is_complex():
                raise TypeError(
                    f"{name} is complex ({p.dtype}); orthoopt's orthogonality is for real parameters: "
                    "put it in a group with ortho=0, or use torch.view_as_real"
                )
            if _penalized(group):
                self._resolve(group, p, name)
        if _penalized(group) and group["ortho_mode"] == "hard":
            stiefel.update_rule(type(self))

    def _resolve(self, group: dict, p: torch.Tensor, name: str) -> Layout | None:
        return resolve_layout(group["ortho_layout"], p.shape, name)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, refusing a state saved under another layout, mode or parameter shape,
        and keeping float32 state of half-precision parameters in float32."""
        saved_groups = state_dict["param_groups"]
        params = [p for g in self.param_groups for p in g["params"]]
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key in ("ortho_layout", "ortho_mode", "ortho_penalty"):
                if key not in saved or not _penalized(group) or saved[key] == group[key]:
                    continue
                if key == "ortho_layout" and all(
                    _same_layout(saved[key], group[key], p.shape) for p in group["params"]
                ):
                    continue  # e.g. 'auto' and the layout it resolves to
                raise ValueError(
                    f"param group {gi}: the checkpoint was saved with {key}={saved[key]!r} but this "
                    f"optimizer has {key}={group[key]!r}; construct the optimizer with {key}={saved[key]!r} "
                    "to resume, or start from a fresh optimizer state"
                )
        saved_ids = [i for g in saved_groups for i in g["params"]]
        for index, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape and key != "step":
                    if value.numel() == p.numel() or key.startswith(("ortho", "stiefel")):
                        continue  # a stacked view of the same parameter, or orthoopt's own per-matrix state
                    raise ValueError(
                        f"the checkpoint's state {key!r} for parameter {index} has shape {tuple(value.shape)}, "
                        f"but the parameter has shape {tuple(p.shape)}: it belongs to another model"
                    )
        super().load_state_dict(state_dict)
        for index, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                loaded = self.state[p].get(key)
                if (
                    isinstance(value, torch.Tensor)
                    and isinstance(loaded, torch.Tensor)
                    and value.dtype == torch.float32
                    and p.dtype in (torch.float16, torch.bfloat16)
                    and loaded.dtype != torch.float32
                ):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._soft_cache = None
        # Checkpoints written before a key existed (or by the plain torch optimizer) get
        # this optimizer's defaults, the way torch's optimizers fill keys they added later.
        defaults = {**ORTHO_DEFAULTS, **{k: v for k, v in self.defaults.items() if k in ORTHO_DEFAULTS}}
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hard = self._hard_plan()
        plan = self._soft_plan()
        deltas, staged = [], []
        for bucket in plan:
            if isinstance(bucket, distributed.ShardedBucket):
                deltas.append((bucket, bucket.delta()))
                continue
            mats = bucket.matrices()
            r = penalty.residual(mats, out=bucket.r)
            r_max = penalty.max_abs(r)  # the step needs it; NaN or Inf where a matrix is not finite
            finite = torch.isfinite(r_max)
            if bucket.nonfinite != "skip":  # a host sync, which "skip" saves
                if bool(finite.all()):
                    finite = True
                else:
                    self._report_nonfinite(bucket, finite)
            if bucket.auto:  # β comes from this step's base update: finish after it
                staged.append((bucket, mats.clone(), r, r_max, finite))
            else:
                deltas.append((bucket, bucket.step(r, mats, bucket.eta(r), finite, r_max)))
        with stiefel.grads_hidden(hard) if hard else contextlib.nullcontext():
            super().step()
        if hard:
            stiefel.step_(self, hard)
        for bucket, before, r, r_max, finite in staged:
            lr = bucket.per_matrix(bucket.lrs(), r)
            eta = 2 * lr * self._auto_beta(bucket, before, finite, lr)
            deltas.append((bucket, bucket.step(r, before, eta, finite, r_max)))
        for bucket, delta in deltas:
            if isinstance(bucket, distributed.ShardedBucket):
                bucket.finish(delta, self.state)  # its 'auto' entries, which need the update
            bucket.apply(delta)
        return loss

    def _auto_beta(
        self, bucket: _Bucket, before: torch.Tensor, finite: torch.Tensor | bool, lr: torch.Tensor
    ) -> torch.Tensor:
        """β per matrix for ``ortho='auto'`` (:mod:`orthoopt.auto`), from this step's base update."""
        lam = auto.threshold(auto.update_products(before, bucket.matrices(), lr), finite & (lr > 0))
        estimates = [auto.remember(self.state[p], new) for p, new in zip(bucket.params, lam.split(bucket.counts))]
        return auto.AUTO_SAFETY * torch.cat(estimates)

    def _hard_plan(self) -> list[stiefel.HardItem]:
        """The parameters that take a Riemannian step instead of the base update (checked)."""
        items = []
        for gi, group in enumerate(self.param_groups):
            if not _penalized(group) or group["ortho_mode"] != "hard":
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = _param_name(group, i, gi)
                layout = self._resolve(group, p, name)
                if layout is not None:
                    distributed.refuse_hard(p, name)
                    items.append(stiefel.HardItem(p, layout, p.grad, group, name))
        stiefel.check(type(self), items)
        return items

    def _soft_plan(self) -> list[_Bucket | distributed.ShardedBucket]:
        """The buckets of this step, reused with their workspaces while nothing they depend
        on changes: the groups' ortho options, which grads are None, the storages."""
        if torch.compiler.is_compiling():
            return self._build_soft_plan(workspaces=False)  # the compiler plans its own buffers
        key = self._soft_key()
        cache = getattr(self, "_soft_cache", None)
        if cache is None or cache[0] != key:
            cache = self._soft_cache = (key, self._build_soft_plan(workspaces=True))
        return cache[1]

    def _soft_key(self) -> tuple:
        key = []
        for group in self.param_groups:
            if not _penalized(group) or group["ortho_mode"] != "soft":
                key.append(None)
                continue
            # β (unless 'auto') and lr only scale the step and are read at every step.
            options = tuple(group[k] for k in ORTHO_DEFAULTS if k != "ortho") + (group["ortho"] == "auto",)
            grads = tuple((p.data_ptr(), None if p.grad is None else p.grad.is_sparse) for p in group["params"])
            key.append((options, grads))
        return tuple(key)

    def _build_soft_plan(self, workspaces: bool) -> list[_Bucket | distributed.ShardedBucket]:
        """Group the penalized matrices into buckets that share one batched matmul."""
        buckets: dict[Any, Any] = {}
        for gi, group in enumerate(self.param_groups):
            if not _penalized(group) or group["ortho_mode"] != "soft":
                continue
            auto = group["ortho"] == "auto"
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue  # as torch skips it, and its decoupled weight decay with it
                name = _param_name(group, i, gi)
                if p.grad.is_sparse:
                    raise TypeError(f"{name} has a sparse gradient, which orthoopt does not support; use a dense one")
                layout = self._resolve(group, p, name)
                if layout is None:
                    continue
                if distributed.is_dtensor(p):  # FSDP2: the Gram needs the other ranks' shards
                    buckets.setdefault("dtensor", distributed.ShardedBucket()).add(p, layout, group)
                    continue
                m, l, n = layout.stack_shape(p.shape)
                options = (group["ortho_smoothing"], group["ortho_penalty"], group["ortho_nonfinite"], auto)
                key = (l, n, p.dtype, p.device, *options)
                if key not in buckets:
                    buckets[key] = _Bucket(*options)
                buckets[key].add(p, layout, m, group, name)
        plan = list(buckets.values())
        if workspaces:
            for bucket in plan:
                if isinstance(bucket, _Bucket):
                    bucket.allocate()
        return plan

    def _report_nonfinite(self, bucket: _Bucket, finite: torch.Tensor) -> None:
        bad = [name for name, ok in zip(bucket.names, finite.split(bucket.counts)) if not bool(ok.all())]
        message = (
            f"{', '.join(bad)} holds NaN or Inf: the orthogonality step skips its non-finite matrices "
            "(other matrices and parameters are unaffected). Lower the learning rate, or clip gradients"
        )
        if bucket.nonfinite == "raise":
            raise FloatingPointError(message + "; nothing was changed by this step")
        fresh = [n for n in bad if n not in self.__dict__.setdefault("_ortho_warned", set())]
        if fresh:
            self._ortho_warned.update(fresh)
            warnings.warn(
                message + " (warned once per parameter; ortho_nonfinite='raise' to stop instead)",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- reading the constraint ---------------------------------------------------------
    @torch.no_grad()
    def orthogonality_errors(self) -> dict[str, float]:
        """``{name: max_jk |Φ_iᵀΦ_i - I|_jk over the parameter's matrices}`` for every
        parameter under a constraint (soft or hard), for logging."""
        errors = {}
        for gi, group in enumerate(self.param_groups):
            if not _penalized(group):
                continue
            for i, p in enumerate(group["params"]):
                layout = self._resolve(group, p, _param_name(group, i, gi))
                if layout is not None:
                    errors[param_key(group, i, gi)] = _max_error(layout, p)
        return errors


class _Bucket:
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
        self.views = [_view_or_none(m, p) for m, p in zip(mats, self.params)]
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
                _view_or_none(layout.from_matrices(chunk, p.shape), self.delta)
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
        if _is_number(first) and all(_is_number(e) and e == first for e in etas):
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


def _view_or_none(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """``t`` if it shares ``base``'s memory (a view that stays current), else None."""
    return t if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else None


# -- the classes ------------------------------------------------------------------------
_CLASS_DOC = """{base} with a decoupled group-orthogonality step (see :mod:`orthoopt.optim`).

    Takes every argument of :class:`torch.optim.{base}`, plus, as defaults and per group:

    ortho (float or 'auto'): the penalty weight β >= 0; 0 switches it off.
    ortho_smoothing (float): Huber threshold δ >= 0 for sign(); 0 is the exact L1 penalty.
    ortho_layout (str): which vectors are orthonormal (:mod:`orthoopt.layout`); 'auto'.
    ortho_mode (str): 'soft' (this penalty step) or 'hard' (Stiefel manifold, geoopt).
    ortho_penalty (str): 'l1' (default) or 'frobenius' (the squared-Frobenius baseline).
    ortho_manifold (str): hard mode's geoopt manifold, 'euclidean' (QR) or 'canonical' (Cayley).
    ortho_stabilize (int, None or 'auto'): hard mode re-projects every that many steps
        (:mod:`orthoopt.stiefel`); 'auto' is every 10 for 'canonical', never for 'euclidean'.
"""


def orthogonalize(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Make ``Ortho<Name>``, a true subclass of ``optimizer_cls`` with the ortho options."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"orthogonalize expects a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(optimizer_cls, OrthoMixin):
        return optimizer_cls
    return type(
        f"Ortho{optimizer_cls.__name__}",
        (OrthoMixin, optimizer_cls),
        {"__doc__": _CLASS_DOC.format(base=optimizer_cls.__name__), "__module__": optimizer_cls.__module__},
    )


class OrthoSGD(OrthoMixin, torch.optim.SGD):
    __doc__ = _CLASS_DOC.format(base="SGD")


class OrthoAdam(OrthoMixin, torch.optim.Adam):
    __doc__ = _CLASS_DOC.format(base="Adam")


class OrthoAdamW(OrthoMixin, torch.optim.AdamW):
    __doc__ = _CLASS_DOC.format(base="AdamW")


# -- model helpers --------------------------------------------------------------------
_UNPENALIZED_MODULES = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def param_groups(
    model: nn.Module,
    ortho: float | str = 1.0,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    **options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a penalized group and an unpenalized one.

    Penalized: every parameter of 2 or more dimensions (Linear and Conv weights, raw 3-D
    tensors) outside embeddings and norm layers, whose name matches ``include`` (all when
    None) and not ``exclude``.  A pattern matches a name exactly, as a module prefix
    (``"head"`` matches ``"head.weight"``) or as a glob (``"*.bias"``).  ``options`` (e.g.
    ``ortho_smoothing``, ``ortho_layout``, ``ortho_mode``, ``lr``) go into the penalized group.
    Groups carry ``param_names`` so that errors and logs name parameters.
    """
    check_options({"ortho": ortho, **{k: v for k, v in options.items() if k in ORTHO_DEFAULTS}}, "param_groups")
    exclude = list(exclude)
    include = None if include is None else list(include)
    skip = {id(p) for mod in model.modules() if isinstance(mod, _UNPENALIZED_MODULES) for p in mod.parameters()}
    on: list[tuple[str, nn.Parameter]] = []
    off: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        wanted = (
            p.dim() >= 2
            and id(p) not in skip
            and not _matches(name, exclude)
            and (include is None or _matches(name, include))
        )
        (on if wanted else off).append((name, p))
    groups = []
    if on:
        groups.append({"params": [p for _, p in on], "param_names": [n for n, _ in on], "ortho": ortho, **options})
    if off:
        groups.append({"params": [p for _, p in off], "param_names": [n for n, _ in off], "ortho": 0.0})
    return groups


def _max_error(layout: Layout, p: torch.Tensor) -> float:
    if distributed.is_dtensor(p):
        return distributed.max_error(layout, p)
    return penalty.residual(layout.matrices(p.detach())).abs().max().item()


def _constrained(model: nn.Module, layout: str, **kwargs: Any) -> list[tuple[str, torch.Tensor, Layout]]:
    """(name, parameter, layout) for each parameter :func:`param_groups` would penalize."""
    named = dict(model.named_parameters())
    out = []
    for group in param_groups(model, ortho_layout=layout, **kwargs):
        if group["ortho"]:
            for n in group["param_names"]:
                lay = resolve_layout(layout, named[n].shape, f"parameter '{n}'")
                if lay is not None:
                    out.append((n, named[n], lay))
    return out


@torch.no_grad()
def project_(target: torch.optim.Optimizer | nn.Module | Iterable[torch.Tensor], layout: str = "auto") -> None:
    """Snap each constrained parameter to its nearest orthonormal point (the polar factor).

    ``target`` is an ortho optimizer (its groups' layouts, penalized groups only), a model
    (the parameters :func:`param_groups` would penalize, with ``layout``), or parameters.
    On FSDP2-sharded parameters it is a collective: every rank must call it.
    """
    if isinstance(target, OrthoMixin):
        items = [
            (p, target._resolve(g, p, _param_name(g, i, gi)))
            for gi, g in enumerate(target.param_groups)
            if _penalized(g)
            for i, p in enumerate(g["params"])
        ]
    elif isinstance(target, nn.Module):
        items = [(p, lay) for _, p, lay in _constrained(target, layout)]
    else:
        items = [(p, resolve_layout(layout, p.shape, f"parameter {i}")) for i, p in enumerate(target)]
    for p, lay in items:
        if lay is None:
            continue
        if distributed.is_dtensor(p):  # FSDP2: the SVD needs whole matrices
            distributed.project_(p, lay)
        else:
            p.copy_(lay.from_matrices(penalty.polar(lay.matrices(p)), p.shape))


def named_orthogonality_errors(model: nn.Module, layout: str = "auto", **kwargs: Any) -> dict[str, float]:
    """``{name: max error}`` for every parameter :func:`param_groups` would penalize."""
    return {n: _max_error(lay, p) for n, p, lay in _constrained(model, layout, **kwargs)}
