"""Mixture of probabilistic PCA on the digits (a group prior on the (l, m, n) tensor): Adam methods against closed-form EM.

m = 10 components of n latent dimensions on the l = 64 pixels, Φ (64, 10, n) orthonormal per
component (layout group_axis:1), trained by maximum likelihood with Adam (full batch, lr 1e-2,
cosine): none (unconstrained loadings), soft (L1), soft-huber, soft-auto, hard; against the EM of
Tipping and Bishop (1999) from the same initial point, unsupervised (responsibilities from the
model, the mixture's log p(x)) and supervised (component = class, log p(x, y)).  Held-out
log-likelihood per digit (float64), orthogonality error, time to within 0.1% of EM's training
log-likelihood.

    python experiments/mppca.py [--quick] [--n 4] [--steps 1500] [--seeds 3]
"""

from __future__ import annotations

from _common import compare, parser, save, setup, write_md

from orthoopt.compare.mppca import against_em

VARIANTS = {0: "unsupervised", 1: "supervised"}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hard-scale", type=float, default=1.0, help="one more hard row with Φ's lr times this")
    args = p.parse_args(argv)
    out = setup(args, f"mppca/n{args.n}")
    steps = 20 if args.quick else args.steps
    seeds = [0] if args.quick else list(range(args.seeds))
    settings = {"seeds": seeds, "steps": steps, "beta": args.beta, "lr": args.lr, "progress": True}
    settings["record_every"] = 1 if args.quick else 5
    sections = []
    for sup, name in VARIANTS.items():
        spec = f"mppca:n={args.n},supervised={sup}" + (",em_max_iter=10" if args.quick else "")
        comp = compare.run(spec, **settings)
        cmd = f"python experiments/mppca.py --n {args.n} --steps {steps} --seeds {len(seeds)}"
        cmd += f" --hard-scale {args.hard_scale:g}" if args.hard_scale != 1 else ""
        sections.append(save(comp, out / name, title=f"Mixture of PPCA, n={args.n}, {name}", command=cmd))
        rows = [(m, comp.by_method(m)) for m in comp.config["methods"]]
        if args.hard_scale != 1:
            # With ortho_second_moment='sum' (geoopt's rule) Riemannian Adam moves Φ_i by about lr
            # in Frobenius norm per step, Adam by about lr per entry (√(l·n) = 16 times more for
            # n = 4); the default 'mean' is that rule at 16 times the lr, so no second row.
            hard = compare.run(spec, methods=["hard"], constrained_lr_scale=args.hard_scale, **settings)
            rows.append((f"hard, Φ lr × {args.hard_scale:g}", hard.runs))
        sections.append(against_em(comp, rows, name))
    write_md(out, sections)


if __name__ == "__main__":
    main()
