"""Which parameters of a model are put under the constraint, with which layout, and how they are named.

The default rule (:mod:`orthoopt.rule`; docs/selection.md says the same in prose) reads what
each layer computes:

* **Constrained by default**: the weights of ``nn.Linear``, ``nn.Conv{1,2,3}d`` and
  ``nn.ConvTranspose{1,2,3}d`` (subclasses included), transformers' ``Conv1D`` (GPT-2),
  ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and their cells, ``nn.MultiheadAttention``, and every
  parameter with a registered layout (:mod:`orthoopt.registry`).
* **Their layouts**: a fused projection (q/k/v in one weight, a gated MLP's gate and value,
  an LSTM's gates) gets the layout registered for the class that owns it, read off that
  class's forward: ``row_groups:G`` for equal row blocks, ``row_blocks:...`` for blocks of
  unequal sizes or per-head interleaving, ``column_groups:3`` for GPT-2's ``c_attn``.  A
  grouped convolution gets one block per group (``row_groups:G``); everything else ``"auto"``.
* **Left out by default**: embeddings (and weights tied to one), norm layers, biases and every
  other 0-D or 1-D parameter, raw ``nn.Parameter``s of other modules (timm's ``cls_token`` and
  ``pos_embed``, the ``(l, m, n)`` group tensor); the model's output layer (found by its
  framework's convention, :mod:`orthoopt.heads`); layers that encode positions; depthwise
  convolutions and per-channel scales; weights whose matrices are single vectors; weights
  under ``weight_norm``/``spectral_norm``/``parametrizations.orthogonal``.
* ``include``: a pattern that names a parameter in full (``"pos_embed"``) or by a glob over
  full names (``"layers.*.phi"``) selects it whatever its module (an explicit name wins over
  the default skips; a glob passes over 0-D and 1-D parameters); a pattern that names a
  module selects the parameters of the default rule inside it, and the weights of that
  layer itself when the rule left it out (``include=["head"]`` brings the output layer
  back, with the layout the rule would give it).  ``exclude`` removes whatever it matches.
  A pattern that matches no parameter, or an ``include`` pattern that selects nothing, is a
  ``ValueError`` that lists real names.  Both take a string (one pattern) or any iterable of
  strings, tuples nested in it included (timm's ``pretrained_cfg["classifier"]``).
* Names are matched with and without the prefixes that wrappers add (``_orig_mod.`` from
  ``torch.compile``, ``module.`` from DDP, ``_fsdp_wrapped_module.`` and
  ``_checkpoint_wrapped_module.``), so the bare model's patterns fit a wrapped one.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layout import Layout, canonical_layout, resolve_layout
from .options import check_options
from .rule import LEFT_OUT, Verdict, is_lazy, survey

__all__ = ["param_groups", "constrained", "select", "default_layouts", "bare_name"]

# Path components that wrappers insert: torch.compile, FSDP1, activation checkpointing.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

Choice = tuple[str, torch.Tensor, str]  # (name, parameter, layout string)


# -- names and patterns ---------------------------------------------------------------
def bare_name(name: str) -> str:
    """``name`` without the components wrappers add (``_orig_mod.``, a leading ``module.``, ...)."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":  # DDP, DataParallel, accelerate
        parts.pop(0)
    return ".".join(parts)


def _patterns(value: str | Iterable[str] | None, option: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else [value]
    # a tuple inside the list: timm's pretrained_cfg["classifier"] of a model with two heads
    patterns = [q for p in patterns for q in (p if isinstance(p, (tuple, list)) else [p])]
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"{option} must be a string or an iterable of strings (parameter names, module names or globs), "
                f"got {value!r}"
            )
    return patterns


def _match(pattern: str, keys: list[str]) -> str | None:
    """How ``pattern`` matches a parameter known by ``keys``: 'exact', 'glob', 'module' or None."""
    if pattern in keys:
        return "exact"
    if any(fnmatch.fnmatchcase(k, pattern) for k in keys):
        return "glob"
    if any(k.startswith(pattern + ".") for k in keys):
        return "module"
    return None


