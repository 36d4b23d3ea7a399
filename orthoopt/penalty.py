r"""The group orthogonality penalties and their closed-form gradients: pure functions.

For a stack of matrices :math:`\Phi_i \in \mathbb{R}^{l\times n}` (see :mod:`orthoopt.layout`)
with residuals :math:`R_i = \Phi_i^\top\Phi_i - I_n`,

.. math::
    \mathcal{L} = \beta \sum_i \sum_{jk} h\big((R_i)_{jk}\big), \qquad
    \frac{\partial \mathcal{L}}{\partial \Phi_i} = 2\beta\, \Phi_i\, h'(R_i),

with :math:`h = |\cdot|` (so :math:`h' = \operatorname{sign}`, and ``sign(0) = 0`` picks the
minimal-norm subgradient at a kink) or the Huber function of threshold :math:`\delta`,
:math:`h(x) = x^2/(2\delta)` on :math:`[-\delta, \delta]` and :math:`|x| - \delta/2` outside,
whose derivative is :math:`\operatorname{clamp}(x/\delta, -1, 1)`.  The 2 comes from the
symmetry of :math:`R_i`: :math:`d\mu = G : (\Phi^\top d\Phi + d\Phi^\top \Phi) = 2\Phi G : d\Phi`.

Every function works on all groups at once with batched matmuls; half-precision inputs
have their Gram matrices accumulated in float32.
"""

from __future__ import annotations

import torch

from .layout import as_matrices

__all__ = [
    "l1_orthogonality",
    "l1_orthogonality_grad",
    "frobenius_orthogonality",
    "frobenius_orthogonality_grad",
    "orthogonality_error",
    "residual",
    "direction",
    "huber",
    "safe_step_size",
]

_HALF = (torch.float16, torch.bfloat16)
# Largest relative change of Φ that one penalty step may make: Φ ← Φ (I - ηS) with
# ‖ηS‖₂ ≤ 1/4 keeps every singular value within a factor [3/4, 5/4] of its old value.
MAX_MULTIPLIER_STEP = 0.25


def residual(mats: torch.Tensor) -> torch.Tensor:
    """``R_i = Φ_iᵀ Φ_i - I`` for a stack ``(m, l, n)``; float32 for half-precision stacks."""
    return _residual(mats)


