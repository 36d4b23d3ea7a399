"""Details of the optimizer glue (orthoopt.optim) that the contract tests left open (found by
mutation testing): how groups may give their parameters, what load_state_dict checks and keeps,
'auto' on a non-finite matrix, hard groups behind skipped parameters, and the exact messages.
(Generators as a group's params, LBFGS's closure and where the non-finite warning points are
test_torch_contract's and test_errors' since issue 8.)"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthoopt


def _penalized_step(w: torch.Tensor, **options) -> torch.Tensor:
    """``w`` after one OrthoSGD step with a zero gradient: the penalty step alone."""
    ref = nn.Parameter(w.detach().clone())
    ref.grad = torch.zeros_like(ref)
    orthoopt.OrthoSGD([ref], lr=0.05, ortho=1.0, **options).step()
    return ref.detach()


# -- how a group gives its parameters ------------------------------------------------------
def test_a_group_may_give_one_tensor_or_a_reiterable_collection():
    g = torch.Generator().manual_seed(0)
    w, v = nn.Parameter(torch.randn(8, 3, generator=g)), nn.Parameter(torch.randn(8, 3, generator=g))
    expected = [_penalized_step(w, ortho_layout="columns"), _penalized_step(v)]
    opt = orthoopt.OrthoSGD(
        [{"params": w, "ortho_layout": "columns"}, {"params": {"v": v}.values()}], lr=0.05, ortho=1.0
    )
    assert opt.param_groups[0]["params"] == [w] and opt.param_groups[1]["params"] == [v]
    w.grad, v.grad = torch.zeros_like(w), torch.zeros_like(v)
    opt.step()
    assert torch.equal(w.detach(), expected[0]) and torch.equal(v.detach(), expected[1])


def test_positional_arguments_reach_the_base_optimizer():
    w = nn.Parameter(torch.randn(8, 3))
    assert orthoopt.OrthoSGD([w], 0.3, 0.9).param_groups[0]["lr"] == 0.3
    group = orthoopt.OrthoAdamW([w], 0.02, (0.8, 0.9)).param_groups[0]
    assert group["lr"] == 0.02 and group["betas"] == (0.8, 0.9)


def test_bad_defaults_and_complex_parameters_are_named_with_the_fix():
    with pytest.raises(ValueError, match=r"^optimizer defaults: ortho must be a finite number >= 0"):
        orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3))], lr=0.1, ortho=-1.0)
    with pytest.raises(TypeError) as info:
        orthoopt.OrthoSGD([("z", nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)))], lr=0.1, ortho=1.0)
    assert str(info.value).endswith(
        "orthoopt's orthogonality is for real parameters: put it in a group with ortho=0, or use torch.view_as_real"
    )


# -- load_state_dict -----------------------------------------------------------------------
def _adamw_state(w: torch.Tensor, **options) -> dict:
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0, **options)
    w.grad = torch.randn_like(w)
    opt.step()
    return copy.deepcopy(opt.state_dict())


def test_a_layout_that_resolves_the_same_does_not_end_the_checks():
    """Saved with 'columns' and the Frobenius penalty, loaded under 'auto' (which resolves to
    'columns' here) and L1: the penalty still differs, and is refused with the fix."""
    saved = _adamw_state(nn.Parameter(torch.randn(8, 3)), ortho_layout="columns", ortho_penalty="frobenius")
    fresh = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(8, 3))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(saved)
    assert str(info.value) == (
        "param group 0: the checkpoint was saved with ortho_penalty='frobenius' but this optimizer has "
        "ortho_penalty='l1'; construct the optimizer with ortho_penalty='frobenius' to resume, or start "
        "from a fresh optimizer state"
    )


def test_scalar_state_of_other_base_optimizers_loads_and_resumes_bitwise():
    """ASGD keeps 0-dim 'eta' and 'mu' besides 'step': not a parameter-shaped state to check."""
    ASGD = orthoopt.orthogonalize(torch.optim.ASGD)

    def run(opt, w, steps, g):
        for _ in range(steps):
            w.grad = torch.randn(w.shape, generator=g)
            opt.step()

    w = nn.Parameter(torch.randn(8, 3))
    opt = ASGD([w], lr=0.01, ortho=1.0)
    g = torch.Generator().manual_seed(1)
    run(opt, w, 3, g)
    saved, start = copy.deepcopy(opt.state_dict()), w.detach().clone()
    run(opt, w, 3, torch.Generator().manual_seed(2))
    v = nn.Parameter(start)
    resumed = ASGD([v], lr=0.01, ortho=1.0)
    resumed.load_state_dict(saved)
    run(resumed, v, 3, torch.Generator().manual_seed(2))
    assert torch.equal(v, w)


def test_state_of_another_shape_is_refused_for_vectors_and_behind_orthoopt_keys():
    w, b = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(5))
    opt = orthoopt.OrthoAdamW([w, b], lr=1e-2, ortho=1.0)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(4))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError, match=r"state 'exp_avg' for parameter 1 has shape \(5,\).*\(4,\)"):
        other.load_state_dict(saved)
    # orthoopt's own per-matrix keys are skipped, and the keys after them still checked
    state = saved["state"][0]
    saved["state"][0] = {"ortho_multiplier": torch.ones(1), **{k: v for k, v in state.items()}}
    saved["state"][0]["exp_avg"] = torch.zeros(7, 3)
    fresh = orthoopt.OrthoAdamW([nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(5))], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError, match=r"state 'exp_avg' for parameter 0 has shape \(7, 3\)"):
        fresh.load_state_dict(saved)


def test_a_float32_checkpoint_resumes_a_float64_model_in_float64():
    """torch casts the state to the parameter's dtype; only half-precision parameters keep float32."""
    saved = _adamw_state(nn.Parameter(torch.randn(8, 3)))
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0)
    opt.load_state_dict(saved)
    assert opt.state[w]["exp_avg"].dtype == torch.float64 and opt.state[w]["exp_avg_sq"].dtype == torch.float64
    w.grad = torch.randn_like(w)
    opt.step()


