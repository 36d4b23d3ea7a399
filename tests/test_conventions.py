"""orthoopt's terms for the orthogonality penalties of Keras and BigGAN, against their code.

Each reference below transcribes the other library's code into torch, line for line, and
orthoopt's loss and closed-form gradient, with the β, layout, target and normalize that
docs/conventions.md gives, must match it in float64.
"""

from __future__ import annotations

import pytest
import torch

import orthoopt
from orthoopt.layout import Layout


def keras_orthogonal_regularizer(inputs: torch.Tensor, factor: float, mode: str) -> torch.Tensor:
    """Keras's ``OrthogonalRegularizer(factor, mode)(inputs)`` (keras/src/regularizers/regularizers.py),
    with Keras's ``normalize`` (``x * min(rsqrt(Σx²), 1/epsilon)``, epsilon = 1e-7)."""
    if len(inputs.shape) != 2:
        raise ValueError(f"Inputs to OrthogonalRegularizer must have rank 2. Received: inputs.shape={inputs.shape}")

    def normalize(x, axis, epsilon=1e-7):
        square_sum = torch.sum(torch.square(x), dim=axis, keepdim=True)
        inv_norm = torch.minimum(torch.rsqrt(square_sum), torch.tensor(1.0 / epsilon, dtype=x.dtype))
        return x * inv_norm

    if mode == "rows":
        inputs = normalize(inputs, axis=1)
        product = torch.matmul(inputs, torch.transpose(inputs, 0, 1))
        size = inputs.shape[0]
    else:
        inputs = normalize(inputs, axis=0)
        product = torch.matmul(torch.transpose(inputs, 0, 1), inputs)
        size = inputs.shape[1]
    product_no_diagonal = product * (1.0 - torch.eye(size, dtype=inputs.dtype))
    num_pairs = size * (size - 1.0) / 2.0
    return factor * 0.5 * torch.sum(torch.abs(product_no_diagonal)) / num_pairs


def biggan_ortho_grad(param: torch.Tensor, strength: float) -> torch.Tensor:
    """What BigGAN-PyTorch's ``utils.ortho(model, strength)`` adds to ``param.grad``."""
    w = param.view(param.shape[0], -1)
    grad = 2 * torch.mm(torch.mm(w, w.t()) * (1.0 - torch.eye(w.shape[0], dtype=w.dtype)), w)
    return strength * grad.view(param.shape)


def keras_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The Keras kernel of a torch weight: ``(in, units)`` for ``nn.Linear``'s ``(out, in)``, and
    ``(kh, kw, in, out)`` for ``nn.Conv2d``'s ``(out, in, kh, kw)``."""
    return weight.t() if weight.dim() == 2 else weight.permute(2, 3, 1, 0)


def keras_terms(factor: float, mode: str, weight: torch.Tensor) -> tuple[float, str]:
    """orthoopt's β and layout for Keras's factor and mode on the kernel of ``weight`` (a Conv
    kernel seen as the matrix ``(kh·kw·in, out)``), with target='orthogonal', normalize=True."""
    out, fan_in = weight.shape[0], weight[0].numel()
    n = fan_in if mode == "rows" else out  # Keras's rows are torch's columns, and the other way round
    return factor / (n * (n - 1)), "columns" if mode == "rows" else "rows"


def orthoopt_loss_and_grad(weight, beta, layout, kind, **options):
    lay = Layout(layout)
    mats = lay.matrices(weight)
    loss_fn = orthoopt.frobenius_orthogonality if kind == "frobenius" else orthoopt.l1_orthogonality
    grad_fn = orthoopt.frobenius_orthogonality_grad if kind == "frobenius" else orthoopt.l1_orthogonality_grad
    loss = loss_fn(mats, beta, group_dim=0, **options)
    grad = lay.from_matrices(grad_fn(mats, beta, group_dim=0, **options), weight.shape)
    return loss, grad


