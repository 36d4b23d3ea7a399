"""The compared methods, each built from the same parameter split and hyper-parameters.

======================  ===========================================================================
``none``                the base optimizer alone (plain ``torch.optim.SGD`` or ``AdamW``)
``soft``                ``OrthoSGD``/``OrthoAdamW``, the decoupled L1 step (``ortho=β``)
``soft-huber``          the same with Huber smoothing (``ortho_smoothing=δ``)
``soft-auto``           the same with ``ortho='auto'``: β from the running multiplier estimate, no tuning
``soft-tol``            the same as ``soft`` with ``ortho_tol``: the error held below the task's bound after every step
``frobenius``           the same step on ``β‖ΦᵀΦ - I‖²_F`` (``ortho_penalty='frobenius'``)
``landing``             the landing update (:mod:`orthoopt.compare.landing`) on the constrained
                        parameters, the base optimizer on the others
``hard``                ``ortho_mode='hard'``: the Stiefel manifold through geoopt
``hard-canonical``      the same on geoopt's canonical Stiefel manifold (``ortho_manifold='canonical'``)
``geotorch``            geotorch's ``orthogonal`` parametrization (``W = B·expm(A)``, ``A`` skew, the
                        base ``B`` the initial weights), the base optimizer on ``A``; not in the
                        default set (it needs the ``geotorch`` package and 2-D ``auto`` layouts)
``bjorck``              Björck orthonormalization as a parametrization (:mod:`orthoopt.compare.parametrized`),
                        the base optimizer on the raw weight; 2-D ``auto`` layouts
``torch-orthogonal``    torch's ``parametrizations.orthogonal`` (same conditions)
======================  ===========================================================================

Every method uses the base optimizer's settings; the constrained parameters take the lr
times ``constrained_lr_scale`` (geotorch's copying example trains ``W`` at 1/5 of the lr).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize

from .. import OrthoAdam, OrthoAdamW, OrthoSGD, param_groups
from ..selection import constrained
from . import parametrized
from .landing import Landing

__all__ = ["METHODS", "ALL_METHODS", "Settings", "task_settings", "build_optimizers", "prepared"]

ORTHO_OPTIMIZERS = {"SGD": OrthoSGD, "Adam": OrthoAdam, "AdamW": OrthoAdamW}
METHODS = ("none", "soft", "soft-huber", "soft-auto", "frobenius", "landing", "hard")
ALL_METHODS = METHODS + ("soft-tol", "hard-canonical", "geotorch", "bjorck", "torch-orthogonal")
PARAMETRIZED = ("geotorch", "bjorck", "torch-orthogonal")  # methods that reparametrize the weights


@dataclass
class Settings:
    """What every method shares: base optimizer, lr, β and the rest."""

    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    beta: float = 1.0
    smoothing: float = 0.05
    landing_lr: float | None = None
    landing_lam: float = 1.0
    landing_eps: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    constrained_lr_scale: float = 1.0
    ortho_tol: float = 1e-2  # soft-tol's bound on max |ΦᵀΦ - I| after every step


def task_settings(task, **overrides: Any) -> Settings:
    """The :class:`~orthoopt.compare.tasks.Task`'s settings, each override that is not None in
    place of the task's (``base``, ``lr``, ``momentum``, ``beta``, ``smoothing``, ``landing_lr``,
    ``constrained_lr_scale``, ``ortho_tol``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"task_settings: unknown settings {sorted(unknown)}")
    fields = ("base", "lr", "momentum", "beta", "smoothing", "landing_lr", "betas", "constrained_lr_scale", "ortho_tol")
    return Settings(**{**{f: getattr(task, f) for f in fields}, **given})


def _base_kwargs(s: Settings) -> tuple[str, dict[str, Any]]:
    if s.base == "sgd":
        return "SGD", {"lr": s.lr, "momentum": s.momentum}
    if s.base in ("adam", "adamw"):
        # No weight decay: it fights a unit-norm constraint and is not what is compared.
        return ("Adam" if s.base == "adam" else "AdamW"), {"lr": s.lr, "betas": tuple(s.betas), "weight_decay": 0.0}
    raise ValueError(f"base optimizer must be 'sgd', 'adam' or 'adamw', got {s.base!r}")


