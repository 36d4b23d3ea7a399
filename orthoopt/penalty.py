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

import math

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
    "penalty_step",
    "max_abs",
    "steppable",
    "largest_residual",
    "max_error",
    "polar",
    "spectral_norm",
    "start_vector",
    "polar_correction",
]

_HALF = (torch.float16, torch.bfloat16)
# Largest relative change of Φ that one penalty step may make: Φ ← Φ (I - ηS) with
# ‖ηS‖₂ ≤ 1/4 keeps every singular value within a factor [3/4, 5/4] of its old value.
MAX_MULTIPLIER_STEP = 0.25
# The spectral estimate (one power iteration, from below) is padded by this factor.
SPECTRAL_PAD = 1.25
# The power iteration's vector is rescaled to this norm (torch.renorm: one operation, and a
# zero vector stays zero): small enough that no product of it with S overflows.
_UNIT = 2.0**-20
# The host's skip of the cap asks for this much room below it, more than the rounding of a norm.
_CAP_MARGIN = 1 - 1e-3
# Beyond this cutoff c, clamp(R, -c, c) is divided by c before the power iteration, whose
# squares would otherwise leave the float's range (n^1.5·c must stay well below it).
_LARGE_CUTOFF = 2.0**40


def residual(
    mats: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    transposed: torch.Tensor | None = None,
    minus_eye: torch.Tensor | None = None,
) -> torch.Tensor:
    """``R_i = Φ_iᵀ Φ_i - I`` for a stack ``(m, l, n)``; float32 for half-precision stacks.

    ``out``: an ``(m, n, n)`` workspace of the result's dtype; ``transposed`` (``mats.mT``)
    and ``minus_eye`` (``-I``, ``(n, n)`` in the result's dtype): views and constants the
    optimizer keeps, so that a step makes none of them.  One ``baddbmm``: ``-I + ΦᵀΦ``.
    """
    if mats.dtype in _HALF and mats.is_cuda:
        # bf16/fp16 tensor-core matmul with a float32 output (fp32 accumulation).
        mt = mats.mT if transposed is None else transposed
        gram = torch.bmm(mt, mats, out_dtype=torch.float32, out=out)
        return gram.add_(_minus_eye(gram) if minus_eye is None else minus_eye)
    if mats.dtype in _HALF:
        mats = mats.float()
        transposed = None
    mt = mats.mT if transposed is None else transposed
    eye = _minus_eye(mats) if minus_eye is None else minus_eye
    return torch.baddbmm(eye, mt, mats, out=out)


def _minus_eye(like: torch.Tensor) -> torch.Tensor:
    n = like.shape[-1]
    return torch.eye(n, dtype=like.dtype, device=like.device).neg_()


