"""Writing a :class:`~orthoopt.compare.harness.Comparison`: terminal/markdown table, JSON, CSV."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .formatting import fmt, pm
from .harness import Comparison, RunResult

__all__ = ["table", "write", "load", "fmt", "pm"]


def _pm(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    mean, std = row.get(key), row.get(key + "_std")
    if mean is None:
        return "-"
    if row["seeds"] - row["diverged"] - row["failed"] > 1 and std is not None:
        return f"{fmt(mean * scale, digits)} ± {fmt(std * scale, 2)}"
    return fmt(mean * scale, digits)


def _status(row: dict) -> str:
    parts = []
    if row["diverged"]:
        parts.append(f"diverged {row['diverged']}/{row['seeds']} (step {', '.join(map(str, row['diverged_at']))})")
    if row["failed"]:
        parts.append(f"failed {row['failed']}/{row['seeds']}: {row['error']}")
    return "; ".join(parts) or "ok"


def table(comp: Comparison) -> str:
    """A markdown table of the summary (mean ± std over seeds)."""
    rows = comp.summary
    c = comp.config
    has_gap = any(r.get("gap") is not None for r in rows) or c.get("target_gap")
    has_target = has_gap or c.get("target_text")
    metrics = c.get("metrics") or {}
    has_acc = "test_acc" not in metrics and any(r.get("test_acc") is not None for r in rows)
    head = ["method", "final loss"]
    if has_gap:
        head += ["f - f*", "rel gap"]
    head += ["orth max-abs", "orth Frobenius"]
    if has_acc:
        head += ["test acc %"]
    head += [label for label, _ in metrics.values()]
    head += ["step ms", "iter ms"]
    if has_target:
        head += ["to target s (step)"]
    head += ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _pm(r, "loss", digits=5 if has_gap else 4)]
        if has_gap:
            cells += [_pm(r, "gap"), _pm(r, "rel_gap")]
        cells += [_pm(r, "orth_max"), _pm(r, "orth_fro")]
        if has_acc:
            cells += [_pm(r, "test_acc", 100.0, 4)]
        cells += [_pm(r, key, scale, 4) for key, (_, scale) in metrics.items()]
        cells += [fmt(r.get("step_ms")), fmt(r.get("iter_ms"))]
        if has_target:
            tt = r.get("time_to_target")
            cells += [
                "-"
                if tt is None
                else f"{fmt(tt)} ({fmt(r['step_to_target'])}, {r['reached_target']}/{r['seeds']} seeds)"
            ]
        cells += [_status(r)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"task {c['task']} {c['task_params']}, {len(c['seeds'])} seed(s), {c['steps']} steps, base {c['base']} "
        f"lr {fmt(c['lr'])} ({c['schedule']}), β {fmt(c['beta'])}"
    )
    if c.get("threshold") is not None:
        note += f" (= {fmt(c['beta'] / c['threshold'])} × threshold β* {fmt(c['threshold'])})"
    if c.get("constrained_lr_scale", 1.0) != 1.0:
        note += f", constrained lr × {fmt(c['constrained_lr_scale'])}"
    note += f", {c['device']} {c['dtype']}; times are medians per step"
    if has_gap:
        note += "; rel gap = abs(f - f*)/abs(f*)"
    if c.get("target_text"):
        note += f"; target: {c['target_text']}"
    elif has_gap and c.get("target_gap") is not None:
        note += f"; target: rel gap <= {fmt(c['target_gap'])} and orth max-abs <= {fmt(c['target_orth'])}"
    if any(r["seeds"] > 1 for r in rows):
        note += "; mean ± std over seeds"
    return note + "\n\n" + "\n".join(lines)


def _thin(history: dict[str, list], most: int) -> dict[str, list]:
    n = len(history.get("step", []))
    if n <= most:
        return history
    keep = sorted(set(range(0, n, math.ceil(n / most))) | {n - 1})
    return {k: [v[i] for i in keep] for k, v in history.items()}


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.5g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def load(path: str | Path) -> Comparison:
    """The comparison saved by :func:`write` in ``results.json`` (histories as thinned there), e.g. to re-plot."""
    data = json.loads(Path(path).read_text())
    runs = [RunResult(**r) for r in data["runs"]]
    return Comparison(data["config"]["task"], data["config"], runs, data["summary"])


def write(comp: Comparison, out: str | Path, *, plots: bool = True, history_points: int = 1000) -> dict[str, Path]:
    """Write ``results.json``, ``runs.csv``, ``summary.csv``, ``table.md`` and the PNGs to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    runs = []
    for r in comp.runs:
        d = asdict(r)
        d["history"] = _thin(r.history, history_points)
        runs.append(d)
    paths["json"] = out / "results.json"
    data = {"config": comp.config, "summary": comp.summary, "runs": runs}
    paths["json"].write_text(json.dumps(_clean(data), separators=(",", ":")))
    paths["runs_csv"] = out / "runs.csv"
    final_keys = sorted({k for r in comp.runs for k in r.final if k != "traceback"})
    with paths["runs_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["task", "method", "seed", "steps", "diverged", "diverged_at", "error", "step_to_target", "time_to_target"]
            + final_keys
        )
        for r in comp.runs:
            w.writerow(
                [r.task, r.method, r.seed, r.steps, r.diverged, r.diverged_at, r.error or "", r.step_to_target]
                + [r.time_to_target]
                + [r.final.get(k) for k in final_keys]
            )
    paths["summary_csv"] = out / "summary.csv"
    keys = [k for k in comp.summary[0] if k != "diverged_at"] if comp.summary else []
    with paths["summary_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(comp.summary)
    paths["table"] = out / "table.md"
    paths["table"].write_text(table(comp) + "\n")
    if plots:
        from .plots import plot_comparison

        paths.update(plot_comparison(comp, out))
    return paths
