"""Every example in examples/ runs and does what its docstring says (at its own sizes, or fewer
steps where they take more than a few seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import import_or_skip

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow  # each runs an example script


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_swap_on_an_mlp_keeps_its_hidden_weights_orthonormal(capsys):
    out = load("mlp_swap").main()
    assert out["accuracy"] > 0.9, out  # measured: 94.4%
    errors = {k: v for k, v in out.items() if k.endswith(".weight")}
    assert set(errors) == {"hidden1.weight", "hidden2.weight"}  # the head is left out
    assert max(errors.values()) < 1e-2, errors  # measured: 6.8e-3 and 2.6e-3
    assert "hidden1.weight: max |WᵀW - I| = " in capsys.readouterr().out


def test_the_group_tensor_reaches_the_polar_factors():
    out = load("group_tensor").main()
    error, distance = out["OrthoSGD"]
    assert error < 1e-5 and distance < 1e-5, out  # measured: 1.7e-6 and 7.7e-7
    error, distance = out["l1_orthogonality + SGD"]
    assert error < 1e-4 and distance < 0.05, out  # measured: 2.3e-5 and 1.4e-2
    start, target, solution = load("group_tensor").problem()
    assert start.shape == target.shape == solution.shape == (32, 8, 16)


def test_timm_under_its_own_optimizer_with_the_swap():
    import_or_skip("timm")
    out = load("timm_vit").main(epochs=2)
    errors = {k: v for k, v in out.items() if k != "accuracy"}
    assert len(errors) == 9 and not any(k.startswith("head") for k in errors), sorted(errors)
    assert max(errors.values()) < 1e-2 and out["accuracy"] > 0.3, out  # measured: 2.6e-3 and 47%


def test_a_hugging_face_trainer_with_the_swap_logs_the_errors():
    import_or_skip("transformers")
    out = load("hf_trainer").main(steps=60)  # measured: max error 5.1e-3, 87% held out
    errors = {k: v for k, v in out.items() if k.startswith("ortho/error/")}
    assert len(errors) == 13 and "ortho/error/bert.pooler.dense.weight" in errors, sorted(errors)
    assert out["ortho/max_error"] == max(errors.values()) < 1e-2 and out["accuracy"] > 0.2, out
