r"""Benchmark of the whole training iteration: what orthogonality costs on real models.

``python -m orthoopt bench --models`` times forward + backward + step on the same batches,
side by side in one process (each round runs one iteration of every contender in turn),
for each model of :data:`MODELS`:

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

The constrained weights are those :func:`orthoopt.param_groups` picks (weights of two or
more dimensions outside embeddings and norms), less the output layer (and a ViT's position
embedding and class token); every contender constrains the same ones, from the same
initial weights (snapped to the manifold), and is fed the same batches:

====================  =====================================================================
``plain``             the model's optimizer, unswapped
``soft``              orthoopt's soft step, ``Ortho<Optimizer>`` with ``ortho=β``
``soft-auto``         the same with ``ortho='auto'``
``soft-every``        ``ortho=β`` with ``ortho_every=k`` (the penalty step every k steps,
``auto-every``        k times as large), and the same with ``ortho='auto'`` (``--every``)
``hard``              ``ortho_mode='hard'`` (geoopt's Stiefel manifold)
``torch-orthogonal``  ``torch.nn.utils.parametrizations.orthogonal`` with the plain optimizer
``geotorch``          geotorch's ``orthogonal`` (0.4) with the plain optimizer
``frobenius``         the plain optimizer on ``loss + β Σ‖ΦᵀΦ - I‖²_F`` through autograd, as
                      one writes it by hand
====================  =====================================================================

A weight of more than two dimensions (a conv filter bank) is flattened to the matrix
orthoopt constrains before torch's or geotorch's parametrization (both would otherwise make
each kernel's last two axes orthogonal, another constraint).  The parametrizations can be
very slow (geotorch completes an ``l × n`` weight to an ``l × l`` orthogonal matrix), so
their setup and first iteration run first in a child process and are abandoned past the
budget (``--budget``, 10 s): such a contender is reported over budget with the time it was
given.  Reported per model and contender: median ms per iteration (and the quartiles), the
ratio to ``plain`` (the median of the per-round ratios), the memory the method holds beyond
``plain`` (CPU: bytes of optimizer state, orthoopt's workspaces and the parametrizations'
buffers; CUDA: the iteration's ``max_memory_allocated`` over plain's), and the largest
orthogonality error ``max|ΦᵀΦ - I|`` of the constrained weights after the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import penalty
from .layout import Layout
from .optim import orthogonalize, project_
from .options import ORTHO_DEFAULTS
from .selection import constrained, param_groups

__all__ = ["MODELS", "CONTENDERS", "TARGETS", "ModelSpec", "main", "run"]

EVERY = 4  # the default k of the soft-every and auto-every contenders

# The issue's targets: the iteration time over the plain optimizer's, at most (CPU).
TARGETS = {
    "mnist": {"soft": 1.05, "soft-auto": 1.08, "hard": 1.10},
    "lstm": {"soft": 1.03, "soft-auto": 1.05, "hard": 1.10},
    "vit": {"soft": 1.03, "soft-auto": 1.05, "hard": 1.10},
    "mlp": {"soft": 1.5},
}
CUDA_TARGETS = {"vit": {"soft": 1.02}}


class NotAvailable(Exception):
    """A model or contender this environment cannot run; reported with the reason."""


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
    beta: float  # ortho=β of soft and frobenius: 2·lr·β = 2e-3 throughout
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


def _mlp_batch(g, quick):
    n, d = (8, 16) if quick else (64, 64)
    return torch.randn(n, d, generator=g), torch.randint(10, (n,), generator=g)


def _wide_batch(g, quick):
    n, d, k = (8, 64, 8) if quick else (64, 2048, 128)
    return torch.randn(n, d, generator=g), torch.randn(n, k, generator=g)


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
            beta=1e-3,
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

CONTENDERS = (
    "plain",
    "soft",
    "soft-auto",
    "soft-every",
    "auto-every",
    "hard",
    "torch-orthogonal",
    "geotorch",
    "frobenius",
)
# Parametrizations whose first iteration may take minutes: probed in a child process first.
RISKY = ("torch-orthogonal", "geotorch")


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
    for name, _, layout in constrained(model, "auto", exclude=spec.exclude):
        module, _, attr = name.rpartition(".")
        out.append(Weight(module, attr, layout))
    return out


def max_error(model: nn.Module, weights: list[Weight]) -> float:
    """``max|ΦᵀΦ - I|`` over the constrained weights (their parametrized values, if any)."""
    with torch.no_grad():
        return max(penalty.max_error(w.layout.matrices(w.value(model).detach())) for w in weights)


# -- contenders ------------------------------------------------------------------------
@dataclass
class Contender:
    """One way to train the model: its copy of the model, optimizer and extra loss term."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    weights: list[Weight]
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def iteration(self, batch: tuple) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.model, batch).backward()
        self.optimizer.step()


