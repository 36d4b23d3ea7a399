"""The project's tools (tools/): the results index, the merge of a rerun method into a saved
comparison.  The benchmark targets' table is tested with the benchmarks (tests/test_bench.py)."""

from __future__ import annotations

import json

import pytest
from test_experiments import TOOLS, load

pytestmark = pytest.mark.slow  # each runs a tool's script


def test_collect_gathers_the_results_readmes_in_order(tmp_path):
    collect = load("collect", TOOLS)
    for folder, body in (("mppca/n4", "## Mixture\n\ntext m\n\n## more"), ("group_tensor", "## Tensor\n\ntext s")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "README.md").write_text(body)
    collect.main(["--results", str(tmp_path)])
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Experiment results\n")
    first, last = (
        text.index("## 0. The (l, m, n) = (32, 8, 16) group tensor"),
        text.index("## 5. Mixture of probabilistic"),
    )
    assert first < last and "[mppca/n4/](mppca/n4/)\n\n### Mixture\n\ntext m\n\n### more" in text
    assert "pca_target" not in text  # no folder, no section


def test_replace_method_swaps_one_method_only(tmp_path):
    """replace_method.py: the method's rows come from the later run, the others' stay byte for byte."""
    from orthoopt import compare

    replace = load("replace_method", TOOLS)
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