class _Names:
    """Every parameter of a model once, in ``named_parameters`` order, with all its names
    (a tied weight has one per module) and their bare forms."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params: dict[int, torch.Tensor] = {}
        self.aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.params.setdefault(id(p), p)
            self.aliases.setdefault(id(p), []).append(name)
        self.keys = {
            pid: list(dict.fromkeys(k for n in names for k in (n, bare_name(n)))) for pid, names in self.aliases.items()
        }

    def name(self, pid: int) -> str:
        return self.aliases[pid][0]

    def exact_alias(self, pid: int, pattern: str) -> str:
        return next((n for n in self.aliases[pid] if pattern in (n, bare_name(n))), self.name(pid))

    def check_matches(self, pattern: str, option: str) -> None:
        if not any(_match(pattern, keys) for keys in self.keys.values()):
            raise ValueError(self._no_match(pattern, option))

    def _no_match(self, pattern: str, option: str) -> str:
        names = [self.name(pid) for pid in self.params]
        modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
        close = difflib.get_close_matches(pattern, modules + names, n=3, cutoff=0.5)
        top = list(dict.fromkeys(bare_name(n).split(".")[0] for n in names))
        shown = top if len(top) <= 12 else top[:8] + ["..."] + top[-3:]
        quoted = [repr(n) for n in names]
        sample = quoted if len(names) <= 6 else quoted[:3] + ["..."] + quoted[-3:]
        hint = f" (closest: {', '.join(map(repr, close))})" if close else ""
        return (
            f"{option} pattern {pattern!r} matches no parameter of {type(self.model).__name__}{hint}; "
            f"its top-level modules are {', '.join(shown)} and its parameters are named like "
            f"{', '.join(sample)}. A pattern is a parameter name ('fc.weight'), a module name ('fc') "
            "or a glob over parameter names ('*.qkv.weight'); fix or drop this one"
        )


# -- the default rule -------------------------------------------------------------------
def default_layouts(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): layout}`` of every parameter the default rule constrains."""
    return {pid: v.layout for pid, v in survey(model).items() if v.selected}


# -- the selection ----------------------------------------------------------------------
def select(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    layouts: dict[str, str] | None = None,
    layout: str | Layout | None = None,
    among: set[int] | None = None,
    where: str = "param_groups",
    allow_empty: bool = False,
) -> list[Choice]:
    """``(name, parameter, layout)`` of each parameter of ``model`` to constrain, in
    ``named_parameters`` order (see the module docstring for the rule).

    ``layout`` replaces every default layout; ``layouts`` maps patterns to layouts (the first
    that matches wins, the others keep theirs).  ``among`` (ids of parameters) restricts the
    choice to the parameters an optimizer holds; ``where`` names the caller in errors;
    ``allow_empty`` returns an empty choice rather than raising.
    """
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude") or []
    if layouts is not None and not isinstance(layouts, dict):
        raise TypeError(f"{where}: layouts must be a dict {{pattern: layout}}, got {layouts!r}")
    layouts = {p: canonical_layout(v, f"layouts[{p!r}]") for p, v in (layouts or {}).items()}
    if layout is not None:
        layout = canonical_layout(layout, "ortho_layout")
    names = _Names(model)
    for option, patterns in (("include", include or []), ("exclude", exclude), ("layouts", layouts)):
        for pattern in patterns:
            names.check_matches(pattern, option)
    verdicts = survey(model)
    chosen: list[Choice] = []
    picked: dict[str, bool] = {pattern: False for pattern in include or []}
    for pid, p in names.params.items():
        if among is not None and pid not in among:
            continue
        if include is None:
            name = names.name(pid) if verdicts[pid].selected else None
        else:
            name = _included(names, pid, include, verdicts[pid], picked, where)
        if name is None or any(_match(pattern, names.keys[pid]) for pattern in exclude):
            continue
        if is_lazy(p):
            raise ValueError(
                f"{where}: parameter '{name}' is not initialized yet (a lazy module): run one forward pass "
                "before building the optimizer"
            )
        spec = layout or next((v for k, v in layouts.items() if _match(k, names.keys[pid])), None)
        chosen.append((name, p, spec or verdicts[pid].layout or "auto"))
    _check_selected(names, verdicts, picked, layouts, chosen, among, where, allow_empty)
    return chosen


def _included(
    names: _Names, pid: int, include: list[str], verdict: Verdict, picked: dict[str, bool], where: str
) -> str | None:
    """The name under which ``include`` selects parameter ``pid``, or None (``picked`` records
    which patterns selected something)."""
    p, name = names.params[pid], None
    for pattern in include:
        how = _match(pattern, names.keys[pid])
        if how is None or (
            how == "module" and not verdict.selected and not _names_its_layer(pattern, names, pid, verdict)
        ):
            continue  # a module name selects only the default rule's matrices inside it, and its own weights
        if not is_lazy(p) and p.dim() < 2:
            if how == "exact":
                raise ValueError(
                    f"{where}: include names parameter '{names.name(pid)}' of shape {tuple(p.shape)}, which has "
                    "fewer than 2 dimensions and cannot be orthonormal; drop it from include"
                )
            continue  # a glob passes over vectors
        picked[pattern] = True
        if name is None or how == "exact":
            name = names.exact_alias(pid, pattern) if how == "exact" else names.name(pid)
    return name


