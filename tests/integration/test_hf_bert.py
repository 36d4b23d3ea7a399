"""A tiny BERT (BertForSequenceClassification from a BertConfig) under Hugging Face's Trainer:
the swap is constrain_ on ``trainer.optimizer`` after ``trainer.create_optimizer()``, with the
OrthoCallback logging the errors."""

from __future__ import annotations

import functools

import checks
import pytest
import training_scripts as ts
from conftest import import_or_skip

import orthoopt

pytestmark = pytest.mark.integration

EXPECTED = ts.bert_constrained()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> checks.Runs:
    import_or_skip("transformers")
    out = str(tmp_path_factory.mktemp("bert"))
    return checks.Runs(functools.partial(ts.hf_bert, output_dir=out, epochs=4))


@pytest.mark.parametrize("variant", ["soft", "auto", "hard"])
def test_projections_end_orthonormal(runs, variant):
    checks.constraint_holds(runs, variant, EXPECTED)


@pytest.mark.parametrize("variant", ["soft", "auto", "hard"])
def test_embeddings_norms_biases_and_classifier_are_left_to_the_trainer(runs, variant):
    checks.nothing_else_is_penalized(runs, variant, EXPECTED)
    free = {n: g["weight_decay"] for g in runs[variant].groups if g["ortho"] == 0 for n in g["param_names"]}
    assert free["bert.embeddings.word_embeddings.weight"] == 0.01
    assert free["bert.embeddings.LayerNorm.weight"] == 0.0
    assert free["classifier.weight"] == 0.01


# Hard mode met this only once its Adam second moment became the mean over each matrix's
# entries (ortho_second_moment="mean"): with geoopt's sum its steps were sqrt(l·n) times too short.
@pytest.mark.parametrize("variant", ["soft", "auto", "hard"])
def test_task_loss_within_10_percent(runs, variant):
    checks.loss_within_margin(runs, variant)


@pytest.mark.parametrize("variant", ["soft", "auto", "hard"])
def test_the_callback_logged_the_errors(runs, variant):
    """The OrthoCallback's rows in the Trainer's log history: one per logging step (every 20 of
    252), every constrained parameter named, none above the target."""
    logged = [row for row in runs[variant].log if "ortho/max_error" in row]
    assert len(logged) == runs[variant].steps // 20
    names = {key.removeprefix("ortho/error/") for key in logged[-1] if key.startswith("ortho/error/")}
    assert names == EXPECTED
    tol = checks.HARD_TOL if variant == "hard" else checks.SOFT_TOL
    assert all(row["ortho/max_error"] <= tol for row in logged)
    assert ("ortho/max_beta" in logged[-1]) == (variant == "auto")


def test_without_the_projection_the_std_002_start_is_reported_at_the_first_step(tmp_path):
    """ortho_init='warn' (the optimizer's own default): BERT's std-0.02 projections are far from
    orthonormal, and the Trainer's warmup starts at lr 0, where the pull never gets there."""
    transformers = import_or_skip("transformers")
    import torch

    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    )
    args = transformers.TrainingArguments(
        str(tmp_path), learning_rate=1e-3, warmup_steps=0.1, report_to=[], use_cpu=True
    )
    trainer = transformers.Trainer(model=model, args=args)
    trainer.create_optimizer()
    orthoopt.constrain_(trainer.optimizer, model, exclude=ts.BERT_EXCLUDE, ortho=ts.SOFT_BETA, ortho_init="warn")
    trainer.create_scheduler(num_training_steps=100, optimizer=trainer.optimizer)  # the warmup starts at lr 0

    model(input_ids=torch.randint(32, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    checks.far_start_reported(trainer.optimizer.step, EXPECTED)
