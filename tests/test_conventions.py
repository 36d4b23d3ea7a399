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


# -- the targets as group options ---------------------------------------------------------------------


def test_target_options_default_and_are_kept_per_group():
    w, v = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(3, 5))
    opt = orthoopt.OrthoSGD(
        [{"params": [w]}, {"params": [v], "ortho_target": "orthogonal", "ortho_normalize": True}], lr=0.1, ortho=1.0
    )
    assert (opt.param_groups[0]["ortho_target"], opt.param_groups[0]["ortho_normalize"]) == ("orthonormal", False)
    assert (opt.param_groups[1]["ortho_target"], opt.param_groups[1]["ortho_normalize"]) == ("orthogonal", True)
    assert (opt.defaults["ortho_target"], opt.defaults["ortho_normalize"]) == ("orthonormal", False)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"ortho_target": "cosine"}, ValueError, r"param group 0: ortho_target must be one of \('orthonormal', "),
        ({"ortho_normalize": 1}, TypeError, "param group 0: ortho_normalize must be True or False, got 1"),
        (
            {"ortho_normalize": True},
            ValueError,
            "ortho_normalize=True .* cannot ask for orthonormal vectors: use ortho_target='orthogonal'",
        ),
        (
            {"ortho_target": "orthogonal", "ortho": "auto"},
            ValueError,
            r"ortho='auto' sets β from the Lagrange multipliers of ΦᵀΦ = I .* set ortho to a number",
        ),
        (
            {"ortho_target": "orthogonal", "ortho_normalize": True, "ortho_mode": "hard"},
            ValueError,
            r"ortho_mode='hard' moves on the Stiefel manifold .* ortho_target='orthogonal' with "
            r"ortho_normalize=True .* another manifold \(the matrices with orthogonal nonzero columns.* orthoopt "
            "does not provide it",
        ),
    ],
)
def test_bad_target_options_are_refused_naming_the_group(options, error, message):
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(error, match=message):
        orthoopt.OrthoAdam([{"params": [w], "ortho": 1.0, **options}], lr=0.1)
    with pytest.raises(error, match=message.replace("param group 0", "param_groups")):
        orthoopt.param_groups(torch.nn.Linear(6, 4), **{"ortho": 1.0, **options})


def test_a_target_set_on_a_hard_group_after_construction_is_refused_before_anything_changes():
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = orthoopt.OrthoAdam([w], lr=0.1, ortho=1.0, ortho_mode="hard")
    opt.param_groups[0]["ortho_target"] = "orthogonal"
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="param group 0: ortho_mode='hard' moves on the Stiefel manifold"):
        opt.step()
    assert torch.equal(w, before) and not opt.state[w]


# -- the soft step of the targets -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(6, 9), (5, 3, 2, 2)], ids=["linear", "conv"])
def test_a_small_soft_step_is_the_keras_gradient_step(mode, shape):
    """With a small learning rate (no cap binds, every cosine at least the cutoff away from zero),
    the soft step of the Keras mapping is -lr times the gradient of Keras's loss: the one-line
    swap takes Keras's gradient step, decoupled from the base update (zero gradients here)."""
    if mode == "rows":  # orthoopt's layouts take at most as many vectors as their length
        shape = {(6, 9): (9, 6), (5, 3, 2, 2): (8, 2, 2, 1)}[shape]
    weight = torch.randn(*shape, dtype=torch.float64) * torch.rand(shape[0], *([1] * (len(shape) - 1))).double()
    leaf = weight.clone().requires_grad_(True)
    kernel = keras_kernel(leaf)
    (expected,) = torch.autograd.grad(
        keras_orthogonal_regularizer(kernel.reshape(-1, kernel.shape[-1]), 0.03, mode), leaf
    )
    beta, layout = keras_terms(0.03, mode, weight)
    p = torch.nn.Parameter(weight.clone())
    lr = 1e-6
    opt = orthoopt.OrthoSGD(
        [p], lr=lr, ortho=beta, ortho_layout=layout, ortho_target="orthogonal", ortho_normalize=True, ortho_init="keep"
    )
    p.grad = torch.zeros_like(p)
    opt.step()
    # The update is read back as a difference of numbers of the weights' size: up to eps·|w| off.
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(p.detach() - weight, -lr * expected, rtol=1e-12, atol=eps * weight.abs().max().item())


