r"""A mixture of probabilistic PCA on the digits: a group prior on a probabilistic model.

Tipping and Bishop (1999), "Mixtures of probabilistic principal component analyzers".
Component ``i`` of ``m`` is a Gaussian on the ``l`` pixels with mean :math:`\mu_i` and covariance

.. math::
    C_i = \Phi_i \operatorname{diag}(s_i^2)\, \Phi_i^\top + \sigma_i^2 I_l,
    \qquad \Phi_i^\top \Phi_i = I_n,

where :math:`\Phi_i = \Phi[:, i, :]` is a slice of the group tensor :math:`\Phi \in
\mathbb{R}^{l\times m\times n}` (layout ``group_axis:1``).  With :math:`W_i = \Phi_i
\operatorname{diag}(s_i)` the density depends on :math:`W_i W_i^\top` only, so the constraint
takes nothing from the model: it fixes the gauge (the columns of :math:`\Phi_i` are then the
component's principal directions, :math:`s_i^2 + \sigma_i^2` its variances along them) and
the constrained and unconstrained maxima of the likelihood are the same.

Log-densities, for any :math:`W_i` (orthonormal or not), by the matrix determinant lemma and
Woodbury's identity with the ``n × n`` matrix :math:`M_i = \sigma_i^2 I_n + W_i^\top W_i =
L_i L_i^\top` (Cholesky):

.. math::
    \log|C_i| = (l - n)\log\sigma_i^2 + 2\sum_j \log (L_i)_{jj},\qquad
    d^\top C_i^{-1} d = \big(\|d\|^2 - \|L_i^{-1} W_i^\top d\|^2\big)/\sigma_i^2 .

The reference is the closed-form EM of Tipping and Bishop (numpy, float64): the E-step's
responsibilities, then per component the weighted mean and covariance :math:`S_i` and its
eigendecomposition, :math:`\sigma_i^2` = the mean of the ``l - n`` smallest eigenvalues,
:math:`W_i = U_n(\Lambda_n - \sigma_i^2 I)^{1/2}`.  Each M-step maximises the expected
complete-data likelihood exactly (the PPCA solution of :math:`S_i`), so the likelihood never
falls.  Supervised (component = class), one M-step with the labels as responsibilities is the
maximum-likelihood fit itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .formatting import pm

__all__ = ["log_likelihoods", "MPPCA", "EMResult", "em", "spectral_log_likelihoods", "problem_fields", "against_em"]

LOG_2PI = math.log(2 * math.pi)


def log_likelihoods(x: torch.Tensor, mu: torch.Tensor, w: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``log N(x_k | μ_i, W_i W_iᵀ + σ_i² I)`` as ``(N, m)``: ``x`` (N, l), ``mu`` (m, l), ``w`` (m, l, n), ``log_var`` (m,)."""
    l, n = w.shape[-2:]
    var = log_var.exp()
    d = x.unsqueeze(0) - mu.unsqueeze(1)  # (m, N, l)
    gram = w.mT @ w + var[:, None, None] * torch.eye(n, dtype=w.dtype, device=w.device)
    chol = torch.linalg.cholesky(gram)
    z = torch.linalg.solve_triangular(chol, (d @ w).mT, upper=False)  # L⁻¹ Wᵀ d, (m, n, N)
    maha = ((d * d).sum(-1) - (z * z).sum(-2)) / var[:, None]
    logdet = (l - n) * log_var + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return (-0.5 * (l * LOG_2PI + logdet[:, None] + maha)).T


