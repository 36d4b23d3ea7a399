"""Deprecated: :mod:`orthoopt.bench.iteration` (this module path goes in the next release)."""

import sys
import warnings

from .bench import iteration

warnings.warn(
    "orthoopt.bench_iteration is deprecated; import orthoopt.bench.iteration instead", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = iteration
