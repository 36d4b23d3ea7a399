"""Replace one method's rows in a saved comparison with those of a later run of that method alone.

For a result folder written by ``compare.write`` (``results.json``, ``runs.csv``, ``summary.csv``,
``table.md``, the PNGs) and, where present, a ``section.md`` of the copying experiment: the
method's runs and summary row come from NEW, every other row stays as it was (the CSV rows are
copied as text, so that they keep their full precision; so are the table's rows), and the plots are
redrawn from the merged ``results.json``.  Both runs must share the task, seeds, steps and initial weights.

    python tools/replace_method.py BASE NEW --method hard --note "..."
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoopt.compare.plots import plot_comparison  # noqa: E402
from orthoopt.compare.report import load  # noqa: E402

SAME = ("task", "task_params", "seeds", "steps", "base", "lr", "schedule", "beta", "constrained_lr_scale", "dtype")


def merged(base: dict, new: dict, method: str) -> dict:
    """BASE's comparison with METHOD's runs and summary row taken from NEW (in BASE's order)."""
    for key in SAME:
        if base["config"].get(key) != new["config"].get(key):
            raise SystemExit(f"the runs differ in {key}: {base['config'].get(key)!r} and {new['config'].get(key)!r}")
    fresh = {(r["seed"]): r for r in new["runs"] if r["method"] == method}
    runs = []
    for r in base["runs"]:
        if r["method"] != method:
            runs.append(r)
            continue
        if r["init_fingerprint"] != fresh[r["seed"]]["init_fingerprint"]:
            raise SystemExit(f"{method} seed {r['seed']}: the two runs start from different weights")
        runs.append(fresh[r["seed"]])
    (row,) = [s for s in new["summary"] if s["method"] == method]
    summary = [row if s["method"] == method else s for s in base["summary"]]
    return {"config": base["config"], "summary": summary, "runs": runs}


def merged_csv(base: Path, new: Path, method: str) -> str:
    """BASE's CSV rows with METHOD's rows replaced by NEW's, as text (the same header required)."""
    old_rows, new_rows = (list(csv.reader(p.open(newline=""))) for p in (base, new))
    if old_rows[0] != new_rows[0]:
        raise SystemExit(f"{base.name}: the two runs' columns differ")
    col = old_rows[0].index("method")
    fresh = iter([r for r in new_rows[1:] if r[col] == method])
    rows = [old_rows[0]] + [next(fresh) if r[col] == method else r for r in old_rows[1:]]
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def merged_table(base: str, new: str, method: str) -> str:
    """BASE's markdown table with METHOD's row from NEW's (as text: ``results.json`` holds 5 digits)."""
    (row,) = [line for line in new.splitlines() if line.startswith(f"| {method} |")]
    return "\n".join(row if line.startswith(f"| {method} |") else line for line in base.splitlines())


def merged_section(base: str, new: str, method: str, table: str, note: str) -> str:
    """The copying section: the new table, METHOD's per-run lines from NEW, the note after the command."""
    head, _, rest = base.partition("\n\ntask ")
    notes = rest[rest.index("Per run") :]
    fresh = iter([line for line in new.splitlines() if line.startswith(f"- {method} seed ")])
    lines = [next(fresh) if line.startswith(f"- {method} seed ") else line for line in notes.splitlines()]
    return f"{head}\n\n{note}\n\n{table}\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--note", default="", help="a line under the section's command (where a section.md exists)")
    args = p.parse_args(argv)
    data = merged(*(json.loads((d / "results.json").read_text()) for d in (args.base, args.new)), args.method)
    (args.base / "results.json").write_text(json.dumps(data, separators=(",", ":")))
    for name in ("runs.csv", "summary.csv"):
        (args.base / name).write_text(merged_csv(args.base / name, args.new / name, args.method))
    table = merged_table(*((d / "table.md").read_text() for d in (args.base, args.new)), args.method)
    (args.base / "table.md").write_text(table + "\n")
    plot_comparison(load(args.base / "results.json"), args.base)
    section = args.base / "section.md"
    if section.exists():
        text = merged_section(section.read_text(), (args.new / "section.md").read_text(), args.method, table, args.note)
        section.write_text(re.sub(r"\n{3,}$", "\n", text))
    print(f"wrote {args.base}")


if __name__ == "__main__":
    main()
