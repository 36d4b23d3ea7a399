"""Shared fixtures and helpers for the orthoopt test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

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


def near_orthonormal(*shape, noise=0.1, seed=0, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal columns (QR of a Gaussian) plus ``noise``-sized Gaussian entries (scaled by
    the column length): a start near the manifold but not on it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=dtype)).Q
    return (q + noise * torch.randn(*shape, generator=g, dtype=dtype) / shape[-2] ** 0.5).contiguous()


# Modules whose every test is slow: spawned processes (DDP/FSDP2 ranks), whole training scripts,
# experiment scripts, the command line and the timed benchmarks.
SLOW_MODULES = (
    "tests/integration/",
    "tests/zoo/",
    "tests/test_distributed.py",
    "tests/test_experiments.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the slow tests (spawned processes, torch.compile, experiment scripts, the CLI, timed "
        "runs); plain pytest runs the quick set",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: runs torch.compile (slow on a small CPU; every compile test is also slow)"
    )


def pytest_collection_modifyitems(config, items):
    """Mark the slow modules' tests and the compile tests slow; without --slow, leave them out."""
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if path.startswith(SLOW_MODULES) or item.get_closest_marker("compile"):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--slow"):
        return
    quick = [item for item in items if not item.get_closest_marker("slow")]
    left_out = [item for item in items if item.get_closest_marker("slow")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = quick


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


class ShardingPathsNet(nn.Module):
    """Every sharding path, with uneven and empty shards over 2 ranks.

    ``up.weight`` (7, 3), 'columns' (tall, auto): Gram all-reduce; rows split 4 + 3.
    ``down.weight`` (3, 7), 'rows' (wide, auto): gather; rows split 2 + 1.
    ``head.weight`` (1, 2), 'rows': gather; rows split 1 + 0 (an empty shard).
    ``mix`` (3, 5, 2), 'group_axis:0': whole groups per rank, local; split 2 + 1.
    ``heads`` (6, 4), 'column_groups:2': Gram all-reduce of 2 groups; rows split 3 + 3.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(3, 7)
        self.down = nn.Linear(7, 3)
        self.mix = nn.Parameter(torch.randn(3, 5, 2) / 2)
        self.heads = nn.Parameter(torch.randn(6, 4) / 2)
        self.head = nn.Linear(2, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.down(torch.tanh(self.up(x))))  # (B, 3)
        z = torch.einsum("bm,mlk->bk", h, self.mix)  # (B, 2)
        z = z + torch.tanh(h @ self.heads[:3]).sum(-1, keepdim=True) * 0.1
        return self.head(z)


# -- hard mode (tests/test_stiefel.py) ------------------------
HARD = {"ortho": 1.0, "ortho_mode": "hard"}


def stack_error(layout: str, p: torch.Tensor) -> float:
    """``max |XᵀX - I|`` over the matrices of ``p`` under ``layout``, in float64."""
    import orthoopt

    lay = orthoopt.layout.resolve_layout(layout, p.shape, "p")
    mats = lay.matrices(p.detach()).double()
    eye = torch.eye(mats.shape[-1], dtype=torch.float64)
    return (mats.mT @ mats - eye).abs().max().item()


def quadratic_grad(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The gradient of 0.5‖A X - B‖², a real, point-dependent Euclidean gradient."""
    return a.T @ (a @ x - b)


def run_pair(
    make_ours, make_geoopt, manifold: str, steps: int = 30, seed_buffer: bool = False, dtype=torch.float32, atol=2e-6
):
    """Our hard optimizer and geoopt's, each on a copy of one 10x4 point, ``steps`` steps of the
    same quadratic loss, equal to ``atol`` after every step; returns the two optimizers."""
    import geoopt

    from orthoopt import stiefel
    from orthoopt.penalty import polar

    torch.manual_seed(0)
    x0 = polar(torch.randn(10, 4).to(dtype))
    a, b = torch.randn(12, 10).to(dtype), torch.randn(12, 4).to(dtype)
    ours = nn.Parameter(x0.clone())
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=stiefel.manifold(manifold))
    opt, ref = make_ours([ours]), make_geoopt([theirs])
    for t in range(steps):
        ours.grad = quadratic_grad(ours.detach(), a, b)
        theirs.grad = quadratic_grad(theirs.detach(), a, b)
        if t == 0 and seed_buffer:
            # geoopt starts its buffer at the raw Euclidean gradient; a zero buffer gives
            # torch.optim.SGD's first step, which we follow (see orthoopt.stiefel).
            ref.state[theirs]["momentum_buffer"] = torch.zeros_like(theirs)
        opt.step()
        ref.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=atol, rtol=0, msg=f"step {t}")
    # Both moved well beyond the tolerance: the agreement is not that of two idle optimizers.
    assert (ours.detach() - x0).abs().max() > 1e-2
    return opt, ref
