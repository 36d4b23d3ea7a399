"""The performance budget's targets, read from the benchmarks' JSON files: for each target the
value of every run, their median and range, and whether the median meets it.

    python tools/bench_targets.py experiments/results/bench/cpu_1thread*.json \\
        experiments/results/bench/cpu_2threads*.json experiments/results/bench/models_*.json

Step-benchmark files (``orthoopt bench``) give the step targets, whole-iteration files
(``orthoopt bench --models``) the iteration ones; files are told apart by their content.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoopt.bench import TARGETS as STEP_TARGETS  # noqa: E402
from orthoopt.bench.iteration import EVERY_VARIANT  # noqa: E402
from orthoopt.bench.iteration import TARGETS as ITERATION_TARGETS  # noqa: E402

# (label, case, ratio key, bound) of the step benchmark's targets.
STEP_ROWS = [
    ("(soft - AdamW) / floor, 16 separate (256, 64)", "16x(256,64) params", "overhead_over_floor", "cpu"),
    ("(soft - AdamW) / floor, (256, 64, 16)", "(256,64,16)", "overhead_over_floor", "cpu"),
    ("(soft - AdamW) / floor, (16, 256, 64)", "(16,256,64)", "overhead_over_floor", "cpu"),
    ("(soft - AdamW) / floor, (1, 1024, 512)", "(1,1024,512)", "overhead_over_floor", "cpu"),
    ("(soft - AdamW) / floor, 48 separate (512, 64)", "48x(512,64) params", "overhead_over_floor", "cpu"),
    ("'auto' step / soft step, (16, 256, 64)", "(16,256,64)", "auto_over_soft", None),
    ("'auto' step / soft step, (256, 64, 16)", "(256,64,16)", "auto_over_soft", None),
    ("'auto' step / soft step, (1, 1024, 512)", "(1,1024,512)", "auto_over_soft", None),
    ("'auto' step / soft step, 48 separate (512, 64)", "48x(512,64) params", "auto_over_soft", None),
]
WORKSPACE_CASES = ["(16,256,64)", "(256,64,16)", "(1,1024,512)", "16x(256,64) params", "48x(512,64) params"]


def _row(label: str, values: list[float], bound: float, at_most: bool = True) -> str:
    if not values:
        return f"| {label} | {'≤' if at_most else '≥'} {bound} | not measured | | |"
    med = statistics.median(values)
    met = med <= bound if at_most else med >= bound
    runs = ", ".join(f"{v:.3g}" for v in values)
    return (
        f"| {label} | {'≤' if at_most else '≥'} {bound} | {med:.3g} ({min(values):.3g} to {max(values):.3g}) "
        f"| {runs} | {'met' if met else '**not met**'} |"
    )


def step_rows(reports: list[dict]) -> list[str]:
    lines = []
    by_threads: dict[int, list[dict]] = {}
    for rep in reports:
        by_threads.setdefault(rep["meta"]["threads"], []).append(rep)
    for threads, reps in sorted(by_threads.items()):
        clock = reps[0]["meta"].get("clock", "wall")
        tag = f"{threads} thread{'s' if threads > 1 else ''}, {clock} clock"
        for label, case, key, kind in STEP_ROWS:
            bound = STEP_TARGETS[key][kind] if kind else STEP_TARGETS[key]
            values = [r["ratios"][key] for rep in reps for r in rep["results"] if r["case"] == case]
            lines.append(_row(f"{label}, {tag}", [v for v in values if v is not None], bound))
        for case in WORKSPACE_CASES:
            values = [
                r["memory"]["soft"]["workspace_x_params"]
                for rep in reps
                for r in rep["results"]
                if r["case"] == case and "soft" in r["memory"]
            ]
            lines.append(
                _row(f"workspaces held / parameters, {case}, {tag}", values, STEP_TARGETS["workspace_x_params"])
            )
    return lines


def iteration_rows(reports: list[dict]) -> list[str]:
    lines = []
    for rep in reports:
        meta = rep["meta"]
        for result in rep["results"]:
            if "skipped" in result:
                continue
            threads = result["threads"] or meta["threads"]
            tag = f"{threads} thread{'s' if threads > 1 else ''}, {meta.get('clock', 'wall')} clock"
            for name, bound in ITERATION_TARGETS.get(result["model"], {}).items():
                for cand in (name, EVERY_VARIANT.get(name)):
                    entry = result["contenders"].get(cand) if cand else None
                    if entry is None:
                        continue
                    label = f"{result['model']}: {cand} / plain, {tag}"
                    if cand != name:
                        label += f", k = {meta['every']}"
                    if entry.get("status") != "ok":
                        lines.append(f"| {label} | ≤ {bound} | {entry.get('status')} | | |")
                        continue
                    values = entry.get("ratio_runs", [entry["ratio"]])
                    lines.append(_row(label, values, bound))
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:+.1f} MiB" if n else "0"


def models_table(reports: list[dict]) -> list[str]:
    """Each model's contenders: ms per iteration, ratio to plain (and its range over runs),
    extra memory held, the final error, or why a contender was not timed."""
    lines = [
        "| model | contender | ms / iteration | × plain (runs) | memory held beyond plain | max \\|ΦᵀΦ - I\\| after |",
        "|---|---|---|---|---|---|",
    ]
    for rep in reports:
        for result in rep["results"]:
            if "skipped" in result:
                lines.append(f"| {result['model']} | | skipped: {result['skipped']} | | | |")
                continue
            for name, e in result["contenders"].items():
                if name in EVERY_VARIANT.values():
                    name = f"{name} (k = {rep['meta']['every']})"
                if e["status"] == "over budget":
                    why = f"over budget: {e['phase']} > {e['seconds']:.3g} s"
                    lines.append(f"| {result['model']} | {name} | {why} | | | |")
                elif e["status"] != "ok":
                    lines.append(f"| {result['model']} | {name} | n/a: {e['reason'].split(';')[0]} | | | |")
                else:
                    runs = e.get("ratio_runs", [e["ratio"]])
                    spread = f" ({min(runs):.3g}–{max(runs):.3g})" if len(runs) > 1 else ""
                    mem = e.get("extra_held_bytes", e.get("extra_peak_bytes", 0))
                    ms = statistics.median(e.get("median_ms_runs", [e["median_ms"]]))
                    lines.append(
                        f"| {result['model']} | {name} | {ms:.3g} | {statistics.median(runs):.3g}{spread} "
                        f"| {_mib(mem)} | {e['max_error']:.1e} |"
                    )
    return lines


def step_table(report: dict) -> list[str]:
    """One step-benchmark run as a markdown table: ms per step and the ratios."""
    names = ["floor", "base", "soft", "soft-auto", "autograd", "hard", "geoopt-E", "geoopt-C"]
    names = [n for n in names if any(n in r["median_ms"] for r in report["results"])]
    head = ["case", *names, "(soft−base)/floor", "auto/soft", "autograd/soft", "many/stacked", "ws", "alloc/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, spec=".3g"):
        return "n/a" if x is None else format(x, spec)

    for r in report["results"]:
        ratios, mem = r["ratios"], r["memory"].get("soft", {})
        cells = [r["case"], *[fmt(r["median_ms"].get(n)) for n in names]]
        cells += [fmt(ratios.get(k), ".2f") for k in ("overhead_over_floor", "auto_over_soft", "autograd_over_soft")]
        cells += [fmt(ratios.get("many_over_stacked"), ".2f") if r["many"] else ""]
        cells += [f"{mem['workspace_x_params']:.2f}x", f"{mem['allocated_per_step_x_params']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="JSON files written by orthoopt bench and orthoopt bench --models")
    p.add_argument("--models-table", action="store_true", help="print the whole-iteration table instead")
    p.add_argument("--step-table", action="store_true", help="print the step table of each step file instead")
    args = p.parse_args(argv)
    reports = [json.loads(Path(f).read_text()) for f in args.files]
    steps = [r for r in reports if "repeats" in r["meta"]]
    iterations = [r for r in reports if "rounds" in r["meta"]]
    if args.models_table:
        lines = models_table(iterations)
    elif args.step_table:
        lines = [line for rep in steps for line in [*step_table(rep), ""]]
    else:
        lines = ["| target | bound | median (range) | runs | verdict |", "|---|---|---|---|---|"]
        lines += step_rows(steps) + iteration_rows(iterations)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
