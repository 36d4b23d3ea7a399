"""The certified-robustness task: the certificate, L, MaxMin, Björck, the PGD attack, the methods, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.utils import parametrize

from orthoopt import compare
from orthoopt.__main__ import main
from orthoopt.compare import lipschitz, methods, parametrized
from orthoopt.compare.lipschitz import (
    LipschitzMLP,
    certified_radius,
    forward_with,
    lipschitz_constant,
    margins,
    max_min,
    pgd_l2,
)

SQRT2 = math.sqrt(2.0)


# -- the certificate ----------------------------------------------------------------------------
def test_certified_radius_is_the_margin_over_root_two_l():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.25, 0.75, -1.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    # margins: 3 - 1 = 2; 0.25 - 0.75 = -0.5 (wrong); 2 - 2 = 0 (a tie is not a certificate)
    assert margins(logits, y).tolist() == [2.0, -0.5, 0.0]
    radius = certified_radius(logits, y, lipschitz=2.0)
    assert radius.tolist() == pytest.approx([2 / (SQRT2 * 2), -0.5 / (SQRT2 * 2), 0.0], abs=0, rel=1e-15)


def test_the_certificate_is_tight_where_the_two_logits_point_apart():
    """``f = (u·x, -u·x)`` with ``‖u‖ = 1``: L = √2, and the certified radius ``M/(√2 L) = M/2`` is
    the exact distance ``|u·x|`` to the decision boundary ``u·x = 0``: the attack breaks the point
    just outside it and cannot just inside it."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, generator=g, dtype=torch.float64)
    u = u / u.norm()
    w = torch.stack([u, -u])
    lip = lipschitz_constant([w])
    assert lip == pytest.approx(SQRT2, rel=1e-14)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = (x @ u < 0).long()  # every point on the right side
    f = lambda z: z @ w.mT  # noqa: E731
    radius = certified_radius(f(x), y, lip)
    torch.testing.assert_close(radius, (x @ u).abs(), rtol=1e-14, atol=0)
    inside, _ = pgd_l2(f, x, y, 0.999 * radius.min().item(), steps=20)
    assert not inside.any()
    for i in range(len(x)):
        outside, delta = pgd_l2(f, x[i : i + 1], y[i : i + 1], 1.001 * radius[i].item(), steps=20)
        assert outside.all() and delta.norm() <= 1.001 * radius[i] * (1 + 1e-12)


# -- L ----------------------------------------------------------------------------------------------
def test_lipschitz_constant_is_the_product_of_the_largest_singular_values():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(a, b, generator=g, dtype=torch.float64) for a, b in ((8, 5), (8, 8), (3, 8))]
    expected = math.prod(torch.linalg.svdvals(w)[0].item() for w in ws)
    assert lipschitz_constant(ws) == pytest.approx(expected, rel=1e-13)
    # float32 weights are measured in float64
    assert lipschitz_constant([w.float() for w in ws]) == pytest.approx(
        math.prod(torch.linalg.svdvals(w.float().double())[0].item() for w in ws), rel=1e-13
    )


def test_lipschitz_constant_bounds_the_network():
    """``‖f(x) - f(x')‖ ≤ L ‖x - x'‖`` for the MaxMin network, on random pairs and random weights."""
    torch.manual_seed(2)
    model = LipschitzMLP(depth=4, width=16, dtype=torch.float64)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(1 + torch.rand(()))  # L > 1, different per layer
            layer.bias.normal_()
    layers = model.weights()
    lip = lipschitz_constant([w for w, _ in layers])
    f = forward_with(layers)
    x, x2 = torch.randn(2000, 64, dtype=torch.float64), torch.randn(2000, 64, dtype=torch.float64)
    x2 = x + 1e-3 * x2  # nearby pairs, where one linear piece often holds
    ratio = (f(x) - f(x2)).norm(dim=1) / (x - x2).norm(dim=1)
    assert ratio.max() <= lip * (1 + 1e-12)
    torch.testing.assert_close(f(x), model(x), rtol=0, atol=0)


def test_an_orthogonal_network_has_l_one():
    torch.manual_seed(3)
    for width in (32, 64, 128):  # wide first layer, square, tall first layer
        model = LipschitzMLP(depth=5, width=width, dtype=torch.float64)
        assert lipschitz_constant([w for w, _ in model.weights()]) == pytest.approx(1.0, abs=1e-12)


