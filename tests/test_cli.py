"""The command line: python -m orthoopt compare / bench."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from orthoopt import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
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
    with pytest.raises(SystemExit) as e:  # argparse's refusal now, before any work
        cli.main(["compare", "--task", "nope", "--quick", "--no-plots", "--no-progress"])
    assert e.value.code == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2


@pytest.mark.slow
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
            "--target-gap",
            "0.5",
            "--out",
            str(tmp_path / "made" / "here"),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "made" / "here" / "results.json").read_text())
    assert data["config"]["seeds"] == [0, 1] and len(data["runs"]) == 4
    assert (data["config"]["target_gap"], data["config"]["target_orth"]) == (0.5, 1e-3)  # procrustes' orth target


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


# -- every bad argument: argparse's exit 2, one line saying what is allowed, nothing written --
COMPARE_BAD = [
    (["--beta", "-1"], r"--beta: must be a finite number > 0"),
    (["--beta", "nan"], r"--beta: must be a finite number > 0"),
    (["--lr", "-1"], r"--lr: must be a finite number > 0"),
    (["--lr", "0"], r"--lr: must be a finite number > 0"),
    (["--landing-lr", "-0.1"], r"--landing-lr: must be a finite number > 0"),
    (["--target-gap", "0"], r"--target-gap: must be a finite number > 0"),
    (["--target-orth", "inf"], r"--target-orth: must be a finite number > 0"),
    (["--smoothing", "-1"], r"--smoothing: must be a finite number >= 0"),
    (["--record-every", "0"], r"--record-every: must be a whole number >= 1"),
    (["--steps", "0"], r"--steps: must be a whole number >= 1"),
    (["--steps", "2.5"], r"--steps: must be a whole number >= 1"),
    (["--threads", "0"], r"--threads: must be a whole number >= 1"),
    (["--seeds", ","], r"--seeds: must be a count >= 1"),
    (["--seeds", "0"], r"--seeds: must be a count >= 1"),
    (["--seeds=-1,2"], r"--seeds: must be a count >= 1 .* distinct seeds >= 0"),
    (["--seeds", "1,1"], r"--seeds: must be a count >= 1 .* distinct seeds >= 0"),
    (["--task", "nope"], r"--task: unknown task 'nope'; choose one of pca"),
    (["--task", "pca:k=abc"], r"--task: task 'pca': k must be a whole number from 1 to 63"),
    (["--task", "pca:k=0"], r"--task: task 'pca': k must be a whole number from 1 to 63"),
    (["--task", "pca:k=100"], r"--task: task 'pca': k must be a whole number from 1 to 63"),
    (["--task", "copying:foo=1"], r"--task: task 'copying': unknown parameter 'foo'; it takes L, K, hidden"),
    (["--task", "copying:L=0"], r"--task: task copying: L must be an integer >= 1, got 0"),
    (["--task", "copying:L=1e9"], r"--task: task copying: L must be an integer >= 1, got 1e9$"),
    (["--task", "pca:k=2.50"], r"--task: task 'pca': k must be a whole number from 1 to 63 .*, got 2.50$"),
    (
        ["--task", "procrustes:noise=-1e-3"],
        r"--task: task 'procrustes': noise must be a finite number >= 0, got -1e-3$",
    ),
    (
        ["--task", "copying:L=10,hidden=8,L=20"],
        r"--task: task 'copying:L=10,hidden=8,L=20': L is given twice; give each parameter once$",
    ),
    (["--task", "copying:hidden=abc"], r"--task: task copying: hidden must be an integer >= 2"),
    (
        ["--task", "mppca:n=64"],
        r"--task: task mppca: n \(latent dimensions per component\) must be an integer in 1..63",
    ),
    (["--task", "mppca:supervised=2"], r"--task: task mppca: supervised must be 0 or 1"),
    (["--task", "pca:x=1"], r"--task: task 'pca': unknown parameter 'x'; it takes k"),
    (["--task", "pca:k"], r"--task: task 'pca:k': expected key=value"),
    (["--task", "procrustes:n=16"], r"--task: task 'procrustes': n must be a whole number from 1 to 15"),
    (["--task", "mlp:batch=0"], r"--task: task 'mlp': batch must be a whole number from 1 to"),
    (["--device", "foo"], r"--device: must be cpu or cuda\[:N\]"),
    (["--device", "gpu"], r"--device: must be cpu or cuda\[:N\]"),
    (["--methods", "soft,bogus"], r"--methods: unknown \['bogus'\]"),
    (["--methods", "soft,hard,soft"], r"--methods: 'soft' is given twice in 'soft,hard,soft'; name each once"),
    (["--dtype", "float16"], r"--dtype: invalid choice"),
    (["--out", "{file}"], r"--out: '.*' is a file; give a folder"),
    (["--out", "{file}/sub"], r"--out: '.*' is a file, not a folder"),
    (["--out", "{readonly}/res"], r"--out: cannot write in"),
]
if not torch.cuda.is_available():
    COMPARE_BAD.append((["--device", "cuda"], r"--device: 'cuda': torch sees no CUDA device; use --device cpu"))

BENCH_BAD = [
    (["--repeats", "0"], r"--repeats: must be a whole number >= 1"),
    (["--hard-repeats", "0"], r"--hard-repeats: must be a whole number >= 1"),
    (["--warmup", "-1"], r"--warmup: must be a whole number >= 0"),
    (["--threads", "0"], r"--threads: must be a whole number >= 1"),
    (["--device", "gpu"], r"--device: must be cpu or cuda\[:N\]"),
    (["--dtype", "int8"], r"--dtype: 'int8' is not a torch floating dtype"),
    (["--contenders", "soft,nope"], r"--contenders: unknown \['nope'\]"),
    (["--contenders", ","], r"--contenders: none given"),
    (["--contenders", "soft,soft"], r"--contenders: 'soft' is given twice in 'soft,soft'; name each once"),
    (["--shapes", "4x2x3"], r"--shapes: '4x2x3' has n=3 > l=2"),
    (["--shapes", "0x4x2"], r"--shapes: \(0,4,2\) has a dimension < 1"),
    (["--shapes", "abc"], r"--shapes: cannot read 'abc'"),
    (
        ["--shapes", "1x100000x100000"],
        r"--shapes: \(1,100000,100000\) in float32 needs at least \S+ TiB \(32 tensors of 10000000000 elements held "
        r"at once by the contenders\), more than the .* available on cpu; give smaller shapes or fewer --contenders",
    ),
    (["--out", "{dir}"], r"--out: '.*' is a folder; give a file name"),
    (["--out", "{file}/x.json"], r"--out: '.*' is a file, not a folder"),
    (["--out", "{readonly}/x.json"], r"--out: cannot write in"),
]


MODELS_BAD = [
    (["--models", "resnet"], r"--models: unknown \['resnet'\]; choose from mnist, lstm, vit, mlp, wide"),
    (["--models", "mlp,lstm,mlp"], r"--models: 'mlp' is given twice in 'mlp,lstm,mlp'; name each once"),
    (["--models", "mlp", "--contenders", "plain,plain"], r"--contenders: 'plain' is given twice"),
    (["--models", "mlp", "--device", "gpu"], r"--device: must be cpu or cuda\[:N\]"),
    (["--models", "mlp", "--out", "{dir}"], r"--out: '.*' is a folder; give a file name"),
    (["--models", "mlp", "--out", "{file}/x.json"], r"--out: '.*' is a file, not a folder"),
]


def _no_work(*args, **kwargs):
    raise AssertionError("the run started despite a bad argument")


def _assert_refused(tmp_path, monkeypatch, capsys, argv, prog, message):
    """Run the CLI in an empty folder: it exits with argparse's code 2 before any work and
    writes nothing, its last line ``prog``'s refusal of an argument, matching ``message``."""
    work, readonly = tmp_path / "work", tmp_path / "readonly"
    work.mkdir()
    readonly.mkdir()
    (tmp_path / "file").write_text("not a folder")
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.chdir(work)
    argv = [a.format(file=tmp_path / "file", dir=tmp_path, readonly=readonly) for a in argv]
    if os.geteuid() == 0 and any(str(readonly) in a for a in argv):
        # root may write in a read-only folder; what refuses it then is, say, a read-only mount
        monkeypatch.setattr(tempfile, "TemporaryFile", _refuse_write)
    from orthoopt import compare
    from orthoopt.bench import iteration, step

    monkeypatch.setattr(compare, "run", _no_work)  # "before any work"
    monkeypatch.setattr(step, "run", _no_work)
    monkeypatch.setattr(iteration, "run", _no_work)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
    finally:
        readonly.chmod(stat.S_IRWXU)
    written = sorted(str(p) for p in (*work.rglob("*"), *readonly.rglob("*")))
    err = capsys.readouterr().err
    assert e.value.code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: argument "), err
    assert re.search(message, last), last
    assert written == []