WEIGHTS = {
    "linear": (6, 9),  # nn.Linear(9, 6): a Keras Dense kernel (9, 6)
    "linear_tall": (9, 4),
    "conv": (5, 3, 2, 2),  # nn.Conv2d(3, 5, 2): a Keras Conv2D kernel (2, 2, 3, 5)
    "conv_1x1": (8, 4, 1, 1),
}


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("shape", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_keras_orthogonal_regularizer(mode, shape):
    """Keras's loss on the kernel (a Conv kernel reshaped to (kh·kw·in, out), as Keras's
    regularizer takes only matrices) and its gradient, from orthoopt's L1 penalty with
    β = factor / (n(n-1)), target='orthogonal', normalize=True."""
    factor = 0.03
    weight = torch.randn(*shape, dtype=torch.float64) * torch.rand(shape[0], *([1] * (len(shape) - 1))).double()
    leaf = weight.clone().requires_grad_(True)
    kernel = keras_kernel(leaf)
    expected = keras_orthogonal_regularizer(kernel.reshape(-1, kernel.shape[-1]), factor, mode)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    beta, layout = keras_terms(factor, mode, weight)
    loss, grad = orthoopt_loss_and_grad(weight, beta, layout, "l1", target="orthogonal", normalize=True)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert expected > 0 and expected_grad.abs().max() > 0


def test_keras_counts_pairs_and_halves():
    """Keras's 0.5 and its count of pairs, on a kernel whose cosines are known: columns (1, 0, 0),
    (0.6, 0.8, 0), (0, 5, 0) have |cos| 0.6, 0 and 0.8, so factor·0.5·(2·1.4)/3 pairs."""
    kernel = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 5.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor(2.0 * 0.5 * 2 * (0.6 + 0.8) / 3, dtype=torch.float64)
    torch.testing.assert_close(keras_orthogonal_regularizer(kernel, 2.0, "columns"), expected, rtol=1e-15, atol=0)
    weight = kernel.t()  # nn.Linear's weight: Keras's columns are its rows
    beta, layout = keras_terms(2.0, "columns", weight)
    assert (beta, layout) == (2.0 / 6, "rows")
    loss, _ = orthoopt_loss_and_grad(weight, beta, layout, "l1", target="orthogonal", normalize=True)
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("shape", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_biggan_ortho(shape):
    """BigGAN's hand-written gradient ``strength·2(WWᵀ ⊙ (1 - I))W`` is orthoopt's Frobenius
    gradient with β = strength/2, layout 'rows', target='orthogonal'; and it is the autograd
    gradient of (strength/2)·‖WWᵀ ⊙ (1 - I)‖²_F, orthoopt's loss there."""
    strength = 1e-4
    weight = torch.randn(*shape, dtype=torch.float64) * torch.rand(shape[0], *([1] * (len(shape) - 1))).double()
    expected_grad = biggan_ortho_grad(weight, strength)
    leaf = weight.clone().requires_grad_(True)
    w = leaf.view(shape[0], -1)
    off = (w @ w.t()) * (1 - torch.eye(shape[0], dtype=torch.float64))
    by_formula = strength / 2 * (off * off).sum()
    (formula_grad,) = torch.autograd.grad(by_formula, leaf)
    torch.testing.assert_close(formula_grad, expected_grad, rtol=1e-13, atol=0)
    loss, grad = orthoopt_loss_and_grad(weight, strength / 2, "rows", "frobenius", target="orthogonal")
    torch.testing.assert_close(loss, by_formula.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-13, atol=1e-20)
    assert expected_grad.abs().max() > 0


def test_the_coupled_forms_of_the_docs():
    """docs/conventions.md's functional lines: Keras's loss on an nn.Linear in mode 'columns', and
    BigGAN's on a conv weight, added to the user's loss (their gradients are autograd's)."""
    fc = torch.nn.Linear(7, 5).double()
    expected = keras_orthogonal_regularizer(fc.weight.t(), 0.01, "columns")
    n = fc.weight.shape[0]
    got = orthoopt.l1_orthogonality(
        fc.weight.T, 0.01 / (n * (n - 1)), group_dim=None, target="orthogonal", normalize=True
    )
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    W = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = orthoopt.frobenius_orthogonality(W.reshape(W.shape[0], -1).T, 1e-4 / 2, group_dim=None, target="orthogonal")
    (grad,) = torch.autograd.grad(loss, W)
    torch.testing.assert_close(grad, biggan_ortho_grad(W.detach(), 1e-4), rtol=1e-13, atol=0)
