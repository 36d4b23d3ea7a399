r"""Certified-robust 1-Lipschitz networks on the digits: a task where exactness is the point.

A network :math:`f = W_D \circ \sigma \circ W_{D-1} \circ \dots \circ \sigma \circ W_1` (biases
included) with the MaxMin activation :math:`\sigma` (GroupSort with groups of two, Anil, Lucas
and Grosse 2019), which is 1-Lipschitz, has the Lipschitz constant in the ℓ2 norm

.. math::
    L \le \prod_i \sigma_{\max}(W_i),

which is 1 when every :math:`W_i` is orthogonal (square, or orthonormal rows or columns).
Each pair of logits :math:`f_y - f_j` is then :math:`\sqrt{2}L`-Lipschitz (``e_y - e_j`` has
norm √2), so a point classified with margin :math:`M = f_y(x) - \max_{j \ne y} f_j(x) > 0` keeps
its class under every perturbation :math:`\|\delta\|_2 < M / (\sqrt{2} L)`, its certified radius.
The certificate uses the true :math:`L`, computed exactly at the end from the weights the
network computes with (:func:`lipschitz_constant`): a method that leaves a layer off the
manifold pays with every radius shrunk by :math:`1/L`, and :math:`L` compounds over the layers.

Every certificate is checked against an attack: targeted PGD in ℓ2 (:func:`pgd_l2`) at the
same radii, each break it finds confirmed in float64; a certified point must never be broken
(``cert_broken`` counts the points that were, and must be 0).

The data are sklearn's digits (no download), standardized with the training split's mean and
standard deviation, the 3:1 split of the other digit tasks; the loss is the multi-class hinge
with margin :math:`\sqrt{2}\,r_{\text{train}}` (``torch.nn.functional.multi_margin_loss``), the
margin a 1-Lipschitz network needs to certify :math:`r_{\text{train}}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import orthogonality_error, project_

__all__ = [
    "max_min",
    "MaxMin",
    "LipschitzMLP",
    "forward_with",
    "lipschitz_constant",
    "margins",
    "certified_radius",
    "pgd_l2",
    "orthogonality_per_layer",
    "robustness",
    "projected",
    "evaluate_robustness",
    "check",
    "problem_fields",
    "TASK_SETTINGS",
    "RADII",
]

CLASSES = 10
FEATURES = 64
# The three radii of the certified and PGD accuracies (standardized pixel units), chosen so that
# the best method at depth 6, width 128 after the task's 1000 steps certifies about 80%, 50% and 20%
# of the test digits (hard-canonical, 3 seeds: 78.9%, 48.2% and 19.1%; experiments/lipschitz.py).
RADII = (1.0, 1.5, 2.0)


def max_min(x: torch.Tensor) -> torch.Tensor:
    """MaxMin on the last axis: its halves ``a``, ``b`` become ``(max(a, b), min(a, b))``.

    Its Jacobian is a permutation matrix wherever ``a ≠ b``, so it is 1-Lipschitz and keeps the
    norm of every gradient it passes back.
    """
    a, b = x.chunk(2, dim=-1)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=-1)


class MaxMin(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_min(x)


class LipschitzMLP(nn.Module):
    """``depth`` linear layers ``64 → width → … → width → 10`` with MaxMin between them.

    Every weight starts orthogonal in its own dtype (``nn.init.orthogonal_``: square,
    orthonormal columns for the first layer when ``width > 64``, orthonormal rows for the last),
    every bias at zero.
    """

    def __init__(
        self,
        depth: int = 6,
        width: int = 128,
        features: int = FEATURES,
        classes: int = CLASSES,
        dtype=None,
        device=None,
    ):
        super().__init__()
        sizes = [features] + [width] * (depth - 1) + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype, device=device) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = MaxMin()
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(W_i, b_i)`` as the network computes with them (a parametrized weight is evaluated), detached."""
        return [(layer.weight.detach(), layer.bias.detach()) for layer in self.layers]


