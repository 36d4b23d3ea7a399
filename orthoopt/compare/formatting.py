"""How the comparison's reports write numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

__all__ = ["fmt", "pm"]


def fmt(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (scientific below 1e-2 and from 1e4), ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"
    return str(x)


def pm(values: Iterable[float | None], digits: int = 3) -> str:
    """``mean ± std`` of the values that are not None (the sample std; the mean alone for one
    value, ``-`` for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(statistics.stdev(values), 2)}"
