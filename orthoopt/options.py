"""The ortho options of a parameter group, their checks, and how parameters are named.

Every other module reads a group's options through this one: the optimizer glue
(:mod:`orthoopt.optim`), the soft step (:mod:`orthoopt.soft`), hard mode
(:mod:`orthoopt.stiefel`) and the sharded step (:mod:`orthoopt.distributed`).  It imports
nothing of orthoopt's but the layouts and the penalties' pure math, so that the imports run one way.  What the
``ortho_nonfinite`` policy does when a matrix is not finite (:func:`report_nonfinite`) is
here too, so that the soft and the hard step report it in the same words.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .layout import canonical_layout, resolve_layout
from .penalty import check_target

__all__ = [
    "ORTHO_DEFAULTS",
    "MODES",
    "PENALTIES",
    "NONFINITE",
    "STARTS",
    "SECOND_MOMENTS",
    "MANIFOLDS",
    "STEPS_KEY",
    "is_number",
    "real_number",
    "check_options",
    "check_known_options",
    "ortho_items",
    "name_unnamed",
    "report_nonfinite",
    "check_step_size",
    "warn_at_caller",
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
    "ortho_init": "warn",
    "ortho_second_moment": "mean",
    "ortho_every": 1,
    "ortho_target": "orthonormal",
    "ortho_normalize": False,
    "ortho_tol": None,
}
MODES = ("soft", "hard")
PENALTIES = ("l1", "frobenius")
NONFINITE = ("warn", "skip", "raise")
# What the soft step does with a parameter that starts far from the manifold (orthoopt.guard).
STARTS = ("warn", "project", "keep")
# Hard mode's Adam second moment per matrix: the mean over its entries (Adam's step size), or
# geoopt's sum (orthoopt.stiefel).
SECOND_MOMENTS = ("mean", "sum")
# Hard mode's geoopt manifolds (orthoopt.stiefel maps each name to its class).
MANIFOLDS = ("euclidean", "canonical")
# The per-group count of step() calls that ortho_every > 1 keeps (orthoopt.soft): no one's
# option, but in the groups, and saved with them.
STEPS_KEY = "ortho_steps"
# The modules whose frames stand between the user's line and step(): orthoopt's own, torch's
# (torch.no_grad, the hook and scheduler wrappers) and the frameworks' that step for the user.
_WRAPPING_PACKAGES = frozenset(
    {"orthoopt", "torch", "accelerate", "transformers", "lightning", "pytorch_lightning", "lightning_fabric"}
)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def real_number(x: Any) -> float | None:
    """``x`` as a Python float if it is a real number, else None.

    Any :class:`numbers.Real` (``int``, ``np.float32``, ``np.int64``, ``fractions.Fraction``)
    and any 0-d real tensor count, as torch accepts them for ``lr``; bools do not.  The
    options keep the Python float: a NumPy scalar or a tensor in a param group would not
    survive ``torch.load(weights_only=True)`` of the state_dict, and a tensor β would be
    read with a host sync at every step.  A number too large for a float is inf.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype == torch.bool or x.is_complex():
            return None
        x = x.item()
    elif not isinstance(x, numbers.Real):  # np.bool_ is not one
        return None
    try:
        return float(x)
    except OverflowError:  # an int beyond the float range
        return math.inf


