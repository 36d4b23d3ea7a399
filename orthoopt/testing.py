"""Helpers for testing code that uses orthoopt (and orthoopt's own suite).

* :func:`accelerator_path`: CPU tensors take exactly the code path of an accelerator's (no
  reads on the host, masks on the device), so that a machine without a GPU runs it;
* :class:`OpCounter` / :func:`count_ops`: the aten operations a call dispatches, among them
  ``_local_scalar_dense``, the host reads (each one a sync on an accelerator);
* :class:`RowBlocks`: a layout of row blocks of unequal sizes, the shape of the fused
  projections that composite layouts describe (every consumer of the constraint must work on
  its pieces, :mod:`orthoopt.pieces`, as on separate parameters), and :func:`resolving`.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import host, pieces
from .layout import Layout, resolve_layout

__all__ = ["accelerator_path", "OpCounter", "count_ops", "HOST_READ", "RowBlocks", "resolving"]

# The aten operation of a read of a tensor's value on the host (item, bool, float, tolist).
HOST_READ = "_local_scalar_dense"


@contextlib.contextmanager
def accelerator_path() -> Iterator[None]:
    """While the block runs, orthoopt's step takes on CPU tensors the path it takes on an
    accelerator's: it reads no value on the host where an accelerator would have to wait for
    it, keeps its masks on the device, and defers the monitor's reading of its statistics to
    its next check.  ``Tensor.tolist`` (which reads a CPU tensor without an aten operation)
    dispatches one ``_local_scalar_dense`` here, as the read of a device tensor is, so that an
    :class:`OpCounter` sees every host read."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        if self.numel():
            torch.ops.aten._local_scalar_dense(self.reshape(-1)[0])
        return original(self)

    previous = host.ACCELERATOR_PATH[0]
    host.ACCELERATOR_PATH[0] = True
    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original
        host.ACCELERATOR_PATH[0] = previous


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name (``ops``), and in
    order (``calls``: name, shapes of the tensor arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.calls.append((name, shapes))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return self.ops[HOST_READ]


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    """The operations ``fn()`` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter


@dataclass(frozen=True)
class RowBlocks(Layout):
    """A 2-D parameter's consecutive row blocks of the given ``sizes``, each constrained on its
    own by the ``'auto'`` rule (its rows where it is wide, its columns where it is tall)."""

    kind: str = "row_blocks"
    sizes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"row_blocks:{','.join(map(str, self.sizes))}"

    def pieces(self, p: torch.Tensor) -> list[tuple[torch.Tensor, Layout]]:
        blocks = p.split(list(self.sizes))
        return [(block, resolve_layout("auto", block.shape, "block")) for block in blocks]

    def check(self, shape, name: str, mode: str = "soft") -> None:
        if len(shape) != 2 or sum(self.sizes) != shape[0]:
            raise ValueError(f"{name}: {self} needs a 2-D parameter of {sum(self.sizes)} rows, got {tuple(shape)}")


@contextlib.contextmanager
def resolving(spec: str, layout: Layout) -> Iterator[None]:
    """While the block runs, the optimizer resolves the layout string ``spec`` to ``layout``
    (a layout that no string names yet, such as a :class:`RowBlocks`)."""
    real = pieces.resolve_layout

    def resolve(given, shape, name):
        if given == spec:
            layout.check(shape, name)
            return layout
        return real(given, shape, name)

    with mock.patch.object(pieces, "resolve_layout", resolve):
        yield
