"""The default rule: for every parameter of a model, whether it is constrained, with which
layout, and why (docs/selection.md has the rule in prose).

The rule looks at what each layer computes, not at its name alone:

* the weights of Linear, Conv and ConvTranspose layers, transformers' Conv1D, RNN/LSTM/GRU
  and MultiheadAttention, and every parameter with a registered layout
  (:mod:`orthoopt.registry`), are *layer weights*; nothing else is constrained by default;
* a layer weight is left out when it is shared with an embedding or a norm layer (a tied
  decoder), when its layer is the model's output layer (:mod:`orthoopt.heads`), encodes
  positions (a registered positional module, or a module whose name says so:
  ``pos_embed``, ``rel_pos``, ``cpb_mlp``, ...), is a depthwise convolution (each filter
  sees one input channel; a 1x1 one is a per-channel scale), or when every matrix of its
  layout is a single vector (``nn.Linear(1, 3)``: a normalisation, not an orthogonality);
* its layout: the registered one (fused projections, RNN gates), else one block per group
  for a grouped convolution (``row_groups:G``), else ``"auto"``;
* a weight under ``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``,
  ``orthogonal``) or under the hook-based ``nn.utils.weight_norm``/``spectral_norm`` is left out: its
  parameters are not the layer's weight (:func:`orthoopt.audit` says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from . import (
    known_layouts,  # noqa: F401 - its registrations of timm's and transformers' classes
    registry,
)
from .heads import is_layer, output_layers
from .layout import resolve_layout

__all__ = ["Verdict", "survey", "LEFT_OUT", "FUSED_NAMES", "matrix_shapes", "is_lazy"]

# A weight shared with one of these (a decoder tied to its embedding) is left out by default.
_SHARED_SKIP = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
# Why the default rule leaves a parameter out (the audit's and the errors' words).
LEFT_OUT = {
    "vector": "fewer than 2 dimensions",
    "shared": "of an embedding or norm layer (or tied to one)",
    "raw": "not a weight of Linear, Conv, RNN/LSTM/GRU or MultiheadAttention",
    "output": "output layer",
    "positional": "encodes positions",
    "depthwise": "depthwise conv (each filter sees one channel)",
    "scale": "per-channel scale (a depthwise 1x1 conv)",
    "single": "each matrix is a single vector (a normalisation)",
    "parametrized": "parametrized",
}
# Names of fused projections: flagged when no registered layout covers them.
FUSED_NAMES = frozenset(
    {"qkv", "kv", "qk", "in_proj", "query_key_value", "qkv_proj", "c_attn", "wqkv", "w_pack", "to_qkv", "to_kv"}
    | {"gate_up_proj", "gate_up", "w12"}
)
# Module names of positional encodings, by the words of a name's part (split at '_'): a word that
# says it alone, 'rel' with 'pos', or a position word with a word of what encodes it ('pos_embed',
# 'pos_proj', 'continuous_position_bias_mlp'; not 'pos_ff', a position-wise feed-forward layer).
_POSITIONAL_ALONE = frozenset({"posemb", "relpos", "rpe", "cpb"})
_POSITION = frozenset({"pos", "position", "positional"})
_ENCODER = frozenset(
    {"embed", "embd", "emb", "embedding", "embeddings", "enc", "encoding", "proj", "projection", "bias", "block"}
    | {"conv", "mlp"}
)


@dataclass(frozen=True)
class Verdict:
    """The default rule's word on one parameter.

    ``layout``: the layout it gets (also for a layer weight the rule leaves out, as
    ``include`` would give it; None for what is no layer weight); ``selected``: whether the
    default rule constrains it; ``reason``: why it is left out, or where its layout comes
    from; ``flags``: what a user should look at (:func:`orthoopt.audit`)."""

    module: nn.Module | None
    layout: str | None
    selected: bool
    reason: str
    flags: tuple[str, ...] = ()


def _layer_weights(module: nn.Module) -> list[str]:
    """The names of ``module``'s own parameters that are layer weights."""
    own = list(module._parameters)
    if isinstance(module, nn.MultiheadAttention):
        return [n for n in own if n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")]
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return [n for n in own if n.startswith(("weight_ih", "weight_hh", "weight_hr"))]
    if is_layer(module):
        return [n for n in own if n == "weight"]
    return []


def _shared(model: nn.Module) -> set[int]:
    """Ids of the parameters of embeddings and norm layers (also where another module shares them)."""
    return {id(p) for m in model.modules() if isinstance(m, _SHARED_SKIP) for p in m.parameters(recurse=False)}


def _parametrized(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``{id(parameter): (layer, what)}`` of the parameters behind a parametrized weight."""
    out: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor, chain in module.parametrizations.items():
                kinds = "+".join(type(f).__name__ for f in chain)
                for p in chain.parameters(recurse=False):
                    out[id(p)] = (module, f"'{tensor}' under torch.nn.utils.parametrize ({kinds})")
        for hook in module._forward_pre_hooks.values():
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                for suffix in ("_g", "_v", "_orig"):
                    p = module._parameters.get(hook.name + suffix)
                    if p is not None:
                        out[id(p)] = (module, f"'{hook.name}' under torch.nn.utils.{kind} hook")
    return out


def _positional(model: nn.Module) -> dict[int, str]:
    """``{id(module): why}`` of the modules that encode positions, and of everything inside them."""
    marked = registry.positional_entries(model)
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if id(module) in marked:
            out[id(module)] = f"registered positional module {marked[id(module)]}"
        elif _positional_name(name.rpartition(".")[2]):
            out[id(module)] = "its name says positional"
        if id(module) in out:
            for inner in module.modules():
                out.setdefault(id(inner), out[id(module)])
    return out


def _positional_name(part: str) -> bool:
    words = set(part.lower().split("_"))
    return bool(words & _POSITIONAL_ALONE or {"rel", "pos"} <= words or (words & _POSITION and words & _ENCODER))


def _depthwise(module: nn.Module) -> str | None:
    if isinstance(module, _ConvNd) and module.groups > 1 and module.in_channels // module.groups == 1:
        return "scale" if all(k == 1 for k in module.kernel_size) else "depthwise"
    return None


def _grouped(module: nn.Module) -> str | None:
    if isinstance(module, _ConvNd) and module.groups > 1:
        return f"row_groups:{module.groups}"  # (out, in/G, k...) and (in, out/G, k...): a block per group
    return None


def _fused_name(path: str) -> bool:
    parts = path.lower().split(".")[-3:-1]  # the layer's name, or its wrapper's (qkv.linear.weight)
    return any(part in FUSED_NAMES for part in parts)


def survey(model: nn.Module) -> dict[int, Verdict]:
    """``{id(parameter): Verdict}`` for every parameter of ``model``."""
    shared = _shared(model)
    outputs = output_layers(model)
    positional = _positional(model)
    parametrized = _parametrized(model)
    registered = registry.layout_entries(model)
    verdicts: dict[int, Verdict] = {}
    for path, module in model.named_modules():
        weights = set(_layer_weights(module))
        for name, p in module._parameters.items():
            if p is None or id(p) in verdicts:
                continue
            full = f"{path}.{name}" if path else name
            if id(p) in parametrized:
                layer, what = parametrized[id(p)]
                reason = f"{LEFT_OUT['parametrized']}: {what}"
                verdicts[id(p)] = Verdict(layer, None, False, reason, ("parametrized weight left out",))
            elif name in weights or id(p) in registered:
                verdicts[id(p)] = _layer_verdict(module, full, p, shared, outputs, positional, registered)
            else:
                vector = not is_lazy(p) and p.dim() < 2
                reason = LEFT_OUT["vector" if vector else "shared" if id(p) in shared else "raw"]
                verdicts[id(p)] = Verdict(module, None, False, reason)
    return verdicts


def _layer_verdict(
    module: nn.Module,
    path: str,
    p: torch.Tensor,
    shared: set[int],
    outputs: dict[int, str],
    positional: dict[int, str],
    registered: dict[int, tuple[str | None, str]],
) -> Verdict:
    """The verdict on a layer weight: its layout, and whether a skip applies."""
    flags: list[str] = []
    if id(p) in registered:
        layout, source = registered[id(p)]
        if layout is None:
            layout, source = "auto", f"{source}: registered, but its layout is not known for this configuration"
            flags.append("fused projection kept 'auto'")
        else:
            source = f"registered layout of {source}"
    elif (grouped := _grouped(module)) is not None:
        layout, source = grouped, f"grouped conv ({module.groups} groups): one block per group"
    else:
        layout, source = "auto", "the default rule"
        if _fused_name(path):
            flags.append("fused name kept 'auto'")
    lazy = is_lazy(p)
    if not lazy and p.dim() < 2:
        return Verdict(module, None, False, LEFT_OUT["vector"])
    if id(p) in shared:
        return Verdict(module, layout, False, LEFT_OUT["shared"])
    if id(module) in outputs:
        return Verdict(module, layout, False, f"{LEFT_OUT['output']} ({outputs[id(module)]})", ("output layer",))
    if id(module) in positional:
        reason = f"{LEFT_OUT['positional']} ({positional[id(module)]})"
        return Verdict(module, layout, False, reason, ("positional",))
    if (kind := _depthwise(module)) is not None:
        return Verdict(module, layout, False, LEFT_OUT[kind], ("depthwise conv",))
    if not lazy and _single_vectors(layout, p.shape):
        return Verdict(module, layout, False, LEFT_OUT["single"], tuple(flags))
    return Verdict(module, layout, True, source, tuple(flags))


def _single_vectors(layout: str, shape: torch.Size) -> bool:
    """Whether every matrix of the layout on ``shape`` has one column (a vector to normalise)."""
    shapes = matrix_shapes(layout, shape)
    return shapes is not None and all(n == 1 for _, _, n in shapes)


def matrix_shapes(layout: str | None, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...] | None:
    """The ``(m, l, n)`` of each piece of ``layout`` on ``shape``; None where there is no layout,
    it leaves the parameter alone, or it does not fit (which is reported where it is used)."""
    if layout is None:
        return None
    try:
        resolved = resolve_layout(layout, shape, "weight")
    except ValueError:
        return None
    return None if resolved is None else tuple(resolved.stack_shapes(shape))


def is_lazy(p: torch.Tensor) -> bool:
    """A lazy module's parameter, whose shape is not known yet."""
    return isinstance(p, nn.parameter.UninitializedParameter)