def check_known_options(options: Iterable[Any], where: str) -> None:
    """Refuse an ``ortho_*`` key that is no option (a misspelled one would otherwise sit in the
    group unread), naming the closest option.  The options are ``ORTHO_DEFAULTS``'s keys, as
    they are when this runs, and the step counter ``ortho_steps``."""
    for key in options:
        if not (isinstance(key, str) and key.startswith("ortho_")) or key in ORTHO_DEFAULTS or key == STEPS_KEY:
            continue
        # Every option shares the 'ortho_' prefix: compare what follows it.
        suffixes = {name.removeprefix("ortho_"): name for name in ORTHO_DEFAULTS}
        close = difflib.get_close_matches(key.removeprefix("ortho_"), suffixes, n=1, cutoff=0.6)
        hint = (
            f"did you mean {suffixes[close[0]]!r}?" if close else f"the options are {', '.join(sorted(ORTHO_DEFAULTS))}"
        )
        raise TypeError(f"{where}: unknown option {key!r}; {hint}")


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate the ortho options of a group (or the defaults); return them canonicalised."""
    check_known_options(options, where)
    out = dict(options)
    ortho = out.get("ortho", 0.0)
    if not (isinstance(ortho, str) and ortho == "auto"):
        number = real_number(ortho)
        if number is None:
            raise TypeError(f"{where}: ortho must be a number >= 0 (the penalty weight β) or 'auto', got {ortho!r}")
        if not (number >= 0 and math.isfinite(number)):
            raise ValueError(f"{where}: ortho must be a finite number >= 0 (0 switches the penalty off), got {ortho!r}")
        out["ortho"] = number
    smoothing = real_number(out.get("ortho_smoothing", 0.0))
    if smoothing is None:
        raise TypeError(
            f"{where}: ortho_smoothing must be a number >= 0 (the Huber threshold δ), got {out['ortho_smoothing']!r}"
        )
    if not (smoothing >= 0 and math.isfinite(smoothing)):
        raise ValueError(
            f"{where}: ortho_smoothing must be a finite number >= 0 (0 means exact sign()), got {smoothing!r}"
        )
    if "ortho_smoothing" in out:
        out["ortho_smoothing"] = smoothing
    mode = out.get("ortho_mode", "soft")
    if mode not in MODES:
        raise ValueError(f"{where}: ortho_mode must be one of {MODES}, got {mode!r}")
    pen = out.get("ortho_penalty", "l1")
    if pen not in PENALTIES:
        raise ValueError(f"{where}: ortho_penalty must be one of {PENALTIES}, got {pen!r}")
    policy = out.get("ortho_nonfinite", "warn")
    if policy not in NONFINITE:
        raise ValueError(f"{where}: ortho_nonfinite must be one of {NONFINITE}, got {policy!r}")
    start = out.get("ortho_init", "warn")
    if start not in STARTS:
        raise ValueError(
            f"{where}: ortho_init must be one of {STARTS} (what the soft step does with a parameter that starts "
            f"far from orthonormal), got {start!r}"
        )
    moment = out.get("ortho_second_moment", "mean")
    if moment not in SECOND_MOMENTS:
        raise ValueError(
            f"{where}: ortho_second_moment must be one of {SECOND_MOMENTS} (hard mode's Adam second moment per "
            f"matrix: the mean over its entries, or geoopt's sum), got {moment!r}"
        )
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
    _check_target_options(out, where)
    tol = out.get("ortho_tol")
    if tol is not None:
        number = real_number(tol)
        if number is None or not (0 < number < 1):
            raise ValueError(
                f"{where}: ortho_tol must be None (off) or a number in (0, 1), the largest max |ΦᵀΦ - I| "
                f"that a matrix may keep after a step, got {tol!r}"
            )
        if mode == "hard":
            raise ValueError(
                f"{where}: ortho_tol={tol} corrects the soft step; hard mode stays on the manifold at every step: "
                "use ortho_tol=None with ortho_mode='hard'"
            )
        if out.get("ortho_target", "orthonormal") != "orthonormal":
            raise ValueError(
                f"{where}: ortho_tol={tol} corrects towards the polar factor, an orthonormal target; with "
                f"ortho_target={out['ortho_target']!r} use ortho_tol=None"
            )
        out["ortho_tol"] = number
    if "ortho_layout" in out:
        out["ortho_layout"] = canonical_layout(out["ortho_layout"], f"{where}: ortho_layout")
    return out


def _check_target_options(options: dict[str, Any], where: str) -> None:
    """``ortho_target`` and ``ortho_normalize``: known values, and only with the β and the mode
    that can serve a target whose vectors' lengths are free."""
    target = options.get("ortho_target", "orthonormal")
    normalize = options.get("ortho_normalize", False)
    ortho, mode = options.get("ortho", 0.0), options.get("ortho_mode", "soft")
    check_target(target, normalize, where, prefix="ortho_")
    if target == "orthonormal":
        return
    if isinstance(ortho, str) and ortho == "auto":
        raise ValueError(
            f"{where}: ortho='auto' sets β from the Lagrange multipliers of ΦᵀΦ = I (the exactness threshold "
            "max|sym(Φᵀu)|/2, orthoopt.auto); ortho_target='orthogonal' constrains only the off-diagonal of ΦᵀΦ, "
            "whose multipliers that estimate does not give: set ortho to a number"
        )
    if mode == "hard":
        raise ValueError(
            f"{where}: ortho_mode='hard' moves on the Stiefel manifold ΦᵀΦ = I (orthonormal vectors); "
            f"ortho_target={target!r}{' with ortho_normalize=True' if normalize else ''} leaves the vectors' lengths "
            "free, which is another manifold (the matrices with orthogonal nonzero columns, Φ = QD with QᵀQ = I and "
            "D diagonal positive: the Stiefel manifold times the scalings), and orthoopt does not provide it. Use "
            "ortho_mode='soft' for this target, or ortho_target='orthonormal' in hard mode"
        )


