"""The Python snippets of the README and of the docs pages run as written, each in a fresh
namespace (no model is handed in), and do what the text around them says: the weight matrices
constrained, the head and everything that is not a matrix of a known layer left alone, and a
step that moves them.  The options tables list every option with its default."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip

import orthoopt
from orthoopt.options import ORTHO_DEFAULTS
from orthoopt.wrappers import unwrap

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPETS = [
    (page.relative_to(ROOT).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]
FRAMEWORKS = ("timm", "transformers", "accelerate", "pytorch_lightning", "lightning")
HEADS = ("head", "classifier", "fc")
# The pages whose options table lists every ortho option.
OPTIONS_TABLES = (README, ROOT / "docs" / "quickstart.md")


def test_the_readme_and_the_docs_have_their_snippets():
    pages = {page for page, _, _ in SNIPPETS}
    assert {"README.md", "docs/quickstart.md", "docs/math.md", "docs/hard-mode.md", "docs/frameworks.md"} <= pages
    assert any("constrain_(opt, model" in code for page, _, code in SNIPPETS if page == "README.md")
    assert sum("import timm" in code or "from transformers" in code for _, _, code in SNIPPETS) >= 2


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


@pytest.mark.parametrize(("page", "index", "code"), SNIPPETS, ids=[f"{page}:{i}" for page, i, _ in SNIPPETS])
def test_snippet_runs(page, index, code, tmp_path, monkeypatch):
    for name in _frameworks(code):
        import_or_skip(name)
    monkeypatch.chdir(tmp_path)  # a Trainer's output folder, a Lightning log folder
    scope: dict = {"__name__": f"snippet_{index}"}
    exec(compile(code, f"{page} snippet {index}", "exec"), scope)
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
    if opt is None or model is None:
        return  # the math check, or a group built by hand: the snippet's own asserts ran
    assert isinstance(unwrap(opt), orthoopt.OrthoMixin)
    _check_selection(opt, model)
    if not hasattr(model, "body"):
        return  # timm's ViT: its selection is checked above and in tests/test_selection.py
    assert set(_penalized(opt)) == {"body.weight"}
    before = model.body.weight.detach().clone()
    model(torch.randn(4, 32)).square().mean().backward()
    groups = [g for g in unwrap(opt).param_groups if g["ortho"] and g["ortho_mode"] == "hard"]
    hard = bool(groups)
    # hard mode reports its first projection, unless the groups asked for it (ortho_init='project')
    reported = any(g["ortho_init"] != "project" for g in groups)
    with pytest.warns(UserWarning, match="projected onto the Stiefel") if reported else contextlib.nullcontext():
        opt.step()
    assert not torch.equal(model.body.weight, before)
    if hard:
        assert max(orthoopt.named_orthogonality_errors(opt).values()) < 1e-5


def _options_table(page: Path) -> dict[str, str]:
    """``{option: default cell}`` of the page's table headed ``| option | default | meaning |``."""
    text = page.read_text()
    start = text.index("| option | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


@pytest.mark.parametrize("page", OPTIONS_TABLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_options_table_lists_every_option_with_its_default(page):
    table = _options_table(page)
    missing = sorted(set(ORTHO_DEFAULTS) - set(table))
    assert not missing, f"{page.name}: add a row for {missing} to the options table"
    assert set(table) == set(ORTHO_DEFAULTS), f"{page.name}: no such option: {sorted(set(table) - set(ORTHO_DEFAULTS))}"
    for option, default in ORTHO_DEFAULTS.items():
        assert table[option] == f"`{json.dumps(default)}`", f"{page.name}: {option}'s default is {default!r}"
