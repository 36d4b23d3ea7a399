"""The mixture of probabilistic PCA task: likelihoods against torch.distributions, EM, quick runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from orthoopt import compare
from orthoopt.compare import mppca, plots, tasks
from orthoopt.compare.formatting import fmt


def _mvn_log_prob(x, mu, cov):
    return torch.stack([MultivariateNormal(mu[i], covariance_matrix=cov[i]).log_prob(x) for i in range(len(mu))], 1)


@pytest.mark.parametrize("orthonormal", [True, False])
def test_log_likelihoods_against_multivariate_normal(orthonormal):
    gen = torch.Generator().manual_seed(0)
    m, l, n, N = 3, 9, 4, 50
    w = torch.randn(m, l, n, generator=gen, dtype=torch.float64)
    if orthonormal:
        w = torch.linalg.qr(w).Q * torch.rand(m, 1, n, generator=gen, dtype=torch.float64) * 3
    mu = torch.randn(m, l, generator=gen, dtype=torch.float64)
    log_var = torch.tensor([-3.0, 0.0, 1.0], dtype=torch.float64)  # σ² from 0.05 to 2.7
    x = 2 * torch.randn(N, l, generator=gen, dtype=torch.float64)
    cov = w @ w.mT + log_var.exp()[:, None, None] * torch.eye(l, dtype=torch.float64)
    got = mppca.log_likelihoods(x, mu, w, log_var)
    assert got.shape == (N, m)
    torch.testing.assert_close(got, _mvn_log_prob(x, mu, cov), rtol=1e-12, atol=1e-10)


def test_spectral_log_likelihoods_against_multivariate_normal():
    rng = np.random.default_rng(0)
    m, l, n, N = 2, 8, 3, 40
    u = np.linalg.qr(rng.standard_normal((m, l, n)))[0]
    var = np.array([0.1, 0.7])
    lam = var[:, None] + rng.uniform(0.5, 3.0, (m, n))
    mu, x = rng.standard_normal((m, l)), rng.standard_normal((N, l))
    cov = u * lam[:, None, :] @ np.swapaxes(u, 1, 2) + var[:, None, None] * (np.eye(l) - u @ np.swapaxes(u, 1, 2))
    ref = _mvn_log_prob(*(torch.as_tensor(a) for a in (x, mu, cov)))
    np.testing.assert_allclose(mppca.spectral_log_likelihoods(x, mu, u, lam, var), ref.numpy(), rtol=1e-12)


def test_model_mixture_and_labelled_likelihoods():
    gen = torch.Generator().manual_seed(1)
    m, l, n, N = 3, 6, 2, 20
    phi = torch.linalg.qr(torch.randn(m, l, n, generator=gen, dtype=torch.float64)).Q.movedim(0, 1)
    model = mppca.MPPCA(phi, torch.full((m, n), 0.8, dtype=torch.float64), torch.full((m,), 0.3, dtype=torch.float64),
                        torch.randn(m, l, generator=gen, dtype=torch.float64))  # fmt: skip
    with torch.no_grad():
        model.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(N, l, generator=gen, dtype=torch.float64)
    y = torch.tensor([i % m for i in range(N)])
    w = phi.movedim(1, 0) * 0.8
    cov = w @ w.mT + 0.3 * torch.eye(l, dtype=torch.float64)
    comp = _mvn_log_prob(x, model.mu.detach(), cov) + torch.log_softmax(model.logits.detach(), 0)
    assert model.log_likelihood(x).item() == pytest.approx(torch.logsumexp(comp, 1).mean().item(), rel=1e-12)
    assert model.log_likelihood(x, y).item() == pytest.approx(comp[torch.arange(N), y].mean().item(), rel=1e-12)


@pytest.fixture(scope="module")
def digits():
    return tasks._split()


def test_em_increases_the_likelihood_monotonically(digits):
    xtr, _, ytr, _ = digits
    init = mppca._initial(xtr, ytr, 10, 3, False, seed=0)
    fit = mppca.em(xtr, init, max_iter=25)
    hist = np.array(fit.history)
    assert len(hist) == 26 and np.all(np.diff(hist) >= -1e-12 * np.abs(hist[1:]))
    assert hist[-1] - hist[0] > 10  # it does climb (nats per image)
    np.testing.assert_allclose(np.einsum("mli,mlj->mij", fit.u, fit.u), np.broadcast_to(np.eye(3), (10, 3, 3)),
                               atol=1e-12)  # fmt: skip
    assert np.all(fit.lam > fit.var[:, None]) and fit.pi.sum() == pytest.approx(1.0)


def test_supervised_em_is_a_stationary_point_of_the_torch_likelihood(digits):
    # The closed-form per-class fit is the maximum-likelihood estimate: the float64 torch
    # likelihood (Woodbury, another formula than EM's spectral one) has zero gradient there
    # and the same value.
    xtr, _, ytr, _ = digits
    init = mppca._initial(xtr, ytr, 10, 4, True, seed=0)
    fit = mppca.em(xtr, init, labels=ytr)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    model = mppca.MPPCA(t(fit.u).movedim(0, 1), t(np.sqrt(fit.lam - fit.var[:, None])), t(fit.var), t(fit.mu))
    with torch.no_grad():
        model.logits.copy_(t(np.log(fit.pi)))
    ll = model.log_likelihood(t(xtr), torch.as_tensor(ytr))
    assert ll.item() == pytest.approx(fit.history[-1], rel=1e-12)
    ll.backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().max().item() < 1e-8, name


@pytest.fixture(scope="module")
def quick():
    torch.set_num_threads(1)
    return {sup: compare.run(f"mppca:n=3,supervised={sup},em_max_iter=15", seeds=[0], steps=25) for sup in (0, 1)}


@pytest.mark.parametrize("sup", [0, 1])
def test_quick_runs_every_method(quick, sup):
    comp = quick[sup]
    assert comp.config["methods"] == ["none", "soft", "soft-huber", "soft-auto", "hard"]
    first = {r.history["loss"][0] for r in comp.runs}
    assert len(first) == 1  # same initial point
    for r in comp.runs:
        assert r.ok, (r.method, r.error)
        assert len(r.history["loss"]) == 25 and r.history["loss"][-1] < r.history["loss"][0]
        assert r.history["orth_max"][0] < 1e-5
        f = r.final
        assert r.history["gap"][0] == pytest.approx(r.history["loss"][0] + f["em_train_ll"], rel=1e-6)
        assert f["train_ll"] == pytest.approx(-f["loss"], rel=1e-4)  # float64 evaluation of the float32 loss
        assert math.isfinite(f["test_ll"]) and f["em_iters"] == (1 if sup else 15)
    assert next(r for r in comp.runs if r.method == "hard").final["orth_max"] < 1e-5
    assert "test LL/digit" in compare.table(comp) and "EM test LL" in compare.table(comp)


@pytest.mark.parametrize("sup", [0, 1])
def test_each_method_against_em(quick, sup):
    comp = quick[sup]
    name = ("unsupervised", "supervised")[sup]
    rows = [(m, comp.by_method(m)) for m in comp.config["methods"]]
    lines = mppca.against_em(comp, rows, name).splitlines()
    assert lines[0] == f"### {name}: against EM"
    body = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[4:] if line.startswith("|")}
    assert list(body) == [*comp.config["methods"], "EM (numpy, float64)"]
    for m in comp.config["methods"]:
        (r,) = comp.by_method(m)
        assert body[m][1] == fmt(r.final["test_ll"], 5) and body[m][2] == fmt(
            r.final["test_ll"] - r.final["em_test_ll"]
        )
    assert body["EM (numpy, float64)"][1] == fmt(comp.runs[0].final["em_test_ll"], 5)


def test_target_is_within_a_thousandth_of_em(digits):
    fields = mppca.problem_fields(digits, supervised=1, n=2)
    f_star = fields["f_star"]
    assert f_star < 0  # a positive log-likelihood per image (densities on [0, 1] pixels)
    assert fields["target"](f_star + 0.9e-3 * abs(f_star)) and not fields["target"](f_star + 1.1e-3 * abs(f_star))
    assert fields["target"](f_star - 1.0)  # beating EM counts


@pytest.mark.parametrize(
    ("spec", "match"), [("mppca:n=0", "n "), ("mppca:n=64", "n "), ("mppca:supervised=2", "supervised")]
)
def test_bad_parameters_are_refused(spec, match):
    with pytest.raises(ValueError, match=f"task mppca: {match}"):
        compare.get_task(spec)  # when the spec is read, before anything is built
    key, _, value = spec.partition(":")[2].partition("=")
    with pytest.raises(ValueError, match=f"task mppca: {match}"):
        compare.get_task("mppca").build(seed=0, **{key: int(value)})  # and by the API


def test_results_reload_and_replot(quick, tmp_path):
    comp = quick[0]
    compare.write(comp, tmp_path, plots=False)
    back = compare.report.load(tmp_path / "results.json")
    assert back.config["task_params"] == comp.config["task_params"] and back.summary[0]["method"] == "none"
    assert [(r.method, r.seed, r.history["step"]) for r in back.runs] == [
        (r.method, r.seed, r.history["step"]) for r in comp.runs
    ]
    paths = plots.plot_comparison(back, tmp_path)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths.values())


@pytest.mark.slow
def test_cli_runs_the_task(tmp_path, capsys):
    from orthoopt import __main__ as cli

    spec = "mppca:n=2,supervised=1"
    assert (
        cli.main(["compare", "--task", spec, "--steps", "3", "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "(cosine)" in out and "EM test LL" in out and "| soft-huber |" in out and "| geotorch |" not in out
