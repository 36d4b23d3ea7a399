"""Every experiment script runs in quick mode and writes its outputs (no figures asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = [
    "pca_target",
    "pca_beta_sweep",
    "pca",
    "procrustes",
    "classifiers",
    "soft_cap_ablation",
    "seed_tensor",
    "mlp_swap",
    "copying",
    "mppca",
]


def load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_quick(name, tmp_path):
    load(name).main(["--quick", "--out", str(tmp_path)])
    written = list(tmp_path.rglob("README.md"))
    assert written, f"{name} wrote no README.md"
    assert all(f.read_text().strip() for f in written)


def test_replace_method_swaps_one_method_only(tmp_path):
    """replace_method.py: the method's rows come from the later run, the others' stay byte for byte."""
    from orthoopt import compare

    replace = load("replace_method")
    base, new, other = tmp_path / "base", tmp_path / "new", tmp_path / "other"
    compare.write(compare.run("pca:k=2", methods=["none", "hard"], seeds=[0, 1], steps=6), base)
    compare.write(compare.run("pca:k=2", methods=["hard"], seeds=[0, 1], steps=6, lr=0.5), new)
    compare.write(compare.run("pca:k=2", methods=["hard"], seeds=[0, 1], steps=7), other)
    before = {name: (base / name).read_text().splitlines() for name in ("runs.csv", "summary.csv", "table.md")}
    with pytest.raises(SystemExit, match="differ in steps"):
        replace.main([str(base), str(other), "--method", "hard"])
    assert (base / "runs.csv").read_text().splitlines() == before["runs.csv"]  # nothing written before the error
    with pytest.raises(SystemExit, match="differ in lr"):
        replace.main([str(base), str(new), "--method", "hard"])
    # a later run of other code under the same settings: here other figures from another lr, its config set back
    data = json.loads((new / "results.json").read_text())
    data["config"]["lr"] = json.loads((base / "results.json").read_text())["config"]["lr"]
    (new / "results.json").write_text(json.dumps(data))
    replace.main([str(base), str(new), "--method", "hard"])
    for name, old in before.items():
        fresh = (new / name).read_text().splitlines()
        merged = (base / name).read_text().splitlines()
        assert len(merged) == len(old)
        for line, was in zip(merged, old, strict=True):
            if ",hard," in line or line.startswith("hard,") or line.startswith("| hard |"):
                assert line in fresh and line != was
            else:
                assert line == was
    merged = json.loads((base / "results.json").read_text())
    assert [r["method"] for r in merged["runs"]] == ["none", "hard", "none", "hard"]
    assert [r["final"] for r in merged["runs"] if r["method"] == "hard"] == [r["final"] for r in data["runs"]]
