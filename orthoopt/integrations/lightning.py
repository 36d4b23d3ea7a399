"""Lightning: the orthogonality errors (and β under ``ortho='auto'``) in the trainer's loggers.

::

    class Model(pl.LightningModule):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return orthoopt.constrain_(opt, self, ortho=3.0, exclude=["head"])

    pl.Trainer(callbacks=[OrthoCallback()]).fit(Model())

Lightning comes as ``pytorch_lightning`` and as ``lightning`` (``import lightning.pytorch as
pl``); a Trainer runs the callbacks of its own package.  The callback is one of each package
that is installed, so that it works with either Trainer; importing this module imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..optim import OrthoMixin
from ..wrappers import unwrap
from . import orthogonality_metrics

__all__ = ["OrthoCallback"]

PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def _callback_bases() -> tuple[type, ...]:
    """``Callback`` of each Lightning package that is installed and imports."""
    bases, failures = [], []
    for name in PACKAGES:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError as e:
            failures.append(f"{name}: {e}")
    if not bases:
        raise ImportError(
            "orthoopt.integrations.lightning needs Lightning: pip install pytorch-lightning (or lightning)"
            + "".join(f"; {failure}" for failure in failures)
        )
    return tuple(bases)


class OrthoCallback(*_callback_bases()):  # type: ignore[misc]
    """After every ``every_n_steps`` optimizer steps (default: the trainer's
    ``log_every_n_steps``), logs :func:`~orthoopt.integrations.orthogonality_metrics` of each
    orthoopt optimizer to every logger of the trainer (``logger.log_metrics``, as Lightning's
    ``LearningRateMonitor`` does), at ``trainer.global_step``.  With several optimizers the
    keys are prefixed ``ortho/opt{i}``.
    """

    def __init__(self, every_n_steps: int | None = None, per_parameter: bool = True, prefix: str = "ortho"):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a whole number >= 1 or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.per_parameter = per_parameter
        self.prefix = prefix
        self._last_step = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if not trainer.loggers or not every or not step or step % every or step == self._last_step:
            return  # (several batches share a step under gradient accumulation; step 0 has not stepped)
        self._last_step = step
        ortho = [opt for opt in trainer.optimizers if isinstance(unwrap(opt), OrthoMixin)]
        metrics: dict[str, float] = {}
        for i, opt in enumerate(ortho):
            prefix = self.prefix if len(ortho) == 1 else f"{self.prefix}/opt{i}"
            metrics.update(orthogonality_metrics(opt, prefix, self.per_parameter))
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
