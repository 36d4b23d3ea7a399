"""Sweep timm's models through orthoopt's default rule and check it against each model's forward.

For every timm model under a parameter budget (counted on the meta device first, so that large
ones cost nothing), built with ``pretrained=False`` at its default size: the default rule's
verdict on each weight (:func:`orthoopt.rule.survey`), one forward pass on a batch of 2 at the
model's input size, read by :func:`orthoopt.probe.feature_blocks`, and these checks:

* no weight of the classes the rule leaves out is selected, by checks that do not use the
  rule's own code: a depthwise convolution (``groups > 1``, one input channel per group), a
  per-channel scale of shape ``(C, 1, 1, 1)``, a weight whose layout makes single vectors, a
  weight under a parametrization, a module whose name says positional (``pos``, ``rel_pos``,
  ``cpb``, ``position``);
* every selected weight's layout agrees with the blocks its forward splits it into
  (:func:`orthoopt.probe.agrees`);
* a weight the forward splits, left at ``"auto"``, is a disagreement too.

Each model's record is one JSON line in ``--out`` (the sweep resumes where it stopped);
``--table`` prints the counts as docs/selection.md shows them.  Run::

    python tools/zoo_sweep.py --out zoo_sweep.jsonl            # hours on 2 cores
    python tools/zoo_sweep.py --out zoo_sweep.jsonl --table    # the counts
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthoopt import probe  # noqa: E402
from orthoopt.rule import survey  # noqa: E402

POSITIONAL = re.compile(r"(^|[._])(pos|posemb|position|positional|rel_pos|relpos|cpb)([._]|$)")


def independent_class(name: str, module: nn.Module, p: torch.Tensor) -> str | None:
    """The class of weight the rule must leave out, judged without the rule's code."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.in_channels == module.groups:
        return "per-channel scale" if p.dim() == 4 and p.shape[1:] == (1, 1, 1) else "depthwise conv"
    if POSITIONAL.search(name.rsplit(".", 1)[0]):
        return "positional"
    if parametrize.is_parametrized(module):
        return "parametrized"
    return None


def sweep_one(name: str, budget: float) -> dict:
    import timm

    record: dict = {"model": name}
    with torch.device("meta"):
        meta = timm.create_model(name, pretrained=False)
    record["params"] = sum(p.numel() for p in meta.parameters())
    if record["params"] >= budget:
        record["skipped"] = "over budget"
        return record
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *size)
    verdicts = survey(model)
    blocks = probe.feature_blocks(model, lambda m: m(x))
    owners = {id(p): (n, m) for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    weights = []
    for pname, p in model.named_parameters():
        verdict = verdicts[id(p)]
        if p.dim() < 2 or verdict.layout is None and verdict.module is None:
            continue
        _, module = owners[id(p)]
        row = {
            "name": pname,
            "module": type(module).__name__,
            "shape": list(p.shape),
            "layout": verdict.layout,
            "selected": verdict.selected,
            "reason": verdict.reason,
            "flags": list(verdict.flags),
            "class": independent_class(pname, module, p),
        }
        axis = probe.output_axis(module)
        if pname in blocks and axis is not None:
            forward = blocks[pname]
            row["forward_blocks"] = len(forward)
            if verdict.selected and verdict.layout is not None:
                row["agrees"] = probe.agrees(verdict.layout, tuple(p.shape), axis, forward)
                if not row["agrees"]:
                    row["forward"] = sorted([min(b), len(b)] for b in forward)[:12]
        weights.append(row)
    record["weights"] = weights
    return record


def sweep(out: Path, budget: float, pattern: str) -> None:
    import timm

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    done = set()
    if out.exists():
        done = {json.loads(line)["model"] for line in out.read_text().splitlines() if line.strip()}
    names = [n for n in timm.list_models(pattern) if n not in done]
    with out.open("a") as f:
        for name in names:
            start = time.perf_counter()
            try:
                record = sweep_one(name, budget)
            except Exception as e:  # noqa: BLE001 - a model that does not build or run is counted as such
                record = {
                    "model": name,
                    "error": f"{type(e).__name__}: {e}"[:400],
                    "trace": traceback.format_exc()[-800:],
                }
            record["seconds"] = round(time.perf_counter() - start, 2)
            f.write(json.dumps(record) + "\n")
            f.flush()


def table(out: Path) -> str:
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    swept = [r for r in records if "weights" in r]
    failed = [r for r in records if "error" in r]
    weights = [(r["model"], w) for r in swept for w in r["weights"]]

    def count(rows: list[tuple[str, dict]]) -> str:
        return f"{len(rows)} in {len({m for m, _ in rows})} models"

    def by(key, rows: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
        out: dict[str, list[tuple[str, dict]]] = {}
        for m, w in rows:
            if (k := key(w)) is not None:
                out.setdefault(k, []).append((m, w))
        return dict(sorted(out.items()))

    selected = [(m, w) for m, w in weights if w["selected"]]
    left = by(lambda w: None if w["selected"] else w["reason"].split(" (")[0].split(":")[0], weights)
    classes = by(lambda w: w["class"], weights)
    wrong = [(m, w) for m, w in weights if w["class"] and w["selected"]]
    fused = by(lambda w: w["layout"].split(":")[0] if w["layout"] not in ("auto", None) else None, selected)
    flagged = by(lambda w: ", ".join(w["flags"]) or None, weights)
    split = [(m, w) for m, w in selected if w.get("forward_blocks", 1) > 1]
    disagree = [(m, w) for m, w in weights if w.get("agrees") is False]
    lines = [
        "| | weights |",
        "|---|---|",
        f"| timm models under the budget, built and run | {len(swept)} ({len(failed)} did not build or run) |",
        f"| weights of 2 or more dimensions | {count(weights)} |",
        f"| selected | {count(selected)} |",
    ]
    lines += [f"| left out: {why} | {count(rows)} |" for why, rows in left.items()]
    lines += [f"| a left-out class by the sweep's own check: {c} | {count(rows)} |" for c, rows in classes.items()]
    lines += [f"| of those, selected | {len(wrong)} |"]
    lines += [f"| selected with layout {kind} | {count(rows)} |" for kind, rows in fused.items()]
    checked = [(m, w) for m, w in selected if "agrees" in w]
    lines += [f"| selected, checked against the forward (Linear, Conv and Conv1D weights it uses) | {count(checked)} |"]
    lines += [f"| of those, split by the forward into blocks | {count(split)} |"]
    lines += [f"| flagged: {flag} | {count(rows)} |" for flag, rows in flagged.items()]
    lines += [f"| selected layouts that disagree with the forward | {len(disagree)} |"]
    detail = [f"  {m} {w['name']} {w['layout']} forward {w.get('forward')}" for m, w in disagree[:30]]
    detail += [f"  selected in a left-out class: {m} {w['name']} ({w['class']})" for m, w in wrong[:30]]
    detail += [f"  failed: {r['model']}: {r['error'][:160]}" for r in failed]
    return "\n".join(lines + ([""] + detail if detail else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("zoo_sweep.jsonl"), help="the JSON lines (resumed if present)")
    p.add_argument("--budget", type=float, default=30e6, help="parameters: models at or above it are skipped")
    p.add_argument("--models", default="*", help="a timm.list_models pattern (default every model)")
    p.add_argument("--table", action="store_true", help="print the counts of --out and stop")
    args = p.parse_args(argv)
    if not args.table:
        sweep(args.out, args.budget, args.models)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
