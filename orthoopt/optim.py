r"""Optimizers with a decoupled group-orthogonality step.

:class:`OrthoMixin` turns any :class:`torch.optim.Optimizer` subclass into one that also
pulls chosen groups of weight vectors towards orthonormality.  For every penalized
parameter, with :math:`\Phi_i` its matrices (:mod:`orthoopt.layout`), step :math:`t` is

.. math::
    \begin{aligned}
    &\Phi^{-} \leftarrow \theta_{t-1}                                     && \text{(value before the step)}\\
    &\theta_t \leftarrow \textsc{BaseStep}(\theta_{t-1}, g_t)              && \text{(torch's own update, untouched)}\\
    &R_i = \Phi_i^{-\top}\Phi_i^{-} - I,\quad S_i = h'(R_i)               && \text{(sign, or clamp}(R_i/\delta)\text{)}\\
    &\eta_i = \min\big(2\gamma\beta,\ \langle R_i,S_i\rangle / 2\|S_i\|_F^2,\ \tfrac14/\|S_i\|_\infty\big)\\
    &\Phi_i(\theta_t) \mathrel{+}= -\eta_i\, \Phi_i^{-} S_i
    \end{aligned}

with :math:`\gamma` the group's (scheduled) learning rate and :math:`\beta` its ``ortho``.
As AdamW decouples weight decay, the base optimizer's moments never see the penalty.
Without the two caps the step is exactly :math:`-\gamma\,\partial\mathcal{L}/\partial\Phi`;
the caps keep it from overshooting the manifold (see
:func:`orthoopt.penalty.safe_step_size`).  With ``ortho = 0`` everywhere the optimizer is
bitwise the base class.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import penalty, stiefel
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
    "ortho_manifold": "euclidean",
    "ortho_stabilize": "auto",
}
MODES = ("soft", "hard")
PENALTIES = ("l1", "frobenius")
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
        deltas = [_bucket_delta(bucket) for bucket in plan]
        with stiefel.grads_hidden(hard):
            super().step()
        stiefel.step_(self, hard)
        for bucket, delta in zip(plan, deltas):
            _apply(bucket, delta)
        return loss

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
                    items.append(stiefel.HardItem(p, layout, p.grad, group, name))
        stiefel.check(type(self), items)
        return items

    def _soft_plan(self) -> list[_Bucket]:
        """The buckets of this step, reused (with their workspaces) while nothing they
        depend on changes: groups, their ortho options, which grads are None, storages."""
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
            # β and lr only scale the step (read each step): scheduling them keeps the plan.
            options = tuple(group[k] for k in ORTHO_DEFAULTS if k != "ortho")
            grads = tuple((p.data_ptr(), None if p.grad is None else p.grad.is_sparse) for p in group["params"])
            key.append((options, grads))
        return tuple(key)

    def _build_soft_plan(self, workspaces: bool) -> list[_Bucket]:
        """Group the penalized matrices into buckets that share one batched matmul."""
        buckets: dict[tuple, _Bucket] = {}
        for gi, group in enumerate(self.param_groups):
            if not _penalized(group) or group["ortho_mode"] != "soft":
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue  # as torch skips it, and its decoupled weight decay with it
                name = _param_name(group, i, gi)
                if p.grad.is_sparse:
                    raise TypeError(f"{name} has a sparse gradient, which orthoopt does not support; use a dense one")
                layout = self._resolve(group, p, name)
                if layout is None:
                    continue
                m, l, n = layout.stack_shape(p.shape)
                key = (l, n, p.dtype, p.device, group["ortho_smoothing"], group["ortho_penalty"])
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = _Bucket(group["ortho_smoothing"], group["ortho_penalty"])
                bucket.add(p, layout, m, group)
        plan = list(buckets.values())
        if workspaces:
            for bucket in plan:
                bucket.allocate()
        return plan

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


def _soft_eta(group: dict) -> Any:
    """The group's penalty step ``2γβ`` (a tensor when its lr is one)."""
    return 2 * group["lr"] * group["ortho"]


