"""The README's Python snippets run as written (a model with a ``head`` stands in for the user's)."""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import orthoopt

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(16, 8), act=nn.Tanh(), head=nn.Linear(8, 3)))


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    model = _model()
    scope = {"torch": torch, "orthoopt": orthoopt, "model": model}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), scope)
    opt = scope.get("opt")
    if opt is None:
        return  # the math check: its own assert ran
    assert isinstance(opt, orthoopt.OrthoAdamW)
    penalized = {n for g in opt.param_groups if g["ortho"] for n in g["param_names"]}
    assert penalized == {"body.weight"}  # the head is excluded, biases are not penalized
    before = model.body.weight.detach().clone()
    model(torch.randn(4, 16)).square().mean().backward()
    hard = any(g["ortho"] and g["ortho_mode"] == "hard" for g in opt.param_groups)
    with pytest.warns(UserWarning, match="projected onto the Stiefel") if hard else contextlib.nullcontext():
        opt.step()  # hard mode reports its first projection
    assert not torch.equal(model.body.weight, before)