class MPPCA(nn.Module):
    """The mixture's parameters; ``phi`` is the ``(l, m, n)`` group tensor."""

    def __init__(self, phi: torch.Tensor, scale: torch.Tensor, var: torch.Tensor, mu: torch.Tensor):
        super().__init__()
        self.phi = nn.Parameter(phi.clone())
        self.log_scale = nn.Parameter(scale.log())  # s_i, (m, n)
        self.log_var = nn.Parameter(var.log())  # σ_i², (m,)
        self.mu = nn.Parameter(mu.clone())  # (m, l)
        self.logits = nn.Parameter(torch.zeros_like(var))  # mixing weights π = softmax

    def loadings(self) -> torch.Tensor:
        """``W_i = Φ_i diag(s_i)``, ``(m, l, n)``."""
        return self.phi.movedim(1, 0) * self.log_scale.exp().unsqueeze(1)

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log π_i + log N(x_k | component i)``, ``(N, m)``; float64 copies when ``x`` is float64."""
        p = {k: v.to(x.dtype) for k, v in (("w", self.loadings()), ("mu", self.mu), ("lv", self.log_var))}
        return torch.log_softmax(self.logits.to(x.dtype), 0) + log_likelihoods(x, p["mu"], p["w"], p["lv"])

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean log-likelihood per image: ``log p(x)`` of the mixture, or ``log p(x, y)`` given labels."""
        joint = self.joint(x)
        if y is None:
            return torch.logsumexp(joint, 1).mean()
        return joint.gather(1, y[:, None]).mean()


# -- the reference: closed-form EM (numpy, float64) ------------------------------------------
@dataclass
class EMResult:
    """EM's fit: ``u`` (m, l, n) orthonormal, ``lam`` (m, n) the variances along them, ``var`` σ² (m,)."""

    pi: np.ndarray
    mu: np.ndarray
    u: np.ndarray
    lam: np.ndarray
    var: np.ndarray
    history: list[float]  # the mean training log-likelihood before each M-step, then the final one
    times: list[float]  # seconds since the start, at each entry of history


def spectral_log_likelihoods(x: np.ndarray, mu: np.ndarray, u: np.ndarray, lam: np.ndarray, var: np.ndarray):
    """``log N(x_k | μ_i, U_i diag(λ_i) U_iᵀ + σ_i²(I - U_i U_iᵀ))``, ``(N, m)``, from the eigenvalues."""
    l = x.shape[1]
    d = x[None] - mu[:, None]  # (m, N, l)
    proj = d @ u  # (m, N, n)
    maha = (d * d).sum(-1) / var[:, None] - (proj**2 * (1 / var[:, None, None] - 1 / lam[:, None])).sum(-1)
    logdet = np.log(lam).sum(-1) + (l - u.shape[-1]) * np.log(var)
    return (-0.5 * (l * LOG_2PI + logdet[:, None] + maha)).T


def _e_step(x, fit) -> tuple[np.ndarray, float]:
    joint = np.log(fit.pi) + spectral_log_likelihoods(x, fit.mu, fit.u, fit.lam, fit.var)
    top = joint.max(1, keepdims=True)
    log_px = top[:, 0] + np.log(np.exp(joint - top).sum(1))
    return np.exp(joint - log_px[:, None]), float(log_px.mean())


def _m_step(x: np.ndarray, resp: np.ndarray, n: int, fit: EMResult) -> None:
    weight = resp.sum(0)  # (m,)
    fit.pi = weight / len(x)
    fit.mu = (resp.T @ x) / weight[:, None]
    for i in range(len(weight)):
        d = x - fit.mu[i]
        cov = (resp[:, i, None] * d).T @ d / weight[i]
        evals, evecs = np.linalg.eigh(cov)  # ascending
        fit.var[i] = evals[:-n].mean()
        fit.lam[i] = evals[::-1][:n]
        fit.u[i] = evecs[:, ::-1][:, :n]


def em(
    x: np.ndarray, init: EMResult, *, labels: np.ndarray | None = None, max_iter: int = 2000, tol: float = 1e-10
) -> EMResult:
    """EM from ``init`` until the mean log-likelihood gains less than ``tol`` (relative), or ``max_iter``.

    With ``labels`` the responsibilities are the one-hot labels: one M-step, the exact ML fit.
    """
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency, as the digits are

    with threadpool_limits(1):  # as the torch runs; on a loaded 2-core machine BLAS threads only contend
        return _em(x, init, labels, max_iter, tol)


