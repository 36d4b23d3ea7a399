"""pytorch/examples' mnist CNN under Adadelta + StepLR: the script builds its optimizer from the
parameters, so the swap is ``orthogonalize(Adadelta)(param_groups(model, ...))``."""

from __future__ import annotations

import functools

import checks
import pytest
import torch
import training_scripts as ts

import orthoopt

pytestmark = pytest.mark.integration

# 16x16 images (fc1 2304 -> 128 instead of 9216 -> 128: a quarter of the time), 8 epochs of
# 23 iterations: the lr ends at 1.0 * 0.7**7 = 0.08.
SCRIPT = functools.partial(ts.mnist_cnn, side=16, epochs=8)
SOFT = ["soft", "auto"]
# Measured: the held-out NLL of the orthonormal CNN is 1.6-1.8 times the plain one's (seeds 1-3)
# at the same accuracy (within 0.3 points): orthonormal conv1/conv2/fc1 cap the scale of the
# features that reach fc2, so its logits are less confident (a temperature of 2 brings the NLL
# from 0.111 to 0.080 against the plain model's 0.060). Strict: it fails once this is fixed.
UNDERCONFIDENT = pytest.mark.xfail(
    strict=True, reason="orthonormal layers cap the logit scale: NLL 1.6-1.8x at equal accuracy"
)


@pytest.fixture(scope="module")
def runs() -> checks.Runs:
    return checks.Runs(SCRIPT)


@pytest.mark.parametrize("variant", SOFT)
def test_conv_and_hidden_weights_end_orthonormal(runs, variant):
    checks.constraint_holds(runs, variant, ts.MNIST_CONSTRAINED)


@pytest.mark.parametrize("variant", SOFT)
def test_only_conv1_conv2_fc1_are_penalized(runs, variant):
    checks.nothing_else_is_penalized(runs, variant, ts.MNIST_CONSTRAINED)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=UNDERCONFIDENT) for v in SOFT])
def test_task_loss_within_10_percent(runs, variant):
    checks.loss_within_margin(runs, variant)


@pytest.mark.parametrize("variant", SOFT)
def test_accuracy_within_one_point(runs, variant):
    assert runs[variant].metric >= runs["plain"].metric - 1.0


def test_hard_mode_refuses_adadelta_at_once_and_changes_nothing():
    """Hard mode follows geoopt's Riemannian SGD or Adam; Adadelta is neither, so the swap is
    refused at construction, naming the class and the way out."""
    model = ts.MnistNet(16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = orthoopt.param_groups(model, exclude=ts.MNIST_EXCLUDE, **ts.RECIPES["hard"])
    with pytest.raises(TypeError, match=r"Adadelta.*neither.*ortho_mode='soft'"):
        orthoopt.orthogonalize(torch.optim.Adadelta)(groups, lr=1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
