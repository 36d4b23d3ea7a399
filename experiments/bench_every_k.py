"""The soft step every k steps (ortho_every=k, k times as large): its final orthogonality error,
accuracy and iteration time on the digit classifiers, next to k = 1.

The classifiers of experiments/classifiers.py (MLP 64-128-128-10 and CNN, hidden weights
constrained) and the whole-iteration benchmark's MLP 64-256-256-256-10, on sklearn's digits:
AdamW (lr 3e-3, cosine to 0, no weight decay), β = 3 or 'auto', batch 64, 1500 steps, 3 seeds.
All variants of one seed train side by side (one iteration of each in turn), from the same
weights and batches, so that their times are comparable: the process's CPU time per
iteration, amortized over blocks of lcm(k) iterations (a median over single iterations would
be that of the iterations without a penalty step).

    python experiments/bench_every_k.py [--quick] [--steps 1500] [--seeds 3] [--every 1,2,4,8]
"""

from __future__ import annotations

import math
import statistics
import time
from functools import reduce

import numpy as np
import torch
from _common import parser, setup
from torch import nn

import orthoopt
from orthoopt.compare.tasks import CNN, MLP, _split

ARCHS = {
    "mlp": ("digits MLP 64-128-128-10", MLP),
    "cnn": ("digits CNN conv3x3(16)-conv3x3(32)-pool-linear", CNN),
    "mlp256": (
        "digits MLP 64-256-256-256-10 (the benchmark's)",
        lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
        ).append(nn.Linear(256, 10)),
    ),
}
EXCLUDE = {"mlp": ["out"], "cnn": ["out"], "mlp256": ["7"]}


class Run:
    """One variant (β, k) on one seed: its copy of the model, optimizer and schedule."""

    def __init__(self, model: nn.Module, arch: str, ortho, every: int, lr: float, steps: int):
        self.model = model
        self.arch = arch
        groups = orthoopt.param_groups(model, ortho=ortho, ortho_every=every, exclude=EXCLUDE[arch])
        self.opt = orthoopt.OrthoAdamW(groups, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        self.times: list[float] = []

    def iteration(self, x, y) -> None:
        t0 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.times.append(time.process_time() - t0)
        self.sched.step()

    @torch.no_grad()
    def final(self, xte, yte, block: int) -> dict:
        errors = orthoopt.named_orthogonality_errors(self.model, exclude=EXCLUDE[self.arch])
        blocks = [sum(self.times[i : i + block]) / block for i in range(0, len(self.times) - block + 1, block)]
        return {
            "orth_max": max(errors.values()),
            "test_acc": (self.model(xte).argmax(1) == yte).float().mean().item(),
            "iter_ms": 1e3 * statistics.median(blocks),
        }


def run_seed(arch: str, seed: int, variants: list[tuple], steps: int, lr: float = 3e-3, batch: int = 64) -> list[dict]:
    xtr, xte, ytr, yte = _split()
    xtr, xte = (torch.as_tensor(v, dtype=torch.float32) for v in (xtr, xte))
    ytr, yte = torch.as_tensor(ytr), torch.as_tensor(yte)
    torch.manual_seed(seed)
    base = ARCHS[arch][1]()
    with torch.no_grad():  # orthonormal start, as build_classifier draws it
        for name, p in base.named_parameters():
            if p.dim() >= 2 and not any(name.startswith(e) for e in EXCLUDE[arch]):
                nn.init.orthogonal_(p)
    runs = []
    for ortho, every in variants:
        model = ARCHS[arch][1]()
        model.load_state_dict(base.state_dict())
        runs.append(Run(model, arch, ortho, every, lr, steps))
    rng = np.random.default_rng(seed)
    per_epoch = len(ytr) // batch
    order = rng.permutation(len(ytr))
    for t in range(steps):
        j = t % per_epoch
        if j == 0 and t:
            order = rng.permutation(len(ytr))
        idx = torch.as_tensor(order[j * batch : (j + 1) * batch])
        for run in runs:
            run.iteration(xtr[idx], ytr[idx])
    block = reduce(math.lcm, (every for _, every in variants))
    return [run.final(xte, yte, block) for run in runs]


def _mean_std(values: list[float], spec: str) -> str:
    mean = statistics.fmean(values)
    return f"{mean:{spec}}" if len(values) < 2 else f"{mean:{spec}} ± {statistics.stdev(values):.1e}"


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--every", default="1,2,4,8", help="comma-separated k (default 1,2,4,8)")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    args = p.parse_args(argv)
    out = setup(args, "bench_every_k")
    steps, seeds = (8, 1) if args.quick else (args.steps, args.seeds)
    ks = [int(k) for k in args.every.split(",")]
    variants = [(ortho, k) for ortho in (3.0, "auto") for k in ks]
    command = f"python experiments/bench_every_k.py --steps {steps} --seeds {seeds} --every {args.every}"
    lines = [
        "## The soft step every k steps: final error, accuracy and time",
        "",
        f"`{command}` ({args.threads} thread(s); mean ± std over {seeds} seed(s); iteration ms: CPU time, "
        "the median over blocks of lcm(k) iterations of each run, measured side by side with the other "
        "variants, then averaged over seeds)",
        "",
        "| model | β | k | final max\\|ΦᵀΦ - I\\| | test acc % | iteration ms | x (k = 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in args.archs.split(","):
        results = [run_seed(arch, seed, variants, steps) for seed in range(seeds)]
        for i, (ortho, k) in enumerate(variants):
            per_seed = [r[i] for r in results]
            first = variants.index((ortho, 1)) if (ortho, 1) in variants else None
            ratio = (
                statistics.fmean(r[i]["iter_ms"] / r[first]["iter_ms"] for r in results) if first is not None else None
            )
            lines.append(
                f"| {ARCHS[arch][0]} | {ortho} | {k} | {_mean_std([r['orth_max'] for r in per_seed], '.2e')} "
                f"| {_mean_std([100 * r['test_acc'] for r in per_seed], '.2f')} "
                f"| {statistics.fmean(r['iter_ms'] for r in per_seed):.3f} | {'' if ratio is None else f'{ratio:.2f}'} |"
            )
        print(f"  done {arch}", flush=True)
    text = "\n".join(lines) + "\n"
    (out / "README.md").write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
