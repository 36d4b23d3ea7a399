r"""The landing method: orthogonality without retraction, as a comparison baseline.

Ablin and Peyré (AISTATS 2022), "Fast and accurate optimization on the orthogonal manifold
without retraction", and its Stiefel extension by Ablin, Vary, Gao and Absil (2023),
"Infeasible deterministic, stochastic, and variance-reduction algorithms for optimization
under orthogonality constraints".  For a tall :math:`X\in\mathbb{R}^{l\times n}` (columns to
be orthonormal, :mod:`orthoopt.layout`) and the Euclidean gradient :math:`G = \nabla f(X)`,

.. math::
    \begin{aligned}
    &\psi(X) = \operatorname{skew}(G X^\top) = \tfrac12 (G X^\top - X G^\top)
        && \text{(relative gradient)}\\
    &\Lambda(X) = \psi(X)\, X + \lambda\, X (X^\top X - I_n)
        && \text{(landing field)}\\
    &d = \|X^\top X - I_n\|_F,\quad g = \|\Lambda(X)\|_F\\
    &\eta^*(X) = \frac{\lambda d (1-d) + \sqrt{\lambda^2 d^2 (1-d)^2 + g^2 (\varepsilon - d)}}{g^2}
        && \text{(safe step)}\\
    &X \leftarrow X - \min(\gamma, \eta^*(X))\, \Lambda(X)
    \end{aligned}

:math:`\psi(X) X = \tfrac12 (G X^\top X - X G^\top X)` is computed without forming the
:math:`l\times l` matrix :math:`\psi`.  The safe step is the one of Ablin, Vary, Gao and Absil
(2023, the safe step-size lemma of the Stiefel landing), as the authors' code computes it
(``_safe_step_size(d, g, lambda_regul, eps_d)`` in ``LandingStiefelSGD``,
github.com/pierreablin/landing and its Stiefel fork).  Its derivation, which is also why it
holds: :math:`X^\top \psi X` is skew, so with :math:`R = X^\top X - I`,

.. math::
    R^+ = R - 2\eta\lambda (R + R^2) + \eta^2 \Lambda^\top\Lambda, \qquad
    \|R^+\|_F \le d - 2\eta\lambda d (1 - d) + \eta^2 g^2,

the second bound using :math:`\|(1 - 2\eta\lambda) R\|_F = (1 - 2\eta\lambda) d`, true for
:math:`\eta \le 1/(2\lambda)`; :math:`\eta^*` is the larger root of
:math:`\eta^2 g^2 - 2\eta\lambda d(1-d) + d - \varepsilon`.  So any
:math:`0\le\eta\le\min(\eta^*, 1/(2\lambda))` keeps :math:`\|R^+\|_F \le \varepsilon` once
:math:`d \le \varepsilon`; :func:`safe_step_size` returns that minimum (the authors' code omits
the :math:`1/(2\lambda)` cap, which only binds for :math:`\gamma\lambda > 1/2`).
"""

from __future__ import annotations

import torch

from ..layout import resolve_layout

__all__ = ["Landing", "landing_field", "safe_step_size"]


def landing_field(x: torch.Tensor, grad: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Λ(X), XᵀX - I)`` for a stack of tall matrices ``(m, l, n)``."""
    xtx = x.mT @ x
    gtx = grad.mT @ x
    relative = 0.5 * (grad @ xtx - x @ gtx)  # ψ(X) X
    r = xtx
    r.diagonal(dim1=-2, dim2=-1).sub_(1)
    return relative + lam * (x @ r), r


def safe_step_size(d: torch.Tensor, g: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """The largest η that provably keeps ``‖XᵀX - I‖_F <= eps`` after ``X - ηΛ`` (module docstring)."""
    b = lam * d * (1 - d)
    disc = (b * b + g * g * (eps - d)).clamp_min(0)
    g2 = (g * g).clamp_min(torch.finfo(g.dtype).tiny)
    return ((b + disc.sqrt()) / g2).clamp(max=0.5 / lam)


class Landing(torch.optim.Optimizer):
    """Landing SGD on parameters with an orthoopt layout (``"auto"`` by default).

    Args:
        lr: the step γ (capped per matrix by the safe step).
        lam: λ, the weight of the normal (attraction) term.
        eps: ε, the largest distance ``‖XᵀX - I‖_F`` the safe step allows.
        momentum: heavy-ball momentum on the Euclidean gradient (0: plain landing).
        layout: the :mod:`orthoopt.layout` spec of each group's parameters.
    """

    def __init__(
        self, params, lr: float = 1e-2, lam: float = 1.0, eps: float = 0.5, momentum: float = 0.0, layout="auto"
    ):
        if not lr >= 0:
            raise ValueError(f"Landing: lr must be >= 0, got {lr}")
        if not lam > 0:
            raise ValueError(f"Landing: lam must be > 0 (the normal term's weight), got {lam}")
        if not 0 < eps < 1:
            raise ValueError(f"Landing: eps must lie in (0, 1) (distance tolerance), got {eps}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Landing: momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "lam": lam, "eps": eps, "momentum": momentum, "layout": layout})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                layout = resolve_layout(group["layout"], p.shape, f"Landing group {gi} parameter {i}")
                grad = p.grad
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = grad.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(grad)
                    grad = buf
                if layout is None:  # 0-D/1-D: plain SGD
                    p.add_(grad, alpha=-group["lr"])
                    continue
                x = layout.matrices(p)
                field, r = landing_field(x, layout.matrices(grad), group["lam"])
                d = torch.linalg.matrix_norm(r)
                g = torch.linalg.matrix_norm(field)
                eta = safe_step_size(d, g, group["lam"], group["eps"]).clamp(max=group["lr"])
                p.add_(layout.from_matrices(field * -eta[:, None, None], p.shape))
        return loss
