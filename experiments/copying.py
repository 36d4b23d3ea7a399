"""The copying memory problem (orthogonal RNN): none, soft, soft-auto, hard and geotorch on one data stream.

Setup of geotorch's examples/copying_problem.py (modReLU cell, batch 128, Adam with betas (0.9, 0.99),
lr 1e-3 and 2e-4 on the recurrent W, constant), W orthogonal at init (torus), the same initial
weights, batches and budget for every method.  Per method: the first iteration whose training loss
is below 1% of the memoryless baseline 10 log 8/(L + 20), ms per iteration, W's orthogonality error
(final and the worst over the run), σ_max(W) and σ_max(W)^L, the recall accuracy on a held-out set.
Then variants on seed 0: soft's fixed β, Huber δ and 'auto', to find what, if anything, holds W; and
hard with a larger lr on W (its Riemannian Adam keeps one second moment per matrix, so at the same lr
it moves W by about lr in Frobenius norm per step where Adam moves every entry by about lr).

    python experiments/copying.py [--quick] [--L 100] [--hidden 128] [--steps 4000] [--seeds 3]
        [--variants soft:beta=1,soft-huber:beta=1:delta=0.01,soft-auto,hard:wlr=128] [--variant-steps 1000]
"""

from __future__ import annotations

import json
import shlex
import sys

from _common import compare, parser, save, setup, write_md

from orthoopt.compare.plots import COLORS

fmt = compare.report.fmt


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--L", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=4000, help="iterations of the main table (0: no main table)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--beta", type=float, default=None, help="soft's β in the main table (default: the task's)")
    p.add_argument("--methods", default="none,soft,soft-auto,hard,geotorch")
    p.add_argument(
        "--variants",
        default="soft:beta=0.1,soft:beta=1,soft-huber:beta=10:delta=0.01,hard:wlr=16,hard:wlr=128",
    )
    p.add_argument("--variant-steps", type=int, default=1000)
    p.add_argument("--record-every", type=int, default=10)
    p.add_argument(
        "--time-rounds", type=int, default=0, help="also time one iteration per method, round-robin, N rounds"
    )
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "experiments/copying.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:  # a smoke run of seconds: a short sequence and a small cell, every part
        args.L, args.hidden, args.time_rounds = 10, 16, 2
    setting = f"L{args.L}_h{args.hidden}"
    out = setup(args, f"copying/{setting}")
    spec = f"copying:L={args.L},hidden={args.hidden}"
    steps = 4 if args.quick else args.steps
    seeds = [0] if args.quick else list(range(args.seeds))
    if args.methods and steps > 0:  # --steps 0: only the variants and/or the timing
        comp = compare.run(
            spec,
            methods=args.methods.split(","),
            seeds=seeds,
            steps=steps,
            beta=args.beta,
            record_every=1 if args.quick else args.record_every,
            progress=True,
        )
        text = save(
            comp, out / "methods", title=f"Copying problem, {setting}", command=args.command, extra=_notes(comp, args.L)
        )
        (out / "methods" / "section.md").write_text(text)
    if args.variants:
        (out / "soft_variants").mkdir(parents=True, exist_ok=True)
        (out / "soft_variants" / "section.md").write_text(
            _variants(args, spec, out, 3 if args.quick else args.variant_steps)
        )
    if args.time_rounds:
        (out / "timing").mkdir(parents=True, exist_ok=True)
        (out / "timing" / "section.md").write_text(_timing(args, spec, args.time_rounds))
    # The README gathers the parts that exist, so that they can be run one at a time.
    parts = [out / part / "section.md" for part in ("methods", "soft_variants", "timing")]
    write_md(out, [part.read_text() for part in parts if part.exists()])


def _timing(args, spec: str, rounds: int) -> str:
    """ms per iteration (forward, backward, step) of each method, interleaved round-robin: medians over rounds."""
    import statistics
    import time
    from contextlib import ExitStack

    from orthoopt.compare.methods import Settings, build_optimizers, prepared

    task = compare.get_task(spec)
    names = args.methods.split(",") if args.methods else ["none", "soft", "soft-auto", "hard", "geotorch"]
    settings = Settings(
        base=task.base, lr=task.lr, beta=task.beta, smoothing=task.smoothing, betas=task.betas,
        constrained_lr_scale=task.constrained_lr_scale,
    )  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in names}
    with ExitStack() as stack:
        runs = {}
        for m in names:
            problem = task.build(seed=0, **task.params)  # one model per method, the same weights
            stack.enter_context(prepared(m, problem.model, problem))
            runs[m] = (problem, build_optimizers(m, problem.model, problem, settings))
        for t in range(rounds + 2):  # two rounds of warm-up
            for m, (problem, optimizers) in runs.items():
                start = time.perf_counter()
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                problem.loss(t).backward()
                for o in optimizers:
                    o.step()
                if t >= 2:
                    times[m].append(1e3 * (time.perf_counter() - start))
    lines = [
        f"## ms per iteration, {args.L} blanks, hidden {args.hidden} (round-robin, {rounds} rounds)",
        "",
        f"`{args.command}`",
        "",
        "| method | median ms | min ms | max ms | median / none's |",
        "|---|---|---|---|---|",
    ]
    base = statistics.median(times[names[0]])
    for m in names:
        med = statistics.median(times[m])
        lines.append(f"| {m} | {med:.1f} | {min(times[m]):.1f} | {max(times[m]):.1f} | {med / base:.2f} |")
    lines += ["", "One iteration: batch draw, forward, backward and the optimizer step; one torch thread."]
    return "\n".join(lines) + "\n"