def param_key(group: dict, index: int, group_index: int) -> str:
    """The parameter's name when the optimizer was given names, else ``group{g}.param{i}``."""
    names = group.get("param_names")
    if names is not None and index < len(names):
        return names[index]
    return f"group{group_index}.param{index}"


def ortho_items(group: dict) -> tuple:
    """The group's ortho options as they stand, to tell when they change: their values, and
    the number of keys (which an unknown key added to the group changes).  Read at every step,
    so one C-level pass over ``ORTHO_DEFAULTS``."""
    return (len(group), *map(group.get, ORTHO_DEFAULTS))


def name_unnamed(group: dict, group_index: int, groups: Sequence[dict]) -> None:
    """Name the parameters of a group added without names to an optimizer whose groups have
    them (constrain_'s and param_groups' do), as messages name unnamed ones
    (``group{g}.param{i}``): torch refuses to mix named and unnamed groups.  ``group["params"]``
    is a list."""
    params = group["params"]
    if not groups or "param_names" not in groups[0] or "param_names" in group:
        return
    if params and isinstance(params[0], tuple):
        return  # (name, parameter) pairs: torch takes their names
    group["param_names"] = [param_key({}, i, group_index) for i in range(len(params))]


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


def report_nonfinite(optimizer: Any, names: Sequence[str], policy: str, what: str) -> None:
    """Apply the ``ortho_nonfinite`` policy to parameters with a non-finite matrix.

    ``what`` says what the step does with them.  ``"raise"`` raises FloatingPointError (the
    callers check before anything changes); ``"warn"`` warns once per parameter, at the
    user's ``step()`` line; ``"skip"`` says nothing.
    """
    message = (
        f"{', '.join(names)} holds NaN or Inf: {what} (other matrices and parameters are unaffected). "
        "Lower the learning rate, or clip gradients"
    )
    if policy == "raise":
        raise FloatingPointError(message + "; nothing was changed by this step")
    if policy != "warn":
        return
    # Kept on the instance, not in its state: a copy or an unpickled optimizer warns afresh.
    warned = optimizer.__dict__.setdefault("_ortho_warned", set())
    fresh = [n for n in names if n not in warned]
    if fresh:
        warned.update(fresh)
        warn_at_caller(message + " (warned once per parameter; ortho_nonfinite='raise' to stop instead)")


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn at the caller of ``optimizer.step()``, past orthoopt's and torch's wrappers
    (``torch.no_grad``, the step-hook wrapper) and the training frameworks' (accelerate's
    optimizer, the Trainer's and Lightning's loops), whose depth a fixed stacklevel cannot know."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _WRAPPING_PACKAGES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@functools.cache
def step_size_limit(dtype: torch.dtype) -> float:
    # The soft step divides R by its cutoff 2η (l1) and rescales by η_i: with 2η above the
    # square root of the float's largest value, the cutoff and R/2η leave the float's range
    # (2η = 4e38 in float32 rounds the cutoff to inf, and the step to zero).  No step needs
    # more: once 2η exceeds max|R| the step no longer depends on η (its caps take over).
    # Half parameters take their step in float32.
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return math.sqrt(torch.finfo(wide).max)


def check_step_size(eta: float, dtype: torch.dtype, name: str | Sequence[str], group_index: int | None) -> None:
    """Refuse ``η = 2·lr·ortho`` that the soft step cannot take in ``dtype``; ``name``: the
    parameter, or the names of a bucket's parameters (joined only for the error: this runs at
    every soft step)."""
    if not dtype.is_floating_point:
        return
    limit = step_size_limit(dtype)
    if eta <= limit:
        return
    if not isinstance(name, str):
        name = ", ".join(dict.fromkeys(name))
    where = "" if group_index is None else f"param group {group_index}: "
    raise ValueError(
        f"{where}{name}: 2·lr·ortho = {eta:.3g} is beyond what the soft step can take in {dtype} "
        f"(at most {limit:.3g}); any 2·lr·ortho above max|ΦᵀΦ - I| already gives the largest step, so "
        "use a smaller ortho"
    )
