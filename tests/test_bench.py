"""The benchmarks: the step benchmark, the whole-iteration benchmark and the profile script run and write their outputs."""

import importlib
import json
import math
import sys

import pytest
import torch

import orthoopt
from orthoopt import bench
from orthoopt.bench import contenders, iteration, models, step
from orthoopt.bench.common import human_bytes


# -- the module paths -------------------------------------------------------------------
@pytest.mark.parametrize(
    "old,new", [("bench_iteration", "iteration"), ("bench_models", "models"), ("bench_contenders", "contenders")]
)
def test_old_module_paths_are_the_new_modules_with_a_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, f"orthoopt.{old}", raising=False)  # imported afresh: its warning again
    with pytest.warns(DeprecationWarning, match=f"orthoopt.{old} is deprecated; import orthoopt.bench.{new} instead"):
        module = importlib.import_module(f"orthoopt.{old}")
    assert module is importlib.import_module(f"orthoopt.bench.{new}")


def test_the_step_benchmarks_names_stay_in_orthoopt_bench():
    assert (bench.run, bench.Case, bench.TARGETS, bench.QUICK_SHAPES) == (
        step.run,
        step.Case,
        step.TARGETS,
        step.QUICK_SHAPES,
    )
    with pytest.warns(DeprecationWarning, match="orthoopt.bench._config is deprecated; use orthoopt.bench.step.config"):
        assert bench._config is step.config
    with pytest.warns(DeprecationWarning, match="orthoopt.bench._floor is deprecated; use orthoopt.bench.step._floor"):
        assert bench._floor is step._floor
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = bench.nothing


# -- the benchmark ----------------------------------------------------------------------
@pytest.mark.slow
def test_quick_benchmark_writes_its_json(tmp_path, capsys):
    out = tmp_path / "made" / "bench.json"  # its folder made
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "targets", "results"}
    assert report["meta"]["device"] == "cpu" and report["meta"]["quick"] is True
    targets = ("overhead_over_floor", "autograd_over_soft", "many_over_stacked", "auto_over_soft", "workspace_x_params")
    assert set(report["targets"]) >= set(targets)
    for target in targets:
        assert report["targets"][target]["met"] in (True, False)
    cases = [r["case"] for r in report["results"]]
    assert len(cases) == len(bench.QUICK_SHAPES) + 1
    for r in report["results"]:
        for name in ("floor", "base", "soft", "soft-auto", "autograd", "geoopt-E", "geoopt-C"):
            assert r["median_ms"][name] > 0, (r["case"], name, r["n/a"])
        # The hard mode is either timed or says why not.
        assert (r["median_ms"]["hard"] is not None) != ("hard" in r["n/a"])
        assert set(r["ratios"]) >= {"overhead_ms", "overhead_over_floor", "autograd_over_soft"}
        assert set(r["memory"]) == {"base", "soft", "soft-auto", "autograd"}
        assert r["ratios"]["auto_over_soft"] > 0
        assert set(r["memory"]["soft"]) >= {"allocations_per_step", "peak_extra_x_params", "workspace_x_params"}
        assert r["memory"]["soft"]["workspace_x_params"] > 0
    many = report["results"][-1]
    assert many["many"] and many["ratios"]["many_over_stacked"] > 0
    assert many["median_ms"]["soft-stacked"] > 0
    table = capsys.readouterr().out
    assert "ovh/floor" in table and "target overhead_over_floor" in table


def test_the_step_benchmark_keeps_the_drift_warnings_of_its_random_weights_off_the_terminal(tmp_path, recwarn):
    # 16 separate random (256, 64) weights drift under random gradients: the drift check would
    # warn about each of them between the benchmark's lines.
    argv = ["--device", "cpu", "--shapes", "many:16x256x64", "--repeats", "20", "--warmup", "2"]
    assert bench.main([*argv, "--contenders", "soft", "--out", str(tmp_path / "b.json")]) == 0
    assert [str(w.message) for w in recwarn if issubclass(w.category, orthoopt.OrthogonalityWarning)] == []


def test_the_step_memory_keeps_the_profilers_lines_off_the_terminal(capfd):
    from orthoopt.bench.memory import step_memory

    cpu = torch.device("cpu")
    soft = step.BUILDERS["soft"](step.Case(2, 8, 4), cpu, torch.float32, {"foreach": True})
    soft.step()
    capfd.readouterr()
    memory = step_memory(soft, cpu)
    out, err = capfd.readouterr()
    assert "profiler_start" not in out + err and "USDT" not in out + err, err
    assert memory["allocations_per_step"] > 0  # the profile itself still ran


