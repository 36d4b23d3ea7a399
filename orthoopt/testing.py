"""Helpers for testing code that uses orthoopt (and orthoopt's own suite).

:class:`RowBlocks` is a layout of row blocks of unequal sizes, the shape of the fused
projections that composite layouts describe: every consumer of the constraint must work on
its pieces (:mod:`orthoopt.pieces`) as on separate parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from . import pieces
from .layout import Layout, resolve_layout

__all__ = ["RowBlocks", "resolving"]


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
