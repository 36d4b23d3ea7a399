"""Batched orthogonal Procrustes, m groups of 16x16, m in {1, 64, 512}: every method,
time to reach |f - f*| < 1e-4|f*| together with max|ΦᵀΦ - I| < 1e-3.

    python experiments/procrustes.py [--quick] [--steps 2000] [--seeds 3]
"""

from __future__ import annotations

from _common import compare, parser, save, setup, write_md


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(argv)
    out = setup(args, "procrustes")
    steps = 40 if args.quick else args.steps
    sections = []
    for m in (1, 64, 512):
        comp = compare.run(
            f"procrustes:m={m}",
            seeds=1 if args.quick else args.seeds,
            steps=steps,
            lr=args.lr,
            record_every=5,
            progress=True,
        )
        cmd = f"python experiments/procrustes.py --steps {steps} --seeds {args.seeds}"
        sections.append(save(comp, out / f"m{m}", title=f"Procrustes m={m}", command=cmd))
    write_md(out, sections)


if __name__ == "__main__":
    main()
