"""The copying memory problem task: data, baseline, model, and every method on a quick run."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.nn.utils import parametrize

from orthoopt import compare
from orthoopt.compare import copying, methods

QUICK = "copying:L=10,hidden=16"


@pytest.mark.parametrize(("L", "K"), [(10, 3), (200, 10), (1000, 10)])
def test_baseline_is_the_memoryless_cross_entropy(L, K):
    assert copying.baseline_loss(L, K) == pytest.approx(K * math.log(8) / (L + 2 * K), rel=1e-15)
    # blank with certainty until the marker's answer steps, then uniform over the 8 symbols
    x, y = copying.copying_batch(L, K, 64, torch.Generator().manual_seed(0))
    steps = L + 2 * K
    logits = torch.full((64, steps, 9), -math.inf, dtype=torch.float64)
    logits[:, : L + K, copying.BLANK] = 0.0
    logits[:, L + K :, 1:] = 0.0
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert ce.item() == pytest.approx(copying.baseline_loss(L, K), rel=1e-12)


def test_batch_layout():
    L, K, B = 7, 4, 32
    x, y = copying.copying_batch(L, K, B, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (B, L + 2 * K) and x.dtype == y.dtype == torch.int64
    symbols = x[:, :K]
    assert symbols.min() >= 1 and symbols.max() <= 8 and len(symbols.unique()) == 8
    assert (x[:, K : K + L] == copying.BLANK).all() and (x[:, K + L] == copying.MARKER).all()
    assert (x[:, K + L + 1 :] == copying.BLANK).all()
    assert (y[:, : L + K] == copying.BLANK).all() and torch.equal(y[:, L + K :], symbols)


def _loop(drive, w, b):
    """The recurrence as written, under autograd: the reference for the hand-written BPTT."""
    h, states = torch.zeros_like(drive[0]), []
    for d in drive:
        z = d + h @ w.T
        h = torch.sign(z) * torch.relu(z.abs() + b)  # modReLU
        states.append(h)
    return torch.stack(states)


def test_model_is_the_onehot_rnn():
    torch.manual_seed(0)
    model = copying.CopyingRNN(12).double()
    w = model.recurrent.weight.detach()
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.allclose(w.T @ w, eye, atol=1e-12) and torch.linalg.det(w) > 0  # torus: a rotation
    x, _ = copying.copying_batch(5, 3, 4, torch.Generator().manual_seed(0))
    drive = model.inp(torch.nn.functional.one_hot(x, 10).double()).transpose(0, 1)  # (steps, batch, hidden)
    expected = model.out(_loop(drive, w, model.act.b)).transpose(0, 1)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    z = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(model.act(z), torch.sign(z) * torch.relu(z.abs() + model.act.b))


def test_recall_counts_the_last_k_steps_only():
    y = torch.tensor([[0, 0, 5, 6]])
    logits = torch.nn.functional.one_hot(torch.tensor([[3, 3, 5, 1]]), 9).double()
    assert copying.recall(logits, y, 2) == 0.5


@pytest.fixture(scope="module")
def quick():
    pytest.importorskip("geotorch")
    torch.set_num_threads(1)
    return compare.run(QUICK, seeds=[0, 1], steps=6)


def test_quick_every_method_same_start(quick):
    assert quick.config["methods"] == ["none", "soft", "soft-auto", "hard", "geotorch"]
    assert quick.config["schedule"] == "constant" and quick.config["base"] == "adam"
    assert quick.config["betas"] == (0.9, 0.99) and quick.config["constrained_lr_scale"] == 0.2
    for seed in (0, 1):
        runs = [r for r in quick.runs if r.seed == seed]
        assert len({tuple(r.init_fingerprint) for r in runs}) == 1
        # same weights and same first batch: the first loss agrees (geotorch's W = B·expm(0) = B)
        first = [r.history["loss"][0] for r in runs]
        assert max(first) - min(first) <= 1e-6 * abs(first[0]), first
        assert all(r.history["orth_max"][0] < 1e-5 for r in runs)  # W orthogonal at init
    a, b = (next(r for r in quick.runs if r.seed == s and r.method == "none") for s in (0, 1))
    assert a.history["loss"][0] != b.history["loss"][0]  # another seed, another draw and stream


def test_quick_records_and_evaluates(quick):
    for r in quick.runs:
        assert r.ok, (r.method, r.error)
        assert r.history["step"] == list(range(6))
        assert all(math.isfinite(v) for v in r.history["loss"])
        assert 0.0 <= r.final["test_acc"] <= 1.0 and math.isfinite(r.final["test_loss"])
        if r.method in ("hard", "geotorch"):
            assert r.final["orth_max"] < 1e-5, r.method
    assert next(r for r in quick.runs if r.method == "none").final["orth_max"] > 1e-4  # it moved off
    table = compare.table(quick)
    assert "recall acc %" in table and "to target s (step)" in table and "10 log 8/(L + 20)" in table
    assert quick.config["reference"]["memoryless baseline"] == pytest.approx(copying.baseline_loss(10))


def test_run_notes_give_each_runs_figures(quick):
    notes = copying.run_notes(quick).splitlines()[2:]
    assert len(notes) == len(quick.runs)
    for line, r in zip(notes, quick.runs):
        sigma = r.final["sigma_max"]
        assert line.startswith(f"- {r.method} seed {r.seed}: below 1% never, ")
        assert f"σ(W) in [{r.final['sigma_min']:.6f}, {sigma:.6f}], σ_max^L = {sigma**10:.4g}, " in line
        assert f"recall {100 * r.final['test_acc']:.2f}%" in line
        assert copying.worst_orth(r) >= max(r.history["orth_max"]) and copying.worst_orth(r) >= r.final["orth_max"]


def test_a_variant_sets_its_settings_on_top_of_the_tasks():
    task = compare.get_task(QUICK)
    assert copying.parse_variant("soft-huber:beta=1:delta=0.01", task) == (
        "soft-huber β=1 δ=0.01",
        "soft-huber",
        {"beta": 1.0, "smoothing": 0.01},
    )
    # W's lr × 16 on top of the task's 0.2
    assert copying.parse_variant("hard:wlr=16", task) == ("hard W lr ×16", "hard", {"constrained_lr_scale": 3.2})
    with pytest.raises(ValueError, match="unknown key 'lr'; use beta, delta, wlr"):
        copying.parse_variant("soft:lr=1", task)


def test_variant_rows_and_their_table():
    task = compare.get_task(QUICK)
    label, method, settings = copying.parse_variant("hard:wlr=2", task)
    comp = compare.run(QUICK, methods=[method], seeds=[0], steps=3, **settings)
    row = copying.variant_row(label, method, comp)
    assert row["w_lr"] == pytest.approx(1e-3 * 0.4) and row["status"] == "ok" and row["history"]["step"] == [0, 1, 2]
    (line,) = copying.variants_table([row])[2:]
    assert line.startswith("| hard W lr ×2 | never | ") and line.endswith(" | ok |")


@pytest.mark.slow
def test_iterations_are_timed_round_robin():
    from orthoopt.compare.timing import time_iterations, timing_table

    times = time_iterations(QUICK, ["none", "hard"], rounds=3)
    assert list(times) == ["none", "hard"] and all(len(v) == 3 and min(v) > 0 for v in times.values())
    lines = timing_table(times)
    assert lines[0] == "| method | median ms | min ms | max ms | median / none's |" and lines[2].endswith(" 1.00 |")


@pytest.mark.slow
def test_interleaved_times_reads_every_clock_around_each_iteration():
    from orthoopt.compare.timing import interleaved_times

    reads = {"a": [], "b": []}

    def counter(name, unit):
        def clock():
            reads[name].append(unit * len(reads[name]))
            return float(reads[name][-1])

        return clock

    times = interleaved_times(QUICK, ["none", "soft"], 2, {"a": counter("a", 1), "b": counter("b", 2)}, warmup=1)
    # Each clock is read before each iteration (3 rounds x 2 methods) and after each timed one,
    # one of its units apart: 1000 ms on clock a, 2000 ms on clock b.
    assert times == {"a": {"none": [1e3, 1e3], "soft": [1e3, 1e3]}, "b": {"none": [2e3, 2e3], "soft": [2e3, 2e3]}}
    assert len(reads["a"]) == len(reads["b"]) == 6 + 4


def test_target_is_one_percent_of_the_baseline():
    fields = copying.problem_fields(L=10, hidden=8, batch=4, test_batch=4)
    base = copying.baseline_loss(10)
    assert fields["target"](0.0099 * base) and not fields["target"](0.0101 * base)


def test_geotorch_parametrization_is_removed_after_the_run():
    pytest.importorskip("geotorch")
    task = compare.get_task(QUICK)
    problem = task.build(seed=0, **task.params)
    before = set(problem.model.state_dict())
    with methods.prepared("geotorch", problem.model, problem):
        assert parametrize.is_parametrized(problem.model.recurrent, "weight")
        (opt,) = methods.build_optimizers("geotorch", problem.model, problem, methods.Settings(base="adam", lr=1e-3))
        assert {g["lr"] for g in opt.param_groups} == {1e-3}
    assert not parametrize.is_parametrized(problem.model.recurrent) and set(problem.model.state_dict()) == before


def test_geotorch_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "geotorch", None)  # `import geotorch` now raises ImportError
    comp = compare.run(QUICK, methods=["geotorch", "none"], seeds=[0], steps=2)
    runs = {r.method: r for r in comp.runs}
    assert "pip install geotorch" in runs["geotorch"].error and runs["none"].ok


def test_geotorch_refuses_other_layouts_before_any_change():
    pytest.importorskip("geotorch")
    task = compare.get_task("pca:k=2")
    problem = task.build(seed=0, **task.params)
    before = problem.model.phi.detach().clone()
    with pytest.raises(ValueError, match="parameter 'phi'.*group_axis:1"):
        with methods.prepared("geotorch", problem.model, problem):
            pass
    assert not parametrize.is_parametrized(problem.model) and torch.equal(problem.model.phi, before)


def test_bad_parameters_are_refused():
    for spec, name, value in (("copying:L=0", "L", 0), ("copying:hidden=1.5", "hidden", 1.5)):
        with pytest.raises(ValueError, match=f"task copying: {name}"):
            compare.get_task(spec)  # when the spec is read, before anything is built
        with pytest.raises(ValueError, match=f"task copying: {name}"):
            compare.get_task("copying").build(seed=0, **{name: value})  # and by the API


@pytest.mark.parametrize("method", ["none", "soft", "soft-auto", "hard", "geotorch"])
def test_every_method_trains_w_at_a_fifth_of_the_lr(method):
    if method == "geotorch":
        pytest.importorskip("geotorch")
    task = compare.get_task(QUICK)
    problem = task.build(seed=0, **task.params)
    settings = methods.Settings(base="adam", lr=1e-3, betas=(0.9, 0.99), constrained_lr_scale=0.2)
    with methods.prepared(method, problem.model, problem):
        (opt,) = methods.build_optimizers(method, problem.model, problem, settings)
        rec = problem.model.recurrent
        w = rec.parametrizations.weight.original if method == "geotorch" else rec.weight
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs.pop(id(w)) == pytest.approx(2e-4)
        assert set(lrs.values()) == {1e-3} and len(lrs) == len(list(problem.model.parameters())) - 1
        assert all(g["betas"] == (0.9, 0.99) for g in opt.param_groups)


@pytest.mark.slow
def test_cli_runs_the_task_with_its_own_defaults(tmp_path, capsys):
    pytest.importorskip("geotorch")
    from orthoopt import __main__ as cli

    assert (
        cli.main(["compare", "--task", "copying:L=5,hidden=8", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "(constant)" in out and "base adam" in out
    for method in ("none", "soft", "soft-auto", "hard", "geotorch"):
        assert f"| {method} |" in out
    assert "| soft-huber |" not in out and (tmp_path / "loss_vs_time.png").exists()
