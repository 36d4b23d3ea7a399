"""orthoopt.audit and ``python -m orthoopt audit``: every weight, its layout and matrices, whether
it is constrained and why, and the flags of what to look at before a swap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip
from torch import nn

import orthoopt
from orthoopt import __main__ as cli
from orthoopt.audit import Row

ROOT = Path(__file__).resolve().parents[1]

BUILDER = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.grouped = nn.Conv1d(width, 2 * width, 3, groups=2)
        self.dw = nn.Conv1d(2 * width, 2 * width, 3, groups=2 * width)
        self.pos_proj = nn.Linear(2, width)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(width, width))
        self.phi = nn.Parameter(torch.randn(4, width, 2))
        self.decoder = nn.Linear(width, 50)


def build(width=16):
    return Net(width)
"""


@pytest.fixture
def net(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_models

    yield user_models.build(width=8)
    sys.modules.pop("user_models", None)


def test_the_rows_say_what_is_constrained_and_why(net):
    result = orthoopt.audit(net)
    assert [r.name for r in result.rows] == [n for n, p in net.named_parameters() if p.dim() >= 2]
    assert result.row("qkv.weight") == Row(
        "qkv.weight", "Linear", (24, 8), "auto", ((1, 24, 8),), True, "the default rule", ("fused name kept 'auto'",)
    )
    grouped = result.row("grouped.weight")
    assert (grouped.layout, grouped.matrices, grouped.selected) == (
        "row_groups:2",
        ((2, 12, 8),),
        True,
    )  # (8, 4·3) each
    left = {r.name: (r.why, r.flags) for r in result.rows if not r.selected}
    assert left == {
        "emb.weight": ("of an embedding or norm layer (or tied to one)", ()),
        "dw.weight": ("depthwise conv (each filter sees one channel)", ("depthwise conv",)),
        "pos_proj.weight": ("encodes positions (its name says positional)", ("positional",)),
        "wn.parametrizations.weight.original0": (
            "parametrized: 'weight' under torch.nn.utils.parametrize (_WeightNorm)",
            ("parametrized weight left out",),
        ),
        "wn.parametrizations.weight.original1": (
            "parametrized: 'weight' under torch.nn.utils.parametrize (_WeightNorm)",
            ("parametrized weight left out",),
        ),
        "phi": ("not a weight of Linear, Conv, RNN/LSTM/GRU or MultiheadAttention", ()),
        "decoder.weight": ("output layer (a decoder onto the vocabulary of embedding 'emb')", ("output layer",)),
    }
    assert all(r.matrices == () for r in result.rows if not r.selected)  # no matrices where nothing is constrained
    assert [r.name for r in result.selected] == ["qkv.weight", "grouped.weight"]
    assert len(result.flagged) == 6


def test_the_table_prints_every_row_and_the_counts(net):
    text = str(orthoopt.audit(net))
    lines = text.splitlines()
    assert lines[0] == "audit of Net: 2 of 9 weights constrained"
    header = next(i for i, line in enumerate(lines) if line.startswith("parameter"))
    assert lines[header].split() == ["parameter", "module", "shape", "layout", "(m,", "l,", "n)", "on", "why", "flags"]
    row = next(line for line in lines if line.startswith("grouped.weight"))
    assert row.split()[:8] == ["grouped.weight", "Conv1d", "16x4x3", "row_groups:2", "(2,", "12,", "8)", "yes"]
    assert "  left out, output layer: 1" in lines and "  flagged, fused name kept 'auto': 1" in lines


def test_include_exclude_and_layouts_show_as_the_swap_would_take_them(net):
    result = orthoopt.audit(net, include=["qkv", "dw", "phi"], exclude=["grouped"], layouts={"phi": "group_axis:0"})
    on = {r.name: (r.layout, r.matrices, r.why) for r in result.rows if r.selected}
    assert on == {
        "qkv.weight": ("auto", ((1, 24, 8),), "the default rule"),
        "dw.weight": ("row_groups:16", ((16, 3, 1),), "include"),
        "phi": ("group_axis:0", ((4, 8, 2),), "include, layout given"),
    }
    assert orthoopt.audit(net, exclude=["qkv"]).row("qkv.weight").why == "exclude"


def test_an_optimizer_is_audited_as_it_is_or_as_the_swap_would_make_it(net):
    plain = torch.optim.AdamW([p for n, p in net.named_parameters() if not n.startswith("grouped")])
    with pytest.raises(TypeError, match=r"audit\(optimizer, model\)"):
        orthoopt.audit(plain)
    before = orthoopt.audit(plain, net)
    assert before.row("grouped.weight").why == "not held by the optimizer"
    assert [r.name for r in before.selected] == ["qkv.weight"]
    orthoopt.constrain_(plain, net, include=["qkv", "dw"])
    after = orthoopt.audit(plain, net)
    assert {r.name: r.layout for r in after.selected} == {"qkv.weight": "auto", "dw.weight": "row_groups:16"}
    assert after.row("dw.weight").flags == ("depthwise conv",)
    named = orthoopt.audit(plain)  # without the model: the names the swap gave the groups
    assert {r.name for r in named.selected} == {"qkv.weight", "dw.weight"}
    with pytest.raises(TypeError, match="takes a model"):
        orthoopt.audit([net.qkv.weight])


def test_a_model_that_nothing_is_selected_in_is_audited_too():
    result = orthoopt.audit(nn.Sequential(nn.Embedding(4, 4)))
    assert result.selected == [] and result.rows[0].why.startswith("of an embedding")


def test_the_command_refuses_what_it_cannot_build(capsys):
    assert cli.main(["audit", "no_such_module_xyz:build"]) == 2
    assert "No module named 'no_such_module_xyz'" in capsys.readouterr().err
    assert cli.main(["audit", "os:getcwd"]) == 2
    assert "gave a str, not an nn.Module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["audit", "x", "--set", "novalue"])
    assert "must be KEY=VALUE" in capsys.readouterr().err


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "orthoopt", "audit", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.slow
def test_the_command_on_a_user_module(tmp_path):
    (tmp_path / "user_models.py").write_text(BUILDER)
    proc = _run("user_models:build", "--set", "width=8", "--show", "flagged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "audit of Net: 2 of 9 weights constrained (user_models:build)"
    shown = [line.split()[0] for line in lines[4:] if line and not line.startswith(" ") and "of 9" not in line]
    assert shown == [
        "qkv.weight",
        "dw.weight",
        "pos_proj.weight",
        "wn.parametrizations.weight.original0",
        "wn.parametrizations.weight.original1",
        "decoder.weight",
    ]


@pytest.mark.slow
def test_the_command_on_a_timm_model(tmp_path):
    import_or_skip("timm")
    proc = _run("efficientformer_l1", "--show", "selected", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("audit of EfficientFormer: 37 of 40 weights constrained (efficientformer_l1)")
    row = next(line for line in proc.stdout.splitlines() if line.startswith("stages.3.blocks.4.token_mixer.qkv"))
    assert "row_blocks:8x(32,32,128)" in row and "(1, 448, 256) + (1, 448, 256) + (1, 1024, 448)" in row


@pytest.mark.slow
def test_the_command_on_a_transformers_config(tmp_path):
    import_or_skip("transformers")
    proc = _run(
        "gpt_neox", "--auto-class", "AutoModelForCausalLM", "--set", "num_hidden_layers=1", cwd=tmp_path
    )  # built on the meta device: GPT-NeoX-20B's widths cost nothing
    assert proc.returncode == 0, proc.stderr
    text = textwrap.dedent(proc.stdout)
    assert "4 of 6 weights constrained" in text
    assert "row_blocks:64x(96,96,96)" in text and "output layer (transformers' get_output_embeddings())" in text
