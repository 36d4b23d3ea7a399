"""Which parameters of a model are put under the constraint, with which layout, and how they are named.

The rule (the README's "Layouts" section says the same):

* **Constrained by default**: the ``weight`` of ``nn.Linear``, ``nn.Conv{1,2,3}d`` and
  ``nn.ConvTranspose{1,2,3}d`` (subclasses included) and of transformers' ``Conv1D`` (GPT-2);
  the ``weight_ih_l*`` and ``weight_hh_l*`` (``_reverse`` included) of ``nn.RNN``, ``nn.LSTM``
  and ``nn.GRU``, an LSTM's ``weight_hr_l*`` (``proj_size``), the cells' ``weight_ih`` and
  ``weight_hh``; ``nn.MultiheadAttention``'s ``in_proj_weight`` or ``q/k/v_proj_weight`` (its
  ``out_proj`` is an ``nn.Linear``).
* **Their layouts**: ``"auto"`` (:mod:`orthoopt.layout`), except for the matrices that stack
  several blocks, which get one block each (``"row_groups:G"``): an LSTM's ``weight_ih``/
  ``weight_hh`` its 4 gates, a GRU's its 3 gates, ``in_proj_weight`` its q, k and v, and a
  ``nn.Linear`` named ``qkv`` whose output splits in three (timm's attention, which reshapes
  it to ``(3, heads, head_dim)`` exactly as ``in_proj_weight`` is split); GPT-2's ``c_attn``
  (a ``Conv1D`` of ``(in, 3·in)``) gets ``"column_groups:3"`` for the same reason.
* **Left out by default**: embeddings (and weights tied to one), norm layers, biases and every
  other 0-D or 1-D parameter, and raw ``nn.Parameter``s of other modules (timm's
  ``cls_token (1, 1, D)`` and ``pos_embed (1, N, D)``, the ``(l, m, n)`` group tensor).
* ``include``: a pattern that names a parameter in full (``"pos_embed"``) or by a glob over
  full names (``"layers.*.phi"``) selects it whatever its module (an explicit name wins over
  the default skips; a glob passes over 0-D and 1-D parameters); a pattern that names a
  module (``"blocks"``) selects the parameters of the default rule inside it.
  ``exclude`` removes whatever it matches.  A pattern that matches no parameter, or an
  ``include`` pattern that selects nothing, is a ``ValueError`` that lists real names.
* Names are matched with and without the prefixes that wrappers add (``_orig_mod.`` from
  ``torch.compile``, ``module.`` from DDP, ``_fsdp_wrapped_module.`` and
  ``_checkpoint_wrapped_module.``), so the bare model's patterns fit a wrapped one; a string
  is one pattern.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .layout import Layout, canonical_layout, resolve_layout
from .options import check_options

__all__ = ["param_groups", "constrained", "select", "default_layouts", "bare_name"]

# A weight shared with one of these (a decoder tied to its embedding) is left out by default.
_SHARED_SKIP = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
# Path components that wrappers insert: torch.compile, FSDP1, activation checkpointing.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_GATES = {"LSTM": 4, "GRU": 3}

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
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"{option} must be a string or a list of strings (parameter names, module names or globs), "
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
def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), looked up only if transformers is already imported."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def _weights_of(module: nn.Module, attr: str, parent: nn.Module | None) -> list[tuple[str, str]]:
    """``(parameter attribute, layout)`` of the weight matrices the default rule picks in ``module``."""
    if isinstance(module, nn.MultiheadAttention):
        return [("in_proj_weight", "row_groups:3")] + [(f"{x}_proj_weight", "auto") for x in "qkv"]
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        if isinstance(module, nn.RNNBase):
            gates = _GATES.get(module.mode, 1)
        else:
            gates = 4 if isinstance(module, nn.LSTMCell) else 3 if isinstance(module, nn.GRUCell) else 1
        names = [n for n, _ in module.named_parameters(recurse=False) if n.startswith(("weight_ih", "weight_hh"))]
        block = "auto" if gates == 1 else f"row_groups:{gates}"
        hr = [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_hr")]
        return [(n, block) for n in names] + [(n, "auto") for n in hr]
    if isinstance(module, nn.Linear) and attr == "qkv" and not getattr(parent, "head_first", False):
        # timm's fused q/k/v: rows (3, heads, head_dim); head_first attentions interleave heads
        fused = module.out_features % 3 == 0 and module.out_features > 0
        return [("weight", "row_groups:3" if fused else "auto")]
    if _is_conv1d(module) and attr == "c_attn" and not getattr(parent, "is_cross_attention", False):
        return [("weight", "column_groups:3" if module.nf % 3 == 0 else "auto")]  # GPT-2: split(dim, dim=2)
    if isinstance(module, (nn.Linear, _ConvNd)) or _is_conv1d(module):
        return [("weight", "auto")]
    return []


def _shared(model: nn.Module) -> set[int]:
    """Ids of the parameters of embeddings and norm layers (also where another module shares them)."""
    return {id(p) for m in model.modules() if isinstance(m, _SHARED_SKIP) for p in m.parameters(recurse=False)}


def default_layouts(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): layout}`` of every parameter the default rule constrains."""
    shared = _shared(model)
    parents = {id(child): (attr, parent) for parent in model.modules() for attr, child in parent.named_children()}
    out: dict[int, str] = {}
    for module in model.modules():
        attr, parent = parents.get(id(module), ("", None))
        for name, layout in _weights_of(module, attr, parent):
            p = module._parameters.get(name)
            if isinstance(p, torch.Tensor) and id(p) not in shared:
                out.setdefault(id(p), layout)
    return out


