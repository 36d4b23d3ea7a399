"""orthoopt: group orthogonality for PyTorch training, soft (L1 penalty) or hard (Stiefel)."""

from .audit import audit
from .guard import OrthogonalityWarning
from .layout import Layout
from .optim import (
    OrthoAdam,
    OrthoAdamW,
    OrthoMixin,
    OrthoSGD,
    named_orthogonality_errors,
    orthogonalize,
    param_groups,
    project_,
)
from .penalty import (
    frobenius_orthogonality,
    frobenius_orthogonality_grad,
    l1_orthogonality,
    l1_orthogonality_grad,
    orthogonality_error,
)
from .schedulers import load_scheduler_state
from .swap import constrain_

__all__ = [
    "Layout",
    "audit",
    "OrthoAdam",
    "OrthoAdamW",
    "OrthoMixin",
    "OrthoSGD",
    "OrthogonalityWarning",
    "constrain_",
    "load_scheduler_state",
    "named_orthogonality_errors",
    "orthogonalize",
    "param_groups",
    "project_",
    "l1_orthogonality",
    "l1_orthogonality_grad",
    "frobenius_orthogonality",
    "frobenius_orthogonality_grad",
    "orthogonality_error",
]
__version__ = "0.1.0"
