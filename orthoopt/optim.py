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
from overshooting or diverging (:func:`orthoopt.penalty.safe_step_size`).  A group with
``ortho_target='orthogonal'`` takes the same step on the off-diagonal of
:math:`\Phi_i^\top\Phi_i` or of the cosines, with its caps
(:func:`orthoopt.penalty.orthogonal_step`).  With
``ortho = 0`` everywhere the optimizer is bitwise the base class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import checkpoint, distributed, penalty, soft, stiefel, wrappers
from .layout import Layout, resolve_layout
from .options import (
    ORTHO_DEFAULTS,
    check_known_options,
    check_options,
    check_step_size,
    name_unnamed,
    ortho_items,
    param_key,  # noqa: F401 - orthoopt.optim.param_key, where it was
    param_name,
    penalized,
    real_number,
)
from .pieces import parameter_pieces, pieces, split
from .plan import Plan, refuse_differentiable
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
        ortho_target: str = "orthonormal",
        ortho_normalize: bool = False,
        ortho_tol: float | None = None,
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
                "ortho_target": ortho_target,
                "ortho_normalize": ortho_normalize,
                "ortho_tol": ortho_tol,
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
        _refuse_counting_under_capture(candidate, self.defaults, index)
        super().add_param_group(param_group)
        self._ortho_plan = None

    def _check_params(self, group: dict, group_index: int) -> None:
        if penalized(group) and group.get("differentiable", self.defaults.get("differentiable", False)):
            refuse_differentiable(group, group_index)
        seen: set[int] = set()
        lr = real_number(group.get("lr", self.defaults.get("lr")))
        for i, p in enumerate(group["params"]):
            name = param_name(group, i, group_index)
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check names the offending type
            if id(p) in seen:
                raise ValueError(f"{name} appears twice in param group {group_index}; pass each parameter once")
            seen.add(id(p))
            if not penalized(group):
                continue
            if p.is_complex():
                raise TypeError(
                    f"{name} is complex ({p.dtype}); orthoopt's orthogonality is for real parameters: "
                    "put it in a group with ortho=0, or use torch.view_as_real"
                )
            found = parameter_pieces(group, group_index, i, p)  # resolves (and checks) the layout
            if found and group["ortho_mode"] == "soft" and group["ortho"] != "auto" and lr is not None:
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, refusing a state saved under another layout, mode or parameter shape,
        and keeping float32 state of half-precision parameters in float32
        (:mod:`orthoopt.checkpoint`).

        orthoopt's checks run as the last load_state_dict pre-hook, so that the user's
        pre-hooks see and may rewrite the checkpoint first, as torch runs them.  A
        checkpoint whose groups lack ortho keys (a plain torch optimizer's, or an older
        orthoopt's) keeps this optimizer's options for them, as constructed.
        """
        loaded: dict[str, Any] = {}

        def check(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
            loaded["state_dict"] = state_dict = checkpoint.checked_state_dict(state_dict, self.param_groups)
            return state_dict

        handle = self.register_load_state_dict_pre_hook(check)  # after every hook registered so far
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        self._ortho_plan = self._ortho_shadow = None
        checkpoint.keep_wide_state(loaded["state_dict"], self.param_groups, self.state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._ortho_plan = None
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
            # Evaluated here, before the plan, which skips parameters whose grad is None.
            with torch.enable_grad():
                loss = closure()
            closure = _Reevaluate(closure, loss)
        plan = self._plan()
        plan.before(self)
        with plan.hard_grads_hidden():
            base_loss = self._base_step(closure)
        plan.hard_step(self)
        plan.after(self)
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

    def _plan(self) -> Plan:
        """The plan of this step (:mod:`orthoopt.plan`), kept while it holds; one of its own
        while torch.compile traces the step (the compiler plans its own buffers)."""
        if torch.compiler.is_compiling():
            return Plan(self.param_groups, workspaces=False)
        plan = self.__dict__.get("_ortho_plan")
        if plan is None or not plan.current(self.param_groups):
            plan = self._ortho_plan = Plan(self.param_groups)
        return plan

    # -- reading the constraint ---------------------------------------------------------
    @torch.no_grad()
    def orthogonality_errors(self) -> dict[str, float]:
        """``{name: max_jk |Φ_iᵀΦ_i - I|_jk over the parameter's matrices}`` for every
        parameter under a constraint (soft or hard), for logging; for a group with
        ``ortho_target='orthogonal'``, the largest off-diagonal entry of its target's residual
        (the dot products, or with ``ortho_normalize`` the cosines, of distinct vectors)."""
        errors: dict[str, float] = {}
        for piece in pieces(self.param_groups):
            error = _max_error(piece.layout, piece.view, piece.group)
            errors[piece.key] = max(errors.get(piece.key, error), error)
        return errors

    def ortho_tol_corrections(self) -> dict[str, int]:
        """``{name: how many times ortho_tol corrected a matrix of the parameter}`` (summed over
        its matrices and steps; read from the optimizer state, a sync on an accelerator)."""
        out: dict[str, int] = {}
        for piece in pieces(self.param_groups, mode="soft"):
            if piece.group.get("ortho_tol") is None:
                continue
            counts = self.state.get(piece.param, {}).get(soft.CORRECTIONS + piece.suffix)
            out[piece.key] = out.get(piece.key, 0) + (0 if counts is None else int(counts.sum()))
        return out


def _refuse_counting_under_capture(group: dict, defaults: dict, group_index: int) -> None:
    # At construction only: torch.compile's trace of a step sees capturable=True in every
    # group, and writes it back into CPU groups too.
    if penalized(group) and group["ortho_every"] != 1 and group.get("capturable", defaults.get("capturable")):
        raise ValueError(
            f"param group {group_index}: ortho_every={group['ortho_every']} with capturable=True: the soft "
            "step's count of step() calls is kept on the host, and a CUDA graph's replays run no Python; "
            "use ortho_every=1 with capturable=True"
        )


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
    ortho_target (str): 'orthonormal' (ΦᵀΦ = I, the default) or 'orthogonal' (only the dot
        products of distinct vectors; their lengths free), soft mode only (docs/conventions.md).
    ortho_normalize (bool): with ortho_target='orthogonal', the cosines instead of the dot products.
    ortho_tol (float or None): after every step, a matrix whose max |ΦᵀΦ - I| is above it is
        corrected towards its polar factor within the step (:mod:`orthoopt.soft`); None (default): off.
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
def _max_error(layout: Layout, p: torch.Tensor, group: dict | None = None) -> float:
    """The error of the group's own target (orthonormal without a group)."""
    target, normalize = (group["ortho_target"], group["ortho_normalize"]) if group else ("orthonormal", False)
    if distributed.is_dtensor(p):
        return distributed.max_error(layout, p, target, normalize)
    return penalty.max_error(layout.matrices(p.detach()), target, normalize)


@torch.no_grad()
def project_(target: torch.optim.Optimizer | nn.Module | Iterable[torch.Tensor], layout: str | None = None) -> None:
    """Snap each constrained parameter to its nearest orthonormal point (the polar factor); in
    an optimizer's group with ``ortho_target='orthogonal'``, to the nearest point whose vectors
    are orthogonal with the lengths they have (:func:`orthoopt.penalty.project`).

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
            (piece.view, piece.layout, piece.name, piece.group["ortho_target"]) for piece in pieces(target.param_groups)
        ]
    else:
        if isinstance(target, nn.Module):
            whole = [(p, lay, f"parameter '{n}'") for n, p, lay in constrained(target, layout)]
        else:
            whole = [
                (p, resolve_layout(layout or "auto", p.shape, f"parameter {i}"), f"parameter {i}")
                for i, p in enumerate(target)
            ]
        items = [
            (v, lay, name, "orthonormal")
            for p, whole_layout, name in whole
            if whole_layout is not None
            for v, lay in split(p, whole_layout, name)
        ]
    for p, _, name, _ in items:
        if not (distributed.is_dtensor(p) or p.is_meta or bool(torch.isfinite(p).all())):
            raise ValueError(
                f"{name} holds NaN or Inf: it has no nearest orthonormal point; nothing was changed. "
                "Re-initialise it (or load a finite checkpoint) before projecting"
            )
    for p, lay, _, goal in items:
        if distributed.is_dtensor(p):  # FSDP2: the SVD needs whole matrices
            distributed.project_(p, lay, goal)
        else:
            p.copy_(lay.from_matrices(penalty.project(lay.matrices(p), goal), p.shape))


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
    return {
        n: max(_max_error(lay, v) for v, lay in split(p, whole, f"parameter '{n}'"))
        for n, p, whole in constrained(target, layout, **kwargs)
    }


def _not_ortho(optimizer: torch.optim.Optimizer, what: str) -> str:
    return (
        f"{what} got a plain {type(optimizer).__name__}, which constrains nothing: turn it into an orthoopt "
        "optimizer first with orthoopt.constrain_(optimizer, model, ortho=...)"
    )