def _em(x, init, labels, max_iter, tol) -> EMResult:
    fit = EMResult(*(np.array(a, dtype=np.float64) for a in (init.pi, init.mu, init.u, init.lam, init.var)), [], [])
    start = time.perf_counter()
    for _ in range(1 if labels is not None else max_iter):
        resp, ll = _e_step(x, fit)
        fit.history.append(ll)
        fit.times.append(time.perf_counter() - start)
        if labels is not None:
            resp = np.eye(len(fit.pi))[labels]
        elif len(fit.history) > 1 and ll - fit.history[-2] <= tol * abs(ll):
            break
        _m_step(x, resp, fit.u.shape[-1], fit)
    fit.times.append(time.perf_counter() - start)
    fit.history.append(_e_step(x, fit)[1] if labels is None else _labelled_ll(x, labels, fit))
    return fit


def _labelled_ll(x: np.ndarray, labels: np.ndarray, fit: EMResult) -> float:
    joint = np.log(fit.pi) + spectral_log_likelihoods(x, fit.mu, fit.u, fit.lam, fit.var)
    return float(joint[np.arange(len(x)), labels].mean())


# -- the task ---------------------------------------------------------------------------------
def _initial(xtr: np.ndarray, ytr: np.ndarray, m: int, n: int, supervised: bool, seed: int) -> EMResult:
    """One draw per seed, shared by EM and every gradient method: means at training images (of
    the component's class when supervised), Φ_i Haar-orthonormal, s_i² = 1/4, σ_i² = the mean
    pixel variance, equal weights."""
    rng = np.random.default_rng(seed)
    if supervised:
        mu = np.stack([xtr[rng.choice(np.flatnonzero(ytr == i))] for i in range(m)])
    else:
        mu = xtr[rng.choice(len(xtr), m, replace=False)]
    q, r = np.linalg.qr(rng.standard_normal((m, xtr.shape[1], n)))
    u = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    var = np.full(m, xtr.var(0).mean())
    return EMResult(np.full(m, 1.0 / m), mu, u, 0.25 + var[:, None] * np.ones((m, n)), var, [], [])


