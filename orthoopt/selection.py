"""Which parameters of a model are put under the constraint, and how they are named.

:func:`param_groups` splits a model's parameters into a penalized group and an unpenalized
one; :func:`constrained` lists the penalized ones with their layouts, for the helpers that
read or snap a model without an optimizer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layout import Layout, resolve_layout
from .options import ORTHO_DEFAULTS, check_options

__all__ = ["param_groups", "constrained"]


_UNPENALIZED_MODULES = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def param_groups(
    model: nn.Module,
    ortho: float | str = 1.0,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    **options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a penalized group and an unpenalized one.

    Penalized: every parameter of 2 or more dimensions (Linear and Conv weights, raw 3-D
    tensors) outside embeddings and norm layers, whose name matches ``include`` (all when
    None) and not ``exclude``.  A pattern matches a name exactly, as a module prefix
    (``"head"`` matches ``"head.weight"``) or as a glob (``"*.bias"``).  ``options`` (e.g.
    ``ortho_smoothing``, ``ortho_layout``, ``ortho_mode``, ``lr``) go into the penalized group.
    Groups carry ``param_names`` so that errors and logs name parameters.
    """
    check_options({"ortho": ortho, **{k: v for k, v in options.items() if k in ORTHO_DEFAULTS}}, "param_groups")
    exclude = list(exclude)
    include = None if include is None else list(include)
    skip = {id(p) for mod in model.modules() if isinstance(mod, _UNPENALIZED_MODULES) for p in mod.parameters()}
    on: list[tuple[str, nn.Parameter]] = []
    off: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        wanted = (
            p.dim() >= 2
            and id(p) not in skip
            and not _matches(name, exclude)
            and (include is None or _matches(name, include))
        )
        (on if wanted else off).append((name, p))
    groups = []
    if on:
        groups.append({"params": [p for _, p in on], "param_names": [n for n, _ in on], "ortho": ortho, **options})
    if off:
        groups.append({"params": [p for _, p in off], "param_names": [n for n, _ in off], "ortho": 0.0})
    return groups


def constrained(model: nn.Module, layout: str, **kwargs: Any) -> list[tuple[str, torch.Tensor, Layout]]:
    """(name, parameter, layout) for each parameter :func:`param_groups` would penalize."""
    named = dict(model.named_parameters())
    out = []
    for group in param_groups(model, ortho_layout=layout, **kwargs):
        if group["ortho"]:
            for n in group["param_names"]:
                lay = resolve_layout(layout, named[n].shape, f"parameter '{n}'")
                if lay is not None:
                    out.append((n, named[n], lay))
    return out