def direction(
    r: torch.Tensor, smoothing: float | torch.Tensor = 0.0, penalty: str = "l1", *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``h'(R)``: sign, clamped ``R/δ`` (Huber), or ``2R`` (squared Frobenius); written into
    ``out``, or into ``r`` itself when ``out`` is None."""
    if out is None or out is r:  # in place: also what autograd can differentiate
        if penalty == "frobenius":
            return r.mul_(2)
        if isinstance(smoothing, torch.Tensor) or smoothing > 0:
            return r.div_(smoothing).clamp_(-1, 1)
        return r.sign_()
    if penalty == "frobenius":
        return torch.mul(r, 2, out=out)
    if isinstance(smoothing, torch.Tensor) or smoothing > 0:
        return torch.div(r, smoothing, out=out).clamp_(-1, 1)
    return torch.sign(r, out=out)


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber function scaled to slope ±1: ``x²/(2δ)`` inside ``[-δ, δ]``, ``|x| - δ/2`` outside."""
    a = x.abs()
    return torch.where(a <= delta, x * x / (2 * delta), a - delta / 2)


def safe_step_size(
    r: torch.Tensor, s: torch.Tensor, eta: torch.Tensor | float, *, start: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-matrix step :math:`\eta_i` for :math:`\Phi_i \leftarrow \Phi_i (I - \eta_i S_i)`, for any
    direction ``s`` of the residual ``r`` (both ``(m, n, n)``):

    .. math::
        \eta_i = \min\Big(\eta,\; \frac{\max_{jk}|R_i|}{2\max_{jk}|S_i|},\;
                 \frac{1/4}{\|S_i\|_2}\Big)

    In the linearisation :math:`R_i^+ \approx R_i - 2\eta S_i` (``S`` has the signs of ``R``)
    the middle term is the largest step after which no entry of :math:`R_i` is further from
    zero than the largest one was: the worst entry lands on zero and the others at most
    overshoot to its size.  So the error ``max|R|`` cannot grow to first order, and the
    chatter of a sign step is bounded by the current error instead of by ``η``.  The last
    term caps the relative change of :math:`\Phi_i` per step at about 25% (every singular
    value stays within a factor [3/4, 5/4], up to the estimate of :func:`spectral_norm`),
    which bounds what the linearisation leaves out and keeps the step from diverging for
    any ``lr·β``.  For the directions of :func:`penalty_step` the middle term is known in
    closed form (see there), which is how the optimizer takes it; this function is the
    general form, for other directions.
    """
    tiny = torch.finfo(r.dtype).tiny
    no_overshoot = max_abs(r) / (2 * max_abs(s)).clamp_min(tiny)
    bounded = MAX_MULTIPLIER_STEP / spectral_norm(s, start=start).clamp_min(tiny)
    return torch.minimum(no_overshoot, bounded).clamp_(max=eta).nan_to_num_(nan=0.0)


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """``max_jk |x_jk|`` per matrix of an ``(m, n, n)`` stack; NaN where a matrix holds one."""
    # max(amax, -amin): no (m, n, n) temporary for |x|, and far faster than vector_norm(inf)
    return torch.maximum(x.amax((-2, -1)), x.amin((-2, -1)).neg_())


def largest_residual(kind: str, dtype: torch.dtype) -> float:
    """The largest ``max|R|`` whose direction ``h'(R)`` is finite in ``dtype``: the float's max,
    or half of it for the Frobenius penalty, whose ``2R`` overflows beyond."""
    top = torch.finfo(dtype).max
    return top / 2 if kind == "frobenius" else top


def steppable(r_max: torch.Tensor, kind: str) -> torch.Tensor:
    """Which matrices can take a penalty step: ``max|R|`` (from :func:`max_abs`) at most
    :func:`largest_residual`; False where it is NaN or Inf."""
    return r_max <= largest_residual(kind, r_max.dtype)


def penalty_step(
    r: torch.Tensor,
    mats: torch.Tensor,
    smoothing: float,
    kind: str,
    eta: torch.Tensor | float,
    *,
    out: torch.Tensor | None = None,
    finite: torch.Tensor | bool | None = None,
    r_max: torch.Tensor | None = None,
    in_place: bool = False,
    eta_top: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``-η_i Φ_i S_i`` for a stack, the step of :func:`safe_step_size` for the directions
    ``S = clamp(R / c, -1, 1)`` with ``c = max(δ, 2η)`` (L1 and Huber, :func:`_no_crossing`) and
    ``S = 2R`` (squared Frobenius), taken in few operations:

    * the no-overshoot term needs no reduction: for L1 and Huber it is
      :math:`\max(\max|R|, c)/2 \ge c/2 \ge \eta`, never binding, and for Frobenius it is
      :math:`1/4` (:math:`\max|R| / 2\max|2R|`);
    * :math:`\|S_i\|_2` is estimated by one power iteration from the fixed start
      :math:`v_0 = \cos(2.399963\,k)`, on :math:`S' = \operatorname{clamp}(R, -c, c) = cS` (L1,
      Huber) or :math:`S' = R/2^{e}` (Frobenius, :math:`2^e` the power of two below
      :math:`\max|R|`, so that nothing overflows): :math:`w = S'v_0`,
      :math:`\hat w = w/(\|w\| + 10^{-7})` (as ``torch.renorm`` normalises, up to its scale),
      :math:`\|S'\|_2 \approx` ``SPECTRAL_PAD`` :math:`\cdot\|S'\hat w\|`;
    * the cap is skipped where it cannot bind whatever ``R`` is: for L1 and Huber
      :math:`|S| \le 1`, so :math:`\|S\|_2 \le n` and the estimate at most ``SPECTRAL_PAD``
      times that; with ``4·SPECTRAL_PAD·n·η ≤ 1`` the step is :math:`-\eta\,\Phi S` (``eta_top``:
      the largest η, where ``eta`` is a tensor of host numbers).

    ``r`` is the residual of the *whole* matrices; ``mats`` may be row blocks of them (a
    shard): the step of each block is its rows of the whole step.  Matrices whose residual
    is not finite (or, for the Frobenius penalty, whose ``2R`` is not) get a zero step, so
    that a NaN stays where it is (``finite``: which are :func:`steppable`, as a tensor that
    broadcasts against the stack, or True when the caller has checked them all; ``r_max``:
    :func:`max_abs` of ``r``, if the caller has it, of shape ``(m,)`` or ``(m, 1, 1)``).
    ``in_place``: ``r`` is spent (S formed in its place); ``out``: a workspace like ``mats``;
    ``start``: :math:`v_0` as an ``(m, n, 1)`` tensor, if the caller keeps one.

    A residual or direction of another kind plugs in here: a new ``kind`` names its
    direction and its closed-form no-overshoot term, or takes :func:`safe_step_size`.
    """
    if finite is None or kind == "frobenius":
        r_max = max_abs(r) if r_max is None else r_max
        r_max = r_max if r_max.dim() == 3 else r_max.reshape(-1, 1, 1)
    if finite is None:
        finite = steppable(r_max, kind)
    if isinstance(eta, (int, float)) and eta == 0:  # lr = 0: no step at all (S may be anything)
        return torch.zeros_like(mats) if out is None else out.zero_()
    s = r if in_place else r.clone()
    alpha, scale = _scaled_direction(s, smoothing, kind, eta, eta_top, r_max, start)
    if scale is not None:
        s.mul_(scale)
    if s.dtype != mats.dtype:
        s = s.to(mats.dtype)
    delta = torch.empty_like(mats) if out is None else out
    delta.baddbmm_(mats, s, beta=0, alpha=alpha)
    if finite is not True:  # True: the caller has checked that every matrix is finite
        torch.where(finite, delta, _zero(delta), out=delta)
    return delta


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    # A 0-d zero kept per dtype and device: torch.where into a workspace takes a tensor there,
    # and making one at every step would be one more operation (a kernel, on an accelerator).
    key = (like.dtype, like.device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return _ZEROS[key]


def _scaled_direction(
    s: torch.Tensor,
    smoothing: float,
    kind: str,
    eta: torch.Tensor | float,
    eta_top: float | None,
    r_max: torch.Tensor | None,
    start: torch.Tensor | None,
) -> tuple[float, torch.Tensor | float | None]:
    r"""Turn the residual ``s`` into :math:`S' = h(R)/u` in place, with :math:`h(R)` the
    unnormalised direction (``clamp(R, -c, c) = cS``, or :math:`R = S/2`) and ``u`` a power of
    two (1 where a host bound keeps the power iteration in the float's range, else the one below
    :math:`\max|h(R)|`, from ``r_max``), and return ``(alpha, scale)`` with
    :math:`-\eta_i S_i = lpha \cdot scale_i \cdot S'_i` (``scale`` None: 1)."""
    n = s.shape[-1]
    number = isinstance(eta, (int, float))
    eta_t = eta if number or eta.dim() == 0 else eta.reshape(-1, 1, 1)
    top = eta if number else eta_top
    if kind == "frobenius":  # S = 2R: no host bound of it
        unit = _power_of_two_below(r_max)
        s.div_(unit)
        # 2η_i = 1/4 / max(1/(8η), 1/2, est(R)), est(R) = u·est(S')
        floor = max(1 / (8 * eta), 0.5) if number else torch.reciprocal(8 * eta_t).clamp_min_(0.5)
        return _capped(s, start, 2.0, unit.reciprocal().mul_(floor))
    cutoff = _no_crossing(smoothing, kind, eta_t)
    if number:
        s.clamp_(-cutoff, cutoff)
    else:
        torch.clamp(s, min=-cutoff, max=cutoff, out=s)
    reach = cutoff if number else max(smoothing, 2 * top) if top is not None else None  # bounds max|h(R)|
    if top is not None and 4 * SPECTRAL_PAD * n * top <= _CAP_MARGIN:
        # ‖S‖₂ ≤ n: the cap cannot bind, and η_i = η
        return (-eta / cutoff, None) if number else (1.0, -(eta_t / cutoff))
    # η_i S = η_i h(R)/c = u·S'/4 / max(c/(4ηu), est(S'))
    floor = cutoff / (4 * eta_t)
    if reach is not None and reach <= _LARGE_CUTOFF:
        return _capped(s, start, reach, floor)
    unit = _power_of_two_below(torch.clamp(r_max, max=cutoff))
    s.div_(unit)
    return _capped(s, start, 2.0, unit.reciprocal().mul_(floor))


def _capped(
    s: torch.Tensor, start: torch.Tensor | None, reach: float, floor: torch.Tensor | float
) -> tuple[float, torch.Tensor]:
    r"""``(alpha, scale)`` for :math:`-\tfrac14 S' / \max(floor, est(S'))`, est from
    :func:`_power_norm` (``reach`` bounds ``max|S'|``)."""
    scale = torch.clamp(_power_norm(s, start, reach), min=floor * (_UNIT / SPECTRAL_PAD)).reciprocal_()
    return -MAX_MULTIPLIER_STEP * _UNIT / SPECTRAL_PAD, scale


def _no_crossing(smoothing: float, kind: str, eta: torch.Tensor | float) -> torch.Tensor | float:
    # The L1 step uses clamp(R / max(δ, 2η)) instead of sign(R): an entry smaller than 2η
    # moves to zero instead of across it (the linearised proximal step of |·|), so no entry
    # of R changes sign to first order and the sign step does not chatter at amplitude 2η.
    # Entries of at least 2η still get the full sign, which is what keeps the penalty exact.
    # A tensor η (a tensor lr, as under torch.compile) keeps its cutoff at least the float's
    # tiny, where clamp(R / cutoff) is sign(R), zeros included.
    if kind != "l1":
        return smoothing
    if isinstance(eta, torch.Tensor):
        return (2 * eta).clamp_(min=max(smoothing, torch.finfo(eta.dtype).tiny))
    return max(smoothing, 2 * eta)


def start_vector(s: torch.Tensor) -> torch.Tensor:
    """The power iteration's fixed start :math:`v_0 = \\cos(2.399963\\,k)`, ``(m, n, 1)`` like ``s``:
    deterministic, well spread, and no draw from the user's RNG."""
    m, n = s.shape[0], s.shape[-1]
    v = torch.cos(torch.arange(n, device=s.device, dtype=s.dtype) * 2.399963)
    return v.reshape(1, n, 1).expand(m, n, 1).contiguous()


def _power_norm(s: torch.Tensor, start: torch.Tensor | None, top: float) -> torch.Tensor:
    """``‖S ŵ‖`` with ``ŵ = S v₀`` rescaled to norm ``_UNIT`` (``(m, 1, 1)``): one power
    iteration, in four operations.  ``top`` bounds ``max|S|`` (a host number): ``S v₀`` is
    formed times a power of two that puts its norm near 2^60 at most, far above the 10⁻⁷
    that torch.renorm adds to it (so that the rescaling is exact to rounding) and far below
    where its squares overflow."""
    start = start_vector(s) if start is None else start
    n = s.shape[-1]
    reach = math.frexp(top * n**1.5)[1]  # 2^reach bounds ‖S v₀‖ (|v₀| <= 1)
    w = torch.baddbmm(start, s, start, beta=0, alpha=2.0 ** (60 - reach))
    w.renorm_(2, 0, _UNIT)
    return torch.linalg.vector_norm(torch.bmm(s, w), dim=(-2, -1), keepdim=True)


def spectral_norm(s: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``‖S_i‖₂`` of symmetric ``(m, n, n)`` matrices, estimated from below by one power
    iteration (:func:`penalty_step`'s) and padded by ``SPECTRAL_PAD``.

    ``S`` is first divided by the power of two below ``max|S|`` (exact), so that no square of
    the iteration overflows; any ``‖S‖₂`` beyond the float's max reads as inf.  Measured on
    clamped matrices of residuals (n = 16 to 256, near-orthonormal, scaled and far starts,
    288 matrices): within a factor [0.65, 1.25] of the true norm, where four iterations with
    a row-sum bound were within [0.72, 1.10], at about three times the operations.
    """
    power = _power_of_two_below(max_abs(s))[:, None, None]
    estimate = _power_norm(s / power, start, 2.0) * power
    return estimate.reshape(-1).mul_(SPECTRAL_PAD / _UNIT)


def _power_of_two_below(x: torch.Tensor) -> torch.Tensor:
    # 2^(e-1) for x = f·2^e (f in [1/2, 1)) where x > 1, else 1: exact (a division whose exact
    # result is representable), in (x/2, x], and finite for any finite x.
    x = x.clamp_min(1)
    return x / torch.frexp(x)[0].mul_(2)


# Newton–Schulz iterations of the ortho_tol correction (measured: from max|R| = 13, error 3e-3).
CORRECTION_ITERATIONS = 6


def polar_correction(r: torch.Tensor, iterations: int = CORRECTION_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(Z, E)`` with :math:`\Phi Z` the polar factor of :math:`\Phi` approximately, from the
    residual ``r`` :math:`= \Phi^\top\Phi - I` alone (``(m, n, n)``, float32 or wider), and
    ``E`` :math:`= \max|Z^\top \Phi^\top \Phi Z - I|` per matrix, ``(m, 1, 1)``: the error the
    corrected matrices have.

    The coupled Newton–Schulz iteration for the inverse square root of :math:`G = I + R`,
    scaled by :math:`c = \max(1, (1 + \|R\|_F)/1.5)`, so that every eigenvalue of :math:`G/c`
    is at most 1.5 and it converges for any non-singular :math:`\Phi` (the scalar map
    :math:`x \mapsto x(3 - x)^2/4` of the eigenvalues of :math:`Z_k Y_k` takes ``(0, 3)`` to
    ``(0, 1]`` and then to 1): :math:`Y_0 = G/c`, :math:`Z_0 = I`,
    :math:`T = (3I - Z_k Y_k)/2`, :math:`Y_{k+1} = Y_k T`, :math:`Z_{k+1} = T Z_k`; then
    :math:`Z_k Y_k = Z_k^\top (G/c) Z_k \to I`, quadratically once close, and
    :math:`Z = Z_k/\sqrt{c}`.  A fixed number of iterations, reading nothing on the host.
    Measured on 20-column matrices (float64), the error after 6 iterations from
    :math:`\max|R|` = 0.02, 0.34, 1.6, 13, 115: 3e-15, 2e-15, 3e-5, 3e-3, 8e-3.
    """
    n = r.shape[-1]
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    c = torch.linalg.vector_norm(r, dim=(-2, -1), keepdim=True).add_(1).div_(1.5).clamp_min_(1)
    y = (r + eye).div_(c)
    z = None
    for _ in range(iterations):
        zy = y if z is None else torch.bmm(z, y)
        t = torch.add(eye * 1.5, zy, alpha=-0.5)
        y = torch.bmm(y, t)
        z = t if z is None else torch.bmm(t, z)
    z = eye.expand_as(r).clone() if z is None else z
    error = torch.linalg.vector_norm(torch.bmm(z, y).sub_(eye), float("inf"), dim=(-2, -1), keepdim=True)
    return z.div_(c.sqrt_()), error


def max_error(mats: torch.Tensor) -> float:
    """``max |Φ_iᵀΦ_i - I|`` over a whole stack, as a Python float (a host sync)."""
    return residual(mats).abs().max().item()


def polar(mats: torch.Tensor) -> torch.Tensor:
    """The nearest matrices with orthonormal columns, ``U Vᵀ`` from the thin SVD."""
    wide = mats.float() if mats.dtype in (torch.float16, torch.bfloat16) else mats
    u, _, vh = torch.linalg.svd(wide, full_matrices=False)
    return (u @ vh).to(mats.dtype)


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
    is the (l, m, n) group tensor's convention), or 2-D with ``group_dim=None``.  Differentiable by autograd.
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
    s = direction(residual(mats), smoothing, penalty)  # in place of R
    out = torch.bmm(mats, _cast_back(s, mats)).mul_(2 * beta)
    if group_dim is None:
        return out.squeeze(0)
    return out.movedim(0, group_dim)


@torch.no_grad()
def orthogonality_error(phi: torch.Tensor, *, group_dim: int | None = 1) -> torch.Tensor:
    """One number per group: ``max_jk |Φ_iᵀΦ_i - I|_jk`` (shape ``(m,)``, float32 or wider)."""
    _check(phi, 0.0)
    return residual(as_matrices(phi, group_dim)).abs().amax((-2, -1))
