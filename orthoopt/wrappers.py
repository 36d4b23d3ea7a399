"""The real optimizer inside the wrappers that training frameworks put around it.

accelerate's ``AcceleratedOptimizer`` (what Hugging Face's ``Trainer.optimizer`` is once
training has started), Lightning's ``LightningOptimizer`` and Fabric's ``_FabricOptimizer``
hold the optimizer the user built and forward ``step`` to it; the latter two even pass
``isinstance`` checks for its class, but not its attributes.  orthoopt reads and changes the
optimizer inside.  The wrappers are recognised by class, without importing their packages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap", "WRAPPERS"]

# (package, class name) of each wrapper; each exposes the optimizer it holds as ``.optimizer``.
WRAPPERS = (
    ("accelerate", "AcceleratedOptimizer"),
    ("pytorch_lightning", "LightningOptimizer"),
    ("lightning", "LightningOptimizer"),
    ("lightning_fabric", "_FabricOptimizer"),
    ("lightning", "_FabricOptimizer"),
)


def _is_wrapper(obj: Any) -> bool:
    return any(
        cls.__name__ == name and cls.__module__.split(".")[0] == package
        for cls in type(obj).__mro__
        for package, name in WRAPPERS
    )


def unwrap(obj: Any) -> Any:
    """The optimizer inside ``obj`` (through nested wrappers), or ``obj`` itself."""
    seen = set()
    while _is_wrapper(obj) and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj.optimizer
    return obj
