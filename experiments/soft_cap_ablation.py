"""What the caps of the soft step cost and buy: an ablation of penalty.safe_step_size.

orthoopt's soft step is η_i = min(2γβ, max|R_i|/(2 max|S_i|), ¼/‖S_i‖₂) with
S = clamp(R / max(δ, 2γβ)) (the library's penalty.safe_step_size and penalty_step).  This
script swaps the cap, *in this process only* (a monkeypatch; the library is unchanged), for
  - "projection":    min(2γβ, ⟨R,S⟩/(2‖S‖²_F), ¼/‖S‖_∞)  (a projection rule; with the plain
                     sign direction it made the penalty lose exactness)
  - "spectral-only": min(2γβ, ¼/‖S‖₂)                      (no no-overshoot term)
  - "uncapped":      2γβ
and reruns soft and frobenius (whose cap is the same function) next to the library's cap.
At the tasks' own lr·β the four agree (the caps do not bind there); what the caps buy is
stability at large lr·β (tests/test_optim.py), and what they cost is the step time below.

    python experiments/soft_cap_ablation.py [--quick] [--task pca] [--steps 20000] [--lr 0.02]
    python experiments/soft_cap_ablation.py --task procrustes:m=64 --steps 1000
    python experiments/soft_cap_ablation.py --task mlp --steps 1500
"""

from __future__ import annotations

import functools

import torch
from _common import compare, parser, save, setup, write_md

from orthoopt import penalty

LIBRARY = penalty.safe_step_size
# The optimizer's step takes the library's cap in closed form; a variant steps through the
# general form of the step with that variant's step size instead.
STEP = penalty.penalty_step


def _tiny(r):
    return torch.finfo(r.dtype).tiny


def projection(r, s, eta, scratch=None, **_):
    along = (r * s).sum((-2, -1)) / (2 * (s * s).sum((-2, -1))).clamp_min(_tiny(r))
    rowsum = penalty.MAX_MULTIPLIER_STEP / s.abs().sum(-1).amax(-1).clamp_min(_tiny(r))
    return torch.minimum(along, rowsum).clamp_(max=eta).nan_to_num_(nan=0.0)


def spectral_only(r, s, eta, scratch=None, **_):
    bound = penalty.MAX_MULTIPLIER_STEP / penalty.spectral_norm(s).clamp_min(_tiny(r))
    return bound.clamp_(max=eta).nan_to_num_(nan=0.0)


def uncapped(r, s, eta, scratch=None, **_):
    return torch.as_tensor(eta, dtype=r.dtype, device=r.device).expand(r.shape[0]).clone()


VARIANTS = {"library": LIBRARY, "projection": projection, "spectral-only": spectral_only, "uncapped": uncapped}


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
    target = {"target_gap": 1e-3} if task.name == "pca" else {}  # the 20,000-step target of experiments/pca_target.py
    sections = []
    try:
        for name, fn in VARIANTS.items():
            penalty.penalty_step = STEP if fn is LIBRARY else functools.partial(penalty.general_step, step_size=fn)
            comp = compare.run(
                task,
                methods=["soft", "frobenius"],
                seeds=args.seeds,
                steps=steps,
                lr=args.lr,
                record_every=10,
                progress=True,
                **beta,
                **target,
            )
            cmd = f"python experiments/soft_cap_ablation.py --task {args.task} --steps {steps}"
            cmd += f" --lr {args.lr}" if args.lr else ""
            sections.append(save(comp, out / name, title=f"soft-step cap: {name}", command=cmd))
    finally:
        penalty.penalty_step = STEP
    write_md(out, sections)


if __name__ == "__main__":
    main()
