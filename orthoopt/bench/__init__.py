"""The benchmarks behind ``python -m orthoopt bench``.

=============  ============================================================================
``step``       one optimizer step: the soft step against its matmul floor, torch's AdamW,
               the autograd penalty, the hard mode and geoopt (``orthoopt bench``)
``iteration``  the whole training iteration of small real models (``orthoopt bench --models``)
``models``     those models, their batches, losses and constrained weights
``contenders`` the ways to train them under the constraint
``memory``     the step's allocations, transient peak and workspaces
``common``     the clocks, the machine's description, the text table and the report's JSON
=============  ============================================================================

The step benchmark's names (``run``, ``Case``, ``TARGETS``, the shapes) are importable from
here as well.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from . import step
from .step import (
    CPU_SHAPES,
    CUDA_SHAPES,
    MANY,
    QUICK_MANY,
    QUICK_SHAPES,
    TARGETS,
    Case,
    format_table,
    parser,
    run,
)

__all__ = [
    "main",
    "run",
    "parser",
    "format_table",
    "Case",
    "TARGETS",
    "CPU_SHAPES",
    "CUDA_SHAPES",
    "MANY",
    "QUICK_SHAPES",
    "QUICK_MANY",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``orthoopt bench [flags]``: the step benchmark, or with ``--models`` the whole iteration."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--models" or a.startswith("--models=") for a in argv):
        from . import iteration

        return iteration.main(argv)
    return step.main(argv)


# The step benchmark's other names, once reached as orthoopt.bench.<name> when it was one module.
_RENAMED = {"_config": "config"}


def __getattr__(name: str):
    target = _RENAMED.get(name, name)
    if target.startswith("__") or not hasattr(step, target):
        raise AttributeError(f"module 'orthoopt.bench' has no attribute {name!r}")
    warnings.warn(
        f"orthoopt.bench.{name} is deprecated; use orthoopt.bench.step.{target}", DeprecationWarning, stacklevel=2
    )
    return getattr(step, target)
