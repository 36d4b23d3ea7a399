"""Certified-robust 1-Lipschitz networks on the digits: every orthogonality method, from the same start.

The harness's ``lipschitz`` task (orthoopt/compare/lipschitz.py): a MaxMin MLP whose every layer is
orthogonal, trained with a multi-class hinge; per run, clean test accuracy, L = Π σ_max(W_i) from
an SVD of every layer at the end, the certified accuracy (margin > √2·L·r) and the accuracy under
a targeted PGD-ℓ2 attack at three radii r, and each layer's orthogonality error.  One comparison per
depth (and lr schedule), 3 seeds; then every method's cost per iteration, timed side by side
(round-robin, one iteration of each method in turn, the thread's CPU time and the wall time).

    python experiments/lipschitz.py [--quick] [--depths 4,6,8] [--width 128] [--steps 1000] [--seeds 3]
        [--schedules cosine,constant] [--betas 1,3,10,100] [--methods ...] [--time-rounds 40] [--reuse]

``--reuse`` reads the comparisons and the timing already in the output folder instead of running
them again (so that schedules or depths can be run in separate processes, then assembled).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orthoopt import compare  # noqa: E402
from orthoopt.compare import lipschitz  # noqa: E402
from orthoopt.compare.plots import COLORS, figure  # noqa: E402
from orthoopt.compare.report import fmt, load  # noqa: E402
from orthoopt.compare.timing import interleaved_times  # noqa: E402

METHODS = lipschitz.TASK_SETTINGS["methods"]
LR_METHODS = ["soft", "soft-auto", "soft-tol", "hard", "bjorck"]  # at the lower constant lrs
COLOR = {
    **COLORS,
    "soft-tol": "#ff9896",
    "hard-canonical": "#393b79",
    "bjorck": "#e377c2",
    "torch-orthogonal": "#bcbd22",
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a run of seconds: depth 4, width 32, 20 steps, one seed")
    p.add_argument("--out", default=str(HERE / "results" / "lipschitz"), help="results folder")
    p.add_argument("--depths", default="4,6,8")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--schedules", default="cosine", help="lr schedules, comma list of cosine, constant")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--time-rounds", type=int, default=40, help="round-robin timing rounds per depth (0: none)")
    p.add_argument("--betas", default="1,3,10,100", help="soft's β at a constant lr, at the middle depth ('': none)")
    p.add_argument(
        "--lrs", default="0.001,0.003", help=f"constant lrs for {', '.join(LR_METHODS)} at the middle depth ('': none)"
    )
    p.add_argument(
        "--projected", default="soft,soft-auto", help="methods also certified after one projection at the end"
    )
    p.add_argument("--reuse", action="store_true", help="read the comparisons already written instead of running")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    command = shlex.join(["python", "experiments/lipschitz.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    if args.quick:
        args.depths, args.width, args.steps, args.seeds, args.time_rounds = "4", 32, 20, 1, 2
        args.betas, args.lrs = "3,30", "0.003"
        args.out += "-quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    depths = [int(d) for d in args.depths.split(",")]
    schedules = args.schedules.split(",")
    methods = args.methods.split(",")

    def comparison(folder: str, depth: int, extra: str = "", plots: bool = False, **kwargs) -> compare.Comparison:
        """The comparison in ``out/folder``: with ``--reuse``, what is there, its missing methods run
        and added (each method's runs depend on its seed only); else run and written."""
        spec = f"lipschitz:depth={depth},width={args.width}{extra}" + (",pgd_steps=10" if args.quick else "")
        wanted = kwargs.pop("methods")
        old = _load(out / folder) if args.reuse and (out / folder / "results.json").exists() else None
        missing = [m for m in wanted if old is None or not old.by_method(m)]
        if not missing:
            return old
        comp = compare.run(spec, methods=missing, seeds=args.seeds, steps=args.steps, record_every=10, **kwargs)
        if old is not None:
            comp = _merged(old, comp, wanted)
        compare.write(comp, out / folder, history_points=200, plots=plots)
        return comp

    comps = {
        (d, sched): comparison(_name(d, sched), d, methods=methods, schedule=sched, plots=True)
        for sched in schedules
        for d in depths
    }
    projections = {
        (d, sched): comparison(
            f"{_name(d, sched)}_projected", d, ",project=1", methods=args.projected.split(","), schedule=sched
        )
        for sched in schedules
        for d in (depths if args.projected else [])
    }
    middle = depths[len(depths) // 2]
    betas = {
        float(b): comparison(
            f"{_name(middle, 'constant')}_beta{b}", middle, methods=["soft"], beta=float(b), schedule="constant"
        )
        for b in filter(None, args.betas.split(","))
    }
    lrs = {
        float(lr): comparison(
            f"{_name(middle, 'constant')}_lr{lr}", middle, methods=LR_METHODS, lr=float(lr), schedule="constant"
        )
        for lr in filter(None, args.lrs.split(","))
    }
    timing = {}
    saved = out / "timing.json"
    if args.reuse and saved.exists():
        timing = {int(d): t for d, t in json.loads(saved.read_text()).items()}
    if args.time_rounds and (set(timing) != set(depths) or any(set(t) != set(methods) for t in timing.values())):
        timing = {d: _timing(d, args.width, methods, args.time_rounds) for d in depths}
        saved.write_text(json.dumps(timing))
    plots = _plots(comps, out)
    text = _readme(comps, timing, command, plots, betas, middle, projections, args.reuse, lrs)
    (out / "README.md").write_text(text)
    print(text)
    print(f"wrote {out}")


def _load(folder: Path) -> compare.Comparison:
    """A comparison written by ``compare.write``, its final figures from ``runs.csv`` (full
    precision: ``results.json`` keeps 5 digits, which reads L = 1 + 1e-6 as 1)."""
    comp = load(folder / "results.json")
    with (folder / "runs.csv").open() as f:
        rows = {(row["method"], int(row["seed"])): row for row in csv.DictReader(f)}
    for run in comp.runs:
        row = rows[run.method, run.seed]
        run.final = {k: float(row[k]) if row.get(k) not in (None, "") else v for k, v in run.final.items()}
    return comp


def _merged(old: compare.Comparison, new: compare.Comparison, methods: list[str]) -> compare.Comparison:
    """``old`` with ``new``'s methods added: the same task, settings, seeds and steps, or an error."""
    same = ("task_params", "seeds", "steps", "schedule", "base", "lr", "beta", "ortho_tol", "dtype")
    differ = [k for k in same if k in old.config and old.config[k] != new.config.get(k)]
    if differ:
        raise ValueError(f"--reuse: the comparison in the folder differs in {differ}; run it again without --reuse")
    order = {m: i for i, m in enumerate(methods)}
    runs = sorted(old.runs + new.runs, key=lambda r: (r.seed, order.get(r.method, len(order))))
    config = {**old.config, "methods": [m for m in methods if any(r.method == m for r in runs)]}
    return compare.Comparison(old.task, config, runs, compare.summarize(runs, config["methods"]))


def _name(depth: int, schedule: str) -> str:
    return f"depth{depth}" + ("" if schedule == "cosine" else f"_{schedule}")


# -- tables ---------------------------------------------------------------------------------------
def _finals(comp, method: str, key: str) -> list[float]:
    return [r.final[key] for r in comp.by_method(method) if r.ok and r.final.get(key) is not None]


def _pm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "-"
    if not any(values):
        return "0"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(statistics.stdev(values) * scale, 2)}"


def _radii(comp) -> list[float]:
    params = {**_defaults(), **comp.config["task_params"]}
    return [params["r1"], params["r2"], params["r3"]]


def _defaults() -> dict:
    import inspect

    return {n: q.default for n, q in inspect.signature(lipschitz.problem_fields).parameters.items()}


def _table(comp, timing: dict | None) -> str:
    c = comp.config
    radii = _radii(comp)
    head = ["method", "clean %", "L - 1"]
    head += [f"cert {r:g} %" for r in radii] + [f"PGD {r:g} %" for r in radii]
    head += ["cert. broken", "max orth error"]
    if timing:
        head += ["ms/iter (CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in c["methods"]:
        runs = comp.by_method(method)
        bad = [r for r in runs if not r.ok]
        cells = [method + (f" ({len(bad)} failed: {bad[0].error or 'diverged'})" if bad else "")]
        cells.append(_pm(_finals(comp, method, "test_acc"), 100, 4))
        cells.append(_pm([v - 1 for v in _finals(comp, method, "lipschitz")]))
        cells += [_pm(_finals(comp, method, f"cert_{k}"), 100, 4) for k in (1, 2, 3)]
        cells += [_pm(_finals(comp, method, f"pgd_{k}"), 100, 4) for k in (1, 2, 3)]
        cells.append(str(round(sum(_finals(comp, method, "cert_broken")))))
        cells.append(fmt(max(_finals(comp, method, "orth_max"), default=None)))
        if timing:
            cells.append(fmt(timing[method]["cpu"]) if method in timing else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _layers_table(comp) -> str:
    layers = sorted(
        {int(k.rpartition("_")[2]) for r in comp.runs for k in r.final if k.startswith("orth_layer_")}, key=int
    )
    head = ["method"] + [f"layer {i}" for i in layers] + ["L - 1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in comp.config["methods"]:
        cells = [method] + [fmt(max(_finals(comp, method, f"orth_layer_{i}"), default=None)) for i in layers]
        cells.append(fmt(max((v - 1 for v in _finals(comp, method, "lipschitz")), default=None)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _timing_table(timing: dict[int, dict], methods: list[str]) -> str:
    depths = sorted(timing)
    head = ["method"] + [f"depth {d}: CPU ms (IQR)" for d in depths] + [f"depth {d}: / soft" for d in depths]
    head += [f"depth {d}: wall ms" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        cells += [
            f"{fmt(timing[d][m]['cpu'])} ({fmt(timing[d][m]['cpu_q1'])}–{fmt(timing[d][m]['cpu_q3'])})" for d in depths
        ]
        cells += [fmt(timing[d][m]["cpu"] / timing[d]["soft"]["cpu"]) if "soft" in timing[d] else "-" for d in depths]
        cells += [fmt(timing[d][m]["wall"]) for d in depths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _beta_table(betas: dict[float, compare.Comparison]) -> str:
    radii = _radii(next(iter(betas.values())))
    head = ["soft β", "clean %", "L - 1", "max orth error"]
    head += [f"cert {r:g} %" for r in radii] + [f"PGD {r:g} %" for r in radii]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for beta, comp in sorted(betas.items()):
        cells = [fmt(beta), _pm(_finals(comp, "soft", "test_acc"), 100, 4)]
        cells.append(_pm([v - 1 for v in _finals(comp, "soft", "lipschitz")]))
        cells.append(fmt(max(_finals(comp, "soft", "orth_max"), default=None)))
        cells += [_pm(_finals(comp, "soft", f"cert_{k}"), 100, 4) for k in (1, 2, 3)]
        cells += [_pm(_finals(comp, "soft", f"pgd_{k}"), 100, 4) for k in (1, 2, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _projection_table(projections: dict[tuple[int, str], compare.Comparison]) -> str:
    radii = _radii(next(iter(projections.values())))
    head = ["lr", "depth", "method", "L - 1", "clean %"]
    head += [f"cert {r:g} %" for r in radii] + [f"PGD {r:g} %" for r in radii] + ["cert. broken"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (depth, schedule), comp in sorted(projections.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for method in comp.config["methods"]:
            for label, prefix in (("", ""), (" projected", "proj_")):
                cells = [schedule, str(depth), method + label]
                cells.append(_pm([v - 1 for v in _finals(comp, method, prefix + "lipschitz")]))
                cells.append(_pm(_finals(comp, method, prefix + "test_acc"), 100, 4))
                cells += [_pm(_finals(comp, method, f"{prefix}cert_{k}"), 100, 4) for k in (1, 2, 3)]
                cells += [_pm(_finals(comp, method, f"{prefix}pgd_{k}"), 100, 4) for k in (1, 2, 3)]
                cells.append(str(round(sum(_finals(comp, method, prefix + "cert_broken")))))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lr_table(lrs: dict[float, compare.Comparison], comps, middle: int) -> str:
    """The methods at each constant lr (the main comparison's lr among them)."""
    at = dict(lrs)
    if (middle, "constant") in comps:
        at[comps[middle, "constant"].config["lr"]] = comps[middle, "constant"]
    radii = _radii(next(iter(at.values())))
    head = ["lr", "method", "clean %", "L - 1", "max orth error"]
    head += [f"cert {r:g} %" for r in radii] + [f"PGD {r:g} %" for r in radii]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lr, comp in sorted(at.items()):
        for method in LR_METHODS:
            if not comp.by_method(method):
                continue
            cells = [f"{lr:g}", method, _pm(_finals(comp, method, "test_acc"), 100, 4)]
            cells.append(_pm([v - 1 for v in _finals(comp, method, "lipschitz")]))
            cells.append(fmt(max(_finals(comp, method, "orth_max"), default=None)))
            cells += [_pm(_finals(comp, method, f"cert_{k}"), 100, 4) for k in (1, 2, 3)]
            cells += [_pm(_finals(comp, method, f"pgd_{k}"), 100, 4) for k in (1, 2, 3)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _readme(
    comps, timing, command: str, plots: list[Path], betas=None, middle=None, projections=None, reused=False, lrs=None
) -> str:
    first = next(iter(comps.values()))
    c = first.config
    params = {**_defaults(), **c["task_params"]}
    parts = [
        "# Certified-robust 1-Lipschitz networks on the digits",
        "",
        f"`{command}`"
        + (" (the comparisons and timing of earlier runs of this script, in this folder)" if reused else ""),
        "",
        f"MaxMin MLP of width {params['width']}, every layer orthogonal; base {c['base']} lr {fmt(c['lr'])}, "
        f"{c['steps']} steps of batch {params['batch']}, multi-class hinge with margin √2·{params['train_radius']:g}; "
        f"soft β = {fmt(c['beta'])}; {len(c['seeds'])} seed(s), mean ± std over seeds; {c['device']} {c['dtype']}, "
        f"{c['threads']} thread(s).  *L − 1*: L = Π σ_max(W_i) from an SVD of each layer at the end; *cert r %*: "
        "test digits whose margin exceeds √2·L·r; *PGD r %*: test digits that a targeted PGD-ℓ2 attack "
        f"({params['pgd_steps']} steps, the {params['pgd_targets']} most likely wrong classes) does not "
        "break within r (every break confirmed in float64); *cert. broken*: certified digits that the attack "
        "broke, over all seeds and radii (0 unless a certificate is wrong); *max orth error*: the largest "
        "max|WᵀW − I| (WWᵀ for a wide W) over the layers and seeds; *ms/iter (CPU)*: from the side-by-side timing below; "
        f"a run's {c['steps']} steps take that many times as long (the wall times of the runs themselves, "
        "`total_s` in runs.csv, were taken under whatever else the machine ran, and compare nothing).",
    ]
    for (depth, schedule), comp in comps.items():
        parts += ["", f"## Depth {depth}, {schedule} lr", "", _table(comp, timing.get(depth)), ""]
        parts += [f"Orthogonality error per layer (the worst seed) and L − 1, depth {depth}, {schedule} lr:", ""]
        parts += [_layers_table(comp)]
    if projections:
        parts += [
            "",
            "## Projected once at the end",
            "",
            "The same runs, then every weight replaced by its polar factor (`orthoopt.project_`) before the "
            "certificate and the attack: L = 1 to rounding.",
            "",
            _projection_table(projections),
        ]
    if lrs:
        parts += [
            "",
            f"## Soft, hard and Björck at three constant lrs, depth {middle}",
            "",
            _lr_table(lrs, comps, middle),
        ]
    if betas:
        parts += ["", f"## Soft's β at a constant lr, depth {middle}", "", _beta_table(betas)]
    if timing:
        methods = list(next(iter(timing.values())))
        parts += [
            "",
            "## Cost per iteration, side by side",
            "",
            "One iteration (batch, forward, backward, optimizer step) of each method in turn, round-robin, "
            f"{_rounds(timing)} rounds after 3 of warm-up; the median of the thread's CPU time with its interquartile "
            "range, its ratio to soft's, and the median wall time.",
            "",
            _timing_table(timing, methods),
        ]
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def _rounds(timing) -> int:
    return len(next(iter(next(iter(timing.values())).values()))["samples"])


# -- timing ---------------------------------------------------------------------------------------
def _timing(depth: int, width: int, methods: list[str], rounds: int) -> dict[str, dict]:
    """ms per iteration of each method, interleaved round-robin (one model and optimizer each, same start)."""
    clocks = {"cpu": time.thread_time, "wall": time.perf_counter}
    times = interleaved_times(f"lipschitz:depth={depth},width={width}", methods, rounds, clocks, warmup=3)
    cpu, wall = times["cpu"], times["wall"]
    out = {}
    for m in methods:
        q1, med, q3 = np.percentile(cpu[m], [25, 50, 75])
        out[m] = {"cpu": med, "cpu_q1": q1, "cpu_q3": q3, "wall": statistics.median(wall[m]), "samples": cpu[m]}
    return out


# -- plots ----------------------------------------------------------------------------------------
def _curve(comp, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    runs = [r for r in comp.by_method(method) if r.ok]
    if not runs:
        return None
    keys = sorted((k for k in runs[0].final if k.startswith("cert_at_")), key=lambda k: float(k[8:]))
    x = np.array([float(k[8:]) for k in keys])
    ys = np.array([[r.final[k] for k in keys] for r in runs]) * 100
    return x, ys.mean(0), ys.min(0), ys.max(0)


def _plots(comps, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for (depth, schedule), comp in comps.items():
        fig, ax = figure(7.0, 4.4)
        radii = _radii(comp)
        for method in comp.config["methods"]:
            curve = _curve(comp, method)
            if curve is None:
                continue
            x, mean, lo, hi = curve
            color = COLOR.get(method)
            ax.plot(x, mean, color=color, lw=1.4, label=method)
            ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
            pgd = [statistics.fmean(_finals(comp, method, f"pgd_{k}")) * 100 for k in (1, 2, 3)]
            ax.plot(radii, pgd, ls="none", marker="o", mfc="none", color=color, ms=5)
        ax.set_xlabel("ℓ2 radius r (standardized pixels)")
        ax.set_ylabel("certified accuracy % (line), PGD accuracy % (circles)")
        ax.set_title(f"depth {depth}, {schedule} lr: certified accuracy, mean over seeds (band: min-max)", fontsize=9)
        ax.set_xlim(0, 3)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"certified_{_name(depth, schedule)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    depths = sorted({d for d, _ in comps})
    if len(depths) > 1:
        for schedule in sorted({s for _, s in comps}):
            fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
            for method in next(iter(comps.values())).config["methods"]:
                color = COLOR.get(method)
                got = [(d, comps[d, schedule]) for d in depths if (d, schedule) in comps]
                r2 = [statistics.fmean(_finals(c, method, "cert_2") or [math.nan]) * 100 for _, c in got]
                lip = [statistics.fmean([v - 1 for v in _finals(c, method, "lipschitz")] or [math.nan]) for _, c in got]
                axes[0].plot([d for d, _ in got], r2, marker="o", color=color, label=method)
                axes[1].plot([d for d, _ in got], np.maximum(lip, 1e-9), marker="o", color=color, label=method)
            radius = _radii(next(iter(comps.values())))[1]
            axes[0].set(xlabel="depth (layers)", ylabel=f"certified accuracy % at r = {radius:g}")
            axes[1].set(xlabel="depth (layers)", ylabel="L − 1 (floor 1e-9)", yscale="log")
            for ax in axes:
                ax.grid(True, which="both", alpha=0.3)
                ax.set_xticks(depths)
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{schedule} lr: certified accuracy and L against depth (mean over seeds)", fontsize=10)
            fig.tight_layout()
            path = out / ("depth.png" if schedule == "cosine" else f"depth_{schedule}.png")
            fig.savefig(path)
            plt.close(fig)
            paths.append(path)
    return paths


if __name__ == "__main__":
    main()
