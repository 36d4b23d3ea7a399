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

That is the default target, orthonormal vectors.  ``target='orthogonal'`` keeps only the
off-diagonal of :math:`\Phi_i^\top\Phi_i` (the lengths free), and ``normalize=True`` takes the
cosines instead of the dot products (:func:`target_residual`, :func:`l1_orthogonality_grad`;
the soft step's :func:`orthogonal_residual` and :func:`orthogonal_step`).

Every function works on all groups at once with batched matmuls; half-precision inputs
have their Gram matrices accumulated in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .layout import as_matrices

__all__ = [
    "l1_orthogonality",
    "l1_orthogonality_grad",
    "frobenius_orthogonality",
    "frobenius_orthogonality_grad",
    "orthogonality_error",
    "TARGETS",
    "check_target",
    "unit_columns",
    "shortest_length",
    "target_residual",
    "cosine_direction",
    "residual",
    "direction",
    "huber",
    "safe_step_size",
    "penalty_step",
    "general_step",
    "gram_matrix",
    "orthogonal_residual",
    "orthogonal_from_gram",
    "orthogonal_step",
    "largest_weight",
    "max_abs",
    "steppable",
    "largest_residual",
    "max_error",
    "polar",
    "project",
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


def gram_matrix(mats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Φ_iᵀ Φ_i`` for a stack ``(m, l, n)``; float32 for half-precision stacks (``out``: as for
    :func:`residual`)."""
    if mats.dtype in _HALF:
        if mats.is_cuda:
            # bf16/fp16 tensor-core matmul with a float32 output (fp32 accumulation).
            gram = torch.bmm(mats.mT, mats, out_dtype=torch.float32, out=out)
        else:
            wide = mats.float()
            gram = torch.bmm(wide.mT, wide, out=out)
    else:
        gram = torch.bmm(mats.mT, mats, out=out)
    return gram


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
    r: torch.Tensor,
    s: torch.Tensor,
    eta: torch.Tensor | float,
    *,
    r_max: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
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
    general form, for other directions.  ``r_max``: :func:`max_abs` of ``r``, if the caller
    has it.  ``reach``: where the linearisation is :math:`R^+ \approx R - \eta\, W \odot G`
    instead (a target whose lengths are free, :func:`orthogonal_step`),
    :math:`\max_{jk} W_{jk}|G_{jk}|` per matrix, which then stands for :math:`2\max|S|` in the
    middle term.
    """
    tiny = torch.finfo(r.dtype).tiny
    r_max = max_abs(r) if r_max is None else r_max
    no_overshoot = r_max / (2 * max_abs(s) if reach is None else reach).clamp_min(tiny)
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


def general_step(
    r: torch.Tensor,
    mats: torch.Tensor,
    smoothing: float,
    kind: str,
    eta: torch.Tensor | float,
    *,
    step_size: Callable[..., torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    finite: torch.Tensor | bool | None = None,
    **_: Any,
) -> torch.Tensor:
    """The step of :func:`penalty_step` in its general form, for any per-matrix step size
    ``step_size(r, s, eta)`` (default :func:`safe_step_size`): ``S = direction(R)`` with the
    no-crossing cutoff, ``η_i = step_size(R, S, η)``, ``-η_i Φ S``, zero where not finite.
    With the default it is :func:`penalty_step`'s step to rounding (tested); it is slower, and
    serves as the reference, and for cap variants (``experiments/soft_cap_ablation.py``)."""
    step_size = safe_step_size if step_size is None else step_size
    r_max = max_abs(r)
    finite = steppable(r_max, kind) if finite is None else finite
    cutoff = _no_crossing(
        smoothing, kind, eta.reshape(-1, 1, 1) if isinstance(eta, torch.Tensor) and eta.dim() else eta
    )
    s = direction(r.clone(), cutoff, kind)
    eta_i = step_size(r, s, eta)
    delta = torch.bmm(mats, s.mul_(-eta_i[:, None, None]).to(mats.dtype), out=out)
    if finite is not True:
        delta.masked_fill_(~finite.reshape(-1, 1, 1), 0)
    return delta


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


def orthogonal_residual(
    mats: torch.Tensor, normalize: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The soft step's residual of ``target='orthogonal'``, from the Gram matrix
    :math:`P = \Phi^\top\Phi`: :math:`R = P \odot (\mathbf 1 - I)`, or with ``normalize`` the cosines
    :math:`R = D^{-1} P D^{-1} \odot (\mathbf 1 - I)`, :math:`D^2 = \operatorname{diag}(P)`; and the
    squared lengths :math:`\operatorname{diag}(P)`, ``(m, n)``, that :func:`orthogonal_step` needs.

    One matmul, as for the orthonormal target (and all-reducible over row shards).  A column
    whose squared length is below the float's smallest normal number is zero-length (see
    :func:`unit_columns`, which draws the same line): its cosines are 0.  ``out``: an
    ``(m, n, n)`` workspace of the result's dtype.
    """
    return orthogonal_from_gram(gram_matrix(mats, out), normalize)


def orthogonal_from_gram(gram: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`orthogonal_residual` from the Gram matrices ``ΦᵀΦ`` (e.g. summed over row shards), in place."""
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    squares = diagonal.clone()
    if normalize:
        inverse = _inverse_lengths(squares)
        gram.mul_(inverse[:, :, None]).mul_(inverse[:, None, :])
    diagonal.zero_()
    return gram, squares


def _inverse_lengths(squares: torch.Tensor) -> torch.Tensor:
    # 1/‖φ_j‖ from ‖φ_j‖², 0 for a zero-length column (a squared length below the float's tiny).
    return torch.where(squares < torch.finfo(squares.dtype).tiny, 0.0, squares.rsqrt())


def orthogonal_step(
    r: torch.Tensor,
    squares: torch.Tensor,
    mats: torch.Tensor,
    smoothing: float,
    kind: str,
    eta: torch.Tensor | float,
    normalize: bool,
    *,
    out: torch.Tensor | None = None,
    finite: torch.Tensor | bool | None = None,
    r_max: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":func:`penalty_step` for ``target='orthogonal'``: ``-η_i Φ_i S_i`` from
    :func:`orthogonal_residual`'s ``r`` and ``squares``, with the caps of :func:`safe_step_size`
    adapted to free lengths.

    The gradient is :math:`2\beta\,\Phi S` with :math:`S = G = h'(R)` (zero diagonal), or for the
    cosines :math:`S = D^{-1}(G - \operatorname{Diag}\rho)D^{-1}`, :math:`\rho_j = \sum_k R_{jk}G_{jk}`
    (:func:`l1_orthogonality_grad`).  The step :math:`\Phi^+ = \Phi(I - \eta S)` changes the
    residual, to first order and leaving out terms of the size of :math:`R` times the step (as
    :func:`safe_step_size`'s :math:`R - 2\eta S` does), by

    .. math::
        R^+_{jk} \approx R_{jk} - \eta\, W_{jk}\, G_{jk}, \qquad W_{jk} = q_j + q_k,\quad
        q_j = \|\varphi_j\|^2 \ \text{(dot products)}, \ \ q_j = \|\varphi_j\|^{-2} \ \text{(cosines)}:

    with :math:`P = D^2 + R`, :math:`dP = -\eta(PS + SP)` has off-diagonal
    :math:`-\eta(q_j + q_k)S_{jk}`; for the cosines :math:`\Phi^+ = (U - \eta U S' D^{-2}) D`
    turns :math:`u_j` by :math:`-\eta (US')_j / \|\varphi_j\|^2` within its tangent space, and
    :math:`dC_{jk} = -\eta(q_j + q_k)G_{jk}`.  (The orthonormal target is :math:`W = 2`.)  So:

    - the L1 direction is :math:`G = \operatorname{clamp}(R / \max(\delta, \eta W), -1, 1)`, entry by
      entry: an entry below :math:`\eta W_{jk}` moves to zero instead of across it;
    - the no-overshoot term of :func:`safe_step_size` is :math:`\max|R| / \max_{jk} W_{jk}|G_{jk}|`,
      the largest step after which no entry of :math:`R` is further from zero than the largest
      was (the *reach*);
    - the spectral cap :math:`\|\eta S\|_2 \le 1/4` is on the :math:`S` of the update itself, so
      the relative change of :math:`\Phi` per step stays bounded as for the orthonormal target
      (a short vector makes :math:`S` of the cosines large, and the whole matrix's step small).

    ``out`` (like ``mats``) and ``scratch`` (like ``r``, free until the product: it may share
    ``out``'s memory) are optional workspaces; ``r`` is spent, and one ``(m, n, n)`` tensor is
    allocated.  ``finite`` and ``r_max``: as for :func:`penalty_step`.
    """
    r_max = max_abs(r) if r_max is None else r_max
    finite = steppable(r_max, kind) if finite is None else finite
    inverse = _inverse_lengths(squares) if normalize else None
    q = inverse * inverse if normalize else squares
    weights = torch.add(q[:, :, None], q[:, None, :], out=scratch)
    g = torch.empty_like(r)  # G, then S: not in scratch, which may share the product's memory
    if kind == "l1":
        # Per entry, η·W_jk can leave the float's range where a vector is nearly zero-length
        # (q ~ 1/tiny): the cutoff is then inf and that entry does not move, as a zero-length one.
        eta_b = eta.reshape(-1, 1, 1) if isinstance(eta, torch.Tensor) and eta.dim() else eta
        cutoff = torch.mul(weights, eta_b, out=g).clamp_(min=max(smoothing, torch.finfo(r.dtype).tiny))
        direction(r, cutoff, kind, out=g)  # R / cutoff, in the cutoff's place
    else:
        direction(r, smoothing, kind, out=g)
    reach = max_abs(weights.mul_(g))
    if normalize:
        g.diagonal(dim1=-2, dim2=-1).sub_(torch.mul(r, g, out=weights).sum(-1))
        g.mul_(inverse[:, :, None]).mul_(inverse[:, None, :])
    eta_i = safe_step_size(r, g, eta, r_max=r_max, reach=reach)
    g.mul_(eta_i.neg_()[:, None, None])
    delta = torch.bmm(mats, g.to(mats.dtype), out=out)
    if finite is not True:
        delta.masked_fill_(~finite[:, None, None], 0)
    return delta


def largest_weight(mats: torch.Tensor, normalize: bool) -> float:
    """The largest :math:`W_{jk} = q_j + q_k` over distinct columns ``j, k`` of a stack (see
    :func:`orthogonal_step`), as a Python float (a host sync): how far one step of unit ``η``
    moves an entry of the residual at most, where the lengths are free; 0 for one column."""
    if mats.shape[-1] < 2:
        return 0.0
    wide = mats.float() if mats.dtype in _HALF else mats
    squares = wide.square().sum(-2)
    q = _inverse_lengths(squares).square_() if normalize else squares
    return q.topk(2, dim=-1).values.sum(-1).max().item()


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


def polar_correction(
    r: torch.Tensor, iterations: int = CORRECTION_ITERATIONS, *, until: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    :math:`Z = Z_k/\sqrt{c}`.  ``iterations`` of them, reading nothing on the host; or, where
    ``until`` is given (the caller reads values for free, on CPU), as few as leave every
    matrix's error at most ``until`` (at most ``iterations``).  Measured on 20-column matrices
    (float64), the error after 6 iterations from :math:`\max|R|` = 0.02, 0.34, 1.6, 13, 115:
    3e-15, 2e-15, 3e-5, 3e-3, 8e-3.
    """
    n = r.shape[-1]
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    c = torch.linalg.vector_norm(r, dim=(-2, -1), keepdim=True).add_(1).div_(1.5).clamp_min_(1)
    y = (r + eye).div_(c)
    z = error = None
    for k in range(iterations + 1):
        zy = y if z is None else torch.bmm(z, y)
        if k == iterations or (until is not None and z is not None):
            error = torch.linalg.vector_norm(zy - eye, float("inf"), dim=(-2, -1), keepdim=True)
            if k == iterations or max(error.reshape(-1).tolist()) <= until:
                break
        t = torch.add(eye * 1.5, zy, alpha=-0.5)
        y = torch.bmm(y, t)
        z = t if z is None else torch.bmm(t, z)
    z = eye.expand_as(r).clone() if z is None else z
    return z.div_(c.sqrt_()), error


def max_error(mats: torch.Tensor, target: str = "orthonormal", normalize: bool = False) -> float:
    """``max |R_i|`` over a whole stack, as a Python float (a host sync): ``max |Φ_iᵀΦ_i - I|``
    for the default target, else that of :func:`target_residual`."""
    return target_residual(mats, target, normalize).abs().max().item()


def polar(mats: torch.Tensor) -> torch.Tensor:
    """The nearest matrices with orthonormal columns, ``U Vᵀ`` from the thin SVD."""
    wide = mats.float() if mats.dtype in (torch.float16, torch.bfloat16) else mats
    u, _, vh = torch.linalg.svd(wide, full_matrices=False)
    return (u @ vh).to(mats.dtype)


def project(mats: torch.Tensor, target: str = "orthonormal") -> torch.Tensor:
    r"""The nearest point of ``target``: :func:`polar` for orthonormal columns; for orthogonal
    columns, the nearest with orthogonal columns of the same lengths,

    .. math::
        Q D, \qquad Q = \operatorname{polar}(\Phi D) = \operatorname{polar}ig(U (D/\max_j d_j)^2ig),
        \qquad D = \operatorname{diag}(\|arphi_j\|)

    (:math:`\|QD - \Phi\|_F^2 = \|D\|_F^2 - 2\operatorname{tr}(Q^	op \Phi D) + \|\Phi\|_F^2`, so
    this is orthogonal Procrustes; polar is invariant to the positive factor).  A zero-length
    column stays zero.
    """
    if target == "orthonormal":
        return polar(mats)
    unit, _, length = _unit_columns(mats)
    ratio = length / length.amax(-1, keepdim=True).clamp_min(torch.finfo(length.dtype).tiny)
    return (polar(unit * (ratio * ratio)[:, None, :]) * length[:, None, :]).to(mats.dtype)


# -- the targets -------------------------------------------------------------------------
# What the penalty drives to zero: ΦᵀΦ - I (orthonormal vectors), or the off-diagonal part of
# ΦᵀΦ (orthogonal vectors of free lengths); with normalize=True, of the cosines UᵀU instead.
TARGETS = ("orthonormal", "orthogonal")


def check_target(target: str, normalize: bool, where: str = "", prefix: str = "") -> None:
    """Refuse a target or a ``normalize`` flag that the penalties do not know, naming it
    (``prefix``: of the names, ``'ortho_'`` for a parameter group's options)."""
    where = f"{where}: " if where else ""
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(
            f"{where}{prefix}target must be one of {TARGETS} ('orthonormal': ΦᵀΦ = I; 'orthogonal': ΦᵀΦ "
            f"diagonal, the lengths free), got {target!r}"
        )
    if not isinstance(normalize, bool):
        raise TypeError(f"{where}{prefix}normalize must be True or False, got {normalize!r}")
    if normalize and target == "orthonormal":
        raise ValueError(
            f"{where}{prefix}normalize=True compares the vectors' directions (their cosines) and leaves their "
            f"lengths free, so it cannot ask for orthonormal vectors: use {prefix}target='orthogonal' with "
            f"{prefix}normalize=True (the cosines, as Keras's OrthogonalRegularizer), or {prefix}normalize=False "
            "for orthonormal vectors"
        )


def unit_columns(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The columns of a stack ``(m, l, n)`` over their lengths, :math:`U = \Phi D^{-1}` with
    :math:`D = \operatorname{diag}(\|\varphi_j\|)`, and the inverse lengths ``(m, n)``.

    A column shorter than :func:`shortest_length` (zero, or so short that its squared length
    underflows) counts as zero-length: its unit vector and its inverse length are 0, so its
    cosine with every vector is 0 and so is its gradient (the cosine is not continuous there,
    and this is the convention; the soft step, which reads the lengths off the Gram matrix,
    draws the same line).  The lengths are taken of the columns divided by a power of two near
    their largest entry: an exact rescaling (the same bits as the plain norm wherever that does
    not overflow), so that any finite column has a finite unit vector.  Half-precision stacks
    are widened to float32.  Differentiable by autograd, zero-length columns included (their
    gradient is 0).
    """
    unit, inverse, _ = _unit_columns(mats)
    return unit, inverse


def shortest_length(dtype: torch.dtype) -> float:
    """The shortest vector that is not zero-length under ``normalize=True``: the square root of
    the float's smallest normal number (2⁻⁶³ ≈ 1.1e-19 in float32, 2⁻⁵¹¹ ≈ 1.5e-154 in float64),
    below which its squared length is no longer a normal number."""
    return torch.finfo(dtype).tiny ** 0.5


def _unit_columns(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # unit_columns, and the lengths (m, n): 0 for a zero-length column, inf beyond the float's max.
    wide = mats.float() if mats.dtype in _HALF else mats
    with torch.no_grad():
        top = wide.abs().amax(-2, keepdim=True)
        # 2^(e-1) for top = f·2^e (f in [1/2, 1)): exact, and never inf.
        scale = torch.where(top > 0, top / torch.frexp(top)[0].mul_(2), 1.0)
    v = wide / scale
    length = torch.linalg.vector_norm(v, dim=-2, keepdim=True)  # in [1, 2√l] where not zero
    with torch.no_grad():
        # scale·|v| is the length, or below the line where it underflows; NaN columns stay NaN.
        zero = length * scale < shortest_length(wide.dtype)
    safe = torch.where(zero, 1.0, length)
    unit = torch.where(zero, 0.0, v / safe)
    inverse = torch.where(zero, 0.0, scale.reciprocal() / safe)
    return unit, inverse.squeeze(-2), torch.where(zero, 0.0, length * scale).squeeze(-2)


def target_residual(
    mats: torch.Tensor, target: str = "orthonormal", normalize: bool = False, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The residual that the penalty of ``target`` drives to zero, ``(m, n, n)``:

    .. math::
        R = \Phi^\top\Phi - I \;\; (\text{orthonormal}), \qquad
        R = \Phi^\top\Phi \odot (\mathbf{1} - I) \;\; (\text{orthogonal}), \qquad
        R = U^\top U \odot (\mathbf{1} - I) \;\; (\text{orthogonal}, \text{normalize})

    with :math:`U` the unit columns (:func:`unit_columns`).  An orthogonal target's diagonal is
    exactly zero.  float32 for half-precision stacks; ``out``: an ``(m, n, n)`` workspace.
    """
    if normalize:
        unit, _ = unit_columns(mats)
        r = torch.bmm(unit.mT, unit, out=out)
        r.diagonal(dim1=-2, dim2=-1).zero_()
        return r
    r = residual(mats, out=out)
    if target == "orthogonal":
        r.diagonal(dim1=-2, dim2=-1).zero_()
    return r


def cosine_direction(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    r"""The cosines' direction :math:`S' = S - \operatorname{Diag}(\rho)`,
    :math:`\rho_j = \sum_k R_{jk} S_{jk}`, for ``R`` the cosines' residual and ``S = h'(R)``,
    both symmetric with a zero diagonal (see :func:`l1_orthogonality_grad`).  ``s`` is
    overwritten with the result."""
    rho = (r * s).sum(-1)
    s.diagonal(dim1=-2, dim2=-1).sub_(rho)
    return s


def _check(phi: torch.Tensor, smoothing: float, target: str = "orthonormal", normalize: bool = False) -> None:
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"phi must be a torch.Tensor, got {type(phi).__name__}")
    if not phi.is_floating_point():
        raise TypeError(f"phi must be a real floating-point tensor, got dtype {phi.dtype}")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0 (0 means the exact L1 penalty), got {smoothing}")
    check_target(target, normalize)


def _cast_back(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def l1_orthogonality(
    phi: torch.Tensor,
    beta: float = 1.0,
    *,
    group_dim: int | None = 1,
    smoothing: float = 0.0,
    target: str = "orthonormal",
    normalize: bool = False,
) -> torch.Tensor:
    r"""``β Σ_i Σ_jk h(R_i)_jk`` with ``h = |·|``, or Huber when ``smoothing > 0``.

    ``phi`` is 3-D with ``Φ_i = phi.select(group_dim, i)`` (``(l, m, n)`` and ``group_dim=1``
    is the (l, m, n) group tensor's convention), or 2-D with ``group_dim=None``; the vectors
    are the columns of each :math:`\Phi_i`.  ``R_i`` is :func:`target_residual`:
    ``target='orthonormal'`` (the default) asks for :math:`\Phi_i^\top\Phi_i = I`;
    ``target='orthogonal'`` for the off-diagonal of :math:`\Phi_i^\top\Phi_i` only, the lengths
    free; ``normalize=True`` (with ``target='orthogonal'``) for the off-diagonal of the cosines
    :math:`U_i^\top U_i`, the Gram of the unit columns (zero-length columns: see
    :func:`unit_columns`).  Differentiable by autograd.
    """
    _check(phi, smoothing, target, normalize)
    r = target_residual(as_matrices(phi, group_dim), target, normalize)
    h = huber(r, smoothing) if smoothing > 0 else r.abs()
    return _cast_back(beta * h.sum(), phi)


def l1_orthogonality_grad(
    phi: torch.Tensor,
    beta: float = 1.0,
    *,
    group_dim: int | None = 1,
    smoothing: float = 0.0,
    target: str = "orthonormal",
    normalize: bool = False,
) -> torch.Tensor:
    r"""``∂L/∂phi`` of :func:`l1_orthogonality` in closed form, shaped like ``phi``.

    With :math:`S = h'(R)` (``sign``, ``sign(0) = 0``: the minimal-norm subgradient at a kink;
    or :math:`\operatorname{clamp}(R/\delta, -1, 1)` for Huber), symmetric like :math:`R`:

    .. math::
        \frac{\partial \mathcal{L}}{\partial \Phi} = 2\beta\, \Phi S

    for both targets without ``normalize``: the orthogonal target's :math:`S` has a zero diagonal
    (:math:`h'(0) = 0`), and :math:`S : (X \odot (\mathbf{1} - I)) = S : X`.  With
    ``normalize=True``, :math:`C = U^\top U`, :math:`u_j = \varphi_j / \|\varphi_j\|` and
    :math:`du_j = (I - u_j u_j^\top)\, d\varphi_j / \|\varphi_j\|`, so

    .. math::
        d\mathcal{L} = \beta\, S : dC = 2\beta\, U S : dU
        = \sum_j \frac{2\beta}{\|\varphi_j\|} \big((US)_j - u_j (CS)_{jj}\big)^\top d\varphi_j,

    where :math:`(CS)_{jj} = \sum_k R_{jk} S_{jk} = \rho_j` (the diagonal of :math:`S` is zero), and

    .. math::
        \frac{\partial \mathcal{L}}{\partial \Phi} = 2\beta\, U \big(S - \operatorname{Diag}(\rho)\big) D^{-1}
        = 2\beta\, \Phi\, D^{-1} \big(S - \operatorname{Diag}(\rho)\big) D^{-1},
        \qquad D = \operatorname{diag}(\|\varphi_j\|):

    each column's gradient is orthogonal to the column (the cosines do not change with the
    lengths).  A zero-length column gets a zero gradient (:func:`unit_columns`).
    """
    _check(phi, smoothing, target, normalize)
    return _grad(phi, beta, group_dim, smoothing, "l1", target, normalize)


def frobenius_orthogonality(
    phi: torch.Tensor,
    beta: float = 1.0,
    *,
    group_dim: int | None = 1,
    target: str = "orthonormal",
    normalize: bool = False,
) -> torch.Tensor:
    """The squared-Frobenius baseline ``β Σ_i ‖R_i‖_F²``, ``R_i`` as in :func:`l1_orthogonality`
    (``target='orthogonal'``: BigGAN's ``β‖ΦᵀΦ ⊙ (1 - I)‖_F²``)."""
    _check(phi, 0.0, target, normalize)
    r = target_residual(as_matrices(phi, group_dim), target, normalize)
    return _cast_back(beta * (r * r).sum(), phi)


def frobenius_orthogonality_grad(
    phi: torch.Tensor,
    beta: float = 1.0,
    *,
    group_dim: int | None = 1,
    target: str = "orthonormal",
    normalize: bool = False,
) -> torch.Tensor:
    """``4β Φ_i R_i`` per group, shaped like ``phi``: :func:`l1_orthogonality_grad`'s formulas
    with ``S = 2R`` (with ``normalize=True``, ``2β Φ D⁻¹(S - Diag(ρ))D⁻¹``)."""
    _check(phi, 0.0, target, normalize)
    return _grad(phi, beta, group_dim, 0.0, "frobenius", target, normalize)


def _grad(phi, beta, group_dim, smoothing, penalty, target, normalize):
    mats = as_matrices(phi, group_dim)
    if normalize:
        unit, inverse = unit_columns(mats)
        r = target_residual(unit, target)  # the unit columns' off-diagonal Gram: the cosines
        s = cosine_direction(r, direction(r.clone(), smoothing, penalty))
        out = _cast_back(torch.bmm(unit, s).mul_(inverse[:, None, :]).mul_(2 * beta), mats)
    else:
        s = direction(target_residual(mats, target), smoothing, penalty)  # in place of R
        out = torch.bmm(mats, _cast_back(s, mats)).mul_(2 * beta)
    if group_dim is None:
        return out.squeeze(0)
    return out.movedim(0, group_dim)


@torch.no_grad()
def orthogonality_error(
    phi: torch.Tensor, *, group_dim: int | None = 1, target: str = "orthonormal", normalize: bool = False
) -> torch.Tensor:
    """One number per group: ``max_jk |R_i|_jk`` of :func:`target_residual` (shape ``(m,)``,
    float32 or wider): ``max|Φ_iᵀΦ_i - I|`` for the default target, the largest off-diagonal
    dot product for ``target='orthogonal'``, the largest ``|cos|`` with ``normalize=True``."""
    _check(phi, 0.0, target, normalize)
    return target_residual(as_matrices(phi, group_dim), target, normalize).abs().amax((-2, -1))
