"""``python -m orthoopt`` (also the ``orthoopt`` console script).

orthoopt compare [--task pca] [--methods soft,hard] [--seeds 3] [--steps N] [--quick] [--out DIR]
orthoopt bench ...   (the step benchmark, orthoopt.bench.step)
orthoopt bench --models [mnist,lstm,vit,mlp,wide] ...   (the whole iteration, orthoopt.bench.iteration)
orthoopt audit MODEL [--set KEY=VALUE] [--show flagged] ...   (a model's weights, orthoopt.audit)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .argtypes import device, names, out_dir, real, whole

DEFAULT_OUT = "orthoopt-results"


def _seeds(text: str) -> list[int]:
    """``"3"`` is seeds 0, 1, 2; ``"0,5,7"`` those seeds."""
    usage = "must be a count >= 1 (3: seeds 0,1,2) or a list of distinct seeds >= 0 (0,4,5)"
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{usage}, got {text!r}") from None
    # Seeds seed numpy's generator too, which takes no negative ones.
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{usage}, got {text!r}")
    return seeds


def _task(text: str) -> str:
    """A task name with parameters the task accepts (checked against its bounds)."""
    from .compare.tasks import get_task

    try:
        get_task(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def compare_parser() -> argparse.ArgumentParser:
    from .compare.methods import ALL_METHODS, METHODS
    from .compare.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="orthoopt compare",
        description=(
            "Run one task under several orthogonality methods with the same initial weights, data order, "
            "lr schedule and step budget; print a table and write results.json, CSV and PNG plots."
        ),
    )
    p.add_argument(
        "--task",
        type=_task,
        default="pca",
        help=f"task name, optionally with parameters: {', '.join(TASKS)}; e.g. pca:k=4, procrustes:m=512 "
        "(default: pca, k=8)",
    )
    p.add_argument(
        "--methods",
        type=names(ALL_METHODS, every=METHODS),
        default=None,
        help=f"comma list of {', '.join(ALL_METHODS)}; all: {', '.join(METHODS)} (default: the task's, else all)",
    )
    p.add_argument("--seeds", type=_seeds, default=None, help="a count (3 = seeds 0,1,2) or a list 0,4,5 (default 3)")
    p.add_argument("--steps", type=whole(1), default=None, help="step budget (default: the task's)")
    p.add_argument("--beta", type=real(positive=True), default=None, help="the penalty weight β (default: the task's)")
    rel = p.add_mutually_exclusive_group()
    rel.add_argument(
        "--beta-relative",
        dest="beta_relative",
        action="store_const",
        const=True,
        help="read --beta as a multiple of the exactness threshold β* (the default for pca and procrustes)",
    )
    rel.add_argument(
        "--beta-absolute", dest="beta_relative", action="store_const", const=False, help="read --beta as β itself"
    )
    p.add_argument("--lr", type=real(positive=True), default=None, help="base learning rate (default: the task's)")
    p.add_argument(
        "--target-gap",
        type=real(positive=True),
        default=None,
        help="the target's relative gap |f - f*|/|f*|, where f* is known (default: the task's; 0.05 for pca)",
    )
    p.add_argument(
        "--target-orth",
        type=real(positive=True),
        default=None,
        help="the target's orthogonality error max|ΦᵀΦ - I|, where f* is known (default: the task's; 1e-5 for pca)",
    )
    p.add_argument(
        "--base", choices=("sgd", "adam", "adamw"), default=None, help="base optimizer (default: the task's)"
    )
    p.add_argument(
        "--smoothing",
        type=real(positive=False),
        default=None,
        help="Huber δ of soft-huber (default: the task's)",
    )
    p.add_argument(
        "--landing-lr",
        type=real(positive=True),
        default=None,
        help="landing's step (default: the task's, else --lr)",
    )
    p.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default=None,
        help="lr schedule (default: the task's; cosine to 0, constant for copying)",
    )
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=whole(1), default=1, help="torch CPU threads (default 1: steadier timings)")
    p.add_argument(
        "--record-every",
        type=whole(1),
        default=1,
        help="record the curves every N steps (default 1)",
    )
    p.add_argument("--quick", action="store_true", help="a run of seconds: the task's short budget, one seed")
    p.add_argument(
        "--out",
        type=out_dir,
        default=DEFAULT_OUT,
        help=f"output folder, made with any missing parent folders (default ./{DEFAULT_OUT})",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def compare_main(argv: Sequence[str] | None = None) -> int:
    parser = compare_parser()
    args = parser.parse_args(argv)  # every argument is checked here, before any work (exit 2)
    import torch

    from . import compare

    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    try:
        comp = compare.run(
            args.task,
            methods=args.methods,
            seeds=seeds,
            steps=args.steps,
            beta=args.beta,
            beta_relative=args.beta_relative,
            lr=args.lr,
            base=args.base,
            smoothing=args.smoothing,
            landing_lr=args.landing_lr,
            schedule=args.schedule,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            record_every=args.record_every,
            quick=args.quick,
            progress=not args.no_progress,
            threads=args.threads if args.device == "cpu" else None,
            target_gap=args.target_gap,
            target_orth=args.target_orth,
        )
    except ValueError as e:  # a combination found out only once the task is built (no optimum known)
        parser.error(str(e))
    print(compare.table(comp))
    paths = compare.write(comp, args.out, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def bench_main(argv: Sequence[str]) -> int:
    from . import bench  # imported here: it pulls in geoopt's optimizers and the profiler

    return bench.main(list(argv)) or 0


COMMANDS = {
    "compare": "compare methods on a task",
    "bench": "time the optimizer step (orthoopt.bench)",
    "audit": "list a model's weights, their layouts and what is constrained (orthoopt.audit)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            # The main job: the default task, every method, results in ./orthoopt-results/.
            return compare_main([])
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items()))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "compare":
        return compare_main(rest)
    if command == "bench":
        return bench_main(rest)
    if command == "audit":
        from .audit import main as audit_main

        return audit_main(rest)
    print(f"orthoopt: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (--help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
