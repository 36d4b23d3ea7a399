"""The memory of one step of the step benchmark: allocations, transient peak, workspaces.

On CUDA the caching allocator's statistics; on CPU, which keeps none, torch's profiler
attributes each allocation to an op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .common import sync
from .profiling import quiet_profile

__all__ = ["step_memory", "workspace_bytes", "available_bytes"]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def workspace_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes held by the soft step's cached workspaces (0 for an optimizer without them)."""
    plan = getattr(opt, "_ortho_plan", None)
    return plan.workspace_bytes() if plan else 0


def _cuda(step: Callable[[], object], device: torch.device) -> tuple[int, int, int]:
    sync(device)
    stats = torch.cuda.memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    after = torch.cuda.memory_stats(device)
    allocations = after["allocation.all.allocated"] - stats["allocation.all.allocated"]
    allocated = after["allocated_bytes.all.allocated"] - stats["allocated_bytes.all.allocated"]
    return allocations, allocated, torch.cuda.max_memory_allocated(device) - before


def _cpu(step: Callable[[], object]) -> tuple[int, int, int]:
    from torch.profiler import ProfilerActivity

    with quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # An event's self memory nets what it allocated and freed; frees of temporaries
    # land on the enclosing event, so count allocations at its start and frees at its end.
    timeline = sorted(
        (e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    running, peak = 0, 0
    for _, d in timeline:
        running += d
        peak = max(peak, running)
    return sum(1 for _, d in timeline if d > 0), sum(d for _, d in timeline if d > 0), peak


def step_memory(contender, device: torch.device) -> dict:
    """Allocations and transient peak of one step of ``contender`` after warm-up (as
    multiples of its parameters' bytes), and the workspaces its optimizer holds."""
    size = _nbytes(contender.params)
    if contender.prepare is not None:
        contender.prepare()
    if device.type == "cuda":
        allocations, allocated, peak = _cuda(contender.step, device)
    else:
        allocations, allocated, peak = _cpu(contender.step)
    return {
        "allocations_per_step": int(allocations),
        "allocated_per_step_x_params": allocated / size,
        "peak_extra_x_params": peak / size,
        "workspace_x_params": workspace_bytes(contender.optimizer) / size,
        "params_bytes": size,
    }


def available_bytes(device: torch.device) -> int | None:
    """The memory a new run could take on ``device``: CUDA's free memory, the system's available
    memory on Linux (``MemAvailable``), else its physical memory; None where none can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
