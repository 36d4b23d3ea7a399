"""The ortho options of a parameter group, their checks, and how parameters are named.

Every other module reads a group's options through this one: the optimizer glue
(:mod:`orthoopt.optim`), the soft step (:mod:`orthoopt.soft`), hard mode
(:mod:`orthoopt.stiefel`) and the sharded step (:mod:`orthoopt.distributed`).  It imports
nothing of orthoopt's but the layouts, so that the imports run one way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .layout import canonical_layout, resolve_layout

__all__ = [
    "ORTHO_DEFAULTS",
    "MODES",
    "PENALTIES",
    "NONFINITE",
    "MANIFOLDS",
    "is_number",
    "check_options",
    "param_key",
    "param_name",
    "same_layout",
    "penalized",
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
    "ortho_every": 1,
}
MODES = ("soft", "hard")
PENALTIES = ("l1", "frobenius")
NONFINITE = ("warn", "skip", "raise")
# Hard mode's geoopt manifolds (orthoopt.stiefel maps each name to its class).
MANIFOLDS = ("euclidean", "canonical")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate the ortho options of a group (or the defaults); return them canonicalised."""
    out = dict(options)
    ortho = out.get("ortho", 0.0)
    if not (is_number(ortho) or ortho == "auto"):
        raise TypeError(f"{where}: ortho must be a number >= 0 (the penalty weight β) or 'auto', got {ortho!r}")
    if is_number(ortho) and not (ortho >= 0 and math.isfinite(ortho)):
        raise ValueError(f"{where}: ortho must be a finite number >= 0 (0 switches the penalty off), got {ortho!r}")
    smoothing = out.get("ortho_smoothing", 0.0)
    if not is_number(smoothing):
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
    every = out.get("ortho_every", 1)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(
            f"{where}: ortho_every must be a whole number >= 1 (the soft step every that many steps, "
            f"that many times as large), got {every!r}"
        )
    if every != 1 and mode == "hard":
        raise ValueError(
            f"{where}: ortho_every={every} applies to the soft step; hard mode steps on the manifold at every "
            "step: use ortho_every=1 with ortho_mode='hard'"
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


def param_name(group: dict, index: int, group_index: int) -> str:
    """``parameter '<key>'``, for messages."""
    return f"parameter '{param_key(group, index, group_index)}'"


def same_layout(a: str, b: str, shape: torch.Size) -> bool:
    """Whether two layout strings resolve to the same layout on ``shape``."""
    try:
        return resolve_layout(a, shape, "") == resolve_layout(b, shape, "")
    except ValueError:
        return False


def penalized(group: dict) -> bool:
    """Whether the group's parameters are under a constraint (soft or hard)."""
    return group["ortho"] == "auto" or group["ortho"] > 0
