"""Why soft misses its targets: the cap on the decoupled L1 step (diagnosis, not a method).

orthoopt's soft step is η_i = min(2γβ, ⟨R,S⟩/(2‖S‖²_F), ¼/‖S‖_∞) (penalty.safe_step_size).
With S = sign(R), the middle (projection) cap equals mean|R_jk|/2: when R is dominated by a
few entries (the k diagonal entries that the PCA gradient inflates) it removes only about
1/k of them per step, so the penalty acts like a weak penalty linear in R whatever β is,
and the exactness threshold β* stops mattering.  This script swaps the cap, *in this
process only* (monkeypatch, the library is unchanged), for
  - "none":     min(2γβ, ¼/‖S‖_∞)              (the plain decoupled sign step)
  - "max-entry": min(2γβ, max|R_jk|/2, ¼/‖S‖_∞) (never push the largest entry past 0)
and reruns soft (and frobenius, whose cap is the same function) next to the library's cap.

    python experiments/soft_cap_ablation.py [--quick] [--task pca] [--steps 20000] [--lr 0.02]
    python experiments/soft_cap_ablation.py --task procrustes:m=64 --steps 1000
    python experiments/soft_cap_ablation.py --task mlp --steps 1500
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
    p.add_argument("--task", default="pca")
    p.add_argument("--steps", type=int, default=None, help="default: 20000 for pca, else the task's")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args(argv)
    task = compare.get_task(args.task)
    tag = args.task.replace(":", "_").replace("=", "").replace(",", "_")
    out = setup(args, f"soft_cap_ablation/{tag}")
    steps = 100 if args.quick else (args.steps or (20000 if task.name == "pca" else task.steps))
    beta = {"beta": 2.0, "beta_relative": True} if task.beta_relative else {}
    sections = []
    try:
        for name, fn in VARIANTS.items():
            penalty.safe_step_size = fn
            comp = compare.run(
                task,
                methods=["soft", "frobenius"],
                seeds=args.seeds,
                steps=steps,
                lr=args.lr,
                record_every=10,
                progress=True,
                **beta,
            )
            cmd = f"python experiments/soft_cap_ablation.py --task {args.task} --steps {steps}"
            cmd += f" --lr {args.lr}" if args.lr else ""
            sections.append(save(comp, out / name, title=f"soft-step cap: {name}", command=cmd))
    finally:
        penalty.safe_step_size = LIBRARY
    write_md(out, sections)


if __name__ == "__main__":
    main()