def _refuse_write(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("argv,message", COMPARE_BAD, ids=[" ".join(a) for a, _ in COMPARE_BAD])
def test_compare_bad_argument_exits_2_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    out = [] if any(a.startswith("--out") for a in argv) else ["--out", "res"]
    _assert_refused(
        tmp_path, monkeypatch, capsys, ["compare", *argv, *out, "--no-progress"], "orthoopt compare", message
    )


@pytest.mark.parametrize("argv,message", MODELS_BAD, ids=[" ".join(a) for a, _ in MODELS_BAD])
def test_bench_models_bad_argument_exits_2_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    _assert_refused(tmp_path, monkeypatch, capsys, ["bench", "--quick", *argv], "orthoopt bench --models", message)


@pytest.mark.parametrize("argv", [["compare"], ["bench"], ["bench", "--models"]], ids=" ".join)
def test_every_out_says_that_missing_folders_are_made(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and re.search(
        r"--out \S+ (output folder|JSON file to write), (made with any missing parent folders|its missing folders made)",
        text,
    ), text


def test_compare_help_names_every_method_it_accepts(capsys):
    from orthoopt.compare.methods import ALL_METHODS

    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"--methods METHODS comma list of (.*?);", text)
    assert e.value.code == 0 and listed, text
    assert listed.group(1).split(", ") == list(ALL_METHODS)


@pytest.mark.parametrize("argv,message", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_bench_bad_argument_exits_2_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    _assert_refused(tmp_path, monkeypatch, capsys, ["bench", "--quick", *argv], "orthoopt bench", message)