class _Bucket:
    """Matrices of one shape, dtype, device and penalty: one batched matmul.

    With :meth:`allocate`, the bucket owns the workspaces of its step (residual,
    direction, product, and the stack of several parameters), so that a cached bucket
    allocates nothing of the parameters' size from its second step on.
    """

    def __init__(self, smoothing: float, kind: str):
        self.smoothing = smoothing
        self.kind = kind
        self.params: list[torch.Tensor] = []
        self.layouts: list[Layout] = []
        self.counts: list[int] = []
        self.groups: list[dict] = []
        self.views: list[torch.Tensor] | None = None
        self.r: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.s_cast: torch.Tensor | None = None
        self.stack: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.updates: list[torch.Tensor | None] | None = None

    def add(self, p: torch.Tensor, layout: Layout, count: int, group: dict) -> None:
        self.params.append(p)
        self.layouts.append(layout)
        self.counts.append(count)
        self.groups.append(group)

    def allocate(self) -> None:
        """Workspaces, and views of the parameters, for every later step."""
        self.views = [layout.matrices(p) for p, layout in zip(self.params, self.layouts)]
        first = self.views[0]
        m, l, n = sum(self.counts), first.shape[1], first.shape[2]
        wide = torch.float32 if first.dtype in penalty._HALF else first.dtype
        self.r = first.new_empty((m, n, n), dtype=wide)
        self.s = torch.empty_like(self.r)
        if wide != first.dtype:
            self.s_cast = first.new_empty((m, n, n))
        if len(self.params) == 1:
            # The product is written straight into a parameter-shaped buffer, so that
            # the update is one contiguous subtraction whatever the layout.
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
        # A single parameter's product lives in its update buffer; several share the stack's.
        held = [self.r, self.s, self.s_cast, self.stack, self.updates[0] if self.stack is None else self.delta]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def matrices(self) -> torch.Tensor:
        mats = self.views or [layout.matrices(p) for p, layout in zip(self.params, self.layouts)]
        return mats[0] if len(mats) == 1 else torch.cat(mats, out=self.stack)

    def eta(self, like: torch.Tensor) -> torch.Tensor | float:
        """``2γβ``: one number for the bucket, or one per matrix when its groups differ."""
        etas = [_soft_eta(g) for g in self.groups]
        first = etas[0]
        # Tensor learning rates are never compared: that would sync, and break torch.compile.
        if all(g is self.groups[0] for g in self.groups):
            return first
        if _is_number(first) and all(_is_number(e) and e == first for e in etas):
            return first
        return torch.cat(
            [torch.as_tensor(e, dtype=like.dtype, device=like.device).expand(c) for e, c in zip(etas, self.counts)]
        )

    def parameter_updates(self, delta: torch.Tensor) -> list[torch.Tensor]:
        """``delta`` in the parameters' shapes (cached views where they exist)."""
        if self.updates is not None and all(u is not None for u in self.updates):
            return self.updates
        cached = self.updates or [None] * len(self.params)
        return [
            layout.from_matrices(chunk, p.shape) if u is None else u
            for u, p, layout, chunk in zip(cached, self.params, self.layouts, delta.split(self.counts))
        ]


def _view_or_none(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """``t`` if it shares ``base``'s memory (a view that stays current), else None."""
    return t if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else None


def _bucket_delta(bucket: _Bucket) -> torch.Tensor:
    """``η_i Φ_i S_i`` for every matrix of the bucket, at the parameters' current values;
    :func:`_apply` subtracts it (the sign is folded there, bitwise the same as adding ``-η_i Φ_i S_i``)."""
    mats = bucket.matrices()
    r = penalty._residual(mats, out=bucket.r)
    s = penalty._direction(r, bucket.smoothing, bucket.kind, out=bucket.s)
    eta = penalty._safe_step_size(r, s, bucket.eta(r), scratch=r)  # r is spent here
    # A non-finite matrix gets no step, so that its NaN/Inf stays where it is.
    eta = eta.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    s.mul_(eta[:, None, None])
    if s.dtype != mats.dtype:
        s = s.to(mats.dtype) if bucket.s_cast is None else bucket.s_cast.copy_(s)
    return torch.bmm(mats, s, out=bucket.delta)


def _apply(bucket: _Bucket, delta: torch.Tensor) -> None:
    updates = bucket.parameter_updates(delta)
    if len(updates) == 1:
        bucket.params[0].sub_(updates[0])  # a foreach call costs more than it saves on one tensor
    else:
        torch._foreach_sub_(bucket.params, updates)


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


def polar(mats: torch.Tensor) -> torch.Tensor:
    """The nearest matrices with orthonormal columns, ``U Vᵀ`` from the thin SVD."""
    wide = mats.float() if mats.dtype in (torch.float16, torch.bfloat16) else mats
    u, _, vh = torch.linalg.svd(wide, full_matrices=False)
    return (u @ vh).to(mats.dtype)


@torch.no_grad()
def project_(target: torch.optim.Optimizer | nn.Module | Iterable[torch.Tensor], layout: str = "auto") -> None:
    """Snap each constrained parameter to its nearest orthonormal point (the polar factor).

    ``target`` is an ortho optimizer (its groups' layouts, penalized groups only), a model
    (the parameters :func:`param_groups` would penalize, with ``layout``), or parameters.
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
        if lay is not None:
            p.copy_(lay.from_matrices(polar(lay.matrices(p)), p.shape))


def named_orthogonality_errors(model: nn.Module, layout: str = "auto", **kwargs: Any) -> dict[str, float]:
    """``{name: max error}`` for every parameter :func:`param_groups` would penalize."""
    return {n: _max_error(lay, p) for n, p, lay in _constrained(model, layout, **kwargs)}