# -- the step's parts ------------------------------------------------------------------------
def test_auto_multiplier_of_a_non_finite_matrix_is_zero():
    """A matrix whose residual is not finite says nothing about the multiplier: its estimate
    stays 0 (and finite), while the other matrix of the parameter gets its own."""
    w = nn.Parameter(torch.randn(2, 8, 3))
    with torch.no_grad():
        w[0, 0, 0] = 1e20  # its Gram overflows float32
    w.grad = torch.randn_like(w)
    opt = orthoopt.OrthoSGD([w], lr=0.05, ortho="auto", ortho_layout="group_axis:0", ortho_nonfinite="skip")
    opt.step()
    multiplier = opt.state[w]["ortho_multiplier"]
    assert multiplier[0] == 0 and multiplier[1] > 0


def test_hard_parameters_behind_one_without_a_gradient_take_the_hard_step():
    c, w = nn.Parameter(torch.randn(8, 3)), nn.Parameter(orthoopt.penalty.polar(torch.randn(8, 3)))
    opt = orthoopt.OrthoSGD([{"params": [c, w], "ortho": 1.0, "ortho_mode": "hard", "ortho_layout": "columns"}], lr=0.1)
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    assert orthoopt.orthogonality_error(w.detach(), group_dim=None).item() < 1e-5
    assert "step" in opt.state[w]


def test_a_hard_layout_that_no_longer_fits_is_named_at_the_step():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([("w", w)], lr=0.1, ortho=1.0, ortho_mode="hard")
    opt.param_groups[0]["ortho_layout"] = "rows"  # 8 rows of length 3: impossible
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match=r"^parameter 'w': layout 'rows' asks for 8 orthonormal vectors"):
        opt.step()


_FIX = (
    " holds NaN or Inf: the orthogonality step skips its non-finite matrices (other matrices and "
    "parameters are unaffected). Lower the learning rate, or clip gradients"
)


def test_non_finite_message_names_only_the_bad_parameters_and_the_fix():
    a, b, c = (nn.Parameter(torch.randn(8, 3)) for _ in range(3))
    with torch.no_grad():
        b[0, 0] = c[1, 1] = float("nan")
    opt = orthoopt.OrthoSGD([("a", a), ("b", b), ("c", c)], lr=0.05, ortho=1.0)
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning) as rec:
        opt.step()
    assert [str(r.message) for r in rec] == [
        "parameter 'b', parameter 'c'" + _FIX + " (warned once per parameter; ortho_nonfinite='raise' to stop instead)"
    ]
    opt.param_groups[0]["ortho_nonfinite"] = "raise"
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    assert str(info.value) == "parameter 'b', parameter 'c'" + _FIX + "; nothing was changed by this step"


