"""The README's Python snippets run as written, each in a fresh namespace (no model is handed
in), and do what the text around them says: the weight matrices constrained, the head and
everything that is not a matrix of a known layer left alone, and a step that moves them."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip

import orthoopt
from orthoopt.wrappers import unwrap

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
FRAMEWORKS = ("timm", "transformers", "accelerate", "pytorch_lightning", "lightning")
HEADS = ("head", "classifier", "fc")


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 7
    assert any("constrain_(opt, model" in s for s in SNIPPETS)


def _frameworks(code: str) -> list[str]:
    roots = re.findall(r"^(?:from|import) (\w+)", code, re.M)
    return [name for name in dict.fromkeys(roots) if name in FRAMEWORKS]


def _penalized(opt) -> dict[str, torch.Tensor]:
    opt = unwrap(opt)
    return {n: p for g in opt.param_groups if g["ortho"] for n, p in zip(g["param_names"], g["params"])}


def _check_selection(opt, model) -> None:
    """Every penalized parameter is a matrix of a known layer, and no head is penalized."""
    penalized = _penalized(opt)
    assert penalized, "nothing is constrained"
    assert all(p.dim() >= 2 for p in penalized.values())
    names = {orthoopt.selection.bare_name(n) for n in penalized}
    assert not any(n.split(".")[0] in HEADS for n in names), names
    assert not any(("embed" in n and "patch_embed" not in n) or "norm" in n or "token" in n for n in names), names


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    for name in _frameworks(code):
        import_or_skip(name)
    monkeypatch.chdir(tmp_path)  # a Trainer's output folder, a Lightning log folder
    scope: dict = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code, f"README.md snippet {index}", "exec"), scope)
    if "Classifier" in scope:  # the Lightning module: its configure_optimizers does the swap
        model = scope["Classifier"]()
        opt = model.configure_optimizers()["optimizer"]
        _check_selection(opt, model)
        assert set(_penalized(opt)) == {"body.weight"}
        return
    if "trainer" in scope and hasattr(scope["trainer"], "create_optimizer"):  # Hugging Face
        _check_selection(scope["trainer"].optimizer, scope["model"])
        assert len(_penalized(scope["trainer"].optimizer)) == 2 * 6 + 1  # per layer q, k, v, 3 dense; pooler
        return
    opt, model = scope.get("opt"), scope.get("model")
    if opt is None:
        return  # the math check: its own assert ran
    assert isinstance(unwrap(opt), orthoopt.OrthoMixin)
    _check_selection(opt, model)
    if not hasattr(model, "body"):
        return  # timm's ViT: its selection is checked above and in tests/test_selection.py
    assert set(_penalized(opt)) == {"body.weight"}
    before = model.body.weight.detach().clone()
    model(torch.randn(4, 32)).square().mean().backward()
    hard = any(g["ortho"] and g["ortho_mode"] == "hard" for g in unwrap(opt).param_groups)
    with pytest.warns(UserWarning, match="projected onto the Stiefel") if hard else contextlib.nullcontext():
        opt.step()  # hard mode reports its first projection
    assert not torch.equal(model.body.weight, before)
    if hard:
        assert max(orthoopt.named_orthogonality_errors(opt).values()) < 1e-5
