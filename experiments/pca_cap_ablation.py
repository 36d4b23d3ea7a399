"""Why soft misses on PCA: the cap on the decoupled L1 step (diagnosis, not a method).

orthoopt's soft step is η_i = min(2γβ, ⟨R,S⟩/(2‖S‖²_F), ¼/‖S‖_∞) (penalty.safe_step_size).
With S = sign(R), the middle (projection) cap equals mean|R_jk|/2: when R is dominated by a
few entries (the k diagonal entries that the PCA gradient inflates) it removes only about
1/k of them per step, so the penalty acts like a weak penalty linear in R whatever β is,
and the exactness threshold β* stops mattering.  This script swaps the cap, *in this
process only* (monkeypatch, the library is unchanged), for
  - "none":     min(2γβ, ¼/‖S‖_∞)              (the plain decoupled sign step)
  - "max-entry": min(2γβ, max|R_jk|/2, ¼/‖S‖_∞) (never push the largest entry past 0)
and reruns soft at β = 2β* next to the library's cap.

    python experiments/pca_cap_ablation.py [--quick] [--steps 20000] [--lr 0.02]
"""

from __future__ import annotations

import torch
from _common import compare, parser, save, setup, write_md

from orthoopt import penalty

LIBRARY = penalty.safe_step_size


def no_projection(r, s, eta):
    rowsum = s.abs().sum(-1).amax(-1)
    spectral = penalty.MAX_MULTIPLIER_STEP / rowsum.clamp_min(torch.finfo(r.dtype).tiny)
    return torch.minimum(spectral, torch.as_tensor(eta, dtype=r.dtype)).clamp_(min=0)


def max_entry(r, s, eta):
    return torch.minimum(no_projection(r, s, eta), r.abs().amax((-2, -1)) / 2)


VARIANTS = {"library": LIBRARY, "none": no_projection, "max-entry": max_entry}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args(argv)
    out = setup(args, "pca_cap_ablation")
    steps = 100 if args.quick else args.steps
    sections = []
    try:
        for name, fn in VARIANTS.items():
            penalty.safe_step_size = fn
            comp = compare.run(
                "pca:k=8",
                methods=["soft", "frobenius"],
                seeds=args.seeds,
                steps=steps,
                beta=2.0,
                beta_relative=True,
                lr=args.lr,
                record_every=10,
                progress=True,
            )
            cmd = f"python experiments/pca_cap_ablation.py --steps {steps}" + (f" --lr {args.lr}" if args.lr else "")
            sections.append(save(comp, out / name, title=f"soft-step cap: {name}", command=cmd))
    finally:
        penalty.safe_step_size = LIBRARY
    write_md(out, sections)


if __name__ == "__main__":
    main()
