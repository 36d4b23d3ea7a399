r"""The copying memory problem: the standard test of orthogonal recurrent networks.

Arjovsky, Shah and Bengio (ICML 2016); Lezcano-Casado and Martínez-Rubio (ICML 2019,
"expRNN"), whose setting geotorch ships as ``examples/copying_problem.py``.  An input
sequence holds ``K`` symbols drawn from ``1..8``, then ``L`` blanks (0), a marker (9) and
``K - 1`` more blanks, ``L + 2K`` steps in all; the target is blank everywhere but the last
``K`` steps, which must repeat the ``K`` symbols.  A network that remembers nothing outputs
blank until the marker and then guesses uniformly among the 8 symbols, so its cross-entropy
averaged over the ``L + 2K`` steps is

.. math::
    \text{baseline}(L, K) = \frac{K \log 8}{L + 2K}.

The model is geotorch's: the cell :math:`h_t = \operatorname{modReLU}(W_{in} x_t + W h_{t-1})`
with ``W`` (hidden × hidden) orthogonal and a linear read-out to 9 classes at every step.
``W`` starts block-diagonal with 2×2 rotations by angles uniform in ``(-π, π)`` (Henaff et
al. 2016; geotorch's ``torus_init_``), the same draw for every method of a seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .formatting import fmt

__all__ = [
    "SYMBOLS",
    "BLANK",
    "MARKER",
    "baseline_loss",
    "copying_batch",
    "ModReLU",
    "CopyingRNN",
    "problem_fields",
    "worst_orth",
    "run_notes",
    "parse_variant",
    "variant_row",
    "variants_table",
]

SYMBOLS = 8  # the symbols are 1..8
BLANK = 0
MARKER = SYMBOLS + 1  # 9: the input alphabet has 10 letters, the output alphabet 9


def baseline_loss(L: int, K: int = 10) -> float:
    """The memoryless cross-entropy ``K log 8 / (L + 2K)`` (nats per step)."""
    return K * math.log(SYMBOLS) / (L + 2 * K)


def copying_batch(L: int, K: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, each ``(batch, L + 2K)`` of int64, as geotorch's ``copying_data``."""
    seq = torch.randint(1, SYMBOLS + 1, (batch, K), generator=generator)
    blanks = lambda n: torch.full((batch, n), BLANK, dtype=torch.long)  # noqa: E731
    marker = torch.full((batch, 1), MARKER, dtype=torch.long)
    x = torch.cat([seq, blanks(L), marker, blanks(K - 1)], dim=1)
    y = torch.cat([blanks(L + K), seq], dim=1)
    return x, y


