"""The real optimizer inside the wrappers that training frameworks put around it.

accelerate's ``AcceleratedOptimizer`` (what Hugging Face's ``Trainer.optimizer`` is once
training has started), Lightning's ``LightningOptimizer`` and Fabric's ``_FabricOptimizer``
hold the optimizer the user built and forward ``step`` to it; the latter two even pass
``isinstance`` checks for its class, but not its attributes.  orthoopt reads and changes the
optimizer inside.  The wrappers are recognised by class, without importing their packages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["unwrap", "WRAPPERS", "is_instance_by_name"]

# (package, class name) of each wrapper; each exposes the optimizer it holds as ``.optimizer``.
WRAPPERS = (
    ("accelerate", "AcceleratedOptimizer"),
    ("pytorch_lightning", "LightningOptimizer"),
    ("lightning", "LightningOptimizer"),
    ("lightning_fabric", "_FabricOptimizer"),
    ("lightning", "_FabricOptimizer"),
)


def is_instance_by_name(obj: Any, classes: Iterable[tuple[str, str]]) -> bool:
    """Whether ``obj``'s class or a base of it is one of ``classes``, ``(package, class name)``
    pairs, without importing their packages."""
    return any(
        cls.__name__ == name and cls.__module__.split(".")[0] == package
        for cls in type(obj).__mro__
        for package, name in classes
    )


def unwrap(obj: Any) -> Any:
    """The optimizer inside ``obj`` (through nested wrappers), or ``obj`` itself."""
    seen = set()
    while is_instance_by_name(obj, WRAPPERS) and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj.optimizer
    return obj
