"""What the benchmarks share: their clocks, where a run happened, the text table, the report."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["CLOCKS", "NotAvailable", "sync", "machine", "human_bytes", "or_na", "render", "publish"]

# CPU clocks: wall time, or the process's CPU time (all its threads), which leaves out the
# time other processes hold the cores (steadier on a shared machine; with one thread it is
# the step's own time, with more it adds up their work).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class NotAvailable(Exception):
    """A model or contender this environment cannot run: reported as n/a, with the reason."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine(device: torch.device, clock: str) -> dict:
    """Where and when a benchmark ran: the first entries of its report's ``meta``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "command": " ".join(sys.argv),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": clock if device.type == "cpu" else "cuda events",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def human_bytes(n: int | None) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (``n/a`` for None)."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def or_na(x: float | None, spec: str = ".3f") -> str:
    """``x`` formatted by ``spec``, ``n/a`` for None."""
    return "n/a" if x is None else format(x, spec)


def render(
    head: Sequence[str], rows: Sequence[Sequence[object]], *, right: bool = True, rule: bool = True
) -> list[str]:
    """The lines of a text table, each column as wide as its widest cell (right-aligned, or left)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    align = str.rjust if right else str.ljust
    lines = ["  ".join(align(str(x), w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def publish(report: dict, out: str, table: str) -> None:
    """Write ``report`` as JSON to ``out`` and print ``table``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(table)
    print(f"wrote {out}")
