"""Class-wise PCA on the digits, every method, k in {4, 8, 16} (Φ of shape (64, 10, k)).

python experiments/pca.py [--quick] [--steps 4000] [--seeds 3]
"""

from __future__ import annotations

from _common import compare, parser, save, setup, write_md


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(argv)
    out = setup(args, "pca")
    steps = 40 if args.quick else args.steps
    sections = []
    for k in (4, 8, 16):
        comp = compare.run(
            f"pca:k={k}",
            seeds=1 if args.quick else args.seeds,
            steps=steps,
            lr=args.lr,
            record_every=5,
            progress=True,
        )
        cmd = f"python experiments/pca.py --steps {steps} --seeds {args.seeds}"
        sections.append(save(comp, out / f"k{k}", title=f"PCA k={k}", command=cmd))
    write_md(out, sections)


if __name__ == "__main__":
    main()