@pytest.mark.parametrize("shape", [(6, 9), (5, 3, 2, 2)], ids=["linear", "conv"])
def test_a_small_soft_step_is_the_biggan_gradient_step(shape):
    weight = torch.randn(*shape, dtype=torch.float64)
    p = torch.nn.Parameter(weight.clone())
    lr, strength = 1e-3, 1e-4
    opt = orthoopt.OrthoSGD(
        [p],
        lr=lr,
        ortho=strength / 2,
        ortho_layout="rows",
        ortho_penalty="frobenius",
        ortho_target="orthogonal",
        ortho_init="keep",
    )
    p.grad = torch.zeros_like(p)
    opt.step()
    eps = torch.finfo(torch.float64).eps  # the update read back as a difference: up to eps·|w| off
    expected = -lr * biggan_ortho_grad(weight, strength)
    torch.testing.assert_close(p.detach() - weight, expected, rtol=1e-12, atol=eps * weight.abs().max().item())


def _free_weights(count, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(0.3, 3.0, shape[0], dtype=torch.float64)[:, None]
    return [torch.randn(*shape, generator=g, dtype=torch.float64) * lengths for _ in range(count)]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", ["l1", "frobenius"])
def test_a_bucket_of_several_parameters_in_chunks_steps_each_as_alone(monkeypatch, normalize, kind):
    """Four same-shaped weights share a bucket (a stack, the update buffer, the cap's scratch in
    the update's memory, two chunks): each moves by penalty.orthogonal_step of its own matrices."""
    monkeypatch.setattr(orthoopt.soft, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(orthoopt.soft, "CHUNK_SHARE", 0.5)
    weights = _free_weights(4, (5, 8))
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    lr, beta = 0.05, 0.3
    options = {"ortho_target": "orthogonal", "ortho_normalize": normalize, "ortho_penalty": kind}
    opt = orthoopt.OrthoSGD(params, lr=lr, ortho=beta, ortho_layout="rows", ortho_init="keep", **options)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    (bucket,) = opt._ortho_plan.buckets
    assert len(bucket.chunks) == 2 and bucket.stack is not None
    for w, p in zip(weights, params):
        mats = Layout("rows").matrices(w)
        r, squares = orthoopt.penalty.orthogonal_residual(mats, normalize)
        step = orthoopt.penalty.orthogonal_step(r, squares, mats, 0.0, kind, 2 * lr * beta, normalize)
        expected = w + Layout("rows").from_matrices(step, w.shape)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
        assert (p.detach() - w).abs().max() > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_the_soft_step_reaches_the_target_and_leaves_the_lengths_free(normalize):
    """Steps of the penalty alone (zero gradients) drive the target's error to zero while the
    lengths stay spread as they started (0.3 to 3), where the orthonormal target makes them 1.
    (The dot products also fall by shortening the vectors that overlap; a step of the cosines is
    orthogonal to each vector, which only grows by the step's square.)"""
    (weight,) = _free_weights(1, (5, 8))
    lengths = weight.norm(dim=1)
    p = torch.nn.Parameter(weight.clone())
    options = {"ortho_target": "orthogonal", "ortho_normalize": normalize, "ortho_init": "keep"}
    opt = orthoopt.OrthoSGD([p], lr=0.1, ortho=0.5 if normalize else 0.05, ortho_layout="rows", **options)
    start = opt.orthogonality_errors()["group0.param0"]
    for _ in range(300):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert start > 0.3 and opt.orthogonality_errors()["group0.param0"] < 1e-6
    ratio = p.detach().norm(dim=1) / lengths
    assert ((ratio > 0.4) & (ratio < 1.01)).all() if not normalize else ((ratio >= 1) & (ratio < 1.1)).all(), ratio
    assert (p.detach().norm(dim=1).max() - p.detach().norm(dim=1).min()) > 1.0
    error = orthoopt.orthogonality_error(p.detach().t(), group_dim=None, target="orthogonal", normalize=normalize)
    assert opt.orthogonality_errors()["group0.param0"] == error.item()


def test_a_non_finite_matrix_of_a_free_target_is_skipped_and_reported():
    weights = _free_weights(2, (5, 8))
    weights[1][0, 0] = float("nan")
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = orthoopt.OrthoSGD(params, lr=0.05, ortho=0.3, ortho_target="orthogonal", ortho_init="keep")
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning, match="'group0.param1' holds NaN or Inf"):
        opt.step()
    assert (params[0].detach() - weights[0]).abs().max() > 1e-3
    assert torch.equal(params[1].detach().nan_to_num(), weights[1].nan_to_num())


@pytest.mark.parametrize("normalize", [False, True])
def test_the_guard_judges_and_projects_the_groups_own_target(normalize):
    """ortho_init='warn' names the target and its error; 'project' snaps to the nearest orthogonal
    vectors of the same lengths (not to unit vectors)."""
    (weight,) = _free_weights(1, (5, 8))
    options = {"ortho_target": "orthogonal", "ortho_normalize": normalize, "ortho_layout": "rows"}
    p = torch.nn.Parameter(weight.clone())
    opt = orthoopt.OrthoSGD([p], lr=1e-4, ortho=0.01, **options)
    p.grad = torch.zeros_like(p)
    measure = "the largest |cos|" if normalize else "the largest |dot product|"
    q = weight.norm(dim=1) ** (-2 if normalize else 2)
    pull = 2 * 1e-4 * 0.01 * q.topk(2).values.sum().item()  # 2γβ·max(q_j + q_k): an entry's most per step
    with pytest.warns(orthoopt.guard.OrthogonalityWarning, match=rf"starts far from orthogonal \({measure}") as w:
        opt.step()
    assert f"by at most {pull:.3g} per step" in str(w[0].message)
    p = torch.nn.Parameter(weight.clone())
    opt = orthoopt.OrthoSGD([p], lr=1e-4, ortho=0.01, ortho_init="project", **options)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.orthogonality_errors()["group0.param0"] < 1e-12
    torch.testing.assert_close(p.detach().norm(dim=1), weight.norm(dim=1), rtol=1e-4, atol=0)
    p = torch.nn.Parameter(weight.clone())
    orthoopt.project_(orthoopt.OrthoSGD([p], lr=1e-4, ortho=0.01, **options))
    torch.testing.assert_close(p.detach().norm(dim=1), weight.norm(dim=1), rtol=1e-14, atol=0)


def test_a_checkpoint_of_another_target_is_refused():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = orthoopt.OrthoSGD([p], lr=0.1, ortho=1.0, ortho_target="orthogonal")
    saved = opt.state_dict()
    fresh = orthoopt.OrthoSGD([torch.nn.Parameter(torch.randn(4, 6))], lr=0.1, ortho=1.0)
    with pytest.raises(ValueError, match="saved with ortho_target='orthogonal' but this optimizer has"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_step_in_float32(dtype):
    (weight,) = _free_weights(1, (5, 8))
    p = torch.nn.Parameter(weight.to(dtype))
    opt = orthoopt.OrthoSGD([p], lr=0.05, ortho=0.3, ortho_target="orthogonal", ortho_normalize=True, ortho_init="keep")
    p.grad = torch.zeros_like(p)
    opt.step()
    mats = Layout("rows").matrices(weight.to(dtype))
    r, squares = orthoopt.penalty.orthogonal_residual(mats, True)
    step = orthoopt.penalty.orthogonal_step(r, squares, mats, 0.0, "l1", 0.03, True)
    assert p.dtype == dtype and step.dtype == dtype
    expected = weight.to(dtype) + Layout("rows").from_matrices(step, weight.shape)
    assert torch.equal(p.detach(), expected)


def test_groups_of_other_targets_take_their_own_steps():
    """Same-shaped weights in groups of different targets do not share a bucket's step."""
    weights = _free_weights(3, (5, 8))
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    targets = [("orthonormal", False), ("orthogonal", False), ("orthogonal", True)]
    groups = [{"params": [p], "ortho_target": t, "ortho_normalize": n} for p, (t, n) in zip(params, targets)]
    opt = orthoopt.OrthoSGD(groups, lr=0.05, ortho=0.3, ortho_layout="rows", ortho_init="keep")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for w, p, (target, normalize) in zip(weights, params, targets):
        alone = torch.nn.Parameter(w.clone())
        single = orthoopt.OrthoSGD(
            [alone],
            lr=0.05,
            ortho=0.3,
            ortho_layout="rows",
            ortho_init="keep",
            ortho_target=target,
            ortho_normalize=normalize,
        )
        alone.grad = torch.zeros_like(alone)
        single.step()
        assert torch.equal(p.detach(), alone.detach()), target
    assert not torch.equal(params[0].detach() - weights[0], params[1].detach() - weights[1])


@pytest.mark.parametrize("normalize", [False, True])
def test_a_weight_on_its_target_is_not_reported_or_projected(normalize, recwarn):
    """Orthogonal rows of lengths 0.5 to 4 are on the target (far from orthonormal): the guard
    neither warns nor projects them, at the start or when it watches for drift."""
    q = torch.linalg.qr(torch.randn(8, 5, dtype=torch.float64)).Q.t()
    weight = q * torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None]
    for init in ("warn", "project"):
        p = torch.nn.Parameter(weight.clone())
        opt = orthoopt.OrthoSGD(
            [p],
            lr=1e-3,
            ortho=0.01,
            ortho_layout="rows",
            ortho_init=init,
            ortho_target="orthogonal",
            ortho_normalize=normalize,
        )
        for _ in range(orthoopt.guard.WATCH_EVERY):
            p.grad = torch.zeros_like(p)
            opt.step()
        torch.testing.assert_close(p.detach(), weight, rtol=0, atol=1e-12)
    assert not [w for w in recwarn if issubclass(w.category, orthoopt.guard.OrthogonalityWarning)]


def _target_groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(8, 4, generator=g) / 3) for _ in range(3)]
    targets = [("orthogonal", False, "l1"), ("orthogonal", True, "l1"), ("orthogonal", False, "frobenius")]
    groups = [
        {"params": [p], "ortho_target": t, "ortho_normalize": n, "ortho_penalty": k, "ortho_layout": "columns"}
        for p, (t, n, k) in zip(ps, targets)
    ]
    return ps, groups


