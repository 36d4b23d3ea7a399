"""Learning-rate schedulers around the swap: those already built on an optimizer, and the state
of one saved before the swap.

A scheduler keeps values per parameter group (``base_lrs``, LambdaLR's ``lr_lambdas``,
ReduceLROnPlateau's ``min_lrs``) and steps the groups it saw when it was built, so
:func:`orthoopt.constrain_`, which splits groups, must come before it.  :func:`built_on` finds
the schedulers built on an optimizer (torch's, including ReduceLROnPlateau, which leaves no
mark on the optimizer, and timm's), recognised by class without importing their packages.

Resuming a run saved before the swap: the optimizer's state loads into the plain optimizer,
which is then swapped; the scheduler is built on the swapped one, and its saved state, one
value per group of before the swap, loads through :func:`load_scheduler_state`, which gives
each split group the values of the group it came from.  It also undoes what building the
scheduler did to the groups (LambdaLR sets ``lr`` to ``base_lr · λ(0)``, OneCycleLR sets
``lr`` and ``betas``): torch's rule is to build the scheduler before loading the optimizer's
state, which the swap in between cannot follow, so the groups get back the values they had
at the swap, the loaded ones.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from typing import Any

import torch

from . import wrappers

__all__ = ["built_on", "remember_swap", "load_scheduler_state"]

# (package, class name) of the schedulers' base classes; each keeps its optimizer as ``.optimizer``.
SCHEDULERS = (("torch", "LRScheduler"), ("torch", "ReduceLROnPlateau"), ("timm", "Scheduler"))
# The entries of torch's and timm's scheduler states that hold one value per parameter group.
PER_GROUP = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
    "base_values",
)
# SequentialLR's and ChainedScheduler's states hold the states of their schedulers here.
NESTED = "_schedulers"
SWAP = "_ortho_swap"


def built_on(*optimizers: Any) -> list[Any]:
    """The live schedulers whose ``.optimizer`` is one of ``optimizers`` (an optimizer and the
    wrappers around it).  One walk over the objects the garbage collector tracks: for the
    swap, once, not for a training loop."""
    ids = {id(o) for o in optimizers}
    found: dict[int, Any] = {}
    for holder in gc.get_referrers(*optimizers):
        # A scheduler refers to its optimizer itself, or through its __dict__ once that is a dict of its own.
        owners = [holder]
        if isinstance(holder, dict):
            owners = [o for o in gc.get_referrers(holder) if getattr(o, "__dict__", None) is holder]
        for owner in owners:
            if wrappers.is_instance_by_name(owner, SCHEDULERS) and id(getattr(owner, "optimizer", None)) in ids:
                found[id(owner)] = owner
    return list(found.values())


@dataclass
class _Swap:
    """What :func:`load_scheduler_state` needs of a swap: the index, before the swap, of the
    group each group came from, and each group's options right after the swap."""

    origin: list[int]
    before: int
    options: list[dict[str, Any]]


def _options(group: dict[str, Any]) -> dict[str, Any]:
    """A group's options (all but its parameters and their names), each tensor among them a copy."""
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else v
        for k, v in group.items()
        if k not in ("params", "param_names")
    }


def remember_swap(optimizer: torch.optim.Optimizer, origin: list[int], before: int) -> None:
    """Record the swap of ``optimizer`` until its first step or state load, after which its
    groups no longer hold what they held at the swap.  (The two hooks stay, as no-ops: torch
    runs hooks from a dict that they cannot leave while it runs them.)"""
    record = _Swap(origin, before, [_options(g) for g in optimizer.param_groups])

    def forget(opt: torch.optim.Optimizer, *args: Any) -> None:
        if opt.__dict__.get(SWAP) is record:
            del opt.__dict__[SWAP]

    optimizer.register_step_pre_hook(forget)
    optimizer.register_load_state_dict_post_hook(forget)
    optimizer.__dict__[SWAP] = record


def load_scheduler_state(scheduler: Any, state_dict: dict[str, Any]) -> None:
    """Load into ``scheduler``, built on an optimizer that :func:`orthoopt.constrain_` has just
    split, a state saved before the swap (one value per group as the groups were then).

    Each split group gets the values of the group it came from, and the groups get back the
    options they had at the swap (the optimizer's loaded state), which building the scheduler
    may have changed.  Call it after building the scheduler, before the first step.  A state
    saved after the swap (one value per group as they are now) loads as it is.
    """
    optimizer = wrappers.unwrap(getattr(scheduler, "optimizer", None))
    record = getattr(optimizer, "__dict__", {}).get(SWAP)
    where = f"load_scheduler_state: the {type(scheduler).__name__}"
    if record is None:
        raise ValueError(
            f"{where}'s optimizer was not swapped by constrain_ in this process, or has stepped or loaded a state "
            "since: its groups are those the state was saved with; use scheduler.load_state_dict(state)"
        )
    after = len(record.origin)
    counts = {len(v) for key, v in _per_group(state_dict)}
    if counts <= {record.before}:
        scheduler.load_state_dict(_remap(state_dict, record.origin))
        for group, options in zip(optimizer.param_groups, record.options):
            group.update(_options(options))
        return
    for key, values in _per_group(state_dict):
        if len(values) != after:
            raise ValueError(
                f"{where} state's {key!r} holds {len(values)} value(s), one per parameter group, but the optimizer had "
                f"{record.before} groups before the swap and {after} after: the state belongs to another optimizer"
            )
    scheduler.load_state_dict(state_dict)


def _per_group(state: dict[str, Any]) -> list[tuple[str, list]]:
    out = [(key, state[key]) for key in PER_GROUP if isinstance(state.get(key), (list, tuple))]
    for nested in state.get(NESTED) or ():
        if isinstance(nested, dict):
            out += _per_group(nested)
    return out


def _remap(state: dict[str, Any], origin: list[int]) -> dict[str, Any]:
    """``state`` with each per-group list holding, for each group, its origin's value (copied:
    the groups of one origin must not share a tensor or a lambda's state)."""
    out = dict(state)
    for key in PER_GROUP:
        if isinstance(state.get(key), (list, tuple)):
            out[key] = [copy.deepcopy(state[key][i]) for i in origin]
    if isinstance(state.get(NESTED), list):
        out[NESTED] = [_remap(s, origin) if isinstance(s, dict) else s for s in state[NESTED]]
    return out
