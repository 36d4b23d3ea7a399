"""Which output features of each layer the forward uses apart: the blocks a fused projection splits into.

A fused projection (``qkv``, ``kv``, ``gate_up_proj``) is one weight whose output features
the forward splits, by a reshape, ``split`` or ``chunk``, into tensors of different roles.
Its layout must give each role its own matrix, whatever the order of its rows (blocks of
unequal sizes, per-head interleaving).  :func:`feature_blocks` reads that split off one
forward pass: it records the operands of the attention products (``scaled_dot_product_attention``,
``matmul``, ``bmm``, ``einsum``) and of products of two computed tensors (``x1 * act(x2)``
of a gated MLP), and asks autograd which output features of which layer each operand
depends on.  Each layer's output is cut from the graph (a fresh leaf) as it leaves the
layer, so that an operand reaches only the layers right before it, not the whole model
through its residual stream; depthwise convolutions, which keep channels apart, are not
cut.  Features that every recorded operand either uses or ignores alike form one block.

:func:`layout_blocks` gives the same partition for a layout (which output features share
a matrix), so that a layout can be compared with its forward: :func:`disagreements`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .heads import conv1d_class
from .layout import resolve_layout

__all__ = ["feature_blocks", "layout_blocks", "agrees", "disagreements", "output_axis"]

Blocks = frozenset  # frozenset[frozenset[int]]: a partition of a layer's output features

_PRODUCTS = {
    torch.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.Tensor.bmm,
    torch.Tensor.baddbmm,
    torch.mm,
    torch.Tensor.mm,
    torch.functional.einsum,
    torch.einsum,
}
_ATTENTION = {torch.nn.functional.scaled_dot_product_attention}
_MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
F = torch.nn.functional
# Elementwise activations and softmax: the probe keeps their values but passes gradients through
# them as through the identity, so that a unit that happens to be dead (a ReLU below zero at every
# position of the probe's input) or a saturated softmax (a one-hot row, whose gradient is exactly
# zero) cannot look like features the forward leaves out.
_ACTIVATIONS = {
    F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.leaky_relu,
    F.leaky_relu_, F.hardtanh, F.hardtanh_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.softplus, F.sigmoid, torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.tanh,
    torch.tanh, torch.Tensor.tanh, torch.clamp, torch.Tensor.clamp, torch.Tensor.clamp_, torch.clamp_min,
    torch.Tensor.clamp_min, torch.Tensor.clamp_min_,
}  # fmt: skip


def output_axis(module: nn.Module) -> int | None:
    """The axis of ``module.weight`` that runs over its output features (None: not a layer)."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return 1  # transformers' Conv1D: weight (in, out)
    if isinstance(module, (nn.Linear, _ConvNd)) and not getattr(module, "transposed", False):
        return 0
    return None


def _channel_local(module: nn.Module) -> bool:
    """A depthwise convolution: each output channel sees one input channel."""
    return isinstance(module, _ConvNd) and module.in_channels // module.groups == 1


class _Record(TorchFunctionMode):
    """Keeps the operands of attention products and of products of two computed tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.operands: list[tuple[bool, list[torch.Tensor]]] = []  # (a product of two computed tensors, operands)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ACTIVATIONS and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x, copy = args[0], args[0].detach().clone()
            value = func(copy, *args[1:], **kwargs)  # the values, on a copy (the call may be in place)
            through = value.detach() + (x - x.detach())
            return x.copy_(through) if value is copy else through
        if func is F.glu and args and args[0].grad_fn is not None:  # a * sigmoid(b) of the two halves
            self.operands.append((True, list(args[0].chunk(2, args[1] if len(args) > 1 else kwargs.get("dim", -1)))))
        if func in _ATTENTION or func in _PRODUCTS or func in _MULTIPLY:
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            flat += [a for a in args if isinstance(a, (list, tuple)) for a in a if isinstance(a, torch.Tensor)]
            flat += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]  # baddbmm(input=, batch1=, ...)
            computed = [t for t in flat if t.grad_fn is not None]
            if func in _ATTENTION or func in _PRODUCTS:
                self.operands.append((False, computed))
            elif len(computed) >= 2:
                self.operands.append((True, computed))
        return func(*args, **kwargs)


def _layers(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{weight name: (module, output axis)}`` of the model's Linear, Conv and Conv1D layers."""
    out = {}
    for name, module in model.named_modules():
        axis = output_axis(module)
        weight = module._parameters.get("weight")
        if axis is not None and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            out[f"{name}.weight" if name else "weight"] = (module, axis)
    return out


def _partition(size: int, sets: Iterable[torch.Tensor]) -> Blocks:
    """The features ``0..size-1`` grouped by which of ``sets`` (boolean masks) hold them."""
    signature: dict[int, list[int]] = {i: [] for i in range(size)}
    for j, mask in enumerate(sets):
        for i in mask.nonzero().flatten().tolist():
            signature[i].append(j)
    blocks: dict[tuple, set[int]] = {}
    for i, sig in signature.items():
        blocks.setdefault(tuple(sig), set()).add(i)
    return frozenset(frozenset(b) for b in blocks.values())


def _leaf_hook(leaves: dict[str, tuple[torch.Tensor, int]], name: str, axis: int) -> Callable:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        leaf = output.detach().requires_grad_(True)
        # Linear and Conv1D put features last, Conv in dim 1
        leaves.setdefault(name, (leaf, -1 if isinstance(module, nn.Linear) or axis == 1 else 1))
        return leaf * 1  # not the leaf itself, which the forward may change in place

    return hook


