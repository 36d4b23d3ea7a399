"""Deprecated: :mod:`orthoopt.bench.models` (this module path goes in the next release)."""

import sys
import warnings

from .bench import models

warnings.warn(
    "orthoopt.bench_models is deprecated; import orthoopt.bench.models instead", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = models