# -- MaxMin ---------------------------------------------------------------------------------------
def test_max_min_sorts_each_pair_of_halves():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 5.0, -4.0]])
    assert max_min(x).tolist() == [[1.0, 5.0, 3.0, 0.5, -2.0, -4.0]]  # halves (1, -2, 3) and (0.5, 5, -4)


def test_max_min_preserves_gradient_norms():
    """Its Jacobian is a permutation matrix (where no pair ties), so every vector-Jacobian product
    keeps its norm (autograd, float64)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(7, 12, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(max_min(x), x, upstream)
    torch.testing.assert_close(grad.norm(dim=1), upstream.norm(dim=1), rtol=1e-15, atol=0)
    jac = torch.autograd.functional.jacobian(max_min, x[0].detach())
    assert set(jac.flatten().tolist()) == {0.0, 1.0}
    assert (jac.sum(0) == 1).all() and (jac.sum(1) == 1).all()


# -- Björck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6)])
def test_bjorck_converges_to_the_polar_factor(shape):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(v, full_matrices=False)
    polar = u @ vh
    torch.testing.assert_close(parametrized.bjorck(v, iters=80), polar, rtol=0, atol=1e-12)
    # Near the manifold, the training count (20 iterations) has converged too.
    q = torch.linalg.qr(v if shape[0] >= shape[1] else v.mT).Q
    near = (q if shape[0] >= shape[1] else q.mT) + 0.05 * torch.randn(*shape, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(near, full_matrices=False)
    torch.testing.assert_close(parametrized.bjorck(near), u @ vh, rtol=0, atol=1e-12)
    assert parametrized.BJORCK_ITERS == 20


def test_bjorck_gradient_against_finite_differences():
    v = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: parametrized.bjorck(a, iters=6), (v,))


# -- the attack -----------------------------------------------------------------------------------
def test_pgd_finds_the_closest_adversarial_point_of_a_linear_model():
    """For ``f = Wx + b`` the region of class ``y`` is an intersection of half-spaces, so the
    closest point of another class is at ``d = min_j (f_y - f_j)/‖w_y - w_j‖`` along
    ``(w_j - w_y)/‖w_j - w_y‖``: PGD at radius ``1.001 d`` breaks the point there, at ``0.999 d`` not."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(10, 20, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    f = lambda z: z @ w.mT + b  # noqa: E731
    x = 3 * torch.randn(40, 20, generator=g, dtype=torch.float64)
    y = f(x).argmax(1)
    diff = w[None, :, :] - w[y][:, None, :]  # (N, C, d): w_j - w_y
    gap = (f(x).gather(1, y[:, None]) - f(x)) / diff.norm(dim=2).clamp_min(1e-300)  # (N, C)
    gap.scatter_(1, y[:, None], math.inf)
    dist, nearest = gap.min(1)
    second = gap.scatter(1, nearest[:, None], math.inf).min(1).values
    clear = second > 1.01 * dist  # points whose second-nearest class is out of the ball
    assert clear.sum() >= 30
    for i in clear.nonzero()[:, 0].tolist():
        xi, yi, d = x[i : i + 1], y[i : i + 1], dist[i].item()
        inside, _ = pgd_l2(f, xi, yi, 0.999 * d, steps=50)
        outside, delta = pgd_l2(f, xi, yi, 1.001 * d, steps=50)
        assert not inside.item() and outside.item()
        direction = diff[i, nearest[i]] / diff[i, nearest[i]].norm()
        assert torch.dot(delta[0], direction) / delta[0].norm() >= 1 - 1e-12
        assert d * (1 - 1e-12) <= delta[0].norm() <= 1.001 * d * (1 + 1e-12)
        assert margins(f(xi + delta), yi).item() <= 0


def test_pgd_leaves_a_misclassified_point_broken_at_zero():
    f = lambda z: z  # noqa: E731 - the logits are the input
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    broken, delta = pgd_l2(f, x, torch.tensor([0, 0]), 0.1, steps=5)
    assert broken.tolist() == [True, False] and delta.abs().sum() == 0


