"""An (l, m, n) = (32, 8, 16) group tensor, the L1 penalty alone.

OrthoAdamW (weight decay 0) from ``torch.randn(32, 8, 16) / 32**0.5`` with a zero task
gradient, 3000 steps at lr 1e-2, β = 1, sign() versus Huber (δ = 1e-3), with a constant lr
and with a cosine schedule to zero.  Writes the curves of the largest orthogonality error and
a table of the final errors.

    python experiments/group_tensor.py [--quick] [--steps 3000]
"""

from __future__ import annotations

import json

import torch
from _common import parser, setup

import orthoopt


def run(steps: int, smoothing: float, cosine: bool, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    phi = torch.nn.Parameter(torch.randn(32, 8, 16) / 32**0.5)
    opt = orthoopt.OrthoAdamW(
        [phi], lr=lr, weight_decay=0.0, ortho=1.0, ortho_smoothing=smoothing, ortho_layout="group_axis:1"
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    curve = [orthoopt.orthogonality_error(phi).max().item()]
    for _ in range(steps):
        phi.grad = torch.zeros_like(phi)  # the penalty alone: a zero task gradient
        opt.step()
        if sched is not None:
            sched.step()
        curve.append(orthoopt.orthogonality_error(phi).max().item())
    return curve


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args(argv)
    out = setup(args, "group_tensor")
    steps = 200 if args.quick else args.steps
    curves = {
        f"{'sign' if sm == 0 else f'huber δ={sm:g}'}, {'cosine' if cos else 'constant'} lr": run(steps, sm, cos)
        for sm in (0.0, 1e-3)
        for cos in (False, True)
    }
    rows = ["| run | start | final max error | median over the last 10% of steps |", "|---|---|---|---|"]
    for name, c in curves.items():
        tail = sorted(c[-max(1, steps // 10) :])
        rows.append(f"| {name} | {c[0]:.3g} | {c[-1]:.3g} | {tail[len(tail) // 2]:.3g} |")
    table = "\n".join(rows)
    (out / "curves.json").write_text(json.dumps(curves))
    from orthoopt.compare.plots import figure

    fig, ax = figure()
    for name, c in curves.items():
        ax.semilogy([max(v, 1e-9) for v in c], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("max |ΦᵢᵀΦᵢ − I| over the 8 groups")
    ax.set_title("group tensor (32, 8, 16): penalty alone, OrthoAdamW lr 1e-2, β = 1")
    ax.legend()
    fig.savefig(out / "orth_vs_step.png", dpi=120, bbox_inches="tight")
    cmd = f"python experiments/group_tensor.py --steps {steps}"
    text = f"## The (l, m, n) = (32, 8, 16) group tensor, penalty alone\n\n`{cmd}`\n\n{table}\n"
    (out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