def _split_lr(groups: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    """The constrained groups at lr × ``constrained_lr_scale`` (unchanged when the scale is 1)."""
    if s.constrained_lr_scale != 1.0:
        for g in groups:
            if g["ortho"]:
                g["lr"] = s.lr * s.constrained_lr_scale
    return groups


def build_optimizers(method: str, model: torch.nn.Module, problem, s: Settings) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of ``method`` for ``problem``'s model (a list: landing uses two).

    For ``geotorch`` the model must be :func:`prepared` (its parametrization registered).
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    base_name, kwargs = _base_kwargs(s)
    if method in PARAMETRIZED:
        return [getattr(torch.optim, base_name)(_parametrized_groups(model, s, method), **kwargs)]
    if method == "none":
        if s.constrained_lr_scale == 1.0:
            return [getattr(torch.optim, base_name)(model.parameters(), **kwargs)]
        groups = param_groups(model, ortho=1.0, include=problem.include, exclude=problem.exclude)
        return [getattr(torch.optim, base_name)([_plain(g) for g in _split_lr(groups, s)], **kwargs)]
    options = {"ortho_layout": problem.layout}
    if method == "soft-huber":
        options["ortho_smoothing"] = s.smoothing
    elif method == "frobenius":
        options["ortho_penalty"] = "frobenius"
    elif method == "soft-tol":
        options["ortho_tol"] = s.ortho_tol
    elif method in ("hard", "hard-canonical"):
        options["ortho_mode"] = "hard"
        if method == "hard-canonical":
            options["ortho_manifold"] = "canonical"
    beta = "auto" if method == "soft-auto" else s.beta
    groups = param_groups(model, ortho=beta, include=problem.include, exclude=problem.exclude, **options)
    groups = _split_lr(groups, s)
    if method == "landing":
        on = [g for g in groups if g["ortho"]]
        off = [g for g in groups if not g["ortho"]]
        landing = Landing(
            [p for g in on for p in g["params"]],
            lr=s.landing_lr if s.landing_lr is not None else s.lr * s.constrained_lr_scale,
            lam=s.landing_lam,
            eps=s.landing_eps,
            momentum=s.momentum,
            layout=problem.layout,
        )
        out: list[torch.optim.Optimizer] = [landing]
        if off:
            out.append(getattr(torch.optim, base_name)([p for g in off for p in g["params"]], **kwargs))
        return out
    return [ORTHO_OPTIMIZERS[base_name](groups, **kwargs)]


def constrained_parameters(model: torch.nn.Module, problem) -> list[tuple[str, torch.Tensor, Any]]:
    """``(name, parameter, layout)`` of every constrained parameter of the problem."""
    return constrained(model, layout=problem.layout, include=problem.include, exclude=problem.exclude)


def _plain(group: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer's group: the parameters and the lr, no ortho options."""
    return {k: v for k, v in group.items() if k in ("params", "lr")}


# -- geotorch, the outside anchor -------------------------------------------------------------
def _geotorch():
    try:
        import geotorch
    except ImportError:
        raise ImportError(
            "method 'geotorch' needs the geotorch package: pip install geotorch "
            "(or the 'experiments' extra: pip install -e '.[experiments]')"
        ) from None
    return geotorch


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


@contextmanager
def prepared(method: str, model: torch.nn.Module, problem) -> Iterator[None]:
    """The model as ``method`` needs it, for the duration of a run.

    For ``geotorch``: each constrained parameter gets geotorch's ``orthogonal``
    parametrization with the parameter's current value as its base (``A = 0``); ``bjorck``
    and ``torch-orthogonal`` theirs (:mod:`orthoopt.compare.parametrized`), also computing
    the current value.  On exit the parametrization is removed, leaving a plain parameter with
    the trained value (so that the next method can load the shared initial weights).  Other
    methods: nothing.
    """
    if method not in PARAMETRIZED:
        yield
        return
    if method == "geotorch":  # _geotorch(): a clear error before any change if geotorch is missing
        register = functools.partial(parametrized.register_based_at, _geotorch().orthogonal)
    elif method == "bjorck":
        register = parametrized.register_bjorck
    else:
        register = parametrized.register_torch_orthogonal
    owners = []
    try:
        for name, p, _ in constrained_parameters(model, problem):
            if p.dim() != 2 or problem.layout != "auto":
                raise ValueError(
                    f"method {method!r}: parameter '{name}' has shape {tuple(p.shape)} and layout "
                    f"{problem.layout!r}; its parametrization applies to 2-D weights with the 'auto' "
                    f"layout (orthonormal along the shorter side); compare this task without {method!r}"
                )
            module, attr = _owner(model, name)
            start = p.detach().clone()
            register(module, attr, start)
            owners.append((module, attr))
        yield
    finally:
        for module, attr in owners:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def _parametrized_groups(model: torch.nn.Module, s: Settings, method: str) -> list[dict[str, Any]]:
    """The parametrizations' free parameters at the constrained lr, the rest at the lr."""
    free = {id(p) for m in model.modules() if parametrize.is_parametrized(m) for p in m.parametrizations.parameters()}
    if not free:
        raise RuntimeError(f"method {method!r}: the model has no parametrization; run it inside prepared()")
    on = [p for p in model.parameters() if id(p) in free]
    off = [p for p in model.parameters() if id(p) not in free]
    return [{"params": on, "lr": s.lr * s.constrained_lr_scale}] + ([{"params": off}] if off else [])
