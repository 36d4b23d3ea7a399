"""The compared methods, each built from the same parameter split and hyper-parameters.

==============  ===========================================================================
``none``        the base optimizer alone (plain ``torch.optim.SGD`` or ``AdamW``)
``soft``        ``OrthoSGD``/``OrthoAdamW``, the decoupled L1 step (``ortho=β``)
``soft-huber``  the same with Huber smoothing (``ortho_smoothing=δ``)
``soft-auto``   the same with ``ortho='auto'``: β from the running multiplier estimate, no tuning
``frobenius``   the same step on ``β‖ΦᵀΦ - I‖²_F`` (``ortho_penalty='frobenius'``)
``landing``     the landing update (:mod:`orthoopt.compare.landing`) on the constrained
                parameters, the base optimizer on the others
``hard``        ``ortho_mode='hard'``: the Stiefel manifold through geoopt
==============  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import optim as ortho_optim
from .landing import Landing

__all__ = ["METHODS", "Settings", "build_optimizers"]

METHODS = ("none", "soft", "soft-huber", "soft-auto", "frobenius", "landing", "hard")


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


def _base_kwargs(s: Settings) -> tuple[str, dict[str, Any]]:
    if s.base == "sgd":
        return "SGD", {"lr": s.lr, "momentum": s.momentum}
    if s.base == "adamw":
        # No weight decay: it fights a unit-norm constraint and is not what is compared.
        return "AdamW", {"lr": s.lr, "weight_decay": 0.0}
    raise ValueError(f"base optimizer must be 'sgd' or 'adamw', got {s.base!r}")


def build_optimizers(method: str, model: torch.nn.Module, problem, s: Settings) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of ``method`` for ``problem``'s model (a list: landing uses two)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    base_name, kwargs = _base_kwargs(s)
    if method == "none":
        return [getattr(torch.optim, base_name)(model.parameters(), **kwargs)]
    options = {"ortho_layout": problem.layout}
    if method == "soft-huber":
        options["ortho_smoothing"] = s.smoothing
    elif method == "frobenius":
        options["ortho_penalty"] = "frobenius"
    elif method == "hard":
        options["ortho_mode"] = "hard"
    beta = "auto" if method == "soft-auto" else s.beta
    groups = ortho_optim.param_groups(model, ortho=beta, include=problem.include, exclude=problem.exclude, **options)
    if method == "landing":
        on = [g for g in groups if g["ortho"]]
        off = [g for g in groups if not g["ortho"]]
        landing = Landing(
            [p for g in on for p in g["params"]],
            lr=s.landing_lr if s.landing_lr is not None else s.lr,
            lam=s.landing_lam,
            eps=s.landing_eps,
            momentum=s.momentum,
            layout=problem.layout,
        )
        out: list[torch.optim.Optimizer] = [landing]
        if off:
            out.append(getattr(torch.optim, base_name)([p for g in off for p in g["params"]], **kwargs))
        return out
    cls = getattr(ortho_optim, "Ortho" + base_name)
    return [cls(groups, **kwargs)]


def constrained_parameters(model: torch.nn.Module, problem) -> list[tuple[str, torch.Tensor, Any]]:
    """``(name, parameter, layout)`` of every constrained parameter of the problem."""
    from ..layout import resolve_layout

    named = dict(model.named_parameters())
    out = []
    for g in ortho_optim.param_groups(model, ortho=1.0, include=problem.include, exclude=problem.exclude):
        if g["ortho"]:
            for n in g["param_names"]:
                lay = resolve_layout(problem.layout, named[n].shape, f"parameter '{n}'")
                if lay is not None:
                    out.append((n, named[n], lay))
    return out
