"""Loading an ortho optimizer's checkpoint: the checks that refuse one it cannot resume, and
half-precision parameters' float32 state kept float32.

:meth:`orthoopt.optim.OrthoMixin.load_state_dict` runs :func:`checked_state_dict` as torch's
last ``load_state_dict`` pre-hook, so that the user's own pre-hooks see and may rewrite the
checkpoint first, and :func:`keep_wide_state` after torch's load.  Pickling of the classes that
:func:`orthoopt.orthogonalize` makes stays with them in :mod:`orthoopt.optim`.
"""

from __future__ import annotations

from typing import Any

import torch

from .options import ORTHO_DEFAULTS, penalized, same_layout

__all__ = ["checked_state_dict", "keep_wide_state"]


def checked_state_dict(state_dict: dict[str, Any], param_groups: list[dict]) -> dict[str, Any]:
    """``state_dict`` with the optimizer's ortho options filled into saved groups that lack
    them (a plain torch optimizer's, or an older orthoopt's); raises, before anything has
    changed, where it cannot be resumed: other groups, another layout, mode or penalty, or
    state of another parameter's shape."""
    _check_same_grouping(state_dict["param_groups"], param_groups)
    saved_groups = [
        {**{k: group[k] for k in ORTHO_DEFAULTS if k in group}, **saved}
        for group, saved in zip(param_groups, state_dict["param_groups"])
    ] + list(state_dict["param_groups"][len(param_groups) :])
    params = [p for g in param_groups for p in g["params"]]
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        for key in ("ortho_layout", "ortho_mode", "ortho_penalty", "ortho_target", "ortho_normalize"):
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


def keep_wide_state(state_dict: dict[str, Any], param_groups: list[dict], state: Any) -> None:
    """After torch's load, which casts state to its parameter's dtype: float32 state of a
    float16/bfloat16 parameter (hard mode's, a user's fp32 master state) stays float32, and a
    later piece's step count (``step.k``, :mod:`orthoopt.pieces`) is kept as torch keeps
    ``step``."""
    params = [p for g in param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for index, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(index, {}).items():
            loaded = state[p].get(key)
            if isinstance(value, torch.Tensor) and _piece_step(key):
                state[p][key] = torch.optim.Optimizer._process_value_according_to_param_policy(
                    p, value, index, state_dict["param_groups"], "step"
                )
            elif (
                isinstance(value, torch.Tensor)
                and isinstance(loaded, torch.Tensor)
                and value.dtype == torch.float32
                and p.dtype in (torch.float16, torch.bfloat16)
                and loaded.dtype != torch.float32
            ):
                state[p][key] = value.to(device=p.device, copy=True)


def _piece_step(key: str) -> bool:
    base, _, part = key.rpartition(".")
    return base == "step" and part.isdigit()


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
    stacked views of the parameter and per-matrix state (``ortho_*``, ``stiefel_*``, suffixed
    for a parameter's later pieces)."""
    if value.dim() == 0 or value.shape == p.shape or (value.dim() == 1 and value.numel() == p.numel()):
        return True
    if key.startswith(("ortho", "stiefel")):
        return True
    if value.dim() == p.dim() and all(v in (1, s) for v, s in zip(value.shape, p.shape)):
        return True
    return value.dim() == 1 and value.numel() == total
