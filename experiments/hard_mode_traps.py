"""Hard mode's choices where it departs from geoopt, each with the figure that motivates it.

- the canonical manifold's drift off the manifold in float32 without re-projection, and with
  ``ortho_stabilize``'s default;
- geoopt's own re-projection of a canonical momentum (``RiemannianAdam(stabilize=1)`` on
  ``CanonicalStiefel``), whose ``proju`` is no projection, against orthoopt's;
- half-precision parameters: the worst error over a run, per dtype and manifold;
- ``torch.compile`` of geoopt's own ``RiemannianSGD`` against orthoopt's compiled hard step;
- the Adam second moment per matrix on the timm ViT of the framework training scripts
  (``tools/integration_scripts.py``'s setting): geoopt's sum against the default mean (needs
  timm; skipped where it does not import).

    python experiments/hard_mode_traps.py [--quick]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import geoopt
import torch
from _common import parser, setup, write_md
from torch import nn

import orthoopt
from orthoopt.penalty import polar

HARD = {"ortho": 1.0, "ortho_mode": "hard"}


def error(weight: torch.Tensor) -> float:
    """``max |XᵀX - I|`` in float64 of a weight whose rows are to be orthonormal (X its transpose)."""
    x = weight.detach().double().reshape(weight.shape[0], -1).mT
    return (x.mT @ x - torch.eye(x.shape[1], dtype=torch.float64)).abs().max().item()


def canonical_drift(steps: int, lr: float, stabilize) -> float:
    """OrthoAdam on the canonical manifold, a (16, 64) weight fitting a random teacher, from its polar factor."""
    torch.manual_seed(0)
    lin, teacher = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
    x = torch.randn(256, 64)
    opt = orthoopt.OrthoAdam(lin.parameters(), lr=lr, **HARD, ortho_manifold="canonical", ortho_stabilize=stabilize)
    orthoopt.project_(opt)
    for _ in range(steps):
        opt.zero_grad()
        (lin(x) - teacher(x)).pow(2).mean().backward()
        opt.step()
    return error(lin.weight)


def canonical_momentum(steps: int, geoopt_own: bool) -> list[tuple[int, float | str]]:
    """|exp_avg| every 10 steps with a re-projection at every step: geoopt's RiemannianAdam
    (stabilize=1) on CanonicalStiefel, or OrthoAdam (ortho_stabilize=1), on the same problem."""
    torch.manual_seed(0)
    teacher = torch.randn(64, 16)
    x = torch.randn(256, 64)
    start = polar(torch.randn(64, 16))
    if geoopt_own:
        w = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.CanonicalStiefel())
        opt = geoopt.optim.RiemannianAdam([w], lr=1e-2, stabilize=1)
        key = "exp_avg"
    else:
        w = nn.Parameter(start.clone())
        opt = orthoopt.OrthoAdam(
            [w], lr=1e-2, **HARD, ortho_layout="columns", ortho_manifold="canonical", ortho_stabilize=1
        )
        key = "stiefel_exp_avg"
    out: list[tuple[int, float | str]] = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        (x @ w - x @ teacher).pow(2).mean().backward()
        try:
            opt.step()
        except RuntimeError as e:  # torch.linalg.LinAlgError: the SVD of a non-finite matrix
            finite = bool(torch.isfinite(opt.state[w][key]).all())
            out.append(
                (
                    step,
                    f"the step raises {type(e).__name__.lstrip('_')} (moment {'finite' if finite else 'not finite'})",
                )
            )
            break
        if step % 10 == 0:
            out.append((step, opt.state[w][key].norm().item()))
    return out


def half_precision(dtype: torch.dtype, manifold: str, stabilize, steps: int) -> float:
    """The worst error over ``steps`` OrthoAdam steps (lr 1e-2) of a (8, 32) half weight."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False).to(dtype)
    x = torch.randn(64, 32, dtype=dtype)
    target = torch.randn(64, 8, dtype=dtype)
    opt = orthoopt.OrthoAdam(lin.parameters(), lr=1e-2, **HARD, ortho_manifold=manifold, ortho_stabilize=stabilize)
    orthoopt.project_(opt)
    worst = 0.0
    for _ in range(steps):
        opt.zero_grad()
        (lin(x) - target).float().pow(2).mean().backward()
        opt.step()
        worst = max(worst, error(lin.weight))
    return worst


