"""PNG plots of a comparison (matplotlib, Agg backend): one line per method, the median
over seeds with a min-max band."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .harness import Comparison

__all__ = ["plot_comparison", "figure"]

COLORS = {
    "none": "#7f7f7f",
    "soft": "#d62728",
    "soft-huber": "#ff7f0e",
    "soft-auto": "#8c564b",
    "frobenius": "#2ca02c",
    "landing": "#9467bd",
    "hard": "#1f77b4",
    "geotorch": "#17becf",
}


def figure(width: float = 6.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _curves(comp: Comparison, method: str, key: str, xkey: str):
    runs = [r for r in comp.by_method(method) if r.history.get(key) and r.error is None]
    if not runs:
        return None
    n = min(len(r.history[key]) for r in runs)
    if n == 0:
        return None
    ys = np.array([[np.nan if v is None else v for v in r.history[key][:n]] for r in runs], dtype=float)
    xs = np.array([r.history[xkey][:n] for r in runs], dtype=float)
    return xs.mean(0), np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def _plot(comp, out: Path, name: str, key: str, xkey: str, ylabel: str, xlabel: str, log, transform=None):
    """One curve per method; ``log`` is True (log scale), ``"symlog"`` (signed values) or False."""
    fig, ax = figure()
    drawn = False
    for method in comp.config["methods"]:
        c = _curves(comp, method, key, xkey)
        if c is None:
            continue
        x, med, lo, hi = c
        if transform is not None:
            med, lo, hi = transform(med), transform(lo), transform(hi)
            lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        if log is True:
            floor = 1e-12
            med, lo, hi = (np.clip(v, floor, None) for v in (med, lo, hi))
        diverged = sum(r.diverged for r in comp.by_method(method))
        label = method + (f" (diverged {diverged})" if diverged else "")
        color = COLORS.get(method)
        ax.plot(x, med, label=label, color=color, lw=1.4)
        if np.any(hi > lo):
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        drawn = True
    if key == "loss":
        for (text, level), style in zip(comp.config.get("reference", {}).items(), ("--", ":", "-.")):
            ax.axhline(level, color="k", ls=style, lw=0.8, label=text)
            drawn = True
    if log == "symlog":
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0.0, color="k", lw=0.6)
    elif log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    c = comp.config
    ax.set_title(f"{c['task']}{_params(c)}: {ylabel}", fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _params(c) -> str:
    p = ",".join(f"{k}={v}" for k, v in c["task_params"].items())
    return f" ({p})" if p else ""


def plot_comparison(comp: Comparison, out: str | Path) -> dict[str, Path]:
    """``loss_vs_step.png``, ``loss_vs_time.png`` and ``orth_vs_step.png`` in ``out``."""
    out = Path(out)
    gaps = [v for r in comp.runs for v in r.history.get("gap") or () if v is not None and math.isfinite(v)]
    if comp.config.get("target_gap") is None and any(v < 0 for v in gaps):
        # f* is a reference that can be beaten (EM's local optimum): the signed gap
        key, label, log, tr = "gap", "f - f* (f* = the reference)", "symlog", None
    elif gaps:
        key, label, log, tr = "gap", "|f - f*|", True, np.abs
    else:
        key, label, log, tr = "loss", "training loss (minibatch)", True, None
    return {
        "loss_step_png": _plot(comp, out, "loss_vs_step.png", key, "step", label, "step", log, tr),
        "loss_time_png": _plot(comp, out, "loss_vs_time.png", key, "time", label, "wall time (s)", log, tr),
        "orth_step_png": _plot(
            comp, out, "orth_vs_step.png", "orth_max", "step", "orthogonality error max|ΦᵀΦ - I|", "step", True
        ),
    }
