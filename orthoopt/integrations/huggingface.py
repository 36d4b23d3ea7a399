"""Hugging Face ``Trainer``: the orthogonality errors (and β under ``ortho='auto'``) in its logs.

::

    trainer.create_optimizer()
    orthoopt.constrain_(trainer.optimizer, model, ortho=3.0, exclude=["classifier"])
    trainer.add_callback(OrthoCallback(trainer))
    trainer.train()

Importing this module imports ``transformers``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from . import orthogonality_metrics

__all__ = ["OrthoCallback"]


class OrthoCallback(TrainerCallback):
    """At each of the Trainer's logging steps (``logging_steps``), logs
    :func:`~orthoopt.integrations.orthogonality_metrics` of its optimizer through
    ``trainer.log``, so that every ``report_to`` integration and ``state.log_history`` get them.

    It needs the trainer because a callback's own ``on_log`` comes after the reporting
    integrations have already sent the step's logs.
    """

    def __init__(self, trainer: Any, per_parameter: bool = True, prefix: str = "ortho"):
        self.trainer = trainer
        self.per_parameter = per_parameter
        self.prefix = prefix

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if control.should_log:
            optimizer = optimizer if optimizer is not None else self.trainer.optimizer
            self.trainer.log(orthogonality_metrics(optimizer, self.prefix, self.per_parameter))
