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
    "TARGETS",
    "check_target",
    "unit_columns",
    "target_residual",
    "cosine_direction",
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
    "project",
]

_HALF = (torch.float16, torch.bfloat16)
# Largest relative change of Φ that one penalty step may make: Φ ← Φ (I - ηS) with
# ‖ηS‖₂ ≤ 1/4 keeps every singular value within a factor [3/4, 5/4] of its old value.
MAX_MULTIPLIER_STEP = 0.25
# The CPU skip of the cap asks for this much room below it, more than the rounding of a row sum.
_CAP_MARGIN = 1 - 1e-3


def residual(mats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``R_i = Φ_iᵀ Φ_i - I`` for a stack ``(m, l, n)``; float32 for half-precision stacks.

    ``out``: an ``(m, n, n)`` workspace of the result's dtype (the optimizer reuses one).
    """
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
    scratch: torch.Tensor | None = None,
    *,
    r_max: torch.Tensor | None = None,
    s_max: torch.Tensor | None = None,
    s_top: float | None = None,
) -> torch.Tensor:
    r"""Per-matrix step :math:`\eta_i` for :math:`\Phi_i \leftarrow \Phi_i (I - \eta_i S_i)`.

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
    any ``lr·β``.  ``r`` and ``s`` are ``(m, n, n)``; ``scratch``, like them, is overwritten.
    ``r_max`` and ``s_max``: :func:`max_abs` of ``r`` and ``s``, if the caller has them;
    ``s_top``: the largest entry of ``s_max`` as a Python number, likewise.
    """
    tiny = torch.finfo(r.dtype).tiny
    r_max = max_abs(r) if r_max is None else r_max
    s_max = max_abs(s) if s_max is None else s_max
    no_overshoot = r_max / (2 * s_max).clamp_min(tiny)
    if s.device.type == "cpu" and not torch.compiler.is_compiling():
        # Host checks, free on CPU, that skip the cap's work where it cannot bind, with the
        # same result: ‖S‖₂ <= max row sum <= n·max|S| (a margin covers the sums' rounding,
        # and the host's wider arithmetic).
        n = s.shape[-1]
        if isinstance(eta, (int, float)):
            top = float(s_max.max()) if s_top is None else s_top  # NaN fails the test, as it should
            if top * eta * n <= _CAP_MARGIN * MAX_MULTIPLIER_STEP:
                return no_overshoot.clamp_(max=eta).nan_to_num_(nan=0.0)
        elif bool((s_max * eta * n <= _CAP_MARGIN * MAX_MULTIPLIER_STEP).all()):
            return no_overshoot.clamp_(max=eta).nan_to_num_(nan=0.0)
        rowsum = torch.abs(s, out=scratch).sum(-1).amax(-1)
        if bool((rowsum * eta <= _CAP_MARGIN * MAX_MULTIPLIER_STEP).all()):
            return no_overshoot.clamp_(max=eta).nan_to_num_(nan=0.0)
    else:
        rowsum = torch.abs(s, out=scratch).sum(-1).amax(-1)  # an upper bound of ‖S‖₂
    bounded = MAX_MULTIPLIER_STEP / spectral_norm(s, rowsum=rowsum, s_max=s_max).clamp_min(tiny)
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
    s_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    finite: torch.Tensor | bool | None = None,
    r_max: torch.Tensor | None = None,
    r_top: float | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-η_i Φ_i S_i`` for a stack, with ``S = direction(R)`` and η_i from :func:`safe_step_size`.

    ``r`` is the residual of the *whole* matrices; ``mats`` may be row blocks of them (a
    shard): the step of each block is its rows of the whole step.  Matrices whose residual
    is not finite (or, for the Frobenius penalty, whose ``2R`` is not) get a zero step, so that a
    NaN stays where it is (``finite``: which are :func:`steppable`, or True when the caller has
    checked them all).  ``r_max``: :func:`max_abs` of ``r``, if the
    caller has it, and ``r_top`` its largest entry as a Python number.  ``s_out`` (like ``r``) and ``out`` (like ``mats``) are optional
    workspaces; with ``s_out`` given, ``r`` is spent as scratch, and ``s_out=r`` forms S in
    place of R.  ``scratch``: a workspace like ``r`` for the cap's row sums (else ``r`` where
    it is free, else one is allocated when the cap's check needs it).
    """
    r_max = max_abs(r) if r_max is None else r_max
    finite = steppable(r_max, kind) if finite is None else finite
    cutoff = _no_crossing(smoothing, kind, eta)
    s = direction(r, cutoff, kind, out=torch.empty_like(r) if s_out is None else s_out)
    if scratch is None and s_out is not None and s_out is not r:
        scratch = r
    s_top = None if r_top is None or isinstance(cutoff, torch.Tensor) else _direction_top(r_top, cutoff, kind)
    eta_i = safe_step_size(
        r, s, eta, scratch=scratch, r_max=r_max, s_max=_direction_max(r_max, cutoff, kind), s_top=s_top
    )
    s.mul_(eta_i.neg_()[:, None, None])
    delta = torch.bmm(mats, s.to(mats.dtype), out=out)
    if finite is not True:  # True: the caller has checked that every matrix is finite
        delta.masked_fill_(~finite[:, None, None], 0)
    return delta


def _direction_max(r_max: torch.Tensor, cutoff: torch.Tensor | float, kind: str) -> torch.Tensor:
    # max|h'(R)| from max|R|, exactly: h' is odd and monotone, and so is its rounding.
    if kind == "frobenius":
        return r_max * 2
    if isinstance(cutoff, torch.Tensor):
        return (r_max / cutoff.reshape(-1)).clamp_(max=1)
    if cutoff > 0:
        return (r_max / cutoff).clamp_(max=1)
    return torch.sign(r_max)  # of sign(R): 1, or 0 for R = 0


def _direction_top(r_top: float, cutoff: float, kind: str) -> float:
    # _direction_max of the largest max|R|, on the host (h' is monotone).
    if kind == "frobenius":
        return 2 * r_top
    if cutoff > 0:
        return min(r_top / cutoff, 1.0)
    return 1.0 if r_top > 0 else 0.0


def _no_crossing(smoothing: float, kind: str, eta: torch.Tensor | float) -> torch.Tensor | float:
    # The L1 step uses clamp(R / max(δ, 2η)) instead of sign(R): an entry smaller than 2η
    # moves to zero instead of across it (the linearised proximal step of |·|), so no entry
    # of R changes sign to first order and the sign step does not chatter at amplitude 2η.
    # Entries of at least 2η still get the full sign, which is what keeps the penalty exact.
    # A tensor η (a tensor lr, as under torch.compile) cannot branch to sign() at η = 0: its
    # cutoff stays at least the float's tiny, where clamp(R / cutoff) is sign(R), zeros included.
    if kind != "l1":
        return smoothing
    if isinstance(eta, torch.Tensor):
        cutoff = (2 * eta).clamp(min=max(smoothing, torch.finfo(eta.dtype).tiny))
        return cutoff.reshape(-1, 1, 1) if eta.dim() else cutoff
    return max(smoothing, 2 * eta)


def spectral_norm(
    s: torch.Tensor, iters: int = 4, rowsum: torch.Tensor | None = None, s_max: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖S_i‖₂`` of symmetric ``(m, n, n)`` matrices, estimated by power iteration.

    The estimate approaches the norm from below; it is padded by 10% and never exceeds the
    max-row-sum norm (an upper bound for symmetric matrices).  On sign matrices of residuals,
    4 iterations were within a factor 1.43 of the true norm (measured), against 1.28 for 8 at
    twice the cost.  The row-sum bound alone is ``√n/2`` times too tight for a full sign matrix
    (``‖S‖₂ ≈ 2√n`` against a row sum of ``n``), which would make the cap weak on wide layers.
    ``rowsum``: the max-row-sum norm of ``s``, and ``s_max``: :func:`max_abs` of ``s``, if the
    caller has them.  Any ``‖S‖₂`` beyond the float's max reads as inf.
    """
    n = s.shape[-1]
    tiny = torch.finfo(s.dtype).tiny
    # The norms square the entries of S·v, which overflow once ‖S‖₂ passes √(float max) (1.8e19
    # in float32: a Frobenius S = 2R of weights near 1e9 does): the estimate would read 0 and
    # the cap would not bind.  So v carries a factor 1/scale, a power of two near max|S| (1 where
    # max|S| <= 1): an exact rescaling, the same bits wherever nothing overflowed.
    scale = _power_of_two_below(max_abs(s) if s_max is None else s_max)[:, None, None]
    # A fixed, well-spread start vector: deterministic, and no draw from the user's RNG.
    v = torch.cos(torch.arange(n, device=s.device, dtype=s.dtype) * 2.399963).expand(s.shape[:-1]).unsqueeze(-1)
    v, w = v / scale, torch.empty_like(v)
    for _ in range(iters):
        torch.bmm(s, v, out=w)
        torch.div(w, w.norm(dim=-2, keepdim=True).clamp_min_(tiny), out=v).div_(scale)
    estimate = torch.bmm(s, v, out=w).norm(dim=(-2, -1), keepdim=True).mul_(scale).reshape(-1)
    if rowsum is None:
        rowsum = s.abs().sum(-1).amax(-1)
    return torch.minimum(estimate.mul_(1.1), rowsum)


def _power_of_two_below(x: torch.Tensor) -> torch.Tensor:
    # 2^(e-1) for x = f·2^e (f in [1/2, 1)) where x > 1, else 1: exact (a division whose exact
    # result is representable), in (x/2, x], and finite for any finite x.
    x = x.clamp_min(1)
    return x / torch.frexp(x)[0].mul_(2)


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

    A column whose entries are all below the float's smallest normal number
    (``torch.finfo(dtype).tiny``: zero, or subnormal) counts as zero-length: its unit vector and
    its inverse length are 0, so its cosine with every vector is 0 and so is its gradient (the
    cosine is not continuous there, and this is the convention).  The lengths are taken of the
    columns divided by a power of two near their largest entry: an exact rescaling (the same
    bits as the plain norm wherever that does not overflow or underflow), so that any finite
    column has a finite unit vector.  Half-precision stacks are widened to float32.
    Differentiable by autograd, zero-length columns included (their gradient is 0).
    """
    unit, inverse, _ = _unit_columns(mats)
    return unit, inverse


def _unit_columns(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # unit_columns, and the lengths (m, n): 0 for a zero-length column, inf beyond the float's max.
    wide = mats.float() if mats.dtype in _HALF else mats
    with torch.no_grad():
        top = wide.abs().amax(-2, keepdim=True)
        zero = top < torch.finfo(wide.dtype).tiny  # NaN columns are not zero: they stay NaN
        # 2^(e-1) for top = f·2^e (f in [1/2, 1)): exact, and never inf.
        scale = torch.where(zero, 1.0, top / torch.frexp(top)[0].mul_(2))
    v = wide / scale
    length = torch.linalg.vector_norm(v, dim=-2, keepdim=True)  # in [1, 2√l] where not zero
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
