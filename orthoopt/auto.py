r"""``ortho='auto'``: β from a running estimate of the exact-penalty threshold.

The decoupled L1 step is exact (its fixed points on the manifold are the constrained
stationary points) once :math:`\beta > \max|\Lambda|/2`, with
:math:`\Lambda = \operatorname{sym}(\Phi^\top u)` and :math:`u` the base optimizer's update
per unit learning rate.  Each step estimates that threshold per matrix from its own update,

.. math::
    \lambda_i = \tfrac12 \max_{jk} \big|\operatorname{sym}(\Phi_i^{-\top} u_i)\big|_{jk},
    \qquad u_i = (\Phi_i^{+} - \Phi_i^{-}) / \gamma,

keeps a running max that decays by ``AUTO_DECAY`` per step (so that it can follow
multipliers that shrink as training settles) in the optimizer state as
``ortho_multiplier``, and uses ``β_i = AUTO_SAFETY`` times it.  The functions are split at
the sum over rows of :math:`\Phi_i^\top u_i`, so that a sharded parameter can all-reduce
it in between (:mod:`orthoopt.distributed`).
"""

from __future__ import annotations

import torch

__all__ = ["AUTO_SAFETY", "AUTO_DECAY", "STATE", "update_products", "threshold", "remember", "remember_all"]

# β is this factor times the estimated threshold (twice it, as the experiments use).
AUTO_SAFETY = 2.0
AUTO_DECAY = 0.99
# The optimizer-state key of the running estimate.
STATE = "ortho_multiplier"


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def update_products(
    before: torch.Tensor, after: torch.Tensor, lr: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Φ⁻ᵀ u`` per matrix, ``(m, n, n)``, with ``u = (Φ⁺ - Φ⁻) / lr`` (``lr``: one per matrix);
    a sum over the rows of ``Φ``, so row blocks of the matrices give partial sums.

    ``out``: a workspace like ``before`` for ``u`` (used where no widening is needed; it may
    be ``after`` itself)."""
    wide = _wide(before.dtype)
    lr = lr.to(wide).clamp_min(torch.finfo(wide).tiny)[:, None, None]
    if out is not None and before.dtype == wide:
        u = torch.sub(after, before, out=out).div_(lr)
    else:
        u = (after.to(wide) - before.to(wide)) / lr
    return torch.bmm(before.to(wide).mT, u)


def threshold(products: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``max|sym(Φᵀu)|/2`` per matrix from :func:`update_products`; 0 where ``ok`` is False
    (a non-finite matrix, or a zero learning rate that says nothing about the update)."""
    lam = (products + products.mT).abs().amax((-2, -1)) / 4
    return torch.where(ok, lam, 0)


def remember_all(
    states: list[dict],
    lam: torch.Tensor,
    counts: list[int],
    keys: list[str] | None = None,
    *,
    skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`remember` for several parameters (or pieces) at once (``counts``: matrices of
    each; ``keys``: each one's state key, :data:`STATE` by default), with one operation where
    every one of them has an estimate; each state keeps its part.  ``skipped``: a bool tensor,
    True where this step does not count (a GradScaler's ``found_inf``): the estimates stay."""
    keys = keys or [STATE] * len(states)
    if len(states) == 1:
        return remember(states[0], lam, keys[0], skipped=skipped)
    olds = [state.get(key) for state, key in zip(states, keys)]
    if any(old is None for old in olds):
        parts = lam.split(counts)
        return torch.cat([remember(st, part, key, skipped=skipped) for st, part, key in zip(states, parts, keys)])
    old = torch.cat(olds).to(lam)
    est = torch.maximum(lam, AUTO_DECAY * old)
    if skipped is not None:
        est = torch.where(skipped, old, est)
    for state, part, key in zip(states, est.split(counts), keys):
        state[key] = part
    return est


def remember(state: dict, lam: torch.Tensor, key: str = STATE, *, skipped: torch.Tensor | None = None) -> torch.Tensor:
    """The running estimate for one parameter's matrices: ``max(λ, AUTO_DECAY · previous)``,
    kept in ``state[key]`` (``state['ortho_multiplier']``, suffixed for a later piece); where
    ``skipped`` is True, the previous one."""
    old = state.get(key)
    est = lam if old is None else torch.maximum(lam, AUTO_DECAY * old.to(lam))
    if skipped is not None and old is not None:
        est = torch.where(skipped, old.to(lam), est)
    state[key] = est
    return est
