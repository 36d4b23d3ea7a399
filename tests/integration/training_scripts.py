"""Four training situations from public scripts, shortened and retold in orthoopt's own words,
each run as its script has it (``options=None``) or with the README's one-line swap.

* :func:`mnist_cnn`: pytorch/examples' ``mnist/main.py``: two 3x3 convolutions (1 -> 32 -> 64),
  max-pooling, dropout, ``fc1 (9216 -> 128)``, ``fc2 (128 -> 10)``, Adadelta at lr 1.0 with
  StepLR(gamma 0.7) per epoch; the script builds its optimizer from ``model.parameters()``, so
  the swap is ``orthogonalize(Adadelta)(param_groups(model, ...))``.
* :func:`word_lm`: pytorch/examples' ``word_language_model``: embedding, a 2-layer ``nn.LSTM``,
  a linear decoder, dropout, gradient clipping at 0.25, truncated backpropagation over ``bptt``
  steps, and the learning rate divided by 4 whenever the validation loss stops improving
  (under AdamW, with an optional cosine decay); the swap is ``constrain_`` on the AdamW.
* :func:`timm_vit`: timm's ``train.py`` on ``vit_tiny_patch16_224`` (made with
  ``timm.create_model(..., pretrained=False)``, smaller images, patches and depth),
  ``create_optimizer_v2`` (AdamW, its no-weight-decay groups) and timm's cosine schedule with a
  warmup, stepped per update; the swap is ``constrain_`` on timm's optimizer.
* :func:`hf_bert`: a tiny ``BertForSequenceClassification`` from a ``BertConfig`` under Hugging
  Face's ``Trainer`` (its AdamW, no-decay groups and linear schedule with warmup); the swap is
  ``constrain_`` on ``trainer.optimizer`` after ``trainer.create_optimizer()``, with the
  ``OrthoCallback``.

No file and no download: the images are scikit-learn's 8x8 digits (upsampled to 28x28 for the
CNN), the text is drawn from a seeded Markov chain, BERT's tokens are the digits' quantised
pixels.  Each function except :func:`hf_bert` is a generator that yields after every training
iteration (so that ``experiments/integration_scripts.py`` can time the variants round-robin)
and returns a :class:`Run`; :func:`run` drives one to its end.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import orthoopt

# The README's recipe, per variant: the options of the one-line swap (None: the script as it is).
SOFT_BETA = 3.0
SOFT_SMOOTHING = 1e-2
RECIPES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "soft": {"ortho": SOFT_BETA, "ortho_smoothing": SOFT_SMOOTHING},
    "auto": {"ortho": "auto", "ortho_smoothing": SOFT_SMOOTHING},
    "hard": {"ortho": 1.0, "ortho_mode": "hard"},
}


@dataclass
class Run:
    """What a script reports at its end, and what the tests compare between variants."""

    loss: float  # the held-out task loss
    metric: float  # held-out accuracy in %, or perplexity for the language model
    metric_name: str
    errors: dict[str, float]  # max |ΦᵀΦ - I| of each parameter the recipe constrains (also in a plain run)
    start_errors: dict[str, float]  # the same at initialisation
    groups: list[dict[str, Any]]  # the optimizer's groups without their tensors
    first_step: dict[str, torch.Tensor]  # every parameter after the first optimizer step
    times: list[float] = field(default_factory=list)  # seconds per training iteration
    steps: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)  # the Trainer's log history (hf_bert)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, errors) (word_lm)


def run(script: Generator[None, None, Run]) -> Run:
    """Drive a script generator to its end and return its :class:`Run`."""
    while True:
        try:
            next(script)
        except StopIteration as done:
            return done.value


# -- shared pieces ------------------------------------------------------------------------
def errors_of(model: nn.Module, exclude: list[str]) -> dict[str, float]:
    """max |ΦᵀΦ - I| of each parameter the default selection (minus ``exclude``) constrains."""
    return orthoopt.named_orthogonality_errors(model, exclude=exclude)


def group_summary(optimizer: Any) -> list[dict[str, Any]]:
    opt = orthoopt.wrappers.unwrap(optimizer)
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def constrained_errors(model: nn.Module, optimizer: Any, exclude: list[str]) -> dict[str, float]:
    """The swapped optimizer's own errors (its layouts), or, unswapped, those the recipe would constrain."""
    if isinstance(orthoopt.wrappers.unwrap(optimizer), orthoopt.OrthoMixin):
        return orthoopt.named_orthogonality_errors(optimizer)
    return errors_of(model, exclude)


