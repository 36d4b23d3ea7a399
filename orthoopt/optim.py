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
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import distributed, guard, penalty, soft, stiefel, wrappers
from .layout import Layout, resolve_layout
from .options import (
    ORTHO_DEFAULTS,
    check_known_options,
    check_options,
    check_step_size,
    name_unnamed,
    ortho_items,
    param_key,
    param_name,
    penalized,
    real_number,
    report_nonfinite,
    same_layout,
)
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
        ortho_init: str = "warn",
        ortho_second_moment: str = "mean",
        ortho_every: int = 1,
        **kwargs,
    ):
        check_known_options(kwargs, "optimizer defaults")  # the rest are the base class's
        options = check_options(
            {
                "ortho": ortho,
                "ortho_smoothing": ortho_smoothing,
                "ortho_layout": ortho_layout,
                "ortho_mode": ortho_mode,
                "ortho_penalty": ortho_penalty,
                "ortho_nonfinite": ortho_nonfinite,
                "ortho_manifold": ortho_manifold,
                "ortho_stabilize": ortho_stabilize,
                "ortho_init": ortho_init,
                "ortho_second_moment": ortho_second_moment,
                "ortho_every": ortho_every,
            },
            "optimizer defaults",
        )
        # The defaults live in self.defaults, the one place that torch's __getstate__ keeps
        # (copy.deepcopy, pickle); torch's __init__ sets it up and calls add_param_group at
        # once, so they wait here for the first add_param_group to move them in.
        self.__dict__["_ortho_pending"] = options
        try:
            super().__init__(params, *args, **kwargs)
        finally:
            self.__dict__.pop("_ortho_pending", None)
        self.defaults.update(options)

    def _ortho_defaults(self) -> dict[str, Any]:
        pending = self.__dict__.pop("_ortho_pending", None)
        if pending is not None:
            self.defaults.update(pending)
        return {key: self.defaults.get(key, value) for key, value in ORTHO_DEFAULTS.items()}

    # -- construction and checkpoints -------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(getattr(self, "param_groups", ()))
        where = f"param group {index}"
        for key, value in self._ortho_defaults().items():
            param_group.setdefault(key, value)
        param_group.update(check_options(param_group, where))
        params = param_group["params"]
        if isinstance(params, set):
            # torch's own refusal (its add_param_group would only see the list made below)
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets will change between runs. Please use a list instead."
            )
        # One pass over a generator or a filter object (torch's per-layer idiom) consumes it:
        # the list made here is what both orthoopt's checks and torch's add_param_group see.
        param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        name_unnamed(param_group, index, getattr(self, "param_groups", ()))
        candidate = {**param_group, "params": params}
        if params and isinstance(params[0], tuple):
            candidate["param_names"] = [n for n, _ in params]
            candidate["params"] = [p for _, p in params]
        self._check_params(candidate, index)
        super().add_param_group(param_group)
        self._soft_cache = None

    def _check_params(self, group: dict, group_index: int) -> None:
        if penalized(group) and group.get("differentiable", self.defaults.get("differentiable", False)):
            _refuse_differentiable(group, group_index)
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
                layout = self._resolve(group, p, name)
                lr = real_number(group.get("lr", self.defaults.get("lr")))
                if layout is not None and group["ortho_mode"] == "soft" and group["ortho"] != "auto" and lr is not None:
                    check_step_size(2 * lr * group["ortho"] * group["ortho_every"], p.dtype, name, group_index)
        if penalized(group) and group["ortho_mode"] == "hard":
            stiefel.update_rule(type(self))

    def _check_changed_groups(self) -> None:
        """Check, as at construction, the groups whose ortho options were set since they were
        last checked (a scheduler's lr is checked by the soft step itself)."""
        checked = self.__dict__.setdefault("_ortho_checked", {})
        for gi, group in enumerate(self.param_groups):
            if checked.get(gi) != ortho_items(group):
                group.update(check_options(group, f"param group {gi}"))
                self._check_params(group, gi)
                checked[gi] = ortho_items(group)  # canonicalised

    def _resolve(self, group: dict, p: torch.Tensor, name: str) -> Layout | None:
        return resolve_layout(group["ortho_layout"], p.shape, name)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, refusing a state saved under another layout, mode or parameter shape,
        and keeping float32 state of half-precision parameters in float32.

        orthoopt's checks run as the last load_state_dict pre-hook, so that the user's
        pre-hooks see and may rewrite the checkpoint first, as torch runs them.  A
        checkpoint whose groups lack ortho keys (a plain torch optimizer's, or an older
        orthoopt's) keeps this optimizer's options for them, as constructed.
        """
        loaded: dict[str, Any] = {}

        def check(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
            loaded["state_dict"] = state_dict = self._checked_state_dict(state_dict)
            return state_dict

        handle = self.register_load_state_dict_pre_hook(check)  # after every hook registered so far
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        state_dict = loaded["state_dict"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                loaded_value = self.state[p].get(key)
                if (
                    isinstance(value, torch.Tensor)
                    and isinstance(loaded_value, torch.Tensor)
                    and value.dtype == torch.float32
                    and p.dtype in (torch.float16, torch.bfloat16)
                    and loaded_value.dtype != torch.float32
                ):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with this optimizer's ortho options filled into saved groups that
        lack them; raises (before anything has changed) where it cannot be resumed."""
        _check_same_grouping(state_dict["param_groups"], self.param_groups)
        saved_groups = [
            {**{k: group[k] for k in ORTHO_DEFAULTS if k in group}, **saved}
            for group, saved in zip(self.param_groups, state_dict["param_groups"])
        ] + list(state_dict["param_groups"][len(self.param_groups) :])
        params = [p for g in self.param_groups for p in g["params"]]
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key in ("ortho_layout", "ortho_mode", "ortho_penalty"):
                if not penalized(group) or saved[key] == group[key]:
                    continue
                if key == "ortho_layout" and all(same_layout(saved[key], group[key], p.shape) for p in group["params"]):
                    continue  # e.g. 'auto' and the layout it resolves to
                raise ValueError(
                    f"param group {gi}: the checkpoint was saved with {key}={saved[key]!r} but this "
                    f"optimizer has {key}={group[key]!r}; construct the optimizer with {key}={saved[key]!r} "
                    "to resume, or start from a fresh optimizer state"
                )
        saved_ids = [i for g in saved_groups for i in g["params"]]
        total = sum(p.numel() for p in params)
        for index, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and not _fits(key, value, p, total):
                    raise ValueError(
                        f"the checkpoint's state {key!r} for parameter {index} has shape {tuple(value.shape)}, "
                        f"but the parameter has shape {tuple(p.shape)}: it belongs to another model"
                    )
        return {**state_dict, "param_groups": saved_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._soft_cache = None
        # Pickles written before a key existed get this optimizer's defaults, the way torch's
        # optimizers fill keys they added later.
        defaults = self._ortho_defaults()
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)

    def __reduce_ex__(self, protocol: int):
        # A class made by orthogonalize() is rebuilt from its base class, which pickle finds
        # by its own module and name in any process (the generated class may not exist there).
        base = type(self).__dict__.get("_ortho_base")
        if base is None:
            return super().__reduce_ex__(protocol)
        return _instance_of, (base,), self.__getstate__()

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if not torch.compiler.is_compiling():
            self._check_changed_groups()
        loss = None
        if closure is not None:
            # Evaluated here, before the plans, which skip parameters whose grad is None.
            with torch.enable_grad():
                loss = closure()
            closure = _Reevaluate(closure, loss)
        self._refuse_differentiable_groups()
        hard = self._hard_plan()
        plan = self._soft_plan()
        # A new plan may hold parameters at their first soft step: read where they start.
        starting = self.__dict__.pop("_ortho_new_plan", False)
        memory = self.__dict__.setdefault("_ortho_memory", {})
        if starting:
            guard.before_step(self.param_groups, self.state, memory)
        due = [bucket for bucket in plan if soft.due(bucket)]  # ortho_every
        sharded = []
        for bucket in due:
            if isinstance(bucket, distributed.ShardedBucket):
                sharded.append((bucket, bucket.delta()))
                continue
            for chunk, finite in bucket.prepare():  # the parts holding NaN or Inf, if any
                self._report_nonfinite(chunk, finite)
        with stiefel.grads_hidden(hard) if hard else contextlib.nullcontext():
            base_loss = self._base_step(closure)
        if hard:
            stiefel.step_(self, hard)
        for bucket in due:
            if isinstance(bucket, soft.Bucket):
                bucket.finish(self.state)  # 'auto' takes β from the base update; then the addition
        for bucket, delta in sharded:
            bucket.finish(delta, self.state)  # its 'auto' entries, which need the update
            bucket.apply(delta)
        soft.advance(self.param_groups)
        if plan and not torch.compiler.is_compiling():
            self._ortho_steps = getattr(self, "_ortho_steps", 0) + 1
            watching = self._ortho_steps % guard.WATCH_EVERY == 0
            guard.after_step(self.param_groups, self.state, memory, starting=starting, watching=watching)
        return loss if closure is None else base_loss

    def _base_step(self, closure: Callable[[], Any] | None) -> Any:
        """The base class's ``step``, without torch's hook wrapper.

        torch wraps the ``step`` of the class of every optimizer it constructs in a function
        that runs the step hooks (``Optimizer._patch_step_function``): this class's, where
        the hooks run once around the whole step, and the base class's as soon as a plain
        instance of it is built, before or after this one.  Called through that wrapper, every
        hook would run twice, the inner post-hooks before the penalty or hard step.
        """
        step = super().step.__func__
        while getattr(step, "hooked", False):
            step = step.__wrapped__
        return step(self) if closure is None else step(self, closure)

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
        stiefel.check(self, items)
        return items

    def _refuse_differentiable_groups(self) -> None:
        # Construction refuses these; a group switched on later is caught here.
        for gi, group in enumerate(self.param_groups):
            if group.get("differentiable", False) and penalized(group):
                _refuse_differentiable(group, gi)

    def _soft_plan(self) -> list[soft.Bucket | distributed.ShardedBucket]:
        """The buckets of this step, reused with their workspaces while nothing they depend
        on changes: the groups' ortho options, which grads are None, the storages."""
        if torch.compiler.is_compiling():
            return soft.build_plan(self.param_groups, workspaces=False)  # the compiler plans its own buffers
        key = soft.plan_key(self.param_groups)
        cache = getattr(self, "_soft_cache", None)
        if cache is None or cache[0] != key:
            cache = self._soft_cache = (key, soft.build_plan(self.param_groups, workspaces=True))
            self._ortho_new_plan = True
        return cache[1]

    def _report_nonfinite(self, bucket: soft.Chunk, finite: torch.Tensor) -> None:
        bad = [name for name, ok in zip(bucket.names, finite.split(bucket.counts)) if not bool(ok.all())]
        report_nonfinite(self, bad, bucket.nonfinite, "the orthogonality step skips its non-finite matrices")

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


def _check_same_grouping(saved: list[dict], groups: list[dict]) -> None:
    """torch maps saved state to parameters by their order over the groups: a checkpoint of
    other groups (a plain optimizer's one group, before param_groups split it) cannot load."""
    saved_sizes = [len(g["params"]) for g in saved]
    sizes = [len(g["params"]) for g in groups]
    if saved_sizes == sizes:
        return
    what = (
        "loaded state dict has a different number of parameter groups"
        if len(saved_sizes) != len(sizes)
        else "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
    )
    raise ValueError(
        f"{what}: the checkpoint's groups hold {saved_sizes} parameters, this optimizer's {sizes}. A "
        "checkpoint of the optimizer before the swap (param_groups or constrain_ split its groups) "
        "loads into that optimizer: load it there, then swap with orthoopt.constrain_(optimizer, model), "
        "which keeps the state"
    )


def _fits(key: str, value: torch.Tensor, p: torch.Tensor, total: int) -> bool:
    """Whether a saved state tensor can belong to ``p``.  torch's optimizers keep state of the
    parameter's shape, of a shape that broadcasts to it (Adafactor's factored row and column
    variances), scalars, or, LBFGS, vectors over all the parameters at once; orthoopt keeps
    stacked views of the parameter and per-matrix state (``ortho_*``, ``stiefel_*``)."""
    if value.dim() == 0 or value.shape == p.shape or (value.dim() == 1 and value.numel() == p.numel()):
        return True
    if key.startswith(("ortho", "stiefel")):
        return True
    if value.dim() == p.dim() and all(v in (1, s) for v, s in zip(value.shape, p.shape)):
        return True
    return value.dim() == 1 and value.numel() == total


class _Reevaluate:
    """The closure handed to the base step.  Its first call returns the loss that ``step()``
    has just evaluated: torch's optimizers call the closure first, before they change
    anything, so SGD or Adam evaluate it once, as without orthoopt.  Later calls (LBFGS's
    line search) evaluate the closure again."""

    def __init__(self, closure: Callable[[], Any], loss: Any):
        self.closure, self.loss, self.fresh = closure, loss, True

    def __call__(self) -> Any:
        if self.fresh:
            self.fresh = False
            return self.loss
        return self.closure()


def _refuse_differentiable(group: dict, group_index: int) -> None:
    raise ValueError(
        f"param group {group_index}: differentiable=True with ortho={group['ortho']!r}: orthoopt's "
        "orthogonality step is not differentiable, so autograd through step() would treat it as a "
        "constant and give wrong gradients. Put the parameters you differentiate through in a group "
        "with ortho=0, or use differentiable=False"
    )


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
    ortho_init (str): a soft parameter that starts far from orthonormal is reported at its first
        step ('warn'), snapped to its polar factor after it ('project'), or left alone ('keep')
        (:mod:`orthoopt.guard`).
    ortho_second_moment (str): hard mode's Adam second moment per matrix, the 'mean' over its
        entries (Adam's step size at the same lr) or geoopt's 'sum' (:mod:`orthoopt.stiefel`).
    ortho_every (int): the soft step at every k-th call of step(), k times as large (default 1).
"""

# One class per base class, so that orthogonalize(X) is orthogonalize(X) (isinstance works,
# torch patches its step once) and its instances can be pickled and torch.save'd whole.
_ORTHO_CLASSES: dict[type, type] = {}


def orthogonalize(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``Ortho<Name>``, a true subclass of ``optimizer_cls`` with the ortho options.

    The class is made once per base class and lives in this module under its name
    (``orthoopt.optim.OrthoRMSprop``), or ``Ortho<Name>_<n>`` where two bases share a name.
    Closure-driven optimizers (LBFGS) are supported: the closure goes to the base step, and
    the orthogonality step follows it once.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"orthogonalize expects a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(optimizer_cls, OrthoMixin):
        return optimizer_cls
    cls = _ORTHO_CLASSES.get(optimizer_cls)
    if cls is None:
        module = sys.modules[__name__]
        name, n = f"Ortho{optimizer_cls.__name__}", 1
        while name in vars(module):  # not hasattr: that would ask __getattr__ below
            n += 1
            name = f"Ortho{optimizer_cls.__name__}_{n}"
        cls = type(
            name,
            (OrthoMixin, optimizer_cls),
            {
                "__doc__": _CLASS_DOC.format(base=optimizer_cls.__name__),
                "__module__": __name__,
                "__qualname__": name,
                "_ortho_base": optimizer_cls,
            },
        )
        setattr(module, name, cls)
        _ORTHO_CLASSES[optimizer_cls] = cls
    return cls


def _instance_of(base: type[torch.optim.Optimizer]) -> OrthoMixin:
    """An empty instance of ``orthogonalize(base)``, for unpickling (its state comes next)."""
    cls = orthogonalize(base)
    return cls.__new__(cls)


def __getattr__(name: str) -> type:
    # ``orthoopt.optim.Ortho<Name>`` for any torch.optim class, so that a pickled generated
    # class (not an instance: those go through _instance_of) is found in a fresh process.
    base = getattr(torch.optim, name.removeprefix("Ortho"), None) if name.startswith("Ortho") else None
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        cls = orthogonalize(base)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OrthoSGD(OrthoMixin, torch.optim.SGD):
    __doc__ = _CLASS_DOC.format(base="SGD")


class OrthoAdam(OrthoMixin, torch.optim.Adam):
    __doc__ = _CLASS_DOC.format(base="Adam")


class OrthoAdamW(OrthoMixin, torch.optim.AdamW):
    __doc__ = _CLASS_DOC.format(base="AdamW")


_ORTHO_CLASSES.update({torch.optim.SGD: OrthoSGD, torch.optim.Adam: OrthoAdam, torch.optim.AdamW: OrthoAdamW})


# -- model helpers --------------------------------------------------------------------
def _max_error(layout: Layout, p: torch.Tensor) -> float:
    if distributed.is_dtensor(p):
        return distributed.max_error(layout, p)
    return penalty.max_error(layout.matrices(p.detach()))


@torch.no_grad()
def project_(target: torch.optim.Optimizer | nn.Module | Iterable[torch.Tensor], layout: str | None = None) -> None:
    """Snap each constrained parameter to its nearest orthonormal point (the polar factor).

    ``target`` is an ortho optimizer (its groups' layouts, penalized groups only), also inside
    a framework's wrapper (:mod:`orthoopt.wrappers`), a model (the parameters
    :func:`param_groups` would penalize, with their layouts, or all with ``layout``), or
    parameters (``layout``, default 'auto').  Every parameter is checked before any changes:
    one that cannot be projected (NaN or Inf) leaves all of them as they were.  On
    FSDP2-sharded parameters it is a collective: every rank must call it (a sharded parameter
    is not checked beforehand: that would be a collective too).
    """
    target = wrappers.unwrap(target)
    if isinstance(target, torch.optim.Optimizer) and not isinstance(target, OrthoMixin):
        raise TypeError(_not_ortho(target, "project_"))
    if isinstance(target, OrthoMixin):
        items = [
            (p, target._resolve(g, p, param_name(g, i, gi)), param_name(g, i, gi))
            for gi, g in enumerate(target.param_groups)
            if penalized(g)
            for i, p in enumerate(g["params"])
        ]
    elif isinstance(target, nn.Module):
        items = [(p, lay, f"parameter '{n}'") for n, p, lay in constrained(target, layout)]
    else:
        items = [
            (p, resolve_layout(layout or "auto", p.shape, f"parameter {i}"), f"parameter {i}")
            for i, p in enumerate(target)
        ]
    items = [(p, lay, name) for p, lay, name in items if lay is not None]
    for p, _, name in items:
        if not (distributed.is_dtensor(p) or p.is_meta or bool(torch.isfinite(p).all())):
            raise ValueError(
                f"{name} holds NaN or Inf: it has no nearest orthonormal point; nothing was changed. "
                "Re-initialise it (or load a finite checkpoint) before projecting"
            )
    for p, lay, _ in items:
        if distributed.is_dtensor(p):  # FSDP2: the SVD needs whole matrices
            distributed.project_(p, lay)
        else:
            p.copy_(lay.from_matrices(penalty.polar(lay.matrices(p)), p.shape))


def named_orthogonality_errors(
    target: nn.Module | torch.optim.Optimizer, layout: str | None = None, **kwargs: Any
) -> dict[str, float]:
    """``{name: max error}``: of every parameter :func:`param_groups` would penalize in a model
    (``layout`` and ``kwargs`` as for it), or of an ortho optimizer's constrained parameters,
    also inside a framework's wrapper (:mod:`orthoopt.wrappers`)."""
    target = wrappers.unwrap(target)
    if isinstance(target, OrthoMixin):
        return target.orthogonality_errors()
    if isinstance(target, torch.optim.Optimizer):
        raise TypeError(_not_ortho(target, "named_orthogonality_errors"))
    return {n: _max_error(lay, p) for n, p, lay in constrained(target, layout, **kwargs)}


def _not_ortho(optimizer: torch.optim.Optimizer, what: str) -> str:
    return (
        f"{what} got a plain {type(optimizer).__name__}, which constrains nothing: turn it into an orthoopt "
        "optimizer first with orthoopt.constrain_(optimizer, model, ortho=...)"
    )
