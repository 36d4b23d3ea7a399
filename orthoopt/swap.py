"""The one-line swap: a training script's own optimizer, or its own list of parameter groups,
turned into an orthoopt one in place.

Scripts build their optimizers with their own rules (timm's and Hugging Face's no-weight-decay
groups, per-layer learning rates).  :func:`constrain_` keeps all of that: each group is split
into its constrained part (one part per layout, :func:`orthoopt.selection.select`) and the
rest, every part keeping the group's options, and the optimizer's class becomes
``orthogonalize(its class)``.  Its state (moments, step counts) stays where it is, keyed by
parameter, so that a swap after some steps goes on from them::

    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    orthoopt.constrain_(opt, model, ortho=3.0, ortho_smoothing=1e-2, exclude=["head"])

The optimizer may sit inside a framework's wrapper (:mod:`orthoopt.wrappers`); the swap changes
the optimizer inside, which the wrapper keeps stepping.  A learning-rate scheduler comes after
the swap (:mod:`orthoopt.schedulers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import required

from . import schedulers, wrappers
from .layout import resolve_layout
from .optim import OrthoAdam, OrthoAdamW, OrthoMixin, OrthoSGD, orthogonalize
from .options import ORTHO_DEFAULTS, check_known_options, check_options, param_key, penalized
from .pieces import pieces
from .selection import Choice, select

__all__ = ["constrain_"]

# The named classes, which pickle and print as orthoopt's; any other base gets orthogonalize's.
_NAMED = {torch.optim.SGD: OrthoSGD, torch.optim.Adam: OrthoAdam, torch.optim.AdamW: OrthoAdamW}


def constrain_(
    target: torch.optim.Optimizer | list,
    model: nn.Module,
    ortho: float | str = 1.0,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    layouts: dict[str, str] | None = None,
    **options: Any,
) -> Any:
    """Constrain ``model``'s weight matrices under an existing optimizer, in place; returns ``target``.

    ``target`` is a ``torch.optim.Optimizer`` (or a framework's wrapper of one), or a list of
    parameter groups (dicts) or of parameters, whose contents are replaced by the split
    groups.  ``model`` names the parameters and says which are weight matrices; ``ortho``,
    ``include``, ``exclude``, ``layouts`` and ``options`` (``ortho_smoothing``,
    ``ortho_mode``, ..., or base options such as ``weight_decay`` for the constrained parts
    only) are those of :func:`orthoopt.param_groups`.  Every part of a split group keeps the
    group's other options; the unconstrained parts step bitwise as before.  As in
    :func:`orthoopt.param_groups`, ``ortho_init`` defaults to ``"project"``.  LBFGS, which
    takes one group, keeps it whole (the layout ``'auto'`` leaves its vectors alone).

    Call it right after the optimizer is built (or has loaded its state) and before a
    learning-rate scheduler is built on it (the scheduler keeps one value per group); a
    scheduler's state saved before the swap loads with
    :func:`orthoopt.load_scheduler_state`.  Nothing is changed when it raises.
    """
    # The one-line swap starts on the manifold: the soft pull from a typical init can outlast the run.
    options = check_options({"ortho": ortho, "ortho_init": "project", **options}, "constrain_")
    options.pop("ortho")
    layout = options.pop("ortho_layout", None)
    optimizer = wrappers.unwrap(target)
    if isinstance(optimizer, torch.optim.Optimizer):
        _check_swappable(optimizer, target)
        groups = optimizer.param_groups
    elif isinstance(target, list):
        groups = _as_groups(target)
        if any(g.get("ortho", 0) == "auto" or g.get("ortho", 0) > 0 for g in groups):
            raise ValueError("constrain_: these groups already constrain parameters (ortho > 0); call constrain_ once")
    else:
        raise TypeError(
            "constrain_ takes a torch.optim.Optimizer (or accelerate's or Lightning's wrapper of one) or a list "
            f"of parameter groups, got {type(target).__name__}; for a generator such as model.parameters(), "
            "use orthoopt.param_groups(model, ...) instead"
        )
    held = {id(p) for g in groups for p in g["params"]}
    chosen = select(
        model, include=include, exclude=exclude, layouts=layouts, layout=layout, among=held, where="constrain_"
    )
    if options.get("ortho_mode") == "hard" and isinstance(optimizer, torch.optim.Optimizer):
        _check_fresh_state(optimizer, chosen)
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(optimizer, torch.optim.LBFGS):
        split, origin = _whole(optimizer, chosen, names, ortho, options), [0]
    else:
        split, origin = _split(groups, chosen, names, ortho, options)
    if isinstance(optimizer, torch.optim.Optimizer):
        before = len(groups)
        _become_ortho(optimizer, split)
        schedulers.remember_swap(optimizer, origin, before)
    else:
        for _ in pieces(split):  # resolves every layout: the optimizer would check them only at construction
            pass
        target[:] = split
    return target


def _check_swappable(optimizer: torch.optim.Optimizer, target: Any) -> None:
    kind = type(optimizer).__name__
    if isinstance(optimizer, OrthoMixin) and any(penalized(g) for g in optimizer.param_groups):
        raise ValueError(
            f"constrain_: this {kind} already constrains parameters; call constrain_ once, on the optimizer "
            "the script built"
        )
    # torch's schedulers wrap the optimizer's step (that wrapper would keep calling the base class's
    # step after the swap); ReduceLROnPlateau and timm's leave no mark on the optimizer.  The
    # 'initial_lr' of the groups is no mark: it comes with a state saved by a run that had one.
    found = schedulers.built_on(optimizer, target)
    if found or hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        what = ", ".join(dict.fromkeys(type(s).__name__ for s in found)) or "its step is wrapped by one"
        raise ValueError(
            f"constrain_: a learning-rate scheduler ({what}) was already built on this {kind}; a scheduler keeps "
            "one value per group and would not schedule the split groups. Call constrain_ right after building "
            "the optimizer (or loading its state), then build the scheduler (and load a state it saved before "
            "the swap with orthoopt.load_scheduler_state)"
        )


def _as_groups(target: list) -> list[dict[str, Any]]:
    """A list of group dicts, or of parameters (or ``(name, parameter)`` pairs) as one group."""
    if not target:
        raise ValueError("constrain_ got an empty list of parameter groups")
    if all(isinstance(g, dict) for g in target):
        groups = [dict(g) for g in target]
    elif not any(isinstance(g, dict) for g in target):
        groups = [{"params": list(target)}]
    else:
        raise TypeError("constrain_: a list of groups must hold only dicts, or only parameters")
    for gi, g in enumerate(groups):
        check_known_options(g, f"constrain_: group {gi}")
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and all(isinstance(p, tuple) for p in params):
            g["param_names"] = [n for n, _ in params]
            params = [p for _, p in params]
        g["params"] = params
    return groups


def _check_fresh_state(optimizer: torch.optim.Optimizer, chosen: list[Choice]) -> None:
    stepped = [name for name, p, _ in chosen if optimizer.state.get(p)]
    if stepped:
        raise ValueError(
            f"constrain_: ortho_mode='hard' on parameters this {type(optimizer).__name__} has already stepped "
            f"({', '.join(stepped[:3])}{', ...' if len(stepped) > 3 else ''}): hard mode keeps its own "
            "per-matrix state and projects at the first hard step, which their Euclidean state would skip. "
            "Swap before the first step, or use ortho_mode='soft', which keeps the state"
        )


def _split(
    groups: list[dict[str, Any]], chosen: list[Choice], names: dict[int, str], ortho: Any, options: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Each group's constrained parts (one per layout) and then its other part, every part
    keeping the group's options; all of them named.  And the index of the group each part
    comes from."""
    layout_of = {id(p): (name, spec) for name, p, spec in chosen}
    out, origin = [], []
    for gi, group in enumerate(groups):
        given = group.get("param_names")
        parts: dict[str | None, list[tuple[str, torch.Tensor]]] = {}
        for i, p in enumerate(group["params"]):
            name, spec = layout_of.get(id(p), (names.get(id(p), param_key({}, i, gi)), None))
            parts.setdefault(spec, []).append((given[i] if given else name, p))
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if not parts:
            out.append({**rest, "params": [], "param_names": []})
            origin.append(gi)
        for spec in sorted(parts, key=lambda s: s is None):  # stable: layouts in order, then the rest
            items = parts[spec]
            extra = {"ortho": 0.0} if spec is None else {**options, "ortho": ortho, "ortho_layout": spec}
            out.append({**rest, **extra, "params": [p for _, p in items], "param_names": [n for n, _ in items]})
            origin.append(gi)
    return out, origin


def _whole(
    optimizer: torch.optim.Optimizer, chosen: list[Choice], names: dict[int, str], ortho: Any, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """LBFGS's one group whole, in its order (its state is one flat vector over the group),
    constrained with the chosen parameters' one layout, where that leaves the others alone."""
    (group,) = optimizer.param_groups
    layout_of = {id(p): spec for _, p, spec in chosen}
    specs = list(dict.fromkeys(layout_of.values()))
    given = group.get("param_names")
    named = [given[i] if given else names.get(id(p), param_key({}, i, 0)) for i, p in enumerate(group["params"])]
    why = None
    if len(specs) > 1:
        why = f"constrains its matrices with several layouts ({', '.join(map(repr, specs))}), one group each"
    else:
        for name, p in zip(named, group["params"]):
            if id(p) not in layout_of and not _left_alone(specs[0], p):
                what = "weight matrix" if p.dim() >= 2 else "parameter"
                why = f"leaves out the {what} '{name}', which ortho_layout={specs[0]!r} would not leave alone"
                break
    if why is not None:
        raise ValueError(
            f"constrain_: {type(optimizer).__name__} takes one parameter group (no per-parameter options), and this "
            f"swap {why}. Constrain all of its weight matrices with one layout, e.g. by include/exclude such "
            "that none is left out (the layout 'auto' leaves its vectors alone), or use another optimizer"
        )
    rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return [
        {
            **rest,
            **options,
            "ortho": ortho,
            "ortho_layout": specs[0],
            "params": list(group["params"]),
            "param_names": named,
        }
    ]


def _left_alone(spec: str, p: torch.Tensor) -> bool:
    try:
        return resolve_layout(spec, p.shape, "") is None
    except ValueError:
        return False


def _become_ortho(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Make ``optimizer`` an instance of ``orthogonalize(its class)`` holding ``groups``.

    A fresh instance is built first from the same groups and defaults: its constructor runs
    every check (nothing is changed when one fails) and gives the attributes the ortho class
    sets up, which ``optimizer`` then takes, keeping its own state, hooks and defaults.
    """
    base = next(c for c in type(optimizer).__mro__ if not issubclass(c, OrthoMixin))  # an Ortho class's torch class
    cls = type(optimizer) if isinstance(optimizer, OrthoMixin) else _NAMED.get(base) or orthogonalize(base)
    signature = inspect.signature(base.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    defaults = {
        k: v
        for k, v in optimizer.defaults.items()
        if (takes_any or k in signature) and k not in ORTHO_DEFAULTS and v is not required
    }
    fresh = cls(groups, **defaults)
    optimizer.__class__ = cls
    for key, value in vars(fresh).items():
        if key not in vars(optimizer):
            setattr(optimizer, key, value)
    optimizer.defaults.update({k: fresh.defaults[k] for k in ORTHO_DEFAULTS})
    optimizer._ortho_plan = None
    # In place: wrappers that copied the list (Lightning's, accelerate's) see the new groups.
    optimizer.param_groups[:] = fresh.param_groups