def finish(model, optimizer, exclude, start, first, times, loss, metric, metric_name) -> Run:
    errors = constrained_errors(model, optimizer, exclude)
    return Run(loss, metric, metric_name, errors, start, group_summary(optimizer), first, times, len(times))


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1], a fixed 80/20 split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    cut = len(y) - 360
    return x[:cut], y[:cut], x[cut:], y[cut:]


def batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One shuffled epoch of index batches (the last one may be smaller), as a DataLoader gives."""
    return list(torch.randperm(n, generator=generator).split(size))


# -- 1. pytorch/examples mnist ------------------------------------------------------------
class MnistNet(nn.Module):
    """The example's network: conv(1->32), conv(32->64), pool, dropout, fc1, dropout, fc2."""

    def __init__(self, side: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((side - 4) // 2) ** 2, 128)  # 9216 for 28x28 images
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2)).flatten(1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


MNIST_EXCLUDE = ["fc2"]
MNIST_CONSTRAINED = {"conv1.weight", "conv2.weight", "fc1.weight"}


def mnist_images(side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as 1-channel ``side x side`` images, normalised by the training set's mean and std."""
    x_train, y_train, x_test, y_test = digits()

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, None], size=(side, side), mode="bilinear", align_corners=False)

    x_train, x_test = up(x_train), up(x_test)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def mnist_cnn(
    options: dict[str, Any] | None, *, epochs: int = 3, batch_size: int = 64, side: int = 28, seed: int = 1
) -> Generator[None, None, Run]:
    x_train, y_train, x_test, y_test = mnist_images(side)
    torch.manual_seed(seed)
    model = MnistNet(side)
    start = errors_of(model, MNIST_EXCLUDE)
    if options is None:
        optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    else:  # the swap where the script builds its optimizer from the parameters
        groups = orthoopt.param_groups(model, exclude=MNIST_EXCLUDE, **options)
        optimizer = orthoopt.orthogonalize(torch.optim.Adadelta)(groups, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    order = torch.Generator().manual_seed(seed)
    times: list[float] = []
    first = None
    for _ in range(epochs):
        model.train()
        for idx in batches(len(y_train), batch_size, order):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = F.nll_loss(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
            first = first or snapshot(model)
            yield
        scheduler.step()
    model.eval()
    with torch.no_grad():
        out = model(x_test)
    loss = F.nll_loss(out, y_test).item()
    accuracy = 100.0 * (out.argmax(1) == y_test).float().mean().item()
    return finish(model, optimizer, MNIST_EXCLUDE, start, first, times, loss, accuracy, "accuracy %")


# -- 2. pytorch/examples word_language_model -----------------------------------------------
def markov_text(
    vocab: int, length: int, successors: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A token stream from a random Markov chain over ``vocab`` words, each with ``successors``
    possible next words; returns (train 90%, validation 10%, the chain's entropy rate in nats,
    the best loss any model can reach)."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.stack([torch.randperm(vocab, generator=g)[:successors] for _ in range(vocab)])
    probs = torch.softmax(2 * torch.randn(vocab, successors, generator=g, dtype=torch.float64), dim=1)
    draws = torch.rand(length, generator=g, dtype=torch.float64)
    cumulative = probs.cumsum(1)
    tokens = torch.empty(length, dtype=torch.long)
    word = 0
    for t in range(length):
        k = min(int(torch.searchsorted(cumulative[word], draws[t])), successors - 1)
        word = tokens[t] = nxt[word, k]
    stationary = torch.bincount(tokens, minlength=vocab).double() / length
    entropy = -(stationary[:, None] * probs * probs.log()).sum().item()
    cut = length * 9 // 10
    return tokens[:cut], tokens[cut:], entropy


class WordLM(nn.Module):
    """The example's RNNModel with an LSTM: dropout(embedding) -> LSTM -> dropout -> decoder."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return F.log_softmax(self.decoder(self.drop(out)), dim=-1), hidden


LM_EXCLUDE = ["decoder"]
LM_CONSTRAINED = {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"}


def columns(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The example's batchify: the stream cut into ``batch_size`` columns, (length, batch_size)."""
    n = len(data) // batch_size
    return data[: n * batch_size].view(batch_size, n).t().contiguous()


def word_lm(
    options: dict[str, Any] | None,
    *,
    epochs: int = 4,
    vocab: int = 50,
    tokens: int = 24_000,
    emsize: int = 32,
    nhid: int = 32,
    batch_size: int = 16,
    bptt: int = 20,
    lr: float = 5e-3,
    cosine: bool = True,
    dropout: float = 0.2,
    clip: float = 0.25,
    seed: int = 1,
    record_every: int = 0,
) -> Generator[None, None, Run]:
    train, valid, _ = markov_text(vocab, tokens)
    train, valid = columns(train, batch_size), columns(valid, 10)
    torch.manual_seed(seed)
    model = WordLM(vocab, emsize, nhid, 2, dropout)
    start = errors_of(model, LM_EXCLUDE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if options is not None:
        orthoopt.constrain_(optimizer, model, exclude=LM_EXCLUDE, **options)
    per_epoch = math.ceil((len(train) - 1) / bptt)
    # The example divides the lr by 4 whenever validation stops improving; a cosine decay over
    # the run (per iteration) lands the soft step where that never triggers in a short run.
    schedule = (
        torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, epochs * per_epoch) / (epochs * per_epoch)))
        )
        if cosine
        else None
    )
    times: list[float] = []
    first, best, history = None, math.inf, []
    for _ in range(epochs):
        model.train()
        hidden = (torch.zeros(2, batch_size, nhid), torch.zeros(2, batch_size, nhid))
        for i in range(0, len(train) - 1, bptt):
            t0 = time.perf_counter()
            seq = min(bptt, len(train) - 1 - i)
            inputs, targets = train[i : i + seq], train[i + 1 : i + 1 + seq]
            hidden = tuple(h.detach() for h in hidden)  # truncated backpropagation through time
            model.zero_grad()
            out, hidden = model(inputs, hidden)
            loss = F.nll_loss(out.view(-1, vocab), targets.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            times.append(time.perf_counter() - t0)
            first = first or snapshot(model)
            if record_every and len(times) % record_every == 0:
                history.append((len(times), constrained_errors(model, optimizer, LM_EXCLUDE)))
            yield
        val = evaluate_lm(model, valid, bptt, nhid, vocab)
        if val < best:
            best = val
        else:
            for group in optimizer.param_groups:
                group["lr"] /= 4.0
    val = evaluate_lm(model, valid, bptt, nhid, vocab)
    run_ = finish(model, optimizer, LM_EXCLUDE, start, first, times, val, math.exp(val), "perplexity")
    run_.history = history
    return run_


@torch.no_grad()
def evaluate_lm(model: WordLM, data: torch.Tensor, bptt: int, nhid: int, vocab: int) -> float:
    model.eval()
    hidden = (torch.zeros(2, data.shape[1], nhid), torch.zeros(2, data.shape[1], nhid))
    total, count = 0.0, 0
    for i in range(0, len(data) - 1, bptt):
        seq = min(bptt, len(data) - 1 - i)
        out, hidden = model(data[i : i + seq], hidden)
        total += F.nll_loss(out.view(-1, vocab), data[i + 1 : i + 1 + seq].reshape(-1), reduction="sum").item()
        count += seq * data.shape[1]
    return total / count


# -- 3. timm train.py on a vit_tiny ----------------------------------------------------------
VIT_EXCLUDE = ["head"]


def vit_constrained(depth: int) -> set[str]:
    names = {"patch_embed.proj.weight"}
    for b in range(depth):
        names |= {f"blocks.{b}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    return names


def timm_vit(
    options: dict[str, Any] | None,
    *,
    epochs: int = 4,
    depth: int = 2,
    patch_size: int = 2,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_epochs: int = 1,
    seed: int = 1,
    **model_options: Any,
) -> Generator[None, None, Run]:
    import timm
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    x_train, y_train, x_test, y_test = digits()
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = ((x_train - mean) / std)[:, None], ((x_test - mean) / std)[:, None]
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=patch_size,
        in_chans=1,
        depth=depth,
        num_classes=10,
        **model_options,
    )
    start = errors_of(model, VIT_EXCLUDE)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    if options is not None:
        orthoopt.constrain_(optimizer, model, exclude=VIT_EXCLUDE, **options)
    per_epoch = math.ceil(len(y_train) / batch_size)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=1e-5,
        step_on_epochs=False,
        updates_per_epoch=per_epoch,
    )
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    order = torch.Generator().manual_seed(seed)
    times: list[float] = []
    first, updates = None, 0
    for epoch in range(epochs):
        model.train()
        for idx in batches(len(y_train), batch_size, order):
            t0 = time.perf_counter()
            loss = criterion(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            times.append(time.perf_counter() - t0)
            first = first or snapshot(model)
            yield
        scheduler.step(epoch + 1)
    model.eval()
    with torch.no_grad():
        out = model(x_test)
    loss = F.cross_entropy(out, y_test).item()
    accuracy = 100.0 * (out.argmax(1) == y_test).float().mean().item()
    return finish(model, optimizer, VIT_EXCLUDE, start, first, times, loss, accuracy, "top-1 %")


# -- 4. a tiny BERT under Hugging Face's Trainer -------------------------------------------------
BERT_EXCLUDE = ["classifier"]
BERT_LAYERS = 2


def bert_constrained(layers: int = BERT_LAYERS) -> set[str]:
    names = {"bert.pooler.dense.weight"}
    for i in range(layers):
        prefix = f"bert.encoder.layer.{i}"
        names |= {f"{prefix}.attention.self.{x}.weight" for x in ("query", "key", "value")}
        names |= {f"{prefix}.{m}.dense.weight" for m in ("attention.output", "intermediate", "output")}
    return names


class MarkerTokens(torch.utils.data.Dataset):
    """A synthetic sequence task: [CLS] and 16 tokens drawn from 20 noise ids, one of which is
    replaced by a marker id that is the label (10 classes); a seeded draw."""

    CLS, MARKERS, NOISE, LENGTH = 1, 10, 20, 16
    VOCAB = 2 + MARKERS + NOISE

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        tokens = 2 + self.MARKERS + torch.randint(self.NOISE, (n, self.LENGTH), generator=g)
        self.labels = torch.randint(self.MARKERS, (n,), generator=g)
        where = torch.randint(self.LENGTH, (n,), generator=g)
        tokens[torch.arange(n), where] = 2 + self.labels
        self.ids = torch.cat([torch.full((n, 1), self.CLS), tokens], dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def hf_bert(
    options: dict[str, Any] | None,
    output_dir: str,
    *,
    epochs: int = 4,
    train_size: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 1,
) -> Generator[None, None, Run]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from orthoopt.integrations.huggingface import OrthoCallback

    train, test = MarkerTokens(train_size, seed=100), MarkerTokens(500, seed=101)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=MarkerTokens.VOCAB,
        hidden_size=64,
        num_hidden_layers=BERT_LAYERS,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=10,
    )
    model = BertForSequenceClassification(config)
    start = errors_of(model, BERT_EXCLUDE)
    args = TrainingArguments(
        output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=512,
        num_train_epochs=epochs,
        learning_rate=lr,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Clock(TrainerCallback):
        """Whole-iteration times (the Trainer's own loop) and the parameters after step 1."""

        def __init__(self):
            self.times: list[float] = []
            self.first = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.first = self.first or snapshot(model)

    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # quiet: the logs stay in trainer.state.log_history
    if options is not None:
        trainer.create_optimizer()  # the Trainer's own groups: no weight decay on biases and norms
        orthoopt.constrain_(trainer.optimizer, model, exclude=BERT_EXCLUDE, **options)
        trainer.add_callback(OrthoCallback(trainer))
    trainer.train()
    yield
    loss = trainer.evaluate(test)["eval_loss"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=test.ids).logits
    accuracy = 100.0 * (logits.argmax(1) == test.labels).float().mean().item()
    run_ = finish(model, trainer.optimizer, BERT_EXCLUDE, start, clock.first, clock.times, loss, accuracy, "accuracy %")
    run_.log = trainer.state.log_history
    return run_
