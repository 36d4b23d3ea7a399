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

from orthoopt.compare import copying
from orthoopt.compare.plots import plot_variants
from orthoopt.compare.timing import time_iterations, timing_table


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
    task = compare.get_task(spec)
    try:
        variants = [copying.parse_variant(text, task) for text in args.variants.split(",") if text]
    except ValueError as e:
        p.error(f"--variants: {e}")
    steps = 4 if args.quick else args.steps
    seeds = [0] if args.quick else list(range(args.seeds))
    record_every = 1 if args.quick else args.record_every
    if args.methods and steps > 0:  # --steps 0: only the variants and/or the timing
        comp = compare.run(
            spec, methods=args.methods.split(","), seeds=seeds, steps=steps, beta=args.beta,
            record_every=record_every, progress=True,
        )  # fmt: skip
        title = f"Copying problem, {setting}"
        text = save(comp, out / "methods", title=title, command=args.command, extra=copying.run_notes(comp))
        (out / "methods" / "section.md").write_text(text)
    if variants:
        variant_steps = 3 if args.quick else args.variant_steps
        rows = []
        for label, method, settings in variants:
            comp = compare.run(
                spec, methods=[method], seeds=[0], steps=variant_steps, record_every=record_every, **settings
            )
            rows.append(copying.variant_row(label, method, comp))
        vout = out / "soft_variants"
        vout.mkdir(parents=True, exist_ok=True)
        (vout / "variants.json").write_text(json.dumps(rows, default=str))
        plot_variants(rows, vout / "variants.png")
        head = [f"## Soft's variants on seed 0 ({variant_steps} iterations)", "", f"`{args.command}`", ""]
        picture = ["", "![soft variants](soft_variants/variants.png)"]
        (vout / "section.md").write_text("\n".join(head + copying.variants_table(rows) + picture) + "\n")
    if args.time_rounds:
        names = args.methods.split(",") if args.methods else ["none", "soft", "soft-auto", "hard", "geotorch"]
        times = time_iterations(spec, names, args.time_rounds)
        title = f"## ms per iteration, {args.L} blanks, hidden {args.hidden} (round-robin, {args.time_rounds} rounds)"
        note = ["", "One iteration: batch draw, forward, backward and the optimizer step; one torch thread."]
        (out / "timing").mkdir(parents=True, exist_ok=True)
        lines = [title, "", f"`{args.command}`", "", *timing_table(times), *note]
        (out / "timing" / "section.md").write_text("\n".join(lines) + "\n")
    # The README gathers the parts that exist, so that they can be run one at a time.
    parts = [out / part / "section.md" for part in ("methods", "soft_variants", "timing")]
    write_md(out, [part.read_text() for part in parts if part.exists()])


if __name__ == "__main__":
    main()