def test_orthogonalized_class_names_its_base_in_its_doc():
    # (its module and name, orthoopt.optim.OrthoRMSprop, are test_torch_contract's)
    RMSprop = orthoopt.orthogonalize(torch.optim.RMSprop)
    assert RMSprop.__doc__.startswith("RMSprop with a decoupled group-orthogonality step")
    assert ":class:`torch.optim.RMSprop`" in RMSprop.__doc__


# -- found by the mutation run on today's optim.py (tests/MUTATION.md) -----------------------
def test_module_getattr_makes_the_class_of_a_torch_optimizer_by_name():
    """What unpickling a generated class calls in a process that has not made it yet
    (test_torch_contract checks that in a child process, which mutmut does not see)."""
    cls = orthoopt.optim.__getattr__("OrthoAdagrad")
    assert cls is orthoopt.orthogonalize(torch.optim.Adagrad) and cls.__name__ == "OrthoAdagrad"
    for name in ("OrthoNoSuchOptimizer", "Adagrad", "Orthoswa_utils", "OrthoOrthoSGD"):
        with pytest.raises(AttributeError) as info:
            orthoopt.optim.__getattr__(name)
        assert str(info.value) == f"module 'orthoopt.optim' has no attribute {name!r}"


class _OwnSGD(torch.optim.SGD):
    """A user's optimizer outside torch.optim: its generated class exists only where it was made."""


def test_a_generated_class_of_a_users_optimizer_unpickles_where_it_was_never_made(monkeypatch):
    cls = orthoopt.orthogonalize(_OwnSGD)
    w = nn.Parameter(torch.randn(8, 3))
    opt = cls([w], lr=0.1, momentum=0.9, ortho=2.0)
    w.grad = torch.randn_like(w)
    opt.step()
    blob = pickle.dumps(opt)
    # a fresh process: neither the module attribute nor the cache holds the class
    monkeypatch.delattr(orthoopt.optim, cls.__name__)
    monkeypatch.delitem(orthoopt.optim._ORTHO_CLASSES, _OwnSGD)
    other = pickle.loads(blob)
    assert isinstance(other, _OwnSGD) and type(other).__name__ == cls.__name__
    assert other.param_groups[0]["ortho"] == 2.0
    (v,) = other.param_groups[0]["params"]
    assert torch.equal(other.state[v]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_a_pickle_without_the_newer_ortho_keys_gets_this_optimizers_defaults():
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([w], lr=0.1, ortho=2.0, ortho_smoothing=0.01, ortho_every=2)
    state = opt.__getstate__()
    state["param_groups"] = [
        {k: v for k, v in g.items() if k not in ("ortho_smoothing", "ortho_every", "ortho_nonfinite")}
        for g in state["param_groups"]
    ]
    del state["defaults"]["ortho_nonfinite"]  # a key the pickle's orthoopt did not have at all
    old = orthoopt.OrthoSGD.__new__(orthoopt.OrthoSGD)
    old.__setstate__(state)
    group = old.param_groups[0]
    assert (group["ortho"], group["ortho_smoothing"], group["ortho_every"]) == (2.0, 0.01, 2)
    assert group["ortho_nonfinite"] == orthoopt.optim.ORTHO_DEFAULTS["ortho_nonfinite"] == "warn"
    w.grad = torch.zeros_like(w)
    old.step()


def test_plain_optimizers_and_a_models_layout_in_named_orthogonality_errors():
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError) as info:
        orthoopt.named_orthogonality_errors(torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(info.value) == (
        "named_orthogonality_errors got a plain SGD, which constrains nothing: turn it into an orthoopt "
        "optimizer first with orthoopt.constrain_(optimizer, model, ortho=...)"
    )
    # the (8, 3) weight: 'auto' takes its 3 columns, 'rows' cannot (8 rows of length 3) and is refused
    auto = orthoopt.named_orthogonality_errors(model)
    with torch.no_grad():
        expected = orthoopt.orthogonality_error(model[0].weight, group_dim=None).item()
    assert auto["0.weight"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="'0.weight'.*layout 'rows'"):
        orthoopt.named_orthogonality_errors(model, "rows")


def test_differentiable_groups_are_refused_with_the_whole_reason():
    w = nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError) as info:
        orthoopt.OrthoSGD([w], lr=0.1, ortho=1.0, differentiable=True)
    assert str(info.value) == (
        "param group 0: differentiable=True with ortho=1.0: orthoopt's orthogonality step is not "
        "differentiable, so autograd through step() would treat it as a constant and give wrong "
        "gradients. Put the parameters you differentiate through in a group with ortho=0, or use "
        "differentiable=False"
    )


