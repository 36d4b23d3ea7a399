r"""Hard mode: the constrained parameters move on the Stiefel manifold, with geoopt's math.

With ``ortho_mode="hard"``, every parameter that the group would penalize in soft mode is
seen through its layout as a stack of matrices :math:`X_i \in \mathbb{R}^{l\times n}`,
:math:`X_i^\top X_i = I_n` (:mod:`orthoopt.layout`), and takes a Riemannian step instead
of the base optimizer's; every other parameter keeps torch's update.  All manifold
operations are geoopt's (:class:`geoopt.EuclideanStiefel`: QR retraction, projection
transport; or :class:`geoopt.CanonicalStiefel`: Cayley retraction and transport), called
once per parameter on its whole stack.  With :math:`\pi_X` the tangent projection
(``egrad2rgrad``), :math:`R_X` the retraction and :math:`\mathcal{T}` the transport
(``retr_transp``), the steps follow geoopt's ``RiemannianSGD`` and ``RiemannianAdam``:

.. math::
    \begin{aligned}
    &\textbf{SGD family} \text{ (lr } \gamma\text{, momentum } \mu\text{, dampening } \tau
        \text{, weight decay } \lambda\text{)}\\
    &\quad \xi_t \leftarrow \pi_{X_{t-1}}\big(g_t + \lambda X_{t-1}\big)\\
    &\quad b_t \leftarrow \xi_t \ \text{if } t = 1 \text{ else } \mu b_{t-1} + (1-\tau)\xi_t\\
    &\quad d_t \leftarrow \xi_t + \mu b_t \ \text{(nesterov) else } b_t\\
    &\quad (X_t, b_t) \leftarrow \big(R_{X_{t-1}}(-\gamma d_t),\
          \mathcal{T}_{X_{t-1}\to X_t}(b_t)\big)\\[4pt]
    &\textbf{Adam family} \text{ (lr } \gamma\text{, betas } \beta_1,\beta_2\text{, } \epsilon\text{)}\\
    &\quad \xi_t \leftarrow \pi_{X_{t-1}}\big(g_t + \lambda X_{t-1}\big)
          \quad (\lambda = 0 \text{ for AdamW, see below})\\
    &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\,\xi_t\\
    &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\,\langle \xi_t, \xi_t\rangle_{X_{t-1}} / N
          \quad \text{(one scalar per matrix; } N = l\,n \text{, or 1 as geoopt)}\\
    &\quad \hat v_t \leftarrow \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t\\
    &\quad d_t \leftarrow \frac{m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}\\
    &\quad (X_t, m_t) \leftarrow \big(R_{X_{t-1}}(-\gamma d_t),\
          \mathcal{T}_{X_{t-1}\to X_t}(m_t)\big)
    \end{aligned}

Choices and known traps (geoopt 0.5.1), one line each; docs/hard-mode.md ("Choices, and where it
differs from geoopt") has each with its measurement and ``experiments/hard_mode_traps.py``:

* **Second moment.** One per matrix, as geoopt's; ``ortho_second_moment="mean"`` (the default)
  divides geoopt's sum over the :math:`N = l n` entries by :math:`N`, so that the step has Adam's
  size at the script's learning rate; ``"sum"`` is geoopt's RiemannianAdam exactly.
* **First momentum step.** :math:`b_1 = \xi_1`, as :class:`torch.optim.SGD`; geoopt starts from
  the raw Euclidean gradient, which is not tangent.  From the second step on the rules agree.
* **Weight decay.** :math:`\lambda X` is added before the projection, as geoopt does; AdamW's
  decoupled decay would pull the matrices off the manifold, so it is ignored for hard parameters.
* **Initial projection.** At its first hard step a parameter is projected onto the manifold
  (:func:`orthoopt.penalty.polar`), with a warning naming it if it was above ``PROJECTION_TOL``
  (in half precision: above twice its error after projection), unless its group has
  ``ortho_init="project"``.
* **Canonical drift.** The Cayley step drifts off the manifold by rounding: ``ortho_stabilize=k``
  re-projects the point (``projx``) and its momentum every ``k`` hard steps, ``"auto"`` every
  ``CANONICAL_STABILIZE`` on the canonical manifold, never on the Euclidean one.  The momentum
  is re-projected with ``EuclideanStiefel.proju``: ``CanonicalStiefel.proju`` is no projection,
  and geoopt's ``stabilize`` grows a canonical momentum without bound.
* **Batched solve on CPU.** Where MKL's batched solve fails ("Pivots given to lu_solve must all
  be greater or equal to 1"), the step is redone one matrix at a time, then with the QR
  retraction, with a warning.
* **Half precision.** A float16/bfloat16 parameter steps in float32 and is written back in its
  dtype; its state stays float32 (also across :meth:`OrthoMixin.load_state_dict`), and
  ``"auto"`` re-projects a canonical half parameter at every step.
* **torch.compile.** The manifold comes from the group's ``ortho_manifold`` string, not from
  ``isinstance(p, ManifoldParameter)`` (which tracing turns Euclidean in geoopt's own
  optimizers), so a compiled ``step`` takes the same Stiefel step as an eager one.

State: ``optimizer.state[p]`` holds ``"step"`` (torch's float32 scalar tensor) and
``stiefel_momentum_buffer`` or ``stiefel_exp_avg`` in the stack shape ``(m, l, n)``, with
``stiefel_exp_avg_sq`` (and ``stiefel_max_exp_avg_sq``) of shape ``(m, 1, 1)``; it round-trips
through ``state_dict`` and ``torch.load(weights_only=True)`` bitwise.  A parameter whose layout
has several pieces (blocks of unequal sizes, :mod:`orthoopt.pieces`) keeps one such state per
piece, the first under these keys and piece ``k`` under these keys suffixed ``.k``.  A parameter's mode is
meant to stay fixed during a run: the two modes' states are not converted into each other.

Other options of the base optimizers: ``maximize`` is honoured; ``foreach``, ``fused`` and
``capturable`` concern torch's kernels and do not change the hard step; ``differentiable=True``
is refused for a hard group (the step is taken under ``no_grad``).  Under a GradScaler with a
fused base optimizer (which unscales and skips itself), a step with ``found_inf`` set is no
hard step at all, and the hard step unscales the gradients as ``GradScaler.unscale_`` would
(:class:`orthoopt.plan.Amp`); it reads ``found_inf`` (a sync on an accelerator, as hard mode's
other checks are).

Non-finite values follow the group's ``ortho_nonfinite``, as in soft mode: :func:`check`
finds, before anything changes, the matrices whose point or gradient holds NaN or Inf, and
raises (``"raise"``), warns once per parameter (``"warn"``) or says nothing (``"skip"``);
:func:`step_` then moves only the finite matrices, with their rows of the state, exactly as
a parameter made of them alone would move.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import geoopt
import torch

from . import options, penalty
from .guard import OrthogonalityWarning
from .layout import Layout
from .options import report_nonfinite, warn_at_caller

__all__ = [
    "MANIFOLDS",
    "CANONICAL_STABILIZE",
    "PROJECTION_TOL",
    "HardItem",
    "manifold",
    "stabilize_period",
    "update_rule",
    "riemannian_sgd",
    "riemannian_adam",
    "check",
    "grads_hidden",
    "step_",
]

MANIFOLDS = {"euclidean": geoopt.EuclideanStiefel, "canonical": geoopt.CanonicalStiefel}
assert tuple(MANIFOLDS) == options.MANIFOLDS
# Canonical drift in float32 (OrthoAdam, lr 1e-2, a 64x16 Linear weight): max |XᵀX - I| over
# the first 300 steps is 4.3e-5 without re-projection, 1.7e-5 every 100 steps, 2.5e-6 every 10
# (256x64: 2.1e-5, 8.5e-6, 2.2e-6).  Median step time with an SVD every 10 steps: 0.278 ms vs
# 0.248 ms without (64x16), within the noise at 256x64 (2.3 vs 2.8 ms); 1 CPU thread.
CANONICAL_STABILIZE = 10
# geoopt's own tolerance for a point on the Stiefel manifold.
PROJECTION_TOL = 1e-5
_HALF = (torch.float16, torch.bfloat16)

# torch's key and format (a float32 scalar tensor): load_state_dict leaves "step" uncast, and
# Adam.__setstate__ requires it in every non-empty state.
STEP = "step"
MOMENTUM = "stiefel_momentum_buffer"
EXP_AVG = "stiefel_exp_avg"
EXP_AVG_SQ = "stiefel_exp_avg_sq"
MAX_EXP_AVG_SQ = "stiefel_max_exp_avg_sq"
# The tangent vector transported with the point: re-projected when stabilizing.
_TANGENT = (MOMENTUM, EXP_AVG)


@dataclass
class HardItem:
    """A piece of a parameter (:mod:`orthoopt.pieces`) that takes a hard step now.

    ``view`` is the piece of ``param`` (the parameter itself for a simple layout) with the
    simple ``layout``, ``grad_view`` the same piece of ``grad``, the parameter's whole gradient.
    The piece's state lives in the parameter's optimizer state under its keys plus ``suffix``
    ('' for the first piece).  ``finite`` (set by :func:`check`): which of its matrices are
    finite, point and gradient both, as a bool tensor of shape ``(m,)``; None when all are.
    """

    param: torch.Tensor
    layout: Layout
    grad: torch.Tensor
    group: dict[str, Any]
    name: str
    finite: torch.Tensor | None = None
    view: torch.Tensor | None = None
    grad_view: torch.Tensor | None = None
    suffix: str = ""
    unscale: torch.Tensor | None = None  # 1/scale of a GradScaler whose scale the gradient still carries

    def __post_init__(self) -> None:
        if self.view is None:
            self.view = self.param
        if self.grad_view is None:
            self.grad_view = self.grad

    def state(self, states: Any, *, create: bool = True) -> MutableMapping[str, Any]:
        """The piece's optimizer state in ``states`` (the optimizer's); ``create=False`` reads
        it without leaving an empty entry behind (``states`` is a defaultdict)."""
        if self.suffix:
            return _PieceState(states, self.param, self.suffix)
        return states[self.param] if create else states.get(self.param, {})


class _PieceState(MutableMapping):
    """A piece's view of its parameter's state dict: its keys are the parameter's keys that
    end in its suffix, without it.  Reading does not create the parameter's entry (the
    optimizer's state is a defaultdict); writing does."""

    def __init__(self, states: Any, param: torch.Tensor, suffix: str):
        self.states, self.param, self.suffix = states, param, suffix

    def _own(self) -> dict[str, Any]:
        return self.states.get(self.param, {})

    def __getitem__(self, key: str) -> Any:
        return self._own()[key + self.suffix]

    def __setitem__(self, key: str, value: Any) -> None:
        self.states[self.param][key + self.suffix] = value

    def __delitem__(self, key: str) -> None:
        del self.states[self.param][key + self.suffix]

    def _keys(self) -> list[str]:
        return [k[: -len(self.suffix)] for k in self._own() if k.endswith(self.suffix)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


_INSTANCES = {name: cls() for name, cls in MANIFOLDS.items()}


def manifold(name: str) -> geoopt.Manifold:
    """The geoopt manifold named by a group's ``ortho_manifold``."""
    return _INSTANCES[name]


def stabilize_period(group: dict[str, Any], dtype: torch.dtype = torch.float32) -> int | None:
    """Every how many hard steps a parameter of ``group`` is re-projected (None: never)."""
    period = group["ortho_stabilize"]
    if period == "auto":
        if group["ortho_manifold"] != "canonical":
            return None
        # The Cayley step keeps a half parameter's rounding error and adds its own each step.
        return 1 if dtype in _HALF else CANONICAL_STABILIZE
    return period


def update_rule(optimizer_cls: type) -> str:
    """'sgd' or 'adam': the geoopt rule that stands in for ``optimizer_cls``'s base update."""
    if issubclass(optimizer_cls, torch.optim.SGD):
        return "sgd"
    if issubclass(optimizer_cls, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    bases = [c.__name__ for c in optimizer_cls.__mro__[1:] if issubclass(c, torch.optim.Optimizer)]
    raise TypeError(
        f"ortho_mode='hard' follows geoopt's RiemannianSGD or RiemannianAdam, so it needs an "
        f"optimizer built on torch.optim.SGD, Adam or AdamW; {optimizer_cls.__name__} "
        f"(bases: {', '.join(bases)}) is neither. Use ortho_mode='soft' with it, or OrthoSGD, "
        f"OrthoAdam or OrthoAdamW"
    )


# -- the update rules, one parameter's stack at a time ----------------------------------
def riemannian_sgd(
    x: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    stiefel: geoopt.Manifold,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    name: str,
) -> torch.Tensor:
    """geoopt's RiemannianSGD step on a stack ``x`` (torch's first momentum step); returns
    the new point and updates ``state`` in place."""
    rgrad = stiefel.egrad2rgrad(x, _euclidean_grad(x, grad, weight_decay, maximize))
    if momentum == 0:
        return _guarded(stiefel, "retr", name, x, -lr * rgrad)
    buf = state.get(MOMENTUM)
    if buf is None:
        buf = state[MOMENTUM] = rgrad.clone()
    else:
        buf.mul_(momentum).add_(rgrad, alpha=1 - dampening)
    direction = rgrad.add_(buf, alpha=momentum) if nesterov else buf
    new_x, new_buf = _guarded(stiefel, "retr_transp", name, x, -lr * direction, buf)
    buf.copy_(new_buf)
    return new_x


def riemannian_adam(
    x: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    stiefel: geoopt.Manifold,
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
    weight_decay: float,
    maximize: bool,
    name: str,
    second_moment: str = "mean",
) -> torch.Tensor:
    """geoopt's RiemannianAdam step on a stack ``x`` (one second moment per matrix); returns
    the new point and updates ``state`` in place.  ``second_moment="sum"`` is geoopt's
    ``<ξ, ξ>_X``; ``"mean"`` divides it by the matrix's ``l·n`` entries."""
    beta1, beta2 = (float(b) for b in betas)
    rgrad = stiefel.egrad2rgrad(x, _euclidean_grad(x, grad, weight_decay, maximize))
    sq = stiefel.component_inner(x, rgrad)
    if second_moment == "mean":
        sq = sq.div_(x.shape[-2] * x.shape[-1])
    if EXP_AVG not in state:
        state[EXP_AVG] = torch.zeros_like(x)
        state[EXP_AVG_SQ] = torch.zeros_like(sq)
    if amsgrad and MAX_EXP_AVG_SQ not in state:
        state[MAX_EXP_AVG_SQ] = torch.zeros_like(sq)
    exp_avg, exp_avg_sq = state[EXP_AVG], state[EXP_AVG_SQ]
    exp_avg.mul_(beta1).add_(rgrad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(sq, alpha=1 - beta2)
    step = state[STEP].item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if amsgrad:
        torch.maximum(state[MAX_EXP_AVG_SQ], exp_avg_sq, out=state[MAX_EXP_AVG_SQ])
        denom = state[MAX_EXP_AVG_SQ].div(bias_correction2).sqrt_()
    else:
        denom = exp_avg_sq.div(bias_correction2).sqrt_()
    direction = exp_avg.div(bias_correction1) / denom.add_(eps)
    new_x, new_avg = _guarded(stiefel, "retr_transp", name, x, -lr * direction, exp_avg)
    exp_avg.copy_(new_avg)
    return new_x


def _euclidean_grad(x: torch.Tensor, grad: torch.Tensor, weight_decay: float, maximize: bool) -> torch.Tensor:
    # Out of place (geoopt adds in place): the caller's .grad must stay as autograd left it.
    grad = -grad if maximize else grad
    return grad.add(x, alpha=weight_decay) if weight_decay else grad


def _guarded(stiefel: geoopt.Manifold, op: str, name: str, x: torch.Tensor, *args: torch.Tensor):
    """``stiefel.<op>(x, *args)``, redone per matrix, then with the QR retraction, if the
    Cayley solve trips MKL's batched lu_solve error on CPU."""
    try:
        return getattr(stiefel, op)(x, *args)
    except RuntimeError as e:
        if not _is_pivot_error(e):
            raise
        error = e
    try:
        parts = [getattr(stiefel, op)(x[i], *(a[i] for a in args)) for i in range(x.shape[0])]
        warn_at_caller(
            f"{name}: geoopt's batched Cayley solve failed on this step ({error}); redid it one matrix at a time",
        )
        if op == "retr":
            return torch.stack(parts)
        return tuple(torch.stack(t) for t in zip(*parts))
    except RuntimeError as e:
        if not _is_pivot_error(e):
            raise
    warn_at_caller(
        f"{name}: geoopt's Cayley solve failed on this step ({error}), also one matrix at a "
        f"time; took this step with the Euclidean QR retraction instead",
    )
    return getattr(manifold("euclidean"), op)(x, *args)


def _is_pivot_error(e: RuntimeError) -> bool:
    return "lu_solve" in str(e) or "Pivots" in str(e)


# -- the step -------------------------------------------------------------------------------
# The hard step reads values on the host (finiteness, the step count, a failed solve): under
# torch.compile it runs eagerly, at a graph break, rather than traced in pieces.
@torch.compiler.disable
def check(optimizer: torch.optim.Optimizer, items: list[HardItem]) -> None:
    """Refuse a hard step that cannot be taken correctly, before anything has changed, and
    apply the groups' ``ortho_nonfinite`` policy (which sets each item's ``finite``)."""
    if not items:
        return
    update_rule(type(optimizer))
    bad: dict[str, list[str]] = {}
    for item in items:
        if item.param.is_meta:
            continue  # no values to look at
        # The hard step reads the gradient itself (the base update never sees it): a NaN
        # there would reach the point and its state, as one in the point would.
        point, grad = item.layout.matrices(item.view), item.layout.matrices(item.grad_view)
        finite = torch.isfinite(point).flatten(1).all(1) & torch.isfinite(grad).flatten(1).all(1)
        if not bool(finite.all()):
            item.finite = finite
            bad.setdefault(item.group["ortho_nonfinite"], []).append(item.name)
    for policy in sorted(bad, key=options.NONFINITE.index, reverse=True):  # "raise" first
        report_nonfinite(
            optimizer,
            bad[policy],
            policy,
            "hard mode takes no step on its matrices that are not finite (in the parameter or its gradient) "
            "and leaves their optimizer state as it was",
        )


@contextmanager
def grads_hidden(items: list[HardItem]) -> Iterator[None]:
    """Set the hard parameters' ``.grad`` to None, so that the base update skips them."""
    for item in items:
        item.param.grad = None
    try:
        yield
    finally:
        for item in items:
            item.param.grad = item.grad


@torch.compiler.disable
@torch.no_grad()
def step_(optimizer: torch.optim.Optimizer, items: list[HardItem]) -> None:
    """Take one Riemannian step for each item, in place, with its state in ``optimizer.state``.

    Only the matrices that :func:`check` found finite move; a parameter with none gets no
    state entry and no step.  The others' state is updated on their rows alone (a new
    state starts at zero on the skipped rows), and the step counter, one per parameter,
    counts the steps taken by any of its matrices.
    """
    if not items:
        return
    rule = update_rule(type(optimizer))
    items = [item for item in items if item.finite is None or bool(item.finite.any())]
    # The piece's state reads without creating an entry in optimizer.state (a defaultdict).
    _project_new([item for item in items if STEP not in item.state(optimizer.state, create=False)])
    for item in items:
        p, keep = item.view, item.finite
        state = item.state(optimizer.state)
        dtype = torch.float32 if p.dtype in _HALF else p.dtype
        _widen_state(state, dtype)
        x = item.layout.matrices(p).to(dtype)
        grad = item.layout.matrices(item.grad_view)
        if item.unscale is not None:  # as GradScaler.unscale_ does, in the gradient's dtype
            grad = torch.mul(grad, item.unscale).to(grad.dtype)
        grad = grad.to(dtype)
        state.setdefault(STEP, torch.tensor(0.0)).add_(1)
        if keep is None:
            new_x = _step_stack(rule, item, x, grad, state)
        else:
            rows = {k: v[keep] if k.startswith("stiefel_") else v for k, v in state.items()}
            new_x = x.clone()
            new_x[keep] = _step_stack(rule, item, x[keep], grad[keep], rows)
            _scatter_rows(state, rows, keep)
        p.copy_(item.layout.from_matrices(new_x, p.shape))


def _step_stack(rule: str, item: HardItem, x: torch.Tensor, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """The new point of the stack ``x`` (its state updated in place), re-projected when due."""
    group = item.group
    stiefel = manifold(group["ortho_manifold"])
    if rule == "sgd":
        new_x = riemannian_sgd(
            x,
            grad,
            state,
            stiefel,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            maximize=group.get("maximize", False),
            name=item.name,
        )
    else:
        new_x = riemannian_adam(
            x,
            grad,
            state,
            stiefel,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            amsgrad=group["amsgrad"],
            weight_decay=0.0 if group.get("decoupled_weight_decay", False) else group["weight_decay"],
            maximize=group.get("maximize", False),
            name=item.name,
            second_moment=group["ortho_second_moment"],
        )
    period = stabilize_period(group, item.param.dtype)
    if period and int(state[STEP].item()) % period == 0:
        new_x = _stabilize(stiefel, new_x, state)
    return new_x


def _scatter_rows(state: dict[str, Any], rows: dict[str, Any], keep: torch.Tensor) -> None:
    """Write the per-matrix state of the rows ``keep`` back into the parameter's state."""
    for key, value in rows.items():
        if not key.startswith("stiefel_"):
            continue
        if key not in state:
            state[key] = value.new_zeros((keep.shape[0], *value.shape[1:]))
        state[key][keep] = value


def _stabilize(stiefel: geoopt.Manifold, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """geoopt's ``stabilize_group`` for one parameter: back onto the manifold, and its
    transported vector back onto the tangent space there."""
    x = stiefel.projx(x)
    # The orthogonal projection onto the tangent space is EuclideanStiefel's for both metrics:
    # CanonicalStiefel.proju is its egrad2rgrad, u - X uᵀ X, which doubles the X·skew part of
    # a tangent vector, so re-applying it (as geoopt's stabilize_group does) blows momentum up.
    tangent = manifold("euclidean")
    for key in _TANGENT:
        if key in state:
            state[key].copy_(tangent.proju(x, state[key]))
    return x


def _widen_state(state: dict[str, Any], dtype: torch.dtype) -> None:
    # load_state_dict casts state to the parameter's dtype; half parameters keep fp32 state.
    for key, value in state.items():
        if key.startswith("stiefel_") and isinstance(value, torch.Tensor) and value.dtype != dtype:
            state[key] = value.to(dtype)


def _project_new(items: list[HardItem]) -> None:
    """Snap parameters that start hard mode onto the manifold (their finite matrices); warn
    about those that moved, unless their group asked for the projection (``ortho_init="project"``,
    the default of ``param_groups`` and ``constrain_``)."""
    moved = []
    for item in items:
        p, layout, keep = item.view, item.layout, item.finite
        mats = layout.matrices(p)
        before_rows = mats if keep is None else mats[keep]
        rows = penalty.polar(before_rows)
        if keep is None:
            projected = rows
        else:
            projected = mats.clone()
            projected[keep] = rows
        if not p.is_meta:  # nothing to measure on the meta device
            before = penalty.max_error(before_rows)
            # A half parameter is only as orthonormal as its rounding: judge it against that.
            asked = item.group["ortho_init"] == "project"
            if not asked and not before <= max(PROJECTION_TOL, 2 * penalty.max_error(rows)):
                moved.append(f"{item.name} (max |XᵀX - I| = {before:.3g})")
        p.copy_(layout.from_matrices(projected, p.shape))
    if moved:
        warn_at_caller(
            f"ortho_mode='hard': projected onto the Stiefel manifold (polar factor) at their first "
            f"hard step: {', '.join(moved)}. Call orthoopt.project_(optimizer) before training to "
            f"start there",
            OrthogonalityWarning,
        )
