"""Where the step may read tensor values on the host for free.

On CPU a tensor's values are in host memory: reading them costs nothing, and the step reads
a few to skip work (the mask of non-finite matrices) and to report at once.  On an
accelerator every read stalls the host until the device has caught up (a sync), so there the
step reads nothing: masks stay on the device and the monitor (:mod:`orthoopt.guard`) reads
its statistics at its cadence.  Under ``torch.compile`` nothing is read either (a read would
break the graph).  :func:`orthoopt.testing.accelerator_path` makes CPU tensors take the
accelerator's path, so that the suite can run it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["reads_free", "read", "copy_to_host", "read_copy", "capturing"]

# Set by orthoopt.testing.accelerator_path: CPU tensors take the accelerator's path.
ACCELERATOR_PATH = [False]
# Tensor.tolist as torch defines it (accelerator_path counts the reads of device tensors).
_TOLIST = torch.Tensor.tolist


def reads_free(t: torch.Tensor) -> bool:
    """Whether reading ``t`` on the host is free (a CPU tensor, in eager mode)."""
    return t.device.type == "cpu" and not ACCELERATOR_PATH[0] and not torch.compiler.is_compiling()


def read(t: torch.Tensor) -> list[float]:
    """``t``'s values as Python numbers (one copy to the host: a sync on an accelerator)."""
    return t.reshape(-1).tolist()


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``t`` to host memory without waiting for it: ``(the host copy, an event
    that says when it has arrived)``, or no event where the copy is done at once (CPU)."""
    if t.device.type == "cuda":
        copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        copy.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return copy, event
    if t.device.type == "cpu":
        return t.clone(), None
    return t.to("cpu"), None  # other accelerators: a plain copy (it waits)


def read_copy(copy: torch.Tensor) -> list:
    """The values of a host copy from :func:`copy_to_host`, once it has arrived (free: no
    operation on any device)."""
    return _TOLIST(copy)


_CUDA = torch.cuda.is_available()


def capturing() -> bool:
    """Whether a CUDA graph is being captured now: the step's Python runs once, at capture,
    and not at the graph's replays, so nothing that keeps count on the host may run then."""
    return _CUDA and torch.cuda.is_current_stream_capturing()