def test_quiet_profile_passes_on_everything_else_written_meanwhile(capfd):
    import os

    from orthoopt.bench.profiling import is_kineto_line, quiet_profile

    kineto = b"USDT:2026-12-07 20:53:15 7420:7420 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
    assert is_kineto_line(kineto) and is_kineto_line(kineto.replace(b"USDT", b"STAGE"))
    assert not is_kineto_line(b"USDT: a line of someone else's\n")
    with quiet_profile() as prof:
        torch.ones(3).add_(1)
        os.write(2, kineto + b"a warning of the profiled code\n")
    assert any(e.name == "aten::add_" for e in prof.events())
    assert capfd.readouterr().err == "a warning of the profiled code\n"


def test_benchmark_flags(capsys):
    cfg = step.config(["--device", "cpu", "--shapes", "4x16x4, many:3x8x2", "--repeats", "7", "--out", "x.json"])
    assert cfg.cases == [bench.Case(4, 16, 4), bench.Case(3, 8, 2, many=True)]
    assert cfg.repeats == 7 and cfg.hard_repeats == 3 and cfg.dtypes == [torch.float32]
    # argparse's refusal: exit code 2, the reason on stderr (tests/test_cli.py has the whole table)
    for argv, match in [
        (["--shapes", "2x4x8"], "n=8 > l=4"),
        (["--dtype", "int8"], "--dtype"),
        (["--contenders", "soft,nope"], "--contenders"),
    ]:
        with pytest.raises(SystemExit) as e:
            step.config(["--device", "cpu", *argv])
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_a_case_needs_every_contenders_tensors_at_once():
    # floor: input and product; base: parameters, gradients and AdamW's two moments; 4 bytes each
    assert step.case_bytes(step.Case(2, 8, 4), torch.float32, ["floor", "base"]) == (2 + 4) * 64 * 4
    assert step.case_bytes(step.Case(2, 8, 4), torch.bfloat16, ["soft-auto", "base-stacked"]) == 5 * 64 * 2
    assert step.case_bytes(step.Case(2, 8, 4, many=True), torch.float32, ["base-stacked"]) == 4 * 64 * 4


@pytest.mark.parametrize("spare", [0, -1])
def test_a_shape_is_refused_where_its_contenders_cannot_fit(spare, monkeypatch, capsys):
    need = step.case_bytes(step.Case(4, 16, 4), torch.float32, ["floor", "soft"])
    monkeypatch.setattr(step, "available_bytes", lambda device: need + spare)
    argv = ["--device", "cpu", "--shapes", "4x16x4", "--contenders", "floor,soft", "--out", "x.json"]
    if spare >= 0:
        assert step.config(argv).cases == [step.Case(4, 16, 4)]
        return
    with pytest.raises(SystemExit) as e:
        step.config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"needs at least {human_bytes(need)} (6 tensors of 256 elements" in err


@pytest.mark.slow
def test_the_step_benchmark_exits_1_when_every_contender_of_a_case_failed(tmp_path, monkeypatch, capsys):
    def fails(case, *args):
        if case.l == 16:
            raise RuntimeError("not enough memory")
        return step.BUILDERS["base"](case, *args)

    names = ["floor", "soft"]
    monkeypatch.setattr(step, "BUILDERS", {**step.BUILDERS, **{n: fails for n in names}})
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--shapes", "2x8x4,2x16x4", "--contenders", ",".join(names), "--repeats", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "orthoopt bench: every contender failed at (2,16,4) float32 (the n/a lines say why)"
    report = json.loads(out.read_text())  # written, with the reasons
    assert report["results"][1]["n/a"] == {n: "RuntimeError: not enough memory" for n in names}


