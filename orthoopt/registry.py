"""What the default rule knows of particular module classes: the layouts of their fused
projections, and which of their layers encode positions.

A *fused projection* is one weight whose rows the module's forward splits into tensors of
different roles: attention's q, k and v (``qkv``, ``in_proj_weight``, ``query_key_value``),
k and v (``kv``), a gated MLP's gate and value (``gate_up_proj``).  Each role needs its own
matrix; how its rows lie (three equal blocks, blocks of unequal sizes for grouped-query
attention, per-head interleaving) is read off the forward and written here, by the class
that owns the weight, as a layout that may depend on the module's configuration (heads,
head dimensions, ``key_dim``, ``attn_ratio``)::

    register_layout("timm.models.levit.Attention", "qkv.linear.weight",
                    lambda m: f"row_blocks:{m.num_heads}x({m.key_dim},{m.key_dim},{m.val_dim})")

A class matches its own entries and those of its base classes up to the first class that
defines its own ``forward`` (a subclass with another forward may split its rows otherwise).
The tests check every entry against its module's forward (:mod:`orthoopt.probe`).  A rule
returns None where the configuration is one it does not know; the weight then keeps
``"auto"`` and :func:`orthoopt.audit` flags it, as it flags every fused-looking name that
no entry covers.

Positional modules (the continuous position bias MLP of Swin V2, the position projection of
ConViT, Fourier position encodings) are registered with :func:`register_positional`; their
layers are left out by default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from .layout import canonical_layout

__all__ = [
    "register_layout",
    "register_positional",
    "layout_entries",
    "positional_entries",
    "registered",
    "entries_in",
    "Entry",
    "qualified",
]

Rule = Callable[[nn.Module], "str | None"]


@dataclass(frozen=True)
class Entry:
    """``owner``: a qualified class name; ``path``: a parameter (layout) or module (positional)
    path inside it, globs allowed (``""``: the owner itself); ``rule``: the layout, or a
    function of the owner module that gives it (None: not known for this configuration)."""

    owner: str
    path: str
    rule: str | Rule | None = None

    def layout(self, owner: nn.Module) -> str | None:
        return self.rule(owner) if callable(self.rule) else self.rule


_LAYOUTS: dict[str, list[Entry]] = {}
_POSITIONAL: dict[str, list[Entry]] = {}


def qualified(cls: type) -> str:
    """``module.QualName`` of a class, the key of the registry."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _key(owner: type | str, what: str) -> str:
    if isinstance(owner, type):
        return qualified(owner)
    if not isinstance(owner, str) or "." not in owner:
        raise TypeError(
            f"{what}: owner must be a module class or its qualified name such as "
            f"'timm.models.vision_transformer.Attention', got {owner!r}"
        )
    return owner


def register_layout(owner: type | str, path: str, layout: str | Rule) -> None:
    """Give the parameter at ``path`` of every module of class ``owner`` the layout ``layout``
    (a layout string, or a function of the module that returns one, or None where it does
    not know the module's configuration).  A later registration of the same (owner, path)
    replaces the earlier one; ``path`` may be a glob (``"weight_hh_l*"``)."""
    key = _key(owner, "register_layout")
    if not isinstance(path, str) or not path:
        raise TypeError(f"register_layout: path must name a parameter inside {key}, such as 'qkv.weight'; got {path!r}")
    if isinstance(layout, str):
        layout = canonical_layout(layout, f"register_layout({key!r}, {path!r})")
    elif not callable(layout):
        raise TypeError(f"register_layout: layout must be a layout string or a function of the module, got {layout!r}")
    entries = [e for e in _LAYOUTS.get(key, []) if e.path != path]
    _LAYOUTS[key] = entries + [Entry(key, path, layout)]


def register_positional(owner: type | str, path: str = "") -> None:
    """Leave out, by default, the layers of every module of class ``owner`` (``path=""``) or of
    its submodule at ``path``: they encode positions."""
    key = _key(owner, "register_positional")
    if not isinstance(path, str):
        raise TypeError(f"register_positional: path must be a module path inside {key} or '', got {path!r}")
    if all(e.path != path for e in _POSITIONAL.get(key, [])):
        _POSITIONAL.setdefault(key, []).append(Entry(key, path))


def registered() -> tuple[list[Entry], list[Entry]]:
    """Every registered layout entry and every registered positional entry, in order of registration."""
    return [e for es in _LAYOUTS.values() for e in es], [e for es in _POSITIONAL.values() for e in es]


def _entries(table: dict[str, list[Entry]], module: nn.Module) -> list[Entry]:
    """The entries of ``module``'s class, or of a base class whose forward it keeps."""
    for cls in type(module).__mro__:
        if cls is nn.Module:
            return []
        found = table.get(qualified(cls))
        if found:
            return found
        if "forward" in vars(cls):
            return []
    return []


def _walk(model: nn.Module, table: dict[str, list[Entry]]) -> Iterator[tuple[nn.Module, Entry]]:
    for owner in model.modules():
        for entry in _entries(table, owner):
            yield owner, entry


def layout_entries(model: nn.Module) -> dict[int, tuple[str | None, str]]:
    """``{id(parameter): (layout or None, 'Owner.path')}`` of every registered parameter of ``model``."""
    out: dict[int, tuple[str | None, str]] = {}
    for owner, entry in _walk(model, _LAYOUTS):
        for path, p in owner.named_parameters():
            if fnmatch.fnmatchcase(path, entry.path):
                out[id(p)] = (entry.layout(owner), f"{type(owner).__name__}.{path}")
    return out


def entries_in(model: nn.Module) -> set[Entry]:
    """The layout and positional entries that apply to some module of ``model``."""
    return {entry for table in (_LAYOUTS, _POSITIONAL) for _, entry in _walk(model, table)}


def positional_entries(model: nn.Module) -> dict[int, str]:
    """``{id(module): 'Owner.path'}`` of the registered positional modules of ``model``."""
    out: dict[int, str] = {}
    for owner, entry in _walk(model, _POSITIONAL):
        for path, module in owner.named_modules():
            if fnmatch.fnmatchcase(path, entry.path) if entry.path else not path:
                out[id(module)] = f"{type(owner).__name__}{'.' + path if path else ''}"
    return out


# -- torch -------------------------------------------------------------------------------------------
def _mha(m: nn.Module) -> str | None:
    return "row_groups:3" if m._qkv_same_embed_dim else None  # F.multi_head_attention_forward: in_proj chunk(3)


register_layout(nn.MultiheadAttention, "in_proj_weight", _mha)
# torch's RNN kernels read their gates as row blocks: LSTM i, f, g, o; GRU r, z, n
for _cls, _gates in ((nn.LSTM, 4), (nn.GRU, 3), (nn.LSTMCell, 4), (nn.GRUCell, 3)):
    for _path in ("weight_ih*", "weight_hh*"):
        register_layout(_cls, _path, f"row_groups:{_gates}")