def _residual(mats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # ``out``: a reused (m, n, n) workspace of the residual's dtype (the optimizer's hot path).
    if mats.dtype in _HALF:
        if mats.is_cuda:
            # bf16/fp16 tensor-core matmul with a float32 output (fp32 accumulation).
            gram = torch.bmm(mats.mT, mats, out_dtype=torch.float32, out=out)
        else:
            wide = mats.float()
            gram = torch.bmm(wide.mT, wide, out=out)
    else:
        gram = torch.bmm(mats.mT, mats, out=out)
    gram.diagonal(dim1=-2, dim2=-1).sub_(1)
    return gram


def direction(r: torch.Tensor, smoothing: float | torch.Tensor = 0.0, penalty: str = "l1") -> torch.Tensor:
    """``h'(R)`` in place of ``R``: sign, clamped ``R/δ`` (Huber), or ``2R`` (squared Frobenius)."""
    return _direction(r, smoothing, penalty, out=r)


def _direction(
    r: torch.Tensor, smoothing: float | torch.Tensor, penalty: str, out: torch.Tensor | None
) -> torch.Tensor:
    # ``out=None`` leaves ``r`` alone and returns a new tensor.
    if penalty == "frobenius":
        return torch.mul(r, 2, out=out)
    if isinstance(smoothing, torch.Tensor) or smoothing > 0:
        return torch.div(r, smoothing, out=out).clamp_(-1, 1)
    return torch.sign(r, out=out)


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber function scaled to slope ±1: ``x²/(2δ)`` inside ``[-δ, δ]``, ``|x| - δ/2`` outside."""
    a = x.abs()
    return torch.where(a <= delta, x * x / (2 * delta), a - delta / 2)


def safe_step_size(r: torch.Tensor, s: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    r"""Per-matrix step :math:`\eta_i` for :math:`\Phi_i \leftarrow \Phi_i (I - \eta_i S_i)`.

    .. math::
        \eta_i = \min\Big(\eta,\; \frac{\langle R_i, S_i\rangle}{2\|S_i\|_F^2},\;
                 \frac{1/4}{\|S_i\|_\infty}\Big)

    The middle term is the step that removes the part of :math:`R_i` along :math:`S_i` in the
    linearisation :math:`R_i^+ \approx R_i - 2\eta S_i`, so the step never overshoots the
    manifold (a plain sign step chatters at distance :math:`\eta\|S\|` and diverges once
    :math:`\eta n` is of order one).  The last term bounds :math:`\|\eta S\|_2` (the
    max-row-sum norm bounds the spectral norm of a symmetric matrix), so one step changes
    each singular value of :math:`\Phi_i` by at most 25%.  ``r`` and ``s`` are ``(m, n, n)``.
    """
    return _safe_step_size(r, s, eta)


def _safe_step_size(
    r: torch.Tensor, s: torch.Tensor, eta: torch.Tensor | float, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    # ``scratch`` (m, n, n) holds the elementwise products; passing ``r`` itself saves a
    # workspace when the caller no longer needs ``r``.
    prod = torch.mul(r, s, out=scratch)
    along = prod.sum((-2, -1))
    norm2 = torch.mul(s, s, out=prod).sum((-2, -1))
    rowsum = torch.abs(s, out=prod).sum(-1).amax(-1)
    tiny = torch.finfo(r.dtype).tiny
    projection = along.div_(norm2.mul_(2).clamp_min_(tiny))
    # 1/4 is a power of two, so reciprocal-then-scale rounds exactly as 0.25 / rowsum.
    spectral = rowsum.clamp_min_(tiny).reciprocal_().mul_(MAX_MULTIPLIER_STEP)
    return torch.minimum(projection, spectral, out=projection).clamp_(max=eta).clamp_(min=0)


def _check(phi: torch.Tensor, smoothing: float) -> None:
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"phi must be a torch.Tensor, got {type(phi).__name__}")
    if not phi.is_floating_point():
        raise TypeError(f"phi must be a real floating-point tensor, got dtype {phi.dtype}")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0 (0 means the exact L1 penalty), got {smoothing}")


def _cast_back(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def l1_orthogonality(
    phi: torch.Tensor, beta: float = 1.0, *, group_dim: int | None = 1, smoothing: float = 0.0
) -> torch.Tensor:
    """``β Σ_i Σ_jk h(Φ_iᵀΦ_i - I)_jk`` with ``h = |·|``, or Huber when ``smoothing > 0``.

    ``phi`` is 3-D with ``Φ_i = phi.select(group_dim, i)`` (``(l, m, n)`` and ``group_dim=1``
    is the seed's convention), or 2-D with ``group_dim=None``.  Differentiable by autograd.
    """
    _check(phi, smoothing)
    r = residual(as_matrices(phi, group_dim))
    h = huber(r, smoothing) if smoothing > 0 else r.abs()
    return _cast_back(beta * h.sum(), phi)


def l1_orthogonality_grad(
    phi: torch.Tensor, beta: float = 1.0, *, group_dim: int | None = 1, smoothing: float = 0.0
) -> torch.Tensor:
    """``∂L/∂phi`` in closed form, ``2β Φ_i sign(Φ_iᵀΦ_i - I)`` per group, shaped like ``phi``."""
    _check(phi, smoothing)
    return _grad(phi, beta, group_dim, smoothing, "l1")


def frobenius_orthogonality(phi: torch.Tensor, beta: float = 1.0, *, group_dim: int | None = 1) -> torch.Tensor:
    """The squared-Frobenius baseline ``β Σ_i ‖Φ_iᵀΦ_i - I‖_F²``."""
    _check(phi, 0.0)
    r = residual(as_matrices(phi, group_dim))
    return _cast_back(beta * (r * r).sum(), phi)


def frobenius_orthogonality_grad(phi: torch.Tensor, beta: float = 1.0, *, group_dim: int | None = 1) -> torch.Tensor:
    """``4β Φ_i (Φ_iᵀΦ_i - I)`` per group, shaped like ``phi``."""
    _check(phi, 0.0)
    return _grad(phi, beta, group_dim, 0.0, "frobenius")


def _grad(phi, beta, group_dim, smoothing, penalty):
    mats = as_matrices(phi, group_dim)
    s = direction(residual(mats), smoothing, penalty)
    out = torch.bmm(mats, _cast_back(s, mats)).mul_(2 * beta)
    if group_dim is None:
        return out.squeeze(0)
    return out.movedim(0, group_dim)


@torch.no_grad()
def orthogonality_error(phi: torch.Tensor, *, group_dim: int | None = 1) -> torch.Tensor:
    """One number per group: ``max_jk |Φ_iᵀΦ_i - I|_jk`` (shape ``(m,)``, float32 or wider)."""
    _check(phi, 0.0)
    return residual(as_matrices(phi, group_dim)).abs().amax((-2, -1))
