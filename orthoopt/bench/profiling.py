"""torch's profiler without its bookkeeping lines on the terminal.

Kineto, the library under ``torch.profiler``, writes a line to the process's standard error
each time a profile starts and stops (``USDT:<date> <pid>:<tid> SyncActivityProfilerHandler.cpp:52]
profiler_start``, and ``STAGE:`` lines at higher verbosity), from C++ straight to file
descriptor 2, below Python's ``sys.stderr``.  Its log level (``KINETO_LOG_LEVEL``) is read
once, when the profiler first starts in a process, so it cannot be lowered afterwards: the
lines are kept off instead by pointing descriptor 2 at a temporary file for the duration of
the profile, and everything else written there meanwhile goes on to standard error.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_profile", "is_kineto_line"]

_KINETO_LINE = re.compile(rb"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] ")


def is_kineto_line(line: bytes) -> bool:
    """Whether ``line`` is one of kineto's start/stop bookkeeping lines."""
    return bool(_KINETO_LINE.match(line))


@contextmanager
def _stderr_without_kineto() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                sink.seek(0)
                kept = b"".join(line for line in sink.read().splitlines(keepends=True) if not is_kineto_line(line))
                while kept:
                    kept = kept[os.write(2, kept) :]
    finally:
        os.close(saved)


@contextmanager
def quiet_profile(**kwargs) -> Iterator[object]:
    """``torch.profiler.profile(**kwargs)`` with kineto's start and stop lines kept off standard error."""
    from torch.profiler import profile

    with _stderr_without_kineto(), profile(**kwargs) as prof:
        yield prof
