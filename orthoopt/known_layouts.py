"""The registered layouts of timm's and transformers' fused projections, and their positional modules.

Each entry names the class that owns the weight by its qualified name (nothing is imported
here) and reads the layout off the configuration its forward uses; tests/zoo checks each
one against that forward (:mod:`orthoopt.probe`).
"""

from __future__ import annotations

from .registry import register_layout, register_positional

__all__: list[str] = []