def _ortho_optimizer(spec: ModelSpec, model: nn.Module, **options) -> torch.optim.Optimizer:
    cls = orthogonalize(spec.optimizer)
    return cls(param_groups(model, exclude=spec.exclude, **options), lr=spec.lr)


def _frobenius_loss(spec: ModelSpec, weights: list[Weight]):
    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        total = spec.loss(model, batch)
        for w in weights:
            mats = w.layout.matrices(w.value(model))
            r = mats.mT @ mats - torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
            total = total + spec.beta * (r * r).sum()
        return total

    return loss


class _Flat(nn.Module):
    """A parametrization of a ``(out, ...)`` weight through a matrix one of its
    ``(out, numel/out)`` view: the constraint orthoopt's rows/columns layouts put on it."""

    def __init__(self, inner: nn.Module, shape: torch.Size):
        super().__init__()
        self.inner = inner
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).reshape(self.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self.inner.right_inverse(w.reshape(w.shape[0], -1))


def _torch_orthogonal(owner: nn.Module, attr: str) -> None:
    from torch.nn.utils.parametrizations import orthogonal

    w = getattr(owner, attr)
    if w.dim() == 2:
        orthogonal(owner, attr)
        return
    holder = nn.Module()
    holder.weight = nn.Parameter(w.detach().reshape(w.shape[0], -1).clone())
    orthogonal(holder, "weight")
    parametrize.register_parametrization(owner, attr, _Flat(holder.parametrizations.weight[0], w.shape), unsafe=True)


def _geotorch_orthogonal(owner: nn.Module, attr: str) -> None:
    import geotorch

    w = getattr(owner, attr)
    if w.dim() == 2:
        geotorch.orthogonal(owner, attr)
        return
    inner = geotorch.Stiefel(size=(w.shape[0], w[0].numel())).to(w)
    with torch.no_grad():
        w.copy_(inner.sample().reshape(w.shape))  # as geotorch.orthogonal starts: on the manifold
    parametrize.register_parametrization(owner, attr, _Flat(inner, w.shape), unsafe=True)


def _parametrized(spec, model, weights, register) -> torch.optim.Optimizer:
    for w in weights:
        register(w.owner(model), w.attr)
    return spec.optimizer(model.parameters(), lr=spec.lr)


def make_contender(name: str, spec: ModelSpec, model: nn.Module, weights: list[Weight], every: int) -> Contender:
    """``name`` on a copy of ``model`` (which stays untouched)."""
    model = copy.deepcopy(model)
    loss = spec.loss
    if name == "plain":
        opt = spec.optimizer(model.parameters(), lr=spec.lr)
    elif name in ("soft", "soft-auto", "soft-every", "auto-every"):
        ortho = "auto" if "auto" in name else spec.beta
        options = {"ortho_every": every} if name.endswith("every") else {}
        if options and "ortho_every" not in ORTHO_DEFAULTS:
            raise NotAvailable("this orthoopt has no ortho_every option")
        opt = _ortho_optimizer(spec, model, ortho=ortho, **options)
    elif name == "hard":
        try:
            opt = _ortho_optimizer(spec, model, ortho=spec.beta, ortho_mode="hard")
        except TypeError as e:
            raise NotAvailable(f"ortho_mode='hard': {e}") from None
    elif name == "torch-orthogonal":
        opt = _parametrized(spec, model, weights, _torch_orthogonal)
    elif name == "geotorch":
        try:
            import geotorch  # noqa: F401
        except ImportError as e:
            raise NotAvailable(f"geotorch is not installed ({e})") from None
        opt = _parametrized(spec, model, weights, _geotorch_orthogonal)
    elif name == "frobenius":
        opt = spec.optimizer(model.parameters(), lr=spec.lr)
        loss = _frobenius_loss(spec, weights)
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    model.train()
    return Contender(name, model, opt, loss, weights)


# -- memory ----------------------------------------------------------------------------
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def held_bytes(c: Contender) -> int:
    """Bytes the method holds between iterations: optimizer state, orthoopt's workspaces,
    and the parametrizations' buffers (e.g. torch's completed orthogonal ``base``)."""
    state = [v for s in c.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    cache = getattr(c.optimizer, "_soft_cache", None)
    workspaces = sum(b.workspace_bytes() for b in cache[1] if hasattr(b, "workspace_bytes")) if cache else 0
    buffers = [
        b
        for m in c.model.modules()
        if parametrize.is_parametrized(m)
        for b in m.parametrizations.buffers()
        if b is not None
    ]
    return _tensor_bytes(state) + workspaces + _tensor_bytes(buffers)


def _peak_bytes(c: Contender, batch, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    c.iteration(batch)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# -- the budget probe ------------------------------------------------------------------
def _probe_child(conn, jobs: list[tuple[str, str]], quick: bool, threads: int | None, seed: int, every: int) -> None:
    """In a child process: set up and run one iteration of each job, reporting as it goes."""
    try:
        for model_name, name in jobs:
            spec = MODELS[model_name]
            torch.set_num_threads(spec.threads or threads or torch.get_num_threads())
            model, weights, batches = _setup(spec, quick, seed, torch.device("cpu"), 1)
            conn.send(("start", model_name, name, None))
            t0 = time.perf_counter()
            try:
                c = make_contender(name, spec, model, weights, every)
                c.iteration(batches[0])
            except NotAvailable as e:
                conn.send(("n/a", model_name, name, str(e)))
                continue
            conn.send(("done", model_name, name, time.perf_counter() - t0))
    except Exception:  # report, so that the parent does not wait for nothing
        conn.send(("error", "", "", traceback.format_exc()))


def probe(jobs: list[tuple[str, str]], budget: float, cfg) -> dict[tuple[str, str], tuple[str, Any]]:
    """Setup and first iteration of each job, in a child process killed past ``budget`` s.

    Returns ``{(model, contender): (status, seconds or reason)}`` with status ``ok``,
    ``over budget`` or ``n/a``.  One child runs the jobs in turn; after a kill, a new one
    takes the rest.
    """
    ctx = multiprocessing.get_context("spawn")
    results: dict[tuple[str, str], tuple[str, Any]] = {}
    todo = list(jobs)
    while todo:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_probe_child, args=(child, todo, cfg.quick, cfg.threads, cfg.seed, cfg.every))
        proc.start()
        try:
            while todo:
                # Importing and building the model is not the contender's cost: no budget on it.
                if not parent.poll(600):
                    raise RuntimeError("the probe process did not start a job within 600 s")
                kind, model_name, name, value = parent.recv()
                if kind == "error":
                    raise RuntimeError(f"the probe process failed:\n{value}")
                key = (model_name, name)
                if parent.poll(budget):
                    kind, _, _, value = parent.recv()
                    results[key] = ("ok", value) if kind == "done" else (kind, value)
                    todo.remove(key)
                else:
                    results[key] = ("over budget", budget)
                    todo.remove(key)
                    break  # kill the child, start afresh on what is left
        finally:
            proc.kill()
            proc.join()
    return results


# -- one model ---------------------------------------------------------------------------
def _setup(spec: ModelSpec, quick: bool, seed: int, device: torch.device, n_batches: int):
    torch.manual_seed(seed)
    model = spec.build(quick).to(device)
    weights = constrained_weights(model, spec)
    project_(model.get_submodule(w.module).get_parameter(w.attr) for w in weights)  # start on the manifold
    g = torch.Generator().manual_seed(seed + 1)
    batches = [tuple(t.to(device) for t in spec.batch(g, quick)) for _ in range(n_batches)]
    return model, weights, batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(c: Contender, batch, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    c.iteration(batch)
    _sync(device)
    return time.perf_counter() - t0


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def run_model(spec: ModelSpec, cfg, probed: dict) -> dict:
    """Every contender of ``cfg`` on one model, round-robin; the model's entry of the report."""
    device = cfg.device
    threads_before = torch.get_num_threads()
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    try:
        model, weights, batches = _setup(spec, cfg.quick, cfg.seed, device, cfg.batches)
        params_bytes = sum(w.value(model).numel() * w.value(model).element_size() for w in weights)
        entries: dict[str, dict] = {}
        contenders: list[Contender] = []
        for name in cfg.contenders:
            status = probed.get((spec.name, name))
            if status is not None and status[0] != "ok":
                entries[name] = {"status": status[0], "seconds" if status[0] == "over budget" else "reason": status[1]}
                continue
            try:
                c = make_contender(name, spec, model, weights, cfg.every)
            except NotAvailable as e:
                entries[name] = {"status": "n/a", "reason": str(e)}
                continue
            # A check after one iteration, for the contenders not probed in a child process.
            first = _timed(c, batches[0], device)
            if first > cfg.budget:
                entries[name] = {"status": "over budget", "seconds": first}
                continue
            entries[name] = {"status": "ok", "first_iteration_s": status[1] if status else first}
            contenders.append(c)
        for k in range(cfg.warmup):
            for c in contenders:
                c.iteration(batches[(k + 1) % len(batches)])
        plain = next((c for c in contenders if c.name == "plain"), None)
        for r in range(cfg.rounds):
            batch = batches[r % len(batches)]
            round_times = {c.name: _timed(c, batch, device) for c in contenders}
            for c in contenders:
                c.times.append(round_times[c.name])
                if plain is not None:
                    c.ratios.append(round_times[c.name] / round_times["plain"])
        base_held = held_bytes(plain) if plain is not None else 0
        base_peak = _peak_bytes(plain, batches[0], device) if plain is not None and device.type == "cuda" else None
        for c in contenders:
            q1, med, q3 = _quantiles([t * 1e3 for t in c.times])
            entry = entries[c.name]
            entry.update(
                {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": min(c.times) * 1e3, "rounds": len(c.times)}
            )
            if c.ratios:
                r1, rmed, r3 = _quantiles(c.ratios)
                entry.update({"ratio": rmed, "ratio_q1": r1, "ratio_q3": r3})
            entry["max_error"] = max_error(c.model, c.weights)
            if device.type == "cuda":
                entry["extra_peak_bytes"] = _peak_bytes(c, batches[0], device) - base_peak
            else:
                entry["extra_held_bytes"] = held_bytes(c) - base_held
                entry["extra_held_x_params"] = entry["extra_held_bytes"] / params_bytes
        return {
            "model": spec.name,
            "title": spec.title,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "constrained": [f"{w.module}.{w.attr}" if w.module else w.attr for w in weights],
            "constrained_bytes": params_bytes,
            "contenders": entries,
        }
    finally:
        torch.set_num_threads(threads_before)


# -- the report ------------------------------------------------------------------------
def _combine(runs: list[dict]) -> dict:
    """One model's entry over repeated runs: the median of the runs' medians, and their range."""
    first = copy.deepcopy(runs[0])
    for name, entry in first["contenders"].items():
        entries = [r["contenders"][name] for r in runs if r["contenders"][name].get("status") == "ok"]
        if entry.get("status") != "ok" or len(runs) == 1:
            continue
        for key in ("median_ms", "ratio"):
            values = [e[key] for e in entries if key in e]
            if values:
                entry[key] = statistics.median(values)
                entry[f"{key}_runs"] = values
        entry["max_error"] = max(e["max_error"] for e in entries)
    return first


# The every-k variant of a contender, judged against the same target.
EVERY_VARIANT = {"soft": "soft-every", "soft-auto": "auto-every"}


def verdicts(results: list[dict], device: torch.device) -> dict:
    """Each target, met or not, from the measured ratio (also for the every-k variants)."""
    table = CUDA_TARGETS if device.type == "cuda" else TARGETS
    out = {}
    for r in results:
        for name, bound in table.get(r["model"], {}).items():
            for cand in [name, EVERY_VARIANT.get(name)]:
                if cand is None:
                    continue
                entry = r["contenders"].get(cand, {})
                ratio = entry.get("ratio")
                out[f"{r['model']} {cand}"] = {
                    "bound": bound,
                    "ratio": ratio,
                    "met": None if ratio is None else bool(ratio <= bound),
                    "status": entry.get("status", "not run"),
                }
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"whole iteration (forward + backward + step), median ms over {meta['rounds']} rounds x {meta['runs']} run(s), "
        f"{meta['device_name']}, torch {meta['torch']}",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines += ["", f"{r['model']}: skipped: {r['skipped']}"]
            continue
        lines += ["", f"{r['model']}: {r['title']} ({r['threads'] or 'cuda'} threads; {len(r['constrained'])} weights)"]
        head = ["contender", "ms", "q1-q3 ms", "x plain", "ratio q1-q3", "extra mem", "max error", "status"]
        rows = []
        for name, e in r["contenders"].items():
            if e["status"] != "ok":
                why = f"{e['seconds']:.1f} s > budget" if e["status"] == "over budget" else e.get("reason", "")
                rows.append([name, "", "", "", "", "", "", f"{e['status']}: {why}"])
                continue
            mem = e.get("extra_peak_bytes", e.get("extra_held_bytes"))
            rows.append(
                [
                    name,
                    _fmt(e["median_ms"], ".2f"),
                    f"{e['q1_ms']:.2f}-{e['q3_ms']:.2f}",
                    _fmt(e.get("ratio"), ".3f"),
                    f"{e['ratio_q1']:.3f}-{e['ratio_q3']:.3f}" if "ratio_q1" in e else "",
                    _bytes(mem),
                    f"{e['max_error']:.1e}",
                    "ok",
                ]
            )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.append("")
    for key, v in report["targets"].items():
        state = "n/a" if v["met"] is None else ("met" if v["met"] else "NOT met")
        lines.append(f"target {key} <= {v['bound']}x: {state} ({_fmt(v['ratio'], '.3f')}x, {v['status']})")
    return "\n".join(lines)


# -- entry points ----------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="orthoopt bench --models",
        description="Time the whole training iteration (forward + backward + step) of small real models "
        "with each orthogonality method, side by side in one process.",
    )
    ap.add_argument(
        "--models",
        nargs="?",
        const=",".join(DEFAULT_MODELS),
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})",
    )
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, from {', '.join(CONTENDERS)}")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    ap.add_argument("--quick", action="store_true", help="tiny models, two rounds (a smoke test, not a measurement)")
    ap.add_argument("--rounds", type=int, default=None, help="timed iterations per contender and run (default 20)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the timed rounds this many times (default 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations per contender first (default 3)")
    ap.add_argument(
        "--budget", type=float, default=10.0, help="seconds a contender's setup and first iteration may take"
    )
    ap.add_argument("--every", type=int, default=EVERY, help=f"k of soft-every and auto-every (default {EVERY})")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; mlp and wide use 1)"
    )
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file to write (default: bench_models_<device>.json)")
    return ap


