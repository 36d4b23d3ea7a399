"""Every experiment script runs in quick mode and writes its outputs (no figures asserted)."""

from __future__ import annotations

import importlib.util
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
