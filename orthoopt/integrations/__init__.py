"""The constraint in the logs that users of training frameworks read.

:func:`orthogonality_metrics` is what both callbacks log; the callbacks live in their own
modules, :mod:`orthoopt.integrations.huggingface` (a ``transformers.TrainerCallback``) and
:mod:`orthoopt.integrations.lightning` (a Lightning ``Callback``), so that neither framework
is imported unless its callback is.
"""

from __future__ import annotations

from typing import Any

from ..auto import AUTO_SAFETY
from ..optim import OrthoMixin
from ..options import param_key
from ..wrappers import unwrap

__all__ = ["orthogonality_metrics"]


def orthogonality_metrics(optimizer: Any, prefix: str = "ortho", per_parameter: bool = True) -> dict[str, float]:
    """``{f"{prefix}/max_error": ..., f"{prefix}/error/{name}": ..., f"{prefix}/beta/{name}": ...}``.

    The error of a parameter is ``max |Φᵢᵀ Φᵢ − I|`` over its matrices
    (:meth:`~orthoopt.optim.OrthoMixin.orthogonality_errors`); β is the largest one in use
    over its matrices under ``ortho='auto'`` (from the second step on; :mod:`orthoopt.auto`).
    ``per_parameter=False`` keeps only the largest error and β.  ``optimizer`` may be inside
    a framework's wrapper.  On FSDP2-sharded parameters this is a collective (every rank).
    """
    opt = unwrap(optimizer)
    if not isinstance(opt, OrthoMixin):
        raise TypeError(
            f"orthogonality_metrics got a plain {type(opt).__name__}: turn it into an orthoopt optimizer with "
            "orthoopt.constrain_(optimizer, model, ortho=...) first"
        )
    errors = opt.orthogonality_errors()
    betas = {}
    for gi, group in enumerate(opt.param_groups):
        if group["ortho"] != "auto":
            continue
        for i, p in enumerate(group["params"]):
            estimate = opt.state.get(p, {}).get("ortho_multiplier")
            if estimate is not None and estimate.numel():
                betas[param_key(group, i, gi)] = AUTO_SAFETY * float(estimate.max())
    out = {}
    if errors:
        out[f"{prefix}/max_error"] = max(errors.values())
    if betas:
        out[f"{prefix}/max_beta"] = max(betas.values())
    if per_parameter:
        out.update({f"{prefix}/error/{name}": value for name, value in errors.items()})
        out.update({f"{prefix}/beta/{name}": value for name, value in betas.items()})
    return out
