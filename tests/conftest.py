"""Shared fixtures and helpers for the orthoopt test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# The suite's tensors are tiny: one thread avoids OpenMP spin-waits on a loaded 2-core box.
torch.set_num_threads(1)

# CI runs a fixed set of examples (derandomize), so that its verdict is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh ones on every run, for hunting.
settings.register_profile("default", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def orthonormal(m: int, l: int, n: int, dtype=torch.float64, generator=None) -> torch.Tensor:
    """A stack (m, l, n) with exactly orthonormal columns (QR of a Gaussian)."""
    q, _ = torch.linalg.qr(torch.randn(m, l, n, dtype=torch.float64, generator=generator))
    return q.to(dtype)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: runs torch.compile (slow on a small CPU; deselect with -m 'not compile')"
    )


def import_or_skip(name: str):
    """The framework ``name``, or a skip that says why it does not import here (timm needs a
    torchvision built for this torch, which fails with other errors than ImportError)."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import means the same: not here
        pytest.skip(
            f"{name} does not import in this environment ({type(e).__name__}: {e}); pip install '.[integration]'"
        )
