"""Shared bits of the experiment scripts: arguments, output folder, markdown."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

from orthoopt import compare  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a run of seconds (few steps, one seed)")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder (default experiments/results)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    return p


def setup(args, name: str) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out) / (name + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(comp, out: Path, *, title: str, command: str, extra: str = "") -> str:
    """Write the comparison (JSON/CSV/PNGs, history thinned) and return its markdown section."""
    compare.write(comp, out, history_points=200)
    text = f"## {title}\n\n`{command}`\n\n{compare.table(comp)}\n"
    if extra:
        text += "\n" + extra + "\n"
    return text


def write_md(out: Path, sections: list[str]) -> None:
    (out / "README.md").write_text("\n\n".join(sections) + "\n")
    print("\n\n".join(sections))
    print(f"\nwrote {out}")


def sweep(script: str, doc: str, tasks: dict[str, tuple[str, str]], default_steps: int, argv=None) -> None:
    """Every method on each task (folder -> (task spec, title)), one README section per task."""
    p = parser(doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=default_steps)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(argv)
    out = setup(args, script)
    steps = 40 if args.quick else args.steps
    sections = []
    for folder, (spec, title) in tasks.items():
        comp = compare.run(
            spec, seeds=1 if args.quick else args.seeds, steps=steps, lr=args.lr, record_every=5, progress=True
        )
        cmd = f"python experiments/{script}.py --steps {steps} --seeds {args.seeds}"
        sections.append(save(comp, out / folder, title=title, command=cmd))
    write_md(out, sections)
