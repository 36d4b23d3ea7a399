"""The soft-versus-hard comparison: one task, several methods, equal terms.

>>> from orthoopt import compare
>>> comp = compare.run("pca", methods=["soft", "hard"], seeds=1, quick=True)
>>> print(compare.table(comp))

The command line is ``python -m orthoopt compare`` (``--help``).
"""

from .harness import Comparison, RunResult, multiplier_threshold, orthogonality, run, summarize
from .landing import Landing, landing_field, safe_step_size
from .methods import METHODS, Settings, build_optimizers
from .report import table, write
from .tasks import TASKS, Problem, Task, get_task

__all__ = [
    "run",
    "summarize",
    "table",
    "write",
    "Comparison",
    "RunResult",
    "multiplier_threshold",
    "orthogonality",
    "Landing",
    "landing_field",
    "safe_step_size",
    "METHODS",
    "Settings",
    "build_optimizers",
    "TASKS",
    "Task",
    "Problem",
    "get_task",
]
