"""Deprecated: :mod:`orthoopt.bench.contenders` (this module path goes in the next release)."""

import sys
import warnings

from .bench import contenders

warnings.warn(
    "orthoopt.bench_contenders is deprecated; import orthoopt.bench.contenders instead",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = contenders
