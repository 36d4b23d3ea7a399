"""The command line: python -m orthoopt compare / bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orthoopt import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_compare_quick_writes_outputs(tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "orthoopt", "compare", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| method |" in proc.stdout and "soft" in proc.stdout
    for name in (
        "results.json",
        "runs.csv",
        "summary.csv",
        "table.md",
        "loss_vs_step.png",
        "loss_vs_time.png",
        "orth_vs_step.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["task"] == "pca" and data["config"]["task_params"] == {"k": 8}
    assert {r["method"] for r in data["runs"]} == set(data["config"]["methods"])
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + len(data["runs"])


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--out", "--device", "--task", "--methods", "--seeds", "--steps", "--beta"):
        assert flag in text
    assert cli.main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--methods", "soft,bogus"])
    assert "bogus" in capsys.readouterr().err
    assert cli.main(["compare", "--task", "nope", "--quick", "--no-plots", "--no-progress"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2


def test_compare_in_process(tmp_path, capsys):
    rc = cli.main(
        [
            "compare",
            "--task",
            "procrustes:m=2",
            "--methods",
            "soft,landing",
            "--steps",
            "5",
            "--seeds",
            "2",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["seeds"] == [0, 1] and len(data["runs"]) == 4


def test_bench_dispatch(monkeypatch, capsys):
    import types

    calls = []
    fake = types.ModuleType("orthoopt.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "orthoopt.bench", fake)
    import orthoopt

    monkeypatch.setattr(orthoopt, "bench", fake, raising=False)
    assert cli.main(["bench", "--x", "1"]) == 0
    assert calls == [["--x", "1"]]