class _NoClosureStep(torch.optim.Optimizer):
    """A user's optimizer whose step takes no closure (plain gradient descent)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_a_base_step_without_a_closure_argument_is_called_without_one():
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    v = nn.Parameter(w.detach().clone())
    w.grad = torch.randn_like(w)
    v.grad = w.grad.clone()
    orthoopt.orthogonalize(_NoClosureStep)([w], lr=0.05, ortho=1.0).step()
    orthoopt.OrthoSGD([v], lr=0.05, ortho=1.0).step()  # the same base update: p - lr·g
    assert torch.equal(w.detach(), v.detach()) and not torch.equal(w.detach(), w.grad)


def test_float32_state_of_a_half_parameter_is_a_copy_of_the_checkpoints():
    """Stepping a resumed optimizer must not write into the checkpoint it was loaded from
    (torch's cast to bfloat16 copies; orthoopt's kept float32 state must too)."""
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))
    opt = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].float()
    saved = opt.state_dict()
    kept = copy.deepcopy(saved)
    fresh = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    fresh.load_state_dict(saved)
    assert fresh.state[w]["momentum_buffer"].dtype == torch.float32
    fresh.step()
    assert not torch.equal(fresh.state[w]["momentum_buffer"], kept["state"][0]["momentum_buffer"])
    assert torch.equal(saved["state"][0]["momentum_buffer"], kept["state"][0]["momentum_buffer"])


def test_a_groups_own_differentiable_setting_decides_at_construction():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"^param group 1: differentiable=True with ortho=1.0"):
        orthoopt.OrthoSGD([{"params": [w]}, {"params": [v], "differentiable": True}], lr=0.1, ortho=1.0)
    # differentiable by default, but not the penalized group: accepted
    opt = orthoopt.OrthoSGD(
        [{"params": [w], "ortho": 0.0}, {"params": [v], "differentiable": False, "ortho": 1.0}],
        lr=0.1,
        differentiable=True,
    )
    assert [g["differentiable"] for g in opt.param_groups] == [True, False]


def test_the_step_size_check_takes_each_groups_own_lr():
    w, v = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"^param group 1: parameter 'v': 2·lr·ortho = 2e\+20 is beyond"):
        orthoopt.OrthoSGD([{"params": [("w", w)]}, {"params": [("v", v)], "lr": 1e20}], lr=0.1, ortho=1.0)
    opt = orthoopt.OrthoSGD([{"params": [w], "lr": 0.1}], lr=1e20, ortho=1.0)  # its own lr is fine
    assert opt.param_groups[0]["lr"] == 0.1
    # every 4th step with 4 times the step size: 2·lr·ortho·4 = 4e19 is checked, not 1e19
    with pytest.raises(ValueError, match=r"2·lr·ortho = 4e\+19 is beyond"):
        orthoopt.OrthoSGD([w], lr=5e18, ortho=1.0, ortho_every=4)


def test_a_set_of_parameters_is_refused_with_torchs_own_message():
    params = {nn.Parameter(torch.randn(8, 3))}
    with pytest.raises(TypeError) as plain:
        torch.optim.SGD([{"params": params}], lr=0.1)
    with pytest.raises(TypeError) as ortho:
        orthoopt.OrthoSGD([{"params": params}], lr=0.1, ortho=1.0)
    assert str(ortho.value) == str(plain.value)