# -- the task -------------------------------------------------------------------------------------
def _problem(**params):
    task = compare.get_task("lipschitz").with_params(**params)
    return task.build(seed=0, **task.params)


def test_data_are_standardized_on_the_training_split():
    from orthoopt.compare.tasks import _split

    xtr, xte, ytr, yte = lipschitz._standardized(_split())
    varying = xtr.std(0) > 0
    assert abs(xtr.mean(0)).max() < 1e-12 and abs(xtr.std(0)[varying] - 1).max() < 1e-12
    assert len(xtr) == 1347 and len(xte) == 450  # the 3:1 split


def test_every_layer_starts_orthogonal_and_every_method_computes_with_the_start():
    problem = _problem(depth=4, width=96)
    model = problem.model
    shapes = [tuple(layer.weight.shape) for layer in model.layers]
    assert shapes == [(96, 64), (96, 96), (96, 96), (10, 96)]
    start = [w.clone() for w, _ in model.weights()]
    assert max(lipschitz.orthogonality_per_layer(start)) < 1e-6
    for method in ("bjorck", "torch-orthogonal", "geotorch"):
        if method == "geotorch":
            pytest.importorskip("geotorch")
        with methods.prepared(method, model, problem):
            assert all(parametrize.is_parametrized(layer, "weight") for layer in model.layers)
            for (w, _), w0 in zip(model.weights(), start):
                torch.testing.assert_close(w, w0, rtol=0, atol=2e-6)
        assert not any(parametrize.is_parametrized(layer) for layer in model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projected_weights_are_the_polar_factors_and_the_model_is_left_as_it_was(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = ((12, 8), (12, 12), (4, 12))
    layers = [
        (torch.randn(a, b, generator=g, dtype=dtype), torch.randn(a, generator=g, dtype=dtype)) for a, b in shapes
    ]
    before = [(w.clone(), b.clone()) for w, b in layers]
    for (p, pb), (w, b) in zip(lipschitz.projected(layers), layers):
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        torch.testing.assert_close(p.double(), u @ vh, rtol=0, atol=1e-6)
        assert p.dtype == w.dtype and pb is b
    assert all(torch.equal(w, w0) and torch.equal(b, b0) for (w, b), (w0, b0) in zip(layers, before))


def test_soft_tol_is_soft_with_the_tasks_bound():
    task = compare.get_task("lipschitz:depth=3,width=16")
    problem = task.build(seed=0, **task.params)
    settings = methods.task_settings(task)
    (opt,) = methods.build_optimizers("soft-tol", problem.model, problem, settings)
    constrained = [g for g in opt.param_groups if g["ortho"]]
    assert constrained and all(g["ortho_mode"] == "soft" and g["ortho_tol"] == 1e-3 for g in constrained)
    assert task.ortho_tol == 1e-3 and compare.get_task("mlp").ortho_tol == 1e-2


def test_hard_canonical_is_hard_mode_on_the_canonical_manifold():
    problem = _problem(depth=3, width=16)
    (opt,) = methods.build_optimizers("hard-canonical", problem.model, problem, methods.Settings(base="adamw"))
    constrained = [g for g in opt.param_groups if g["ortho"]]
    assert constrained and all(g["ortho_mode"] == "hard" and g["ortho_manifold"] == "canonical" for g in constrained)


@pytest.mark.parametrize(
    "spec, name",
    [
        ("lipschitz:width=7", "width"),
        ("lipschitz:depth=1", "depth"),
        ("lipschitz:r2=0", "r2"),
        ("lipschitz:train_radius=-1", "train_radius"),
        ("lipschitz:pgd_steps=0", "pgd_steps"),
        ("lipschitz:pgd_targets=0", "pgd_targets"),
        ("lipschitz:batch=5000", "batch"),
        ("lipschitz:project=2", "project"),
    ],
)
def test_bad_parameters_are_refused(spec, name):
    with pytest.raises(ValueError, match=f"task lipschitz: {name} must"):
        task = compare.get_task(spec)
        task.build(seed=0, **task.params)


def test_no_certified_point_is_broken_after_a_short_training():
    """Train a small network for a few soft steps at a constant lr (L well above 1), then:
    certificates at the three radii hold against the attack point by point, before and after
    the projection, and the accuracies order as they must."""
    spec = "lipschitz:depth=3,width=32,pgd_steps=20,project=1"
    comp = compare.run(spec, methods=["soft"], seeds=[0], steps=40, schedule="constant")
    (run,) = comp.runs
    f = run.final
    assert run.ok and f["test_acc"] > 0.8 and f["lipschitz"] > 1.01 and f["proj_lipschitz"] < 1 + 1e-6
    assert f["cert_1"] > 0.2 and f["cert_broken"] == 0 and f["proj_cert_broken"] == 0
    for prefix in ("", "proj_"):
        for k in (1, 2, 3):
            assert 0 <= f[f"{prefix}cert_{k}"] <= f[f"{prefix}pgd_{k}"] <= f[f"{prefix}test_acc"]
    assert f["cert_at_0"] == f["test_acc"] and f[f"cert_at_{lipschitz.RADII[0]:g}"] == f["cert_1"]


def test_an_overstated_certificate_is_caught_by_the_attack(monkeypatch):
    """The check can fail: certificates three times too large are broken by PGD."""
    honest = lipschitz.certified_radius
    monkeypatch.setattr(lipschitz, "certified_radius", lambda logits, y, lip: 3 * honest(logits, y, lip))
    comp = compare.run("lipschitz:depth=3,width=32,pgd_steps=20", methods=["hard"], seeds=[0], steps=40)
    assert comp.runs[0].final["cert_broken"] > 10


@pytest.mark.slow
def test_cli_quick_run_writes_certified_and_pgd_accuracies_for_every_method(tmp_path, capsys):
    pytest.importorskip("geotorch")
    assert main(["compare", "--task", "lipschitz", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "cert r1 %" in printed and "PGD r3 %" in printed
    data = json.loads((tmp_path / "results.json").read_text())
    wanted = set(lipschitz.TASK_SETTINGS["methods"])
    assert {r["method"] for r in data["runs"]} == wanted
    for run in data["runs"]:
        f = run["final"]
        assert run["error"] is None and not run["diverged"], run["method"]
        assert math.isfinite(f["lipschitz"]) and f["lipschitz"] > 0
        assert f["cert_broken"] == 0
        for k in (1, 2, 3):
            cert, pgd = f[f"cert_{k}"], f[f"pgd_{k}"]
            assert math.isfinite(cert) and math.isfinite(pgd) and 0 <= cert <= pgd <= f["test_acc"] <= 1
        assert math.isfinite(f["iter_ms"]) and math.isfinite(f["total_s"])
        if run["method"] == "soft-tol":
            assert f["orth_max"] <= lipschitz.TASK_SETTINGS["ortho_tol"]
    exact = [r["final"] for r in data["runs"] if r["method"] != "none"]
    assert all(f["lipschitz"] < 1.01 for f in exact)
    assert any(f["cert_1"] > 0.5 for f in exact)
    assert (tmp_path / "table.md").read_text().count("\n| ") == len(wanted) + 1


@pytest.mark.slow
def test_experiment_quick_run_writes_its_tables_and_plots(tmp_path):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("geotorch")
    path = Path(__file__).resolve().parents[1] / "experiments" / "lipschitz.py"
    spec = importlib.util.spec_from_file_location("experiment_lipschitz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick", "--out", str(tmp_path / "lipschitz"), "--schedules", "cosine,constant"])
    out = tmp_path / "lipschitz-quick"
    text = (out / "README.md").read_text()
    for method in lipschitz.TASK_SETTINGS["methods"]:
        assert text.count(f"\n| {method} |") == 5, method  # two comparisons and their layer tables, the timing
    assert "## Soft's β at a constant lr, depth 4" in text and "\n| 30 |" in text
    assert "\n| 0.003 | soft |" in text and "\n| 0.01 | bjorck |" in text
    assert "\n| constant | 4 | soft projected |" in text and "\n| cosine | 4 | soft-auto projected |" in text
    for name in ("certified_depth4.png", "certified_depth4_constant.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in text
    for folder in ("depth4", "depth4_constant", "depth4_constant_beta3", "depth4_constant_lr0.003", "depth4_projected"):
        runs = json.loads((out / folder / "results.json").read_text())["runs"]
        assert all(r["error"] is None and r["final"]["cert_broken"] == 0 for r in runs)