def test_the_plan_without_workspaces_steps_targets_like_the_cached_plan(monkeypatch):
    """torch.compile's plan has no workspaces (no scratch, no update buffer): the same steps."""

    def run():
        ps, groups = _target_groups()
        opt = orthoopt.OrthoAdamW(groups, lr=0.01, ortho=1.0, ortho_init="keep")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return ps, opt

    cached, opt = run()
    assert all(b.updates is not None for b in opt._plan().buckets)
    real = orthoopt.soft.buckets
    monkeypatch.setattr(orthoopt.soft, "buckets", lambda pieces, workspaces: real(pieces, workspaces=False))
    bare, opt = run()
    assert all(b.updates is None for b in opt._plan().buckets)
    for p, q in zip(bare, cached):
        assert torch.equal(p, q)


@pytest.mark.compile
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiled_step_of_the_targets_matches_eager():
    torch._dynamo.reset()

    def make():
        ps, groups = _target_groups()
        return ps, orthoopt.OrthoAdamW(groups, lr=torch.tensor(0.01), ortho=1.0, ortho_init="keep")

    eager, eager_opt = make()
    compiled, compiled_opt = make()

    @torch.compile(fullgraph=False)
    def step():
        compiled_opt.step()

    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(3):
            for p, q in zip(eager, compiled):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            eager_opt.step()
            step()
            for p, q in zip(eager, compiled):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert getattr(compiled_opt, "_ortho_plan", None) is None
    assert not torch.equal(compiled[1], make()[0][1])
