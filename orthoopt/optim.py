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
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import distributed, penalty, soft, stiefel
from .layout import Layout, resolve_layout
from .options import ORTHO_DEFAULTS, check_options, param_key, param_name, penalized, same_layout
from .selection import constrained, param_groups

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
        ortho_every: int = 1,
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
                "ortho_every": ortho_every,
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
            name = param_name(group, i, group_index)
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names the offending type
            if id(p) in seen:
                raise ValueError(f"{name} appears twice in param group {group_index}; pass each parameter once")
            seen.add(id(p))
            if penalized(group) and p.is_complex():
                raise TypeError(
                    f"{name} is complex ({p.dtype}); orthoopt's orthogonality is for real parameters: "
                    "put it in a group with ortho=0, or use torch.view_as_real"
                )
            if penalized(group):
                self._resolve(group, p, name)
        if penalized(group) and group["ortho_mode"] == "hard":
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
                if key not in saved or not penalized(group) or saved[key] == group[key]:
                    continue
                if key == "ortho_layout" and all(same_layout(saved[key], group[key], p.shape) for p in group["params"]):
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
        plan = [bucket for bucket in self._soft_plan() if soft.due(bucket)]  # ortho_every
        sharded = []
        for bucket in plan:
            if isinstance(bucket, distributed.ShardedBucket):
                sharded.append((bucket, bucket.delta()))
                continue
            for chunk, finite in bucket.prepare():  # the parts holding NaN or Inf, if any
                self._report_nonfinite(chunk, finite)
        with stiefel.grads_hidden(hard) if hard else contextlib.nullcontext():
            super().step()
        if hard:
            stiefel.step_(self, hard)
        for bucket in plan:
            if isinstance(bucket, soft.Bucket):
                bucket.finish(self.state)  # 'auto' takes β from the base update; then the addition
        for bucket, delta in sharded:
            bucket.finish(delta, self.state)  # its 'auto' entries, which need the update
            bucket.apply(delta)
        soft.advance(self.param_groups)
        return loss

    def _hard_plan(self) -> list[stiefel.HardItem]:
        """The parameters that take a Riemannian step instead of the base update (checked)."""
        items = []
        for gi, group in enumerate(self.param_groups):
            if not penalized(group) or group["ortho_mode"] != "hard":
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = param_name(group, i, gi)
                layout = self._resolve(group, p, name)
                if layout is not None:
                    distributed.refuse_hard(p, name)
                    items.append(stiefel.HardItem(p, layout, p.grad, group, name))
        stiefel.check(type(self), items)
        return items

    def _soft_plan(self) -> list[soft.Bucket | distributed.ShardedBucket]:
        """The buckets of this step, reused with their workspaces while nothing they depend
        on changes: the groups' ortho options, which grads are None, the storages."""
        if torch.compiler.is_compiling():
            return soft.build_plan(self.param_groups, workspaces=False)  # the compiler plans its own buffers
        key = soft.plan_key(self.param_groups)
        cache = getattr(self, "_soft_cache", None)
        if cache is None or cache[0] != key:
            cache = self._soft_cache = (key, soft.build_plan(self.param_groups, workspaces=True))
        return cache[1]

    def _report_nonfinite(self, bucket: soft.Chunk, finite: torch.Tensor) -> None:
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
            if not penalized(group):
                continue
            for i, p in enumerate(group["params"]):
                layout = self._resolve(group, p, param_name(group, i, gi))
                if layout is not None:
                    errors[param_key(group, i, gi)] = _max_error(layout, p)
        return errors


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
    ortho_every (int): the soft step at every k-th call of step(), k times as large (default 1).
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
def _max_error(layout: Layout, p: torch.Tensor) -> float:
    if distributed.is_dtensor(p):
        return distributed.max_error(layout, p)
    return penalty.max_error(layout.matrices(p.detach()))


@torch.no_grad()
def project_(target: torch.optim.Optimizer | nn.Module | Iterable[torch.Tensor], layout: str = "auto") -> None:
    """Snap each constrained parameter to its nearest orthonormal point (the polar factor).

    ``target`` is an ortho optimizer (its groups' layouts, penalized groups only), a model
    (the parameters :func:`param_groups` would penalize, with ``layout``), or parameters.
    On FSDP2-sharded parameters it is a collective: every rank must call it.
    """
    if isinstance(target, OrthoMixin):
        items = [
            (p, target._resolve(g, p, param_name(g, i, gi)))
            for gi, g in enumerate(target.param_groups)
            if penalized(g)
            for i, p in enumerate(g["params"])
        ]
    elif isinstance(target, nn.Module):
        items = [(p, lay) for _, p, lay in constrained(target, layout)]
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
    return {n: _max_error(lay, p) for n, p, lay in constrained(model, layout, **kwargs)}