def check(*, n: int, supervised: int, **_: Any) -> None:
    """Refuse settings the task cannot run with, naming the parameter and its bound."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 64:
        raise ValueError(f"task mppca: n (latent dimensions per component) must be an integer in 1..63, got {n!r}")
    if supervised not in (0, 1, True, False):
        raise ValueError(f"task mppca: supervised must be 0 or 1, got {supervised!r}")


def problem_fields(
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    seed: int = 0,
    n: int = 4,
    supervised: int = 0,
    em_max_iter: int = 2000,
    dtype=torch.float32,
    device="cpu",
) -> dict[str, Any]:
    """The fields of the task's Problem for one seed; ``split`` = (x_train, x_test, y_train, y_test).

    The loss is the negative mean training log-likelihood per image (``-log p(x)``, or
    ``-log p(x, y)`` when supervised), full batch.  ``f_star`` is EM's, from the same initial
    point; the target is a loss within 0.1% of it.  ``evaluate`` reports the held-out
    log-likelihood in float64, EM's, and EM's time to the same target.
    """
    check(n=n, supervised=supervised)
    xtr, xte, ytr, yte = split
    m = 10
    init = _initial(xtr, ytr, m, n, bool(supervised), seed)
    fit = em(xtr, init, labels=ytr if supervised else None, max_iter=em_max_iter)
    labels_te = yte if supervised else None
    em_test = _labelled_ll(xte, yte, fit) if supervised else _e_step(xte, fit)[1]
    f_star = -fit.history[-1]
    em_target = next(t for t, ll in zip(fit.times, fit.history) if -ll <= f_star + 1e-3 * abs(f_star))

    as_torch = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    # s_i² = λ_i - σ_i²: the same covariance as EM's initial point
    scale = np.sqrt(init.lam - init.var[:, None])
    model = MPPCA(as_torch(init.u).movedim(0, 1), as_torch(scale), as_torch(init.var), as_torch(init.mu))
    x, y = as_torch(xtr), torch.as_tensor(ytr, device=device) if supervised else None
    x64, xte64 = (torch.as_tensor(a, dtype=torch.float64, device=device) for a in (xtr, xte))
    y64 = torch.as_tensor(ytr, device=device) if supervised else None
    yte64 = torch.as_tensor(labels_te, device=device) if supervised else None

    def loss(_t: int = 0) -> torch.Tensor:
        return -model.log_likelihood(x, y)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {
            "test_ll": model.log_likelihood(xte64, yte64).item(),
            "train_ll": model.log_likelihood(x64, y64).item(),
            "em_test_ll": em_test,
            "em_train_ll": fit.history[-1],
            "em_s": fit.times[-1],
            "em_to_target_s": em_target,
            "em_iters": len(fit.history) - 1,
        }

    return {
        "model": model,
        "loss": loss,
        "include": ["phi"],
        "layout": "group_axis:1",
        "f_star": f_star,
        "evaluate": evaluate,
        "target": lambda value: value <= f_star + 1e-3 * abs(f_star),
        "target_text": "training log-likelihood within 0.1% of EM's (from the same initial point)",
    }


TASK_SETTINGS: dict[str, Any] = {
    "description": "mixture of 10 probabilistic PCAs on sklearn digits, Φ (64, 10, n) orthonormal per component",
    "base": "adam",
    "lr": 1e-2,
    "beta": 10.0,
    "smoothing": 1e-2,
    "steps": 1500,
    "quick_steps": 30,
    "metrics": {"test_ll": ("test LL/digit", 1.0), "em_test_ll": ("EM test LL", 1.0)},
    "params": {"n": 4, "supervised": 0},
    "methods": ("none", "soft", "soft-huber", "soft-auto", "hard"),
}


# -- reading its runs -----------------------------------------------------------------------
def against_em(comp, rows, name: str) -> str:
    """Each method's held-out log-likelihood against EM's (per seed, the same initial point):
    a markdown section.  ``rows``: ``(label, runs)`` in table order; ``name``: "supervised" or
    "unsupervised"."""
    lines = [
        f"### {name}: against EM",
        "",
        "| method | test LL/digit | test LL - EM's | train LL/digit | orth max-abs | to 0.1% of EM: s (step) | "
        "step ms | iter ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seeds = comp.config["seeds"]
    em = [next(r for r in comp.runs if r.seed == s and r.ok).final for s in seeds]
    for method, runs in rows:
        runs = [r for r in runs if r.ok]
        if not runs:
            lines.append(f"| {method} | failed or diverged | | | | | | |")
            continue
        hits = [r for r in runs if r.time_to_target is not None]
        to_target = (
            "never" if not hits else f"{pm([r.time_to_target for r in hits])} ({pm([r.step_to_target for r in hits])})"
        )
        if hits and len(hits) < len(runs):
            to_target += f", {len(hits)}/{len(runs)} seeds"
        cells = [
            method,
            pm([r.final["test_ll"] for r in runs], 5),
            pm([r.final["test_ll"] - r.final["em_test_ll"] for r in runs]),
            pm([r.final["train_ll"] for r in runs], 5),
            pm([r.final["orth_max"] for r in runs]),
            to_target,
            pm([r.final["step_ms"] for r in runs]),
            pm([r.final["iter_ms"] for r in runs]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    em_cells = [
        "EM (numpy, float64)",
        pm([f["em_test_ll"] for f in em], 5),
        "0",
        pm([f["em_train_ll"] for f in em], 5),
        "rounding (eigh)",
        f"{pm([f['em_to_target_s'] for f in em])} ({pm([f['em_iters'] for f in em])} iterations in all, "
        f"{pm([f['em_s'] for f in em])} s)",
        "-",
        "-",
    ]
    lines.append("| " + " | ".join(em_cells) + " |")
    lines += [
        "",
        f"{len(seeds)} seed(s); per seed every method and EM start from the same parameters. LL = log-likelihood "
        "per image in nats (" + ("log p(x, y)" if name == "supervised" else "the mixture's log p(x)") + "), "
        "evaluated in float64 on the held-out quarter of the digits; EM's time is numpy's (one BLAS thread).",
    ]
    return "\n".join(lines)
