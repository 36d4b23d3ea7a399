r"""The models of the whole-iteration benchmark (:mod:`orthoopt.bench.iteration`).

=================  ========================================================================
``mnist``          the CNN of pytorch/examples' mnist (conv 1→32→64 3x3, fc 9216→128→10),
                   batch 64, Adadelta (lr 1)
``lstm``           a 2-layer LSTM language model (vocabulary 10000, 200 wide, 35 steps of
                   20 sequences), AdamW
``vit``            timm's ``vit_tiny_patch16_224`` at depth 6 (``pretrained=False``), batch
                   8, AdamW; skipped, with the reason, where timm does not import
``mlp``            a 64-256-256-256-10 MLP at batch 64 on one thread, AdamW
``wide``           one ``nn.Linear(2048, 128)`` at batch 64 on one thread, AdamW: where a
                   parametrization must build a 2048 x 2048 orthogonal matrix
=================  ========================================================================

The constrained weights are those :func:`orthoopt.param_groups` picks, with its layouts
(an LSTM's gate blocks, ``row_groups:4``), less the output layer (and a ViT's position
embedding and class token).  Batches are random (the cost of an iteration does not depend
on the data); ``quick`` builds tiny versions for the smoke test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import penalty
from ..layout import Layout
from ..selection import constrained
from .common import NotAvailable

__all__ = ["MODELS", "DEFAULT_MODELS", "ModelSpec", "NotAvailable", "Weight", "constrained_weights", "max_error"]


# -- the models ------------------------------------------------------------------------
class MnistNet(nn.Module):
    """pytorch/examples' mnist CNN; smaller ``side`` and widths for the smoke test."""

    def __init__(self, side: int = 28, c1: int = 32, c2: int = 64, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * ((side - 4) // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class LSTMLanguageModel(nn.Module):
    """Embedding, a 2-layer LSTM and a linear decoder, as pytorch/examples' word_language_model."""

    def __init__(self, vocab: int = 10000, width: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.encoder = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, layers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens):
        out, _ = self.rnn(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(out))


def _vit(quick: bool) -> nn.Module:
    try:
        import timm
    except Exception as e:  # timm needs torchvision, which may not import with this torch
        raise NotAvailable(
            f"timm does not import here ({type(e).__name__}: {e}); install the integration extra"
        ) from None
    if quick:
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
        )
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=6)


def _classification(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _nll(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.nll_loss(model(x), y)


def _language(model: nn.Module, batch) -> torch.Tensor:
    tokens = batch[0]
    logits = model(tokens[:-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1))


def _regression(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


@dataclass(frozen=True)
class ModelSpec:
    """A model, its batches, its loss and the optimizer it is trained with."""

    name: str
    title: str
    build: Callable[[bool], nn.Module]  # quick -> model
    batch: Callable[[torch.Generator, bool], tuple]  # generator, quick -> one batch (CPU)
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    optimizer: type[torch.optim.Optimizer]
    lr: float
    beta: float  # ortho=β of soft, hard and frobenius
    exclude: tuple[str, ...]
    threads: int | None = None  # a model benchmarked at a fixed number of threads


def _images(n: int, channels: int, side: int, classes: int):
    def batch(g: torch.Generator, quick: bool) -> tuple:
        return torch.randn(n, channels, side, side, generator=g), torch.randint(classes, (n,), generator=g)

    return batch


def _mnist_batch(g, quick):
    return _images(8 if quick else 64, 1, 12 if quick else 28, 10)(g, quick)


def _vit_batch(g, quick):
    return _images(2 if quick else 8, 3, 32 if quick else 224, 1000)(g, quick)


def _tokens(g, quick):
    steps, n, vocab = (5, 4, 50) if quick else (35, 20, 10000)
    return (torch.randint(vocab, (steps + 1, n), generator=g),)


def _vectors(n: int, d: int, targets: int | None):
    def batch(g: torch.Generator) -> tuple:
        x = torch.randn(n, d, generator=g)
        return x, torch.randint(10, (n,), generator=g) if targets is None else torch.randn(n, targets, generator=g)

    return batch


def _mlp_batch(g, quick):
    return _vectors(*((8, 16) if quick else (64, 64)), None)(g)


def _wide_batch(g, quick):
    return _vectors(*((8, 64, 8) if quick else (64, 2048, 128)))(g)


def _mlp(quick: bool) -> nn.Module:
    d, h = (16, 32) if quick else (64, 256)
    return nn.Sequential(
        nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "mnist",
            "pytorch/examples mnist CNN, batch 64, Adadelta",
            lambda quick: MnistNet(12, 4, 8, 16) if quick else MnistNet(),
            _mnist_batch,
            _nll,
            torch.optim.Adadelta,
            lr=1.0,
            beta=0.05,  # Adadelta's steps at lr 1 outrun a weaker pull (1e-2: error 0.15 after 60 steps)
            exclude=("fc2",),
        ),
        ModelSpec(
            "lstm",
            "2-layer LSTM language model (vocabulary 10000, 200 wide, 35x20 tokens), AdamW",
            lambda quick: LSTMLanguageModel(50, 16) if quick else LSTMLanguageModel(),
            _tokens,
            _language,
            torch.optim.AdamW,
            lr=1e-3,
            beta=1.0,
            exclude=("decoder",),
        ),
        ModelSpec(
            "vit",
            "timm vit_tiny_patch16_224, depth 6, batch 8, AdamW",
            _vit,
            _vit_batch,
            _classification,
            torch.optim.AdamW,
            lr=1e-3,
            beta=1.0,
            exclude=("head", "pos_embed", "cls_token"),
        ),
        ModelSpec(
            "mlp",
            "MLP 64-256-256-256-10, batch 64, one thread, AdamW",
            _mlp,
            _mlp_batch,
            _classification,
            torch.optim.AdamW,
            lr=1e-3,
            beta=1.0,
            exclude=("6",),
            threads=1,
        ),
        ModelSpec(
            "wide",
            "one nn.Linear(2048, 128), batch 64, one thread, AdamW",
            lambda quick: nn.Linear(64, 8) if quick else nn.Linear(2048, 128),
            _wide_batch,
            _regression,
            torch.optim.AdamW,
            lr=1e-3,
            beta=1.0,
            exclude=(),
            threads=1,
        ),
    ]
}
DEFAULT_MODELS = ("mnist", "lstm", "vit", "mlp")


# -- the constrained weights -------------------------------------------------------------
@dataclass(frozen=True)
class Weight:
    """A constrained weight, by module path and attribute, with its layout."""

    module: str
    attr: str
    layout: Layout

    def owner(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module)

    def value(self, model: nn.Module) -> torch.Tensor:
        return getattr(self.owner(model), self.attr)


def constrained_weights(model: nn.Module, spec: ModelSpec) -> list[Weight]:
    out = []
    for name, _, layout in constrained(model, exclude=spec.exclude):
        module, _, attr = name.rpartition(".")
        out.append(Weight(module, attr, layout))
    return out


def max_error(model: nn.Module, weights: list[Weight]) -> float:
    """``max|ΦᵀΦ - I|`` over the constrained weights (their parametrized values, if any)."""
    with torch.no_grad():
        return max(penalty.max_error(w.layout.matrices(w.value(model).detach())) for w in weights)