def config(argv: Sequence[str] | None) -> argparse.Namespace:
    cfg = parser().parse_args(argv)
    cfg.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    cfg.models = [m.strip() for m in cfg.models.split(",") if m.strip()]
    cfg.contenders = [c.strip() for c in cfg.contenders.split(",") if c.strip()]
    for flag, names, known in (("--models", cfg.models, MODELS), ("--contenders", cfg.contenders, CONTENDERS)):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SystemExit(f"{flag}: unknown {unknown or names}; choose from {', '.join(known)}")
    if cfg.rounds is None:
        cfg.rounds = 2 if cfg.quick else 20
    if cfg.warmup is None:
        cfg.warmup = 1 if cfg.quick else 3
    if cfg.rounds < 1 or cfg.runs < 1 or cfg.warmup < 0 or cfg.every < 1 or cfg.batches < 1 or not cfg.budget > 0:
        raise SystemExit("--rounds, --runs, --every and --batches must be >= 1, --warmup >= 0 and --budget > 0")
    cfg.out = cfg.out or f"bench_models_{cfg.device.type}.json"
    return cfg


def run(cfg: argparse.Namespace) -> dict:
    """Every model of ``cfg``; returns the report written as JSON."""
    from .bench import _git_commit

    if cfg.threads and cfg.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    specs = []
    results = []
    for name in cfg.models:
        spec = MODELS[name]
        try:
            spec.build(True)  # fails fast where the model cannot be built (timm absent)
            specs.append(spec)
        except NotAvailable as e:
            print(f"skipping {name}: {e}", file=sys.stderr, flush=True)
            results.append({"model": name, "title": spec.title, "skipped": str(e)})
    # The child process probes on CPU; on CUDA the check after one iteration applies.
    jobs = [(s.name, c) for s in specs for c in cfg.contenders if c in RISKY]
    probed = probe(jobs, cfg.budget, cfg) if jobs and not cfg.quick and cfg.device.type == "cpu" else {}
    for spec in specs:
        runs = [run_model(spec, cfg, probed) for _ in range(cfg.runs)]
        results.append(_combine(runs))
        print(f"  done {spec.name}", file=sys.stderr, flush=True)
    order = {n: i for i, n in enumerate(cfg.models)}
    results.sort(key=lambda r: order[r["model"]])
    device = cfg.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "meta": {
            "command": " ".join(sys.argv),
            "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "rounds": cfg.rounds,
            "runs": cfg.runs,
            "warmup": cfg.warmup,
            "budget_s": cfg.budget,
            "every": cfg.every,
            "quick": cfg.quick,
        },
        "targets": verdicts([r for r in results if "skipped" not in r], device),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orthoopt bench --models [names] [flags]``: print the tables, write the JSON."""
    cfg = config(argv)
    report = run(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report))
    print(f"wrote {cfg.out}")
    return 0