def _notes(comp, L: int) -> str:
    lines = [
        "Per run (first iteration below 1% of the baseline; W's error max|WᵀW - I| final and worst over the run):",
        "",
    ]
    for r in comp.runs:
        if not r.ok:
            lines.append(f"- {r.method} seed {r.seed}: " + (r.error or f"diverged at step {r.diverged_at}"))
            continue
        f = r.final
        worst = _worst(r)
        lines.append(
            f"- {r.method} seed {r.seed}: below 1% "
            + (
                f"at iteration {r.step_to_target} ({fmt(r.time_to_target)} s)"
                if r.step_to_target is not None
                else "never"
            )
            + f", {f['iter_ms']:.0f} ms/iteration, orth final {fmt(f['orth_max'])} (worst {fmt(worst)}), "
            f"σ(W) in [{f['sigma_min']:.6f}, {f['sigma_max']:.6f}], σ_max^L = {f['sigma_max'] ** L:.4g}, "
            f"recall {100 * f['test_acc']:.2f}%, test loss {fmt(f['test_loss'])}"
        )
    return "\n".join(lines)


def _worst(r) -> float:
    """The largest orthogonality error over the run: before every recorded step and at the end."""
    return max([v for v in r.history["orth_max"] if v == v] + [r.final["orth_max"]])


KEYS = {"beta": ("beta", "β"), "delta": ("smoothing", "δ"), "wlr": ("constrained_lr_scale", "W lr ×")}


def _variant(text: str) -> tuple[str, str, dict]:
    """``soft:beta=10``, ``soft-huber:beta=1:delta=0.01``, ``hard:wlr=128`` (W's lr × 128): (label, method, kwargs)."""
    method, *rest = text.split(":")
    kwargs, label = {}, method
    for item in rest:
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--variants: unknown key {key!r} in {text!r}; use {', '.join(KEYS)}")
        name, symbol = KEYS[key]
        kwargs[name] = float(value) * (0.2 if key == "wlr" else 1.0)  # the task trains W at 0.2 × lr
        label += f" {symbol}{'' if key == 'wlr' else '='}{float(value):g}"
    return label, method, kwargs


def _variants(args, spec: str, out, steps: int) -> str:
    rows, comps = [], {}
    for text in args.variants.split(","):
        label, method, kwargs = _variant(text)
        comp = compare.run(
            spec,
            methods=[method],
            seeds=[0],
            steps=steps,
            record_every=1 if args.quick else args.record_every,
            **kwargs,
        )
        comps[label] = comp
        (r,) = comp.runs
        f = r.final
        rows.append(
            {
                "variant": label,
                "beta": comp.config["beta"] if method != "soft-auto" else "auto",
                "smoothing": comp.config["smoothing"] if method == "soft-huber" else None,
                "w_lr": comp.config["lr"] * comp.config["constrained_lr_scale"],
                "status": "ok" if r.ok else (r.error or f"diverged at {r.diverged_at}"),
                "first_below_1pct": r.step_to_target,
                "final_loss": f.get("loss"),
                "orth_final": f.get("orth_max"),
                "orth_worst": _worst(r) if r.ok else None,
                "sigma_max": f.get("sigma_max"),
                "sigma_max_L": f["sigma_max"] ** args.L if "sigma_max" in f else None,
                "recall": f.get("test_acc"),
                "iter_ms": f.get("iter_ms"),
                "history": {k: r.history[k] for k in ("step", "loss", "orth_max")},
            }
        )
    vout = out / "soft_variants"
    vout.mkdir(parents=True, exist_ok=True)
    (vout / "variants.json").write_text(json.dumps(rows, default=str))
    _plot_variants(rows, vout)
    lines = [
        f"## Soft's variants on seed 0 ({steps} iterations)",
        "",
        f"`{args.command}`",
        "",
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
    return "\n".join(lines) + "\n\n![soft variants](soft_variants/variants.png)\n"


def _plot_variants(rows, out) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    seen: dict[str, int] = {}
    for r in rows:
        h, method = r["history"], r["variant"].split()[0]
        seen[method] = seen.get(method, -1) + 1  # one colour per method, one line style per setting
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
    fig.savefig(out / "variants.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