def feature_blocks(
    model: nn.Module, run: Callable[[nn.Module], Any], names: Iterable[str] | None = None
) -> dict[str, Blocks]:
    """``{weight name: partition of its output features}`` as one forward pass splits them.

    ``run(model)`` runs the forward (e.g. ``lambda m: m(x)``); the model runs in eval mode and
    comes back in its own.  ``names`` restricts the answer to some weights (default: every
    Linear, Conv and Conv1D weight the forward uses).  A layer whose output the forward uses
    whole has one block; a layer called more than once is read at its first call.
    """
    layers = _layers(model)
    wanted = set(layers if names is None else names)
    leaves: dict[str, tuple[torch.Tensor, int]] = {}
    handles = [
        module.register_forward_hook(_leaf_hook(leaves, name, axis))
        for name, (module, axis) in layers.items()
        if not _channel_local(module)
    ]
    weights = {name: module.weight for name, (module, _) in layers.items() if name in wanted}
    flags = {name: w.requires_grad for name, w in weights.items()}
    training = model.training
    record = _Record()
    try:
        model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad(), record:
            run(model)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    return _read(record.operands, leaves, weights, layers, wanted)


def _read(
    operands: list[tuple[bool, list[torch.Tensor]]],
    leaves: dict[str, tuple[torch.Tensor, int]],
    weights: dict[str, torch.Tensor],
    layers: dict[str, tuple[nn.Module, int]],
    wanted: set[str],
) -> dict[str, Blocks]:
    """The partition of each wanted layer from the features each recorded operand depends on."""
    refs = [(n, leaf, axis) for n, (leaf, axis) in leaves.items() if n in wanted]
    # a weight used without calling its layer (F.linear(x, self.qkv.weight, bias)); a called layer's
    # weight is no reference, since a weight tied to an embedding feeds the forward through its lookup too
    refs += [(n, w, layers[n][1]) for n, w in weights.items() if n not in leaves]
    sets: dict[str, list[torch.Tensor]] = {}
    sizes = {n: layers[n][0].weight.shape[layers[n][1]] for n in wanted}
    generator = torch.Generator().manual_seed(0)
    for gated, group in operands:
        reached: list[dict[str, torch.Tensor]] = []
        for t in group:
            weight = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            grads = torch.autograd.grad(
                (t * weight).sum(), [r for _, r, _ in refs], allow_unused=True, retain_graph=True
            )
            masks: dict[str, torch.Tensor] = {}
            for (name, _, axis), g in zip(refs, grads):
                if g is None:
                    continue
                used = (g != 0).movedim(axis % g.dim(), 0).reshape(g.shape[axis], -1).any(1)  # NaN counts as used
                masks[name] = used | masks[name] if name in masks else used
            reached.append(masks)
        # x1 * act(x2) splits a layer only where both factors come from it (not x * gate(x))
        shared = set.intersection(*(set(r) for r in reached)) if gated else None
        for masks in reached:
            for name, mask in masks.items():
                if shared is None or name in shared:
                    sets.setdefault(name, []).append(mask)
    for name in wanted:
        module = layers[name][0]
        if isinstance(module, _ConvNd) and module.groups > 1 and not _channel_local(module):
            # a grouped convolution: each group of output channels sees its own inputs
            groups = torch.arange(sizes[name]) // (sizes[name] // module.groups)
            sets.setdefault(name, []).extend(groups == g for g in range(module.groups))
    return {n: _partition(sizes[n], sets.get(n, [])) for n in wanted if n in sets or n in leaves}


def layout_blocks(spec: str, shape: tuple[int, ...], axis: int) -> tuple[Blocks, frozenset[int]]:
    """The partition of a weight's output features (along ``axis``) by the matrices of a
    layout (features held by the same matrices form one block), and the features no matrix
    holds (a row_blocks layout's free blocks)."""
    layout = resolve_layout(spec, shape, "weight")
    index = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    stride = index.stride()[axis]
    members: list[torch.Tensor] = []
    for piece, piece_layout in layout.pieces(index):
        for matrix in piece_layout.matrices(piece):
            features = (matrix.reshape(-1).long() // stride) % shape[axis]
            members.append(torch.zeros(shape[axis], dtype=torch.bool).index_fill_(0, features, True))
    held = torch.stack(members).any(0)
    free = frozenset((~held).nonzero().flatten().tolist())
    return frozenset(b for b in _partition(shape[axis], members) if not b <= free), free


def agrees(spec: str, shape: tuple[int, ...], axis: int, forward: Blocks) -> bool:
    """Whether a layout gives each block of the forward its own matrices: its matrices' blocks
    are blocks of the forward, and its free features are the forward's other blocks."""
    mine, free = layout_blocks(spec, shape, axis)
    rest = forward - mine
    return mine <= forward and frozenset().union(*rest) == free


def disagreements(model: nn.Module, specs: dict[str, str], blocks: dict[str, Blocks]) -> dict[str, tuple[str, Blocks]]:
    """``{weight name: (its layout, the forward's blocks)}`` where the layout does not agree
    with the forward (:func:`agrees`); ``specs``: ``{weight name: layout}``."""
    layers = _layers(model)
    out = {}
    for name, spec in specs.items():
        if name in blocks and name in layers:
            module, axis = layers[name]
            if not agrees(spec, tuple(module.weight.shape), axis, blocks[name]):
                out[name] = (spec, blocks[name])
    return out