class ModReLU(nn.Module):
    r""":math:`\operatorname{sign}(z)\,\operatorname{relu}(|z| + b)` (Arjovsky et al. 2016), ``b`` per unit."""

    def __init__(self, features: int):
        super().__init__()
        self.b = nn.Parameter(torch.empty(features).uniform_(-0.01, 0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.b)


def torus_(w: torch.Tensor) -> torch.Tensor:
    """Fill square ``w`` with 2×2 rotation blocks by angles uniform in (-π, π) (geotorch's ``torus_init_``)."""
    n = w.shape[0]
    angles = (torch.rand(n // 2, dtype=torch.float64) * 2 - 1) * math.pi
    off = torch.zeros(n - 1, dtype=torch.float64)
    off[::2] = angles
    skew = torch.diag_embed(off, offset=-1)
    with torch.no_grad():
        w.copy_(torch.linalg.matrix_exp(skew - skew.T))
    return w


class CopyingRNN(nn.Module):
    """geotorch's copying model: one modReLU cell, ``recurrent.weight`` orthogonal, a read-out per step."""

    def __init__(self, hidden: int = 190):
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(MARKER + 1, hidden)  # on one-hot inputs: a lookup of W_in's columns
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.act = ModReLU(hidden)
        self.out = nn.Linear(hidden, SYMBOLS + 1)
        nn.init.kaiming_normal_(self.inp.weight, nonlinearity="relu")
        torus_(self.recurrent.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, steps, 9)`` for int inputs ``(batch, steps)``."""
        drive = nn.functional.embedding(x.T, self.inp.weight.T) + self.inp.bias  # W_in onehot(x_t) + b_in
        w = self.recurrent.weight  # read once: a parametrization (geotorch) is evaluated once per sequence
        h = drive.new_zeros(drive.shape[1:])
        states = []
        for d in drive.unbind(0):  # not drive[t]: each slice's backward would write a whole-size zero tensor
            h = self.act(d + h @ w.T)
            states.append(h)
        return self.out(torch.stack(states, dim=1))


def recall(logits: torch.Tensor, y: torch.Tensor, K: int) -> float:
    """Accuracy on the ``K`` recalled symbols (the last ``K`` steps)."""
    return (logits[:, -K:].argmax(-1) == y[:, -K:]).double().mean().item()


def check(*, L: int, K: int, hidden: int, batch: int, **_: Any) -> None:
    """Refuse sizes the task cannot run with, naming the parameter and its bound."""
    for name, value, low in (("L", L, 1), ("K", K, 1), ("hidden", hidden, 2), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"task copying: {name} must be an integer >= {low}, got {value!r}")


def problem_fields(
    seed: int = 0,
    L: int = 200,
    K: int = 10,
    hidden: int = 190,
    batch: int = 128,
    test_batch: int = 1000,
    dtype=torch.float32,
    device="cpu",
) -> dict[str, Any]:
    """The fields of the task's :class:`~orthoopt.compare.tasks.Problem` for one seed.

    Step ``t`` trains on the batch drawn from a generator seeded with ``(seed, t)``: the same
    data stream for every method.  ``evaluate`` scores a fixed held-out set of
    ``test_batch`` sequences (the same for every seed).
    """
    check(L=L, K=K, hidden=hidden, batch=batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CopyingRNN(hidden).to(device=device, dtype=dtype)
    criterion = nn.CrossEntropyLoss()

    def data(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = copying_batch(L, K, batch, torch.Generator().manual_seed(seed * 1_000_003 + t))
        return x.to(device), y.to(device)

    def loss(t: int) -> torch.Tensor:
        x, y = data(t)
        return criterion(model(x).flatten(0, 1), y.flatten())

    x_test, y_test = (v.to(device) for v in copying_batch(L, K, test_batch, torch.Generator().manual_seed(2**31 - 1)))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(x_test)
        sigma = torch.linalg.svdvals(model.recurrent.weight.double())  # σ_max^L: what L steps can amplify
        return {
            "test_acc": recall(logits, y_test, K),
            "test_loss": criterion(logits.flatten(0, 1), y_test.flatten()).item(),
            "sigma_max": sigma.max().item(),
            "sigma_min": sigma.min().item(),
        }

    base = baseline_loss(L, K)
    return {
        "model": model,
        "loss": loss,
        "include": ["recurrent.weight"],
        "layout": "auto",
        "evaluate": evaluate,
        "target": lambda value: value < 0.01 * base,
        "target_text": f"training loss < 1% of the memoryless baseline {base:.4g} = 10 log 8/(L + 20)",
        "reference": {"memoryless baseline": base, "1% of baseline": 0.01 * base},
    }


# The settings of geotorch's example: Adam, betas (0.9, 0.99), lr 1e-3 and 2e-4 on W, constant.
TASK_SETTINGS: dict[str, Any] = {
    "description": "copying memory problem: modReLU RNN (geotorch's example), W orthogonal; K=10 symbols, L blanks",
    "base": "adam",
    "lr": 1e-3,
    "betas": (0.9, 0.99),
    "constrained_lr_scale": 0.2,
    "schedule": "constant",
    "beta": 10.0,
    "smoothing": 1e-3,
    "steps": 4000,
    "quick_steps": 5,
    "metrics": {"test_acc": ("recall acc %", 100.0), "test_loss": ("test loss", 1.0), "sigma_max": ("σ_max(W)", 1.0)},
    "params": {"L": 200},
    "methods": ("none", "soft", "soft-auto", "hard", "geotorch"),
}


# -- reading its runs -----------------------------------------------------------------------
def worst_orth(run) -> float:
    """The largest orthogonality error of a run: before every recorded step and at the end."""
    return max([v for v in run.history["orth_max"] if v == v] + [run.final["orth_max"]])


def run_notes(comp) -> str:
    """One line per run: the first iteration below 1% of the baseline, ms per iteration, W's
    error (final and worst), its singular values, σ_max^L, the recall and the test loss."""
    L = comp.config["task_params"]["L"]
    lines = [
        "Per run (first iteration below 1% of the baseline; W's error max|WᵀW - I| final and worst over the run):",
        "",
    ]
    for r in comp.runs:
        if not r.ok:
            lines.append(f"- {r.method} seed {r.seed}: " + (r.error or f"diverged at step {r.diverged_at}"))
            continue
        f = r.final
        first = (
            f"at iteration {r.step_to_target} ({fmt(r.time_to_target)} s)" if r.step_to_target is not None else "never"
        )
        lines.append(
            f"- {r.method} seed {r.seed}: below 1% {first}, {f['iter_ms']:.0f} ms/iteration, orth final "
            f"{fmt(f['orth_max'])} (worst {fmt(worst_orth(r))}), σ(W) in [{f['sigma_min']:.6f}, "
            f"{f['sigma_max']:.6f}], σ_max^L = {f['sigma_max'] ** L:.4g}, recall {100 * f['test_acc']:.2f}%, "
            f"test loss {fmt(f['test_loss'])}"
        )
    return "\n".join(lines)


# A variant's keys: the compare.run setting each sets, and its symbol in the variant's label.
VARIANT_KEYS = {"beta": ("beta", "β"), "delta": ("smoothing", "δ"), "wlr": ("constrained_lr_scale", "W lr ×")}


def parse_variant(text: str, task) -> tuple[str, str, dict[str, float]]:
    """``soft:beta=10``, ``soft-huber:beta=1:delta=0.01``, ``hard:wlr=128`` (W's lr × 128, on top
    of the task's own scale of W's lr): ``(label, method, compare.run settings)``."""
    method, *rest = text.split(":")
    settings, label = {}, method
    for item in rest:
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise ValueError(f"variant {text!r}: unknown key {key!r}; use {', '.join(VARIANT_KEYS)}")
        name, symbol = VARIANT_KEYS[key]
        settings[name] = float(value) * (task.constrained_lr_scale if key == "wlr" else 1.0)
        label += f" {symbol}{'' if key == 'wlr' else '='}{float(value):g}"
    return label, method, settings


def variant_row(label: str, method: str, comp) -> dict[str, Any]:
    """The figures of a variant's one run (``comp``: one method, one seed)."""
    (r,) = comp.runs
    f = r.final
    L = comp.config["task_params"]["L"]
    return {
        "variant": label,
        "beta": comp.config["beta"] if method != "soft-auto" else "auto",
        "smoothing": comp.config["smoothing"] if method == "soft-huber" else None,
        "w_lr": comp.config["lr"] * comp.config["constrained_lr_scale"],
        "status": "ok" if r.ok else (r.error or f"diverged at {r.diverged_at}"),
        "first_below_1pct": r.step_to_target,
        "final_loss": f.get("loss"),
        "orth_final": f.get("orth_max"),
        "orth_worst": worst_orth(r) if r.ok else None,
        "sigma_max": f.get("sigma_max"),
        "sigma_max_L": f["sigma_max"] ** L if "sigma_max" in f else None,
        "recall": f.get("test_acc"),
        "iter_ms": f.get("iter_ms"),
        "history": {k: r.history[k] for k in ("step", "loss", "orth_max")},
    }


def variants_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of :func:`variant_row`'s rows."""
    lines = [
        "| variant | first below 1% | final loss | orth final | orth worst | σ_max(W) | σ_max^L | recall % | ms/iter | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = "never" if r["first_below_1pct"] is None else r["first_below_1pct"]
        sigma = "-" if r["sigma_max"] is None else f"{r['sigma_max']:.6f}"
        recall = "-" if r["recall"] is None else f"{100 * r['recall']:.2f}"
        cells = [r["variant"], first, fmt(r["final_loss"]), fmt(r["orth_final"]), fmt(r["orth_worst"]), sigma]
        cells += [fmt(r["sigma_max_L"]), recall, fmt(r["iter_ms"]), r["status"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines
