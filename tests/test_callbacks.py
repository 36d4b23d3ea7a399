"""The frameworks' callbacks: the orthogonality errors (and β under 'auto') in their own logs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import import_or_skip
from test_swap import _bert, _forward, _lightning_fit, _model, _trainer

import orthoopt
from orthoopt.auto import AUTO_SAFETY
from orthoopt.integrations import orthogonality_metrics


@pytest.mark.slow
def test_import_orthoopt_imports_no_framework():
    code = (
        "import sys, orthoopt, orthoopt.integrations, orthoopt.swap, orthoopt.wrappers\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'transformers', 'accelerate', 'pytorch_lightning', 'lightning', 'lightning_fabric', 'timm'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_are_the_errors_and_the_auto_betas():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    orthoopt.constrain_(opt, model, ortho="auto", exclude=["head"])
    for _ in range(2):
        opt.zero_grad()
        _forward(model, torch.arange(10)).square().mean().backward()
        opt.step()
    metrics = orthogonality_metrics(opt)
    errors = opt.orthogonality_errors()
    assert {k: v for k, v in metrics.items() if k.startswith("ortho/error/")} == {
        f"ortho/error/{n}": e for n, e in errors.items()
    }
    named = dict(model.named_parameters())
    for name in errors:
        beta = AUTO_SAFETY * opt.state[named[name]]["ortho_multiplier"].max().item()
        assert metrics[f"ortho/beta/{name}"] == beta
    assert metrics["ortho/max_error"] == max(errors.values())
    assert metrics["ortho/max_beta"] == max(v for k, v in metrics.items() if k.startswith("ortho/beta/"))
    assert metrics["ortho/max_beta"] > 0
    assert set(orthogonality_metrics(opt, "o", per_parameter=False)) == {"o/max_error", "o/max_beta"}
    with pytest.raises(TypeError, match="plain AdamW.*constrain_"):
        orthogonality_metrics(torch.optim.AdamW(model.parameters()))


def test_hf_callback_logs_through_the_trainer(tmp_path):
    transformers = import_or_skip("transformers")
    from orthoopt.integrations.huggingface import OrthoCallback

    class Reporter(transformers.TrainerCallback):
        """Stands in for a report_to integration: it is called before user callbacks."""

        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    model = _bert(transformers)
    trainer = _trainer(transformers, model, tmp_path)
    reporter = Reporter()
    trainer.callback_handler.callbacks.insert(0, reporter)
    trainer.create_optimizer()
    orthoopt.constrain_(trainer.optimizer, model, ortho="auto", exclude=["classifier"])
    trainer.add_callback(OrthoCallback(trainer))
    trainer.train()
    rows = [row for row in trainer.state.log_history if "ortho/max_error" in row]
    assert [row["step"] for row in rows] == [5, 10]  # logging_steps=5 of max_steps=10
    assert len([r for r in reporter.logs if "ortho/max_error" in r]) == 2
    final = orthoopt.named_orthogonality_errors(trainer.optimizer)
    assert {k[len("ortho/error/") :]: v for k, v in rows[-1].items() if k.startswith("ortho/error/")} == final
    assert rows[-1]["ortho/max_beta"] > 0 and len([k for k in rows[-1] if k.startswith("ortho/beta/")]) == 13


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_lightning_callback_logs_to_the_trainers_loggers(package):
    """With the Trainer of either package (the callback is a Callback of both)."""
    pl = import_or_skip(package)
    from orthoopt.integrations.lightning import OrthoCallback

    assert isinstance(OrthoCallback(), pl.Callback)

    class Recorder(pl.loggers.Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = Recorder()
    module, trainer = _lightning_fit(pl, callbacks=[OrthoCallback(every_n_steps=4)], logger=logger, steps=12)
    rows = [(step, m) for step, m in logger.rows if "ortho/max_error" in m]
    assert [step for step, _ in rows] == [4, 8, 12]
    final = orthoopt.named_orthogonality_errors(trainer.optimizers[0])
    assert {k[len("ortho/error/") :]: v for k, v in rows[-1][1].items() if k.startswith("ortho/error/")} == final
    # gradient accumulation: several batches end on one step, which is logged once
    logger = Recorder()
    _lightning_fit(pl, callbacks=[OrthoCallback()], logger=logger, steps=10, accumulate_grad_batches=2)
    steps = [step for step, m in logger.rows if "ortho/max_error" in m]
    assert steps == [5, 10]  # the trainer's log_every_n_steps
    with pytest.raises(ValueError, match="every_n_steps"):
        OrthoCallback(every_n_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["lightning", "pytorch_lightning"])
def test_lightning_callback_with_one_package_installed(missing):
    """Where only one of the two packages is there, the callback is that one's."""
    present = {"lightning": "pytorch_lightning", "pytorch_lightning": "lightning.pytorch"}[missing]
    import_or_skip(present)
    code = (
        f"import sys; sys.modules[{missing!r}] = None  # as if not installed\n"
        "import importlib\n"
        "from orthoopt.integrations.lightning import OrthoCallback\n"
        f"assert OrthoCallback.__bases__ == (importlib.import_module({present!r}).Callback,), OrthoCallback.__bases__\n"
        f"assert {missing!r} not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