def _lazy(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _left_out(names: _Names, pid: int, shared: set[int]) -> str:
    """Why the default rule leaves a parameter out, for messages."""
    p = names.params[pid]
    if not _lazy(p) and p.dim() < 2:
        return "fewer than 2 dimensions"
    if pid in shared:
        return "of an embedding or norm layer"
    return "not a weight of Linear, Conv, RNN/LSTM/GRU or MultiheadAttention"


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
) -> list[Choice]:
    """``(name, parameter, layout)`` of each parameter of ``model`` to constrain, in
    ``named_parameters`` order (see the module docstring for the rule).

    ``layout`` replaces every default layout; ``layouts`` maps patterns to layouts (the first
    that matches wins, the others keep theirs).  ``among`` (ids of parameters) restricts the
    choice to the parameters an optimizer holds; ``where`` names the caller in errors.
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
    defaults = default_layouts(model)
    chosen: list[Choice] = []
    picked: dict[str, bool] = {pattern: False for pattern in include or []}
    for pid, p in names.params.items():
        if among is not None and pid not in among:
            continue
        if include is None:
            name = names.name(pid) if pid in defaults else None
        else:
            name = _included(names, pid, include, defaults, picked, where)
        if name is None or any(_match(pattern, names.keys[pid]) for pattern in exclude):
            continue
        if _lazy(p):
            raise ValueError(
                f"{where}: parameter '{name}' is not initialized yet (a lazy module): run one forward pass "
                "before building the optimizer"
            )
        spec = layout or next((v for k, v in layouts.items() if _match(k, names.keys[pid])), defaults.get(pid, "auto"))
        chosen.append((name, p, spec))
    _check_selected(names, picked, layouts, chosen, among, where)
    return chosen


def _included(
    names: _Names, pid: int, include: list[str], defaults: dict[int, str], picked: dict[str, bool], where: str
) -> str | None:
    """The name under which ``include`` selects parameter ``pid``, or None (``picked`` records
    which patterns selected something)."""
    p, name = names.params[pid], None
    for pattern in include:
        how = _match(pattern, names.keys[pid])
        if how is None or (how == "module" and pid not in defaults):
            continue  # a module name selects only the default rule's matrices inside it
        if not _lazy(p) and p.dim() < 2:
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


def _check_selected(
    names: _Names,
    picked: dict[str, bool],
    layouts: dict[str, str],
    chosen: list[Choice],
    among: set[int] | None,
    where: str,
) -> None:
    """Every include pattern selected something, every layouts pattern fits a chosen parameter,
    and something is chosen."""
    shared = _shared(names.model)
    for pattern, ok in picked.items():
        if ok:
            continue
        hits = [pid for pid in names.params if _match(pattern, names.keys[pid])]
        why = [
            f"'{names.name(pid)}' ("
            + (
                "not held by this optimizer"
                if among is not None and pid not in among
                else _left_out(names, pid, shared)
            )
            + ")"
            for pid in hits[:4]
        ]
        raise ValueError(
            f"{where}: include pattern {pattern!r} matches {len(hits)} parameter(s) but selects none: "
            f"{', '.join(why)}{', ...' if len(hits) > 4 else ''}. A module name selects only the weight matrices "
            "of the default rule; name a parameter in full (or by a glob) to constrain it anyway"
        )
    taken = {id(p) for _, p, _ in chosen}
    for pattern in layouts:
        if not any(_match(pattern, names.keys[pid]) for pid in taken):
            raise ValueError(
                f"{where}: layouts pattern {pattern!r} matches no constrained parameter; "
                "constrain one it matches (include) or drop the pattern"
            )
    if not chosen:
        held = "" if among is None else " among the parameters this optimizer holds"
        raise ValueError(
            f"{where}: no parameter of {type(names.model).__name__} is constrained{held}: the default rule "
            "takes the weights of Linear, Conv, RNN/LSTM/GRU and MultiheadAttention layers, and nothing "
            "else unless include names it ('pos_embed', 'layers.*.phi'); name the parameters to constrain "
            "with include, or build the groups by hand"
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
