"""argparse types for the command line (``orthoopt compare``, ``orthoopt bench``).

Each checks one argument when argparse reads it, so that a bad one stops the command before
any work, with argparse's exit code 2 and one line that says what is wrong and what is
allowed.  Each returns the value in the form the command uses.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["whole", "real", "names", "device", "out_dir", "out_file"]


def whole(low: int) -> Callable[[str], int]:
    """A whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return value

    return parse


def real(*, positive: bool) -> Callable[[str], float]:
    """A finite number, > 0 if ``positive`` else >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def names(known: Sequence[str], *, every: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """A comma list of distinct names from ``known``; ``all`` stands for ``every``, where given."""
    allowed = ", ".join(known) + (" or all" if every is not None else "")

    def parse(text: str) -> list[str]:
        given = [n.strip() for n in text.split(",") if n.strip()]
        if every is not None and given == ["all"]:
            return list(every)
        unknown = [n for n in given if n not in known]
        if not given or unknown:
            raise argparse.ArgumentTypeError(
                f"{f'unknown {unknown}' if unknown else 'none given'}; choose from {allowed}"
            )
        twice = [n for i, n in enumerate(given) if n in given[:i]]
        if twice:
            raise argparse.ArgumentTypeError(f"{twice[0]!r} is given twice in {text!r}; name each once")
        return given

    return parse


def device(text: str) -> str:
    """``cpu``, or ``cuda[:N]`` where torch sees that device."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees CUDA devices 0 to {count - 1} only")
    return text


def out_dir(text: str) -> str:
    """A folder that is there or can be made, and can be written to (checked by writing)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder for the results")
    _writable(path)
    return text


def out_file(text: str) -> str:
    """A file path that is not a folder, in a folder that is there or can be made and written to."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    _writable(path.parent)
    return text


def _writable(folder: Path) -> None:
    # The nearest folder that exists must take a new file: os.access alone would say yes to
    # root on a read-only mount, so a temporary file is made there and removed.
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise argparse.ArgumentTypeError(f"cannot write in {str(existing)!r} ({reason})") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {str(existing)!r} (permission denied)")