def forward_with(weights: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network of :class:`LipschitzMLP` as a function of fixed ``(W_i, b_i)``."""

    def f(x: torch.Tensor) -> torch.Tensor:
        for w, b in weights[:-1]:
            x = max_min(nn.functional.linear(x, w, b))
        return nn.functional.linear(x, *weights[-1])

    return f


def lipschitz_constant(weights: Sequence[torch.Tensor]) -> float:
    """``Π_i σ_max(W_i)``, each from ``torch.linalg.matrix_norm(ord=2)`` (an SVD) in float64."""
    return math.prod(torch.linalg.matrix_norm(w.double(), ord=2).item() for w in weights)


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j≠y} f_j`` per row (positive where the class is right)."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(1)


def certified_radius(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """``M / (√2 L)``: no ℓ2 perturbation shorter than this changes the class (negative where wrong)."""
    return margins(logits, y) / (math.sqrt(2.0) * lipschitz)


def pgd_l2(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    radius: float,
    steps: int = 50,
    step_size: float | None = None,
    targets: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Targeted PGD in ℓ2; ``(broken, delta)`` for the points ``x`` ``(N, d)`` of classes ``y``.

    For each point and each target class ``j`` (the ``targets`` classes other than ``y`` with the
    largest logits at ``x``; every other class when ``None``), ``steps`` steps of size
    ``step_size`` (default ``2.5·radius/steps``, Madry et al.'s rule) ascend :math:`f_j - f_y`
    along the normalized gradient, each followed by the projection onto the ball
    :math:`\|\delta\|_2 \le` ``radius``.  A point is broken when some iterate (the start
    ``δ = 0`` included) has margin ``≤ 0``; from then on it is no longer attacked, and
    ``delta`` holds that iterate (zero where none broke the point).
    """
    step_size = 2.5 * radius / steps if step_size is None else step_size
    with torch.no_grad():
        logits = f(x)
        classes = logits.shape[1]
        k = classes - 1 if targets is None else min(targets, classes - 1)
        ranked = logits.scatter(1, y[:, None], -math.inf).argsort(1, descending=True)[:, :k]  # (N, k)
    broken = margins(logits, y) <= 0
    found = torch.zeros_like(x)
    # One row per (point, target class), for the points not yet broken.
    rows = (~broken).nonzero()[:, 0].repeat_interleave(k)
    tr = ranked[~broken].reshape(-1)
    delta = torch.zeros_like(x[rows])
    for _ in range(steps):
        if rows.numel() == 0:
            break
        delta.requires_grad_(True)
        out = f(x[rows] + delta)
        objective = out.gather(1, tr[:, None]) - out.gather(1, y[rows, None])
        (grad,) = torch.autograd.grad(objective.sum(), delta)
        with torch.no_grad():
            norm = grad.norm(dim=1, keepdim=True)
            delta = delta.detach() + step_size * grad / torch.where(norm > 0, norm, torch.ones_like(norm))
            length = delta.norm(dim=1, keepdim=True)
            delta = delta * torch.clamp(radius / torch.where(length > 0, length, torch.ones_like(length)), max=1.0)
            hit = margins(f(x[rows] + delta), y[rows]) <= 0
            if hit.any():
                # The first row of each newly broken point gives its delta; all its rows retire.
                points = rows[hit]
                first = torch.ones_like(points, dtype=torch.bool)
                first[1:] = points[1:] != points[:-1]
                found[points[first]] = delta[hit][first]
                broken[points] = True
                keep = ~broken[rows]
                rows, tr, delta = rows[keep], tr[keep], delta[keep]
    return broken, found


def orthogonality_per_layer(weights: Sequence[torch.Tensor]) -> list[float]:
    """``max |WᵀW - I|`` (``WWᵀ`` for a wide ``W``) per layer, in float64."""
    return [
        orthogonality_error(w.double() if w.shape[0] >= w.shape[1] else w.double().mT, group_dim=None).item()
        for w in weights
    ]


@torch.no_grad()
def robustness(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    radii: Sequence[float],
    pgd_steps: int = 50,
    pgd_targets: int | None = 3,
    curve: Sequence[float] = (),
) -> dict[str, float]:
    """Clean, certified and PGD accuracies on ``(x, y)`` of the network of ``layers`` ``(W_i, b_i)``.

    The certificates come from the weights in float64.  The attack (:func:`pgd_l2` at each
    radius, smallest first: a point broken inside a ball is broken inside every larger one)
    searches in the weights' dtype (float32 by default: half the cost) and every break it
    finds is confirmed in float64, so that a rounding error cannot break a point.  Keys:
    ``test_acc``; ``lipschitz`` (L); ``cert_k`` and ``pgd_k`` for the k-th radius (k = 1, 2,
    …); ``cert_broken`` (points certified at a radius that PGD broke at it: 0 unless a
    certificate is wrong); ``orth_layer_i`` and ``sigma_layer_i`` per layer; ``cert_at_r`` at
    each radius ``r`` of ``curve``.
    """
    f = forward_with(layers)
    f64 = forward_with([(w.double(), b.double()) for w, b in layers])
    x64, weights = x.double(), [w.double() for w, _ in layers]
    lip = lipschitz_constant(weights)
    radius = certified_radius(f64(x64), y, lip)
    out = {"test_acc": (radius > 0).double().mean().item(), "lipschitz": lip}
    broken = radius <= 0
    broken_certified = 0
    for k, r in sorted(enumerate(radii, start=1), key=lambda kr: kr[1]):
        todo = (~broken).nonzero()[:, 0]
        with torch.enable_grad():
            hit, delta = pgd_l2(f, x[todo], y[todo], r, steps=pgd_steps, targets=pgd_targets)
        confirmed = hit & (margins(f64(x64[todo] + delta.double()), y[todo]) <= 0)
        broken[todo[confirmed]] = True
        certified = radius > r
        out[f"cert_{k}"] = certified.double().mean().item()
        out[f"pgd_{k}"] = (~broken).double().mean().item()
        broken_certified += int((certified & broken).sum())
    out["cert_broken"] = float(broken_certified)
    for i, (e, w) in enumerate(zip(orthogonality_per_layer(weights), weights)):
        out[f"orth_layer_{i}"] = e
        out[f"sigma_layer_{i}"] = torch.linalg.matrix_norm(w, ord=2).item()
    for r in curve:
        out[f"cert_at_{r:g}"] = (radius > r).double().mean().item()
    return out


def projected(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``layers`` with every weight replaced by its polar factor (:func:`orthoopt.project_`, in
    float64, then back to the weight's dtype); the weights given are left as they are."""
    polar = [w.double().clone() for w, _ in layers]
    project_(polar)
    return [(p.to(w.dtype), b) for p, (w, b) in zip(polar, layers)]


def evaluate_robustness(
    model: LipschitzMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: Sequence[float],
    pgd_steps: int = 50,
    pgd_targets: int | None = 3,
    curve: Sequence[float] = (),
    project: bool = False,
) -> dict[str, float]:
    """:func:`robustness` of ``model``; with ``project``, also of the network whose every weight
    is projected onto the manifold once, at the end (keys ``proj_test_acc``, ``proj_lipschitz``,
    ``proj_cert_k``, ``proj_pgd_k``, ``proj_cert_broken``), the model itself unchanged."""
    layers = model.weights()
    out = robustness(layers, x, y, radii, pgd_steps, pgd_targets, curve)
    if project:
        proj = robustness(projected(layers), x, y, radii, pgd_steps, pgd_targets)
        out.update({f"proj_{k}": v for k, v in proj.items() if not k.startswith(("orth_", "sigma_"))})
    return out


def _standardized(split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xtr, xte, ytr, yte = split
    mean, std = xtr.mean(0), xtr.std(0)
    std = np.where(std > 0, std, 1.0)  # pixels constant over the training digits stay at 0
    return (xtr - mean) / std, (xte - mean) / std, ytr, yte


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"task lipschitz: {name} must be a finite number > 0, got {value!r}")


def check(
    *,
    depth: int,
    width: int,
    batch: int,
    train_radius: float,
    r1,
    r2,
    r3,
    pgd_steps: int,
    pgd_targets: int,
    project: int = 0,
    **_: Any,
) -> None:
    """Refuse sizes and radii the task cannot run with, naming the parameter and its bound."""
    if project not in (0, 1) or isinstance(project, bool):
        raise ValueError(
            f"task lipschitz: project must be 0 or 1 (also certify the projected network), got {project!r}"
        )
    whole = (("depth", depth, 2), ("width", width, 2), ("batch", batch, 1), ("pgd_steps", pgd_steps, 1))
    for name, value, low in whole + (("pgd_targets", pgd_targets, 1),):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"task lipschitz: {name} must be an integer >= {low}, got {value!r}")
    if width % 2:
        raise ValueError(f"task lipschitz: width must be even (MaxMin pairs the units), got {width}")
    for name, value in (("train_radius", train_radius), ("r1", r1), ("r2", r2), ("r3", r3)):
        _positive(name, value)


def problem_fields(
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    seed: int = 0,
    depth: int = 6,
    width: int = 128,
    batch: int = 128,
    train_radius: float = 1.0,
    r1: float = RADII[0],
    r2: float = RADII[1],
    r3: float = RADII[2],
    pgd_steps: int = 50,
    pgd_targets: int = 3,
    project: int = 0,
    dtype=torch.float32,
    device="cpu",
) -> dict[str, Any]:
    """The fields of the task's Problem for one seed; ``split`` = (x_train, x_test, y_train, y_test).

    The seed draws the initial weights and the data order (one permutation per epoch), the
    same for every method.  ``evaluate`` is :func:`evaluate_robustness` on the test digits at
    the radii ``r1, r2, r3``, with the certified accuracy on a grid of radii for the plots;
    ``project=1`` adds the figures of the network projected onto the manifold at the end.
    """
    check(
        depth=depth,
        width=width,
        batch=batch,
        train_radius=train_radius,
        r1=r1,
        r2=r2,
        r3=r3,
        pgd_steps=pgd_steps,
        pgd_targets=pgd_targets,
        project=project,
    )
    xtr, xte, ytr, yte = _standardized(split)
    if batch > len(ytr):
        raise ValueError(f"task lipschitz: batch must be at most the {len(ytr)} training digits, got {batch}")
    xtr, xte = (torch.as_tensor(v, dtype=dtype, device=device) for v in (xtr, xte))
    ytr, yte = (torch.as_tensor(v, device=device) for v in (ytr, yte))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LipschitzMLP(depth, width, dtype=dtype, device=device)
    margin = math.sqrt(2.0) * train_radius
    rng = np.random.default_rng(seed)
    per_epoch = len(ytr) // batch
    orders: list[np.ndarray] = []

    def batch_index(t: int) -> torch.Tensor:
        epoch, j = divmod(t, per_epoch)
        while len(orders) <= epoch:
            orders.append(rng.permutation(len(ytr)))
        return torch.as_tensor(orders[epoch][j * batch : (j + 1) * batch], device=device)

    def loss(t: int) -> torch.Tensor:
        idx = batch_index(t)
        return nn.functional.multi_margin_loss(model(xtr[idx]), ytr[idx], margin=margin)

    def objective() -> torch.Tensor:
        return nn.functional.multi_margin_loss(model(xtr), ytr, margin=margin)

    curve = tuple(round(0.1 * i, 1) for i in range(0, 31))  # 0 to 3 in steps of 0.1

    def evaluate() -> dict[str, float]:
        return evaluate_robustness(model, xte, yte, (r1, r2, r3), pgd_steps, pgd_targets, curve, bool(project))

    return {"model": model, "loss": loss, "layout": "auto", "objective": objective, "evaluate": evaluate}


TASK_SETTINGS: dict[str, Any] = {
    "description": "certified-robust digits: MaxMin MLP, every layer orthogonal, multi-class hinge; "
    "certified accuracy from L = Π σ_max(W_i), checked by PGD-ℓ2",
    "base": "adamw",
    "lr": 1e-2,
    "beta": 3.0,
    "ortho_tol": 1e-3,
    "smoothing": 1e-2,
    "steps": 1000,
    "quick_steps": 40,
    "metrics": {
        "test_acc": ("clean acc %", 100.0),
        "lipschitz": ("L", 1.0),
        "cert_1": ("cert r1 %", 100.0),
        "cert_2": ("cert r2 %", 100.0),
        "cert_3": ("cert r3 %", 100.0),
        "pgd_1": ("PGD r1 %", 100.0),
        "pgd_2": ("PGD r2 %", 100.0),
        "pgd_3": ("PGD r3 %", 100.0),
        "cert_broken": ("certified but broken", 1.0),
    },
    "params": {},
    "methods": (
        "none",
        "soft",
        "soft-auto",
        "soft-tol",
        "hard",
        "hard-canonical",
        "bjorck",
        "torch-orthogonal",
        "geotorch",
    ),
}