def _names_its_layer(pattern: str, names: _Names, pid: int, verdict: Verdict) -> bool:
    """Whether ``pattern`` names the very layer of a weight the default rule leaves out (its
    output layer, a depthwise conv), which brings it back; a tied weight needs its full name."""
    if verdict.layout is None or verdict.reason == LEFT_OUT["shared"]:
        return False
    return any(key.rpartition(".")[0] == pattern for key in names.keys[pid])


def _check_selected(
    names: _Names,
    verdicts: dict[int, Verdict],
    picked: dict[str, bool],
    layouts: dict[str, str],
    chosen: list[Choice],
    among: set[int] | None,
    where: str,
    allow_empty: bool,
) -> None:
    """Every include pattern selected something, every layouts pattern fits a chosen parameter,
    and something is chosen."""
    for pattern, ok in picked.items():
        if ok:
            continue
        hits = [pid for pid in names.params if _match(pattern, names.keys[pid])]
        why = [
            f"'{names.name(pid)}' ("
            + ("not held by this optimizer" if among is not None and pid not in among else verdicts[pid].reason)
            + ")"
            for pid in hits[:4]
        ]
        raise ValueError(
            f"{where}: include pattern {pattern!r} matches {len(hits)} parameter(s) but selects none: "
            f"{', '.join(why)}{', ...' if len(hits) > 4 else ''}. A module name selects the weight matrices of "
            "the default rule inside it and the weights of the layer it names; name a parameter in full (or by a "
            "glob) to constrain it anyway"
        )
    taken = {id(p) for _, p, _ in chosen}
    for pattern in layouts:
        if not any(_match(pattern, names.keys[pid]) for pid in taken):
            raise ValueError(
                f"{where}: layouts pattern {pattern!r} matches no constrained parameter; "
                "constrain one it matches (include) or drop the pattern"
            )
    if not chosen and not allow_empty:
        held = "" if among is None else " among the parameters this optimizer holds"
        raise ValueError(
            f"{where}: no parameter of {type(names.model).__name__} is constrained{held}: the default rule "
            "takes the weights of Linear, Conv, RNN/LSTM/GRU and MultiheadAttention layers (but not the output "
            "layer, depthwise convs or positional encodings), and nothing else unless include names it "
            "('pos_embed', 'layers.*.phi', 'head'); name the parameters to constrain with include, or build the "
            "groups by hand (orthoopt.audit(model) lists every weight and why it is left out)"
        )


def param_groups(
    model: nn.Module,
    ortho: float | str = 1.0,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    layouts: dict[str, str] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into penalized groups (one per layout) and an unpenalized one.

    Which parameters and layouts: :func:`select` (the module docstring has the rule).
    ``options`` (e.g. ``ortho_smoothing``, ``ortho_mode``, ``lr``) go into the penalized
    groups; an ``ortho_layout`` among them replaces every default layout, ``layouts``
    (``{pattern: layout}``) some of them.  Groups carry ``param_names`` so that errors and
    logs name parameters.  ``ortho_init`` defaults to ``"project"`` here (the optimizer's own
    default is ``"warn"``): the constrained weights start on the manifold after the first step
    (:mod:`orthoopt.guard`).
    """
    # The one-line swap starts on the manifold: the soft pull from a typical init can outlast the run.
    options = check_options({"ortho": ortho, "ortho_init": "project", **options}, "param_groups")
    options.pop("ortho")
    chosen = select(
        model,
        include=include,
        exclude=exclude,
        layouts=layouts,
        layout=options.pop("ortho_layout", None),
    )
    groups = penalized_groups(chosen, ortho, options)
    taken = {id(p) for _, p, _ in chosen}
    off = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    if off:
        groups.append({"params": [p for _, p in off], "param_names": [n for n, _ in off], "ortho": 0.0})
    return groups


def penalized_groups(chosen: list[Choice], ortho: float | str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """One group per layout, in order of first appearance, each ``{**options, ortho, ortho_layout}``."""
    by_layout: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p, spec in chosen:
        by_layout.setdefault(spec, []).append((name, p))
    return [
        {
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            **options,
            "ortho": ortho,
            "ortho_layout": spec,
        }
        for spec, items in by_layout.items()
    ]


def constrained(model: nn.Module, layout: str | None = None, **kwargs: Any) -> list[tuple[str, torch.Tensor, Layout]]:
    """(name, parameter, resolved layout) for each parameter :func:`param_groups` would penalize;
    ``layout`` (None: the default rule's) replaces every layout."""
    out = []
    for name, p, spec in select(model, layout=layout, **kwargs):
        resolved = resolve_layout(spec, p.shape, f"parameter '{name}'")
        if resolved is not None:
            out.append((name, p, resolved))
    return out
