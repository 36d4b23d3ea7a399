"""Digit classifiers with orthogonal hidden weights: an MLP (64-128-128-10) and a small CNN
(conv filters through orthoopt.param_groups(model, exclude=["out"]), auto layout), every method,
several seeds: test accuracy (mean ± std), final orthogonality error, time per step.

    python experiments/classifiers.py [--quick] [--steps 1500] [--seeds 3]
"""

from __future__ import annotations

from _common import compare, parser, save, setup, write_md


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--beta", type=float, default=None)
    args = p.parse_args(argv)
    out = setup(args, "classifiers")
    steps = 20 if args.quick else args.steps
    sections = []
    for arch in ("mlp", "cnn"):
        comp = compare.run(
            arch, seeds=1 if args.quick else args.seeds, steps=steps, beta=args.beta, record_every=5, progress=True
        )
        cmd = f"python experiments/classifiers.py --steps {steps} --seeds {args.seeds}"
        sections.append(save(comp, out / arch, title=f"digits {arch.upper()}", command=cmd))
    write_md(out, sections)


if __name__ == "__main__":
    main()
