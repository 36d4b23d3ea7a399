"""PNG plots of a comparison (matplotlib, Agg backend): one line per method, the median
over seeds with a min-max band."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .harness import Comparison

__all__ = ["plot_comparison", "plot_variants", "loss_axis", "figure"]

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


def _plot(comp, out: Path, name: str, key: str, xkey: str, ylabel: str, xlabel: str, log):
    """One curve per method; ``log`` is True (log scale), a float (symmetric log scale, linear
    within that distance of 0: signed values) or False."""
    fig, ax = figure()
    drawn = False
    kept = []  # the curves of the runs that did not diverge, which set the y range of a signed plot
    for method in comp.config["methods"]:
        c = _curves(comp, method, key, xkey)
        if c is None:
            continue
        x, med, lo, hi = c
        if log is True:
            floor = 1e-12
            med, lo, hi = (np.clip(v, floor, None) for v in (med, lo, hi))
        diverged = sum(r.diverged for r in comp.by_method(method))
        label = method + (f" (diverged {diverged})" if diverged else "")
        color = COLORS.get(method)
        ax.plot(x, med, label=label, color=color, lw=1.4)
        if np.any(hi > lo):
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        if not diverged:
            kept += [lo, hi]
        drawn = True
    if key == "loss":
        for (text, level), style in zip(comp.config.get("reference", {}).items(), ("--", ":", "-.")):
            ax.axhline(level, color="k", ls=style, lw=0.8, label=text)
            drawn = True
    if log is True:
        ax.set_yscale("log")
    elif log:
        ax.set_yscale("symlog", linthresh=log)
        ax.axhline(0.0, color="k", lw=0.6)
        _signed_range(ax, kept, log)
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


def _signed_range(ax, curves: list[np.ndarray], linear: float) -> None:
    """The y range of the runs that did not diverge (a diverged run leaves the plot, its label
    says so), a decade beyond them and beyond the linear band on each side of 0, so that a run
    that crosses 0 is seen to go on below it."""
    values = np.concatenate(curves) if curves else np.array([])
    values = values[np.isfinite(values)]
    if values.size:
        ax.set_ylim(min(values.min() * 10, -10 * linear), max(values.max() * 10, 10 * linear))


def _params(c) -> str:
    p = ",".join(f"{k}={v}" for k, v in c["task_params"].items())
    return f" ({p})" if p else ""


def _linear_within(comp: Comparison) -> float:
    """The symmetric-log threshold of a signed gap: a decade below the smallest size at which
    a run that did not diverge ends, so that where the runs end lies on the logarithmic part
    and a change of sign shows as a pass through the linear band around 0."""
    ends = [r.history["gap"][-1] for r in comp.runs if not r.diverged and r.error is None and r.history.get("gap")]
    sizes = [abs(v) for v in ends if v is not None and math.isfinite(v) and v != 0]
    return 10.0 ** (math.floor(math.log10(min(sizes))) - 1) if sizes else 1e-3


def loss_axis(comp: Comparison) -> tuple[str, str, bool | float]:
    """``(history key, label, scale)`` of the loss plots: ``f - f*`` on a log scale (True), or
    signed on a symmetric log scale linear within the returned distance of 0; the training
    loss where f* is not known."""
    gaps = [v for r in comp.runs for v in r.history.get("gap") or () if v is not None and math.isfinite(v)]
    if any(v < 0 for v in gaps):
        reference = " (f* = the reference)" if comp.config.get("target_gap") is None else ""
        return "gap", f"f - f*{reference}, signed", _linear_within(comp)
    if gaps:
        return "gap", "f - f*", True
    return "loss", "training loss (minibatch)", True


def plot_comparison(comp: Comparison, out: str | Path) -> dict[str, Path]:
    """``loss_vs_step.png``, ``loss_vs_time.png`` and ``orth_vs_step.png`` in ``out``.

    Where the optimum's value f* is known the loss plots show ``f - f*``: on a log scale while
    every run stays above f*, on a symmetric log scale with its sign where some run goes below
    (an unconstrained run, a penalty that lets Φ leave the manifold, a reference that can be
    beaten): ``|f - f*|`` would dip to 0 where the run crosses f*, which reads as convergence.
    """
    out = Path(out)
    key, label, log = loss_axis(comp)
    return {
        "loss_step_png": _plot(comp, out, "loss_vs_step.png", key, "step", label, "step", log),
        "loss_time_png": _plot(comp, out, "loss_vs_time.png", key, "time", label, "wall time (s)", log),
        "orth_step_png": _plot(
            comp, out, "orth_vs_step.png", "orth_max", "step", "orthogonality error max|ΦᵀΦ - I|", "step", True
        ),
    }


def plot_variants(rows: list[dict], path: str | Path) -> Path:
    """Training loss and orthogonality error against the iteration of each variant of a method
    (rows with ``variant`` and ``history``: one colour per method, one line style per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    seen: dict[str, int] = {}
    for r in rows:
        h, method = r["history"], r["variant"].split()[0]
        seen[method] = seen.get(method, -1) + 1
        style = {"color": COLORS.get(method), "ls": ("-", "--", ":", "-.")[seen[method] % 4], "lw": 1.1}
        a.plot(h["step"], h["loss"], label=r["variant"], **style)
        b.plot(h["step"], h["orth_max"], label=r["variant"], **style)
    for ax, ylabel in ((a, "training loss (minibatch)"), (b, "max|WᵀW - I|")):
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