def compiled(own: bool, backend: str | None, steps: int = 5) -> torch.Tensor:
    """The matrix after ``steps`` SGD steps (lr 0.1, random gradients) of an (8, 4) matrix on the
    Euclidean Stiefel manifold from its polar factor: geoopt's RiemannianSGD or OrthoSGD, eager
    (``backend=None``) or compiled with ``backend``."""
    torch.manual_seed(0)
    start = polar(torch.randn(8, 4))
    grads = [torch.randn(8, 4) for _ in range(steps)]
    if own:
        w = nn.Parameter(start.clone())
        opt = orthoopt.OrthoSGD([w], lr=0.1, **HARD, ortho_layout="columns")
    else:
        w = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.EuclideanStiefel())
        opt = geoopt.optim.RiemannianSGD([w], lr=0.1)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=backend) if backend else opt.step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break chatter
        for g in grads:
            w.grad = g.clone()
            step()
    torch._dynamo.reset()
    return w.detach().clone()


def vit_second_moment(quick: bool) -> dict[str, dict] | str:
    """The timm ViT of tools/integration_scripts.py: plain AdamW, hard mode with the mean and with geoopt's sum."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests" / "integration"))
    import training_scripts as ts

    variants = {
        "plain": None,
        "hard, mean": ts.RECIPES["hard"],
        "hard, sum": {**ts.RECIPES["hard"], "ortho_second_moment": "sum"},
    }
    out = {}
    for name, options in variants.items():
        try:
            script = ts.timm_vit(options, patch_size=4, epochs=1 if quick else 8)
        except ImportError as e:
            return f"skipped: timm does not import ({e})"
        try:
            while True:
                next(script)
        except StopIteration as done:
            run = done.value
        out[name] = {"loss": run.loss, "top1": run.metric, "max_error": max(run.errors.values()), "steps": run.steps}
    return out


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--skip-vit", action="store_true", help="leave out the timm ViT (it needs timm)")
    args = p.parse_args(argv)
    out = setup(args, "hard_mode_traps")
    quick = args.quick
    command = "python experiments/hard_mode_traps.py" + (" --quick" if quick else "")
    results: dict = {}

    long_steps, short_steps = (200, 50) if quick else (10_000, 500)
    drift = {
        f"lr 1e-3, {long_steps} steps": [canonical_drift(long_steps, 1e-3, s) for s in (None, "auto")],
        f"lr 1e-2, {short_steps} steps": [canonical_drift(short_steps, 1e-2, s) for s in (None, "auto")],
    }
    results["canonical_drift"] = drift
    sections = [
        "## The canonical manifold's drift in float32\n\n"
        "OrthoAdam on `CanonicalStiefel` (Cayley retraction), a (16, 64) `nn.Linear` fitting a random teacher "
        "from its polar factor; final max |XᵀX − I| (float64):\n\n"
        '| run | `ortho_stabilize=None` (never) | `"auto"` (every 10 steps) |\n|---|---|---|\n'
        + "".join(f"| {k} | {a:.2e} | {b:.2e} |\n" for k, (a, b) in drift.items())
    ]

    steps = 30 if quick else 60
    theirs, ours = canonical_momentum(steps, True), canonical_momentum(steps, False)
    results["canonical_momentum"] = {"geoopt": theirs, "orthoopt": ours}
    rows = ""
    for i in range(max(len(theirs), len(ours))):
        step = (theirs[i] if i < len(theirs) else ours[i])[0]
        cells = [
            (f"{v[1]:.3g}" if isinstance(v[1], float) else v[1]) if v and v[0] == step else ""
            for v in (theirs[i] if i < len(theirs) else None, ours[i] if i < len(ours) else None)
        ]
        rows += f"| {step} | {cells[0]} | {cells[1]} |\n"
    sections.append(
        "## Re-projecting a canonical momentum at every step\n\n"
        "Adam at lr 1e-2 on a 64 × 16 matrix on `CanonicalStiefel`, re-projected at every step: geoopt's "
        "`RiemannianAdam(stabilize=1)` (its `proju`) against `OrthoAdam(ortho_stabilize=1)` (the orthogonal "
        "tangent projection); the norm of the first moment:\n\n"
        "| step | geoopt ‖exp_avg‖ | orthoopt ‖exp_avg‖ |\n|---|---|---|\n" + rows
    )

    steps = 50 if quick else 500
    half = {
        f"{str(dtype).removeprefix('torch.')}, {manifold}, ortho_stabilize={stabilize}": half_precision(
            dtype, manifold, stabilize, steps
        )
        for dtype in (torch.bfloat16, torch.float16)
        for manifold, stabilize in (("euclidean", "auto"), ("canonical", 10), ("canonical", "auto"))
    }
    results["half_precision"] = half
    sections.append(
        f"## Half-precision parameters\n\nThe worst max |XᵀX − I| over {steps} OrthoAdam steps (lr 1e-2) of an (8, 32) "
        '`nn.Linear` weight fitting a random target from its polar factor (`"auto"` is never on the Euclidean '
        "manifold, every step on the canonical one for a half parameter):\n\n"
        "| dtype, manifold, re-projection | worst error |\n|---|---|\n"
        + "".join(f"| {k} | {v:.2e} |\n" for k, v in half.items())
    )

    backends = (None, "aot_eager") if quick else (None, "aot_eager", "inductor")
    compile_rows = {}
    for name, own in (("geoopt RiemannianSGD", False), ("OrthoSGD, ortho_mode='hard'", True)):
        runs = {backend or "eager": compiled(own, backend) for backend in backends}
        compile_rows[name] = {
            backend: {"error": error(x.mT), "from_eager": (x - runs["eager"]).abs().max().item()}
            for backend, x in runs.items()
        }
    results["compile"] = compile_rows
    columns = [backend or "eager" for backend in backends]
    sections.append(
        "## torch.compile\n\nFive SGD steps (lr 0.1, random gradients) of an 8 × 4 matrix on the Euclidean Stiefel "
        "manifold from its polar factor, eager and under `torch.compile(opt.step, backend=...)`; final "
        "max |XᵀX − I|, and in brackets the largest difference from the eager run's matrix:\n\n"
        f"| optimizer | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}\n"
        + "".join(
            f"| {name} | "
            + " | ".join(
                f"{r[c]['error']:.2e}" + (f" ({r[c]['from_eager']:.1e})" if c != "eager" else "") for c in columns
            )
            + " |\n"
            for name, r in compile_rows.items()
        )
    )

    if not args.skip_vit:
        vit = vit_second_moment(quick)
        results["vit_second_moment"] = vit
        if isinstance(vit, str):
            sections.append(f"## The Adam second moment on the timm ViT\n\n{vit}\n")
        else:
            plain = vit["plain"]["loss"]
            sections.append(
                "## The Adam second moment on the timm ViT\n\n"
                "The timm `vit_tiny_patch16_224` (depth 2, patch 4) of `tools/integration_scripts.py` on the digits, "
                f"AdamW lr 1e-3, warmup + cosine, {vit['plain']['steps']} iterations:\n\n"
                "| variant | held-out loss | / plain | top-1 % | max error |\n|---|---|---|---|---|\n"
                + "".join(
                    f"| {k} | {v['loss']:.4f} | {v['loss'] / plain:.2f} | {v['top1']:.2f} | {v['max_error']:.2e} |\n"
                    for k, v in vit.items()
                )
            )

    (out / "results.json").write_text(json.dumps(results, indent=1))
    header = (
        f"# Hard mode's choices where it departs from geoopt\n\n`{command}` (torch {torch.__version__}, "
        f"geoopt {geoopt.__version__}, {args.threads} thread(s), CPU, float32 unless the row says otherwise)"
    )
    write_md(out, [header, *sections])


if __name__ == "__main__":
    main()