# -- the whole-iteration benchmark -----------------------------------------------------------
@pytest.mark.slow
def test_models_benchmark_quick_writes_its_json(tmp_path, capsys):
    out = tmp_path / "made" / "models.json"  # its folder made
    assert iteration.main(["--quick", "--models", "mnist,lstm,vit", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["quick"] is True and report["meta"]["every"] == iteration.EVERY
    results = {r["model"]: r for r in report["results"]}
    assert list(results) == ["mnist", "lstm", "vit"]
    if "skipped" in results["vit"]:  # timm absent: skipped with the reason
        assert "timm" in results["vit"]["skipped"]
    for name in ("mnist", "lstm"):
        entries = results[name]["contenders"]
        assert list(entries) == list(contenders.CONTENDERS)
        assert entries["plain"]["ratio"] == 1.0 and entries["plain"]["extra_held_bytes"] == 0
        for contender, e in entries.items():
            if e["status"] != "ok":
                assert e["status"] == "n/a" and e["reason"], (name, contender)
                continue
            assert e["median_ms"] > 0 and e["q1_ms"] <= e["median_ms"] <= e["q3_ms"]
            assert e["ratio"] > 0 and 0 <= e["max_error"] < math.inf, (name, contender, e)
            if contender in ("soft", "soft-auto", "hard", "geotorch"):
                assert e["max_error"] < 0.1, (name, contender, e)
        assert entries["soft"]["extra_held_bytes"] > 0  # its workspaces
    # Adadelta has no Riemannian counterpart in hard mode: n/a, with the reason.
    assert results["mnist"]["contenders"]["hard"]["status"] == "n/a"
    assert "Adadelta" in results["mnist"]["contenders"]["hard"]["reason"]
    assert results["lstm"]["contenders"]["hard"]["status"] == "ok"
    assert {"mnist soft", "mnist soft-every", "lstm hard"} <= set(report["targets"])
    out = capsys.readouterr().out
    assert "x plain" in out and "--quick: tiny models" in out


@pytest.mark.parametrize("model", ["mnist", "lstm", "mlp"])
def test_models_benchmark_starts_on_the_manifold_of_each_weights_own_layout(model):
    # An LSTM's weights are constrained per gate block (row_groups:4): the start is snapped
    # in that layout, not as one whole matrix (which leaves the blocks far from orthogonal).
    spec = models.MODELS[model]
    net, weights, _ = iteration._setup(spec, True, 0, torch.device("cpu"), 1)
    assert models.max_error(net, weights) < 1e-5, [str(w.layout) for w in weights]


@pytest.mark.slow
def test_models_benchmark_abandons_a_contender_over_budget():
    cfg = iteration.config(["--quick", "--device", "cpu"])
    job = ("wide", "geotorch")
    assert iteration.probe([job], 1e-4, cfg) == {job: ("over budget", "setup")}  # no setup takes 0.1 ms
    status, seconds = iteration.probe([job], 120, cfg)[job]
    assert status == "ok" and 0 < seconds < 120


@pytest.mark.slow
def test_models_benchmark_through_the_cli(tmp_path, capsys):
    from orthoopt import __main__ as cli

    out = tmp_path / "m.json"
    assert cli.main(["bench", "--models", "mlp", "--quick", "--contenders", "plain,soft-every", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "mlp" and result["contenders"]["soft-every"]["status"] == "ok"
    # a round times one whole cycle of the every-k step (k = 4 by default) of every contender
    assert result["contenders"]["plain"]["iterations_per_round"] == 4
    assert result["contenders"]["soft-every"]["iterations_per_round"] == 4
    report = iteration.run(iteration.config(["--models", "mlp", "--quick", "--runs", "3"]))
    soft = report["results"][0]["contenders"]["soft"]
    assert len(soft["ratio_runs"]) == 3 and soft["ratio"] == sorted(soft["ratio_runs"])[1]  # the runs' median
    capsys.readouterr()
    for argv, match in [
        (["--models", "resnet"], "--models: unknown"),
        (["--models", "mlp", "--every", "0"], "--every"),
    ]:
        with pytest.raises(SystemExit) as e:  # argparse's refusal: exit code 2, the reason on stderr
            cli.main(["bench", *argv])
        assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_every_k_experiment_and_targets_table_run(tmp_path, capsys):
    from test_experiments import TOOLS, load

    load("bench_every_k").main(["--quick", "--out", str(tmp_path), "--archs", "mlp", "--every", "1,2"])
    text = (tmp_path / "bench_every_k-quick" / "README.md").read_text()
    assert text.count("| digits MLP 64-128-128-10 |") == 4  # β and 'auto', k = 1 and 2
    out = tmp_path / "step.json"
    shapes = ["--shapes", "256x64x16,many:16x256x64", "--repeats", "2", "--warmup", "0"]
    bench.main(["--device", "cpu", *shapes, "--out", str(out), "--contenders", "floor,base,soft,soft-auto"])
    rows = load("bench_targets", TOOLS).main([str(out)]).splitlines()
    measured = [r for r in rows if r.startswith("| (soft - AdamW) / floor, (256, 64, 16)")]
    assert len(measured) == 1 and measured[0].rstrip(" |").endswith(("met", "**not met**"))
    assert sum("not measured" in r for r in rows) == len(rows) - 2 - 5  # the other cases were not run


@pytest.mark.slow
def test_profile_script_runs(capsys):
    from test_experiments import load

    load("profile_soft_step").main(["--shape", "4x8x2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "(soft - AdamW) / floor =" in out and ("aten::bmm" in out or "aten::baddbmm" in out)


@pytest.mark.slow
def test_profile_script_says_where_the_clock_cannot_measure_the_floor(capsys, monkeypatch):
    # Seen under mutmut's forked workers: blocks of tiny steps read 0.0 ms of CPU time, and
    # the ratio divided by zero.
    from test_experiments import load

    script = load("profile_soft_step")
    monkeypatch.setattr(script.time, "process_time", lambda: 0.0)
    script.main(["--shape", "4x8x2", "--steps", "2"])
    assert (
        "(soft - AdamW) / floor = not measured (the floor's steps took less than the CPU clock's"
        in capsys.readouterr().out
    )
