"""The output layers of a model, found by its framework's convention.

An output layer maps features to classes or to a vocabulary: orthonormal rows there are no
property of the operator anyone asked for, and the constraint fights the loss (a measured
case is in docs/selection.md).  The default rule leaves these out:

* timm: the layer(s) of ``model.get_classifier()`` (a tuple for the two heads of distilled
  models) and of ``pretrained_cfg["classifier"]``;
* transformers: ``model.get_output_embeddings()`` (the language-model head) and the layers
  of the task head outside ``model.base_model`` that map onto the labels or the vocabulary
  (``config.num_labels`` or ``vocab_size`` outputs: ``classifier``, ``score``,
  ``qa_outputs``, a CTC ``lm_head``);
* torchvision: the last layer inside the model's ``fc``, ``classifier``, ``head`` or ``heads``;
* any model: its last layer, if it is a Linear with as many outputs as an ``nn.Embedding``
  of the model has rows (the decoder of a language model onto its vocabulary, tied to the
  embedding or not).

Where a layer is found by more than one convention, the first in this order names it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["output_layers", "conv1d_class", "is_layer", "output_features"]


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2), looked up only if transformers is already imported."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear, Conv (or ConvTranspose) or transformers' Conv1D layer."""
    conv1d = conv1d_class()
    return isinstance(module, (nn.Linear, _ConvNd)) or (conv1d is not None and isinstance(module, conv1d))


def output_features(module: nn.Module) -> int | None:
    """The output features of a Linear, Conv or Conv1D layer (None for another module)."""
    for attr in ("out_features", "out_channels", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return None


def _last_layer(module: nn.Module | None) -> nn.Module | None:
    """``module`` if it is a layer, else the last layer inside it (in registration order)."""
    if module is None:
        return None
    if is_layer(module):
        return module
    layers = [m for m in module.modules() if is_layer(m)]
    return layers[-1] if layers else None


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _timm(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    if not (callable(getattr(model, "get_classifier", None)) and hasattr(model, "pretrained_cfg")):
        return
    try:
        heads = _as_list(model.get_classifier())
    except Exception:  # noqa: BLE001 - a model whose classifier is not set up says nothing here
        heads = []
    for head in heads:
        if isinstance(head, nn.Module) and (layer := _last_layer(head)) is not None:
            yield layer, "timm's get_classifier()"
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    for name in _as_list(names):
        if isinstance(name, str) and (layer := _last_layer(_submodule(model, name))) is not None:
            yield layer, "timm's pretrained_cfg['classifier']"


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _transformers(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if base is None or not isinstance(model, base):
        return
    try:
        embeddings = model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - models that have none raise various errors
        embeddings = None
    if isinstance(embeddings, nn.Module) and is_layer(embeddings):
        yield embeddings, "transformers' get_output_embeddings()"
    body = model.base_model
    if body is model:
        return
    inside = {id(m) for m in body.modules()}
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {getattr(config, "num_labels", None), getattr(text, "vocab_size", None)} - {None}
    for module in model.modules():
        if id(module) not in inside and is_layer(module) and output_features(module) in sizes:
            yield module, "the task head of a transformers model (its labels or vocabulary)"


def _torchvision(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    if not type(model).__module__.startswith("torchvision.models"):
        return
    for attr in ("fc", "classifier", "head", "heads"):
        child = getattr(model, attr, None)
        if isinstance(child, nn.Module) and (layer := _last_layer(child)) is not None:
            yield layer, f"torchvision's {attr}"


def _vocabulary(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    rows = {m.num_embeddings: name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    last = _last_layer(model)
    if isinstance(last, nn.Linear) and last.out_features in rows:
        yield last, f"a decoder onto the vocabulary of embedding '{rows[last.out_features]}'"


def output_layers(model: nn.Module) -> dict[int, str]:
    """``{id(layer module): the convention that found it}`` of the output layers of ``model``
    and of the framework models inside it (a wrapper, a backbone)."""
    found: dict[int, str] = {}
    for module in model.modules():
        for finder in (_timm, _transformers, _torchvision):
            for layer, how in finder(module):
                found.setdefault(id(layer), how)
    for layer, how in _vocabulary(model):
        found.setdefault(id(layer), how)
    return found
