"""orthoopt's optimizers held to the torch.optim contract, on torch's own optimizer test matrix.

``torch.testing._internal.common_optimizers.optim_db`` has one ``OptimizerInfo`` per torch
optimizer, with ``optim_inputs_func(device)``: the constructor kwargs that torch's own
``test/test_optim.py`` sweeps.  Every optimizer there goes through :func:`orthoopt.orthogonalize`
(SGD, Adam and AdamW give the named ``OrthoSGD``/``OrthoAdam``/``OrthoAdamW``), and every
input of its ``optim_inputs_func("cpu")`` is checked:

* ``ortho=0``: 10 steps bitwise the base class, parameters and ``state_dict()``, closure-driven
  ones included, over the inputs with torch's global flags as its tests add them on CPU
  (``differentiable``, and ``fused`` where the CPU has it; ``foreach`` has no CPU kernels);
* ``ortho > 0`` (soft, ``'auto'``, and hard where the class has a hard rule): ``state_dict`` ->
  ``torch.save`` -> ``torch.load(weights_only=True)`` -> a fresh optimizer -> 10 more steps,
  bitwise the uninterrupted run; what orthoopt refuses (sparse gradients, ``differentiable=True``,
  hard mode outside the SGD/Adam families) is asserted to be refused, before any change;
* ``copy.deepcopy``, pickle and ``torch.save`` of the whole optimizer keep stepping, and keep
  ``add_param_group`` working;
* step, ``state_dict`` and ``load_state_dict`` hooks, per instance and global, run once each and
  in the order torch runs them for the plain class, whichever was constructed first; pre-hooks
  see the parameters before the step, post-hooks the final ones;
* group dicts whose ``params`` are lists, tuples, generators, ``filter`` objects, a tensor or
  (name, tensor) pairs;
* every LR scheduler kind torch has (a new kind fails the test until it is added here), and the
  schedulers ``optim_db`` pairs with each optimizer;
* a plain optimizer's checkpoint keeps the ortho options; an Ortho checkpoint loads into the
  plain base class.

Skipped is only what torch skips for that optimizer on CPU (the reason is torch's own, read from
the ``OptimizerInfo``'s decorators).  The CLI's bad-argument table is in ``tests/test_cli.py``.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

# torch's test helpers; importing them needs the ``expecttest`` package (the dev extra).
from torch.testing._internal.common_optimizers import (  # noqa: E402
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import orthoopt
from orthoopt import orthogonalize
from orthoopt.optim import OrthoMixin
from orthoopt.options import ORTHO_DEFAULTS

STEPS = 10
BETA = 0.5
HARD_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
ORTHO_KEYS = set(ORTHO_DEFAULTS)


# -- the matrix ---------------------------------------------------------------------------
def _cases(with_global_flags: bool = False):
    for info in optim_db:
        if with_global_flags:
            inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
        else:
            inputs = info.optim_inputs_func(device="cpu")
        for inp in inputs:
            yield pytest.param(info, inp, id=f"{info.name}-{inp.desc}")


def _infos():
    return [pytest.param(info, id=info.name) for info in optim_db]


def torch_skip(info, torch_test: str) -> str | None:
    """Why torch's ``TestOptimRenewed.<torch_test>`` is skipped for ``info`` on CPU, or None."""
    params = {"optim_info": info, "dtype": torch.float32}
    for decorator in info.get_decorators("TestOptimRenewed", torch_test, "cpu", torch.float32, params):
        probe = decorator(lambda: None)
        if getattr(probe, "__unittest_skip__", False):
            return probe.__unittest_skip_why__
    return None


def skip_as_torch(info, torch_test: str) -> None:
    reason = torch_skip(info, torch_test)
    if reason is not None:
        pytest.skip(f"torch skips {torch_test} for {info.name} on CPU: {reason}")


def ortho_class(info):
    return orthogonalize(info.optim_cls)


def beta(info) -> float:
    """The penalty for tests of the contract around it: off where the optimizer takes only
    sparse gradients (SparseAdam), which orthoopt refuses on penalized parameters (that
    refusal is tested in test_resume_is_bitwise)."""
    return 0.0 if info.only_supports_sparse_grads else BETA


def test_the_matrix_is_torchs():
    names = {info.name for info in optim_db}
    assert {"SGD", "Adam", "AdamW", "LBFGS", "SparseAdam"} <= names
    assert orthogonalize(torch.optim.SGD) is orthoopt.OrthoSGD
    assert orthogonalize(torch.optim.AdamW) is orthoopt.OrthoAdamW
    # The one skip that applies: torch's own, for LBFGS's single parameter group.
    skipped = {info.name: torch_skip(info, "test_param_groups_lr") for info in optim_db}
    assert {k for k, v in skipped.items() if v} == {"LBFGS"}, skipped


# -- parameters, a loss, and steps ------------------------------------------------------------
def make_params(info, *, differentiable: bool = False, seed: int = 0) -> list[torch.Tensor]:
    """Two matrices with orthonormal columns (8x4, 5x3) and one more parameter: a vector, or a
    4x2 matrix for Muon, which takes matrices only.  For ``differentiable=True`` the
    parameters are non-leaf clones, as torch's differentiable tests use them."""
    gen = torch.Generator().manual_seed(seed)
    mats = [
        torch.linalg.qr(torch.randn(s, generator=gen, dtype=torch.float64))[0].float().contiguous()
        for s in ((8, 4), (5, 3))
    ]
    last = torch.randn((4, 2) if info.optim_cls is torch.optim.Muon else (4,), generator=gen)
    leaves = [nn.Parameter(t) for t in (*mats, last)]
    if not differentiable:
        return leaves
    clones = [p.clone() for p in leaves]
    for c in clones:
        c.retain_grad()
    return clones


def _targets(params):
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(p.shape, generator=gen) for p in params]


def loss_of(params, targets):
    return sum(0.5 * (p - t).square().sum() + 0.1 * p.sin().sum() for p, t in zip(params, targets))


class Trainer:
    """Steps an optimizer on ``loss_of``: with a closure where the optimizer needs one, and
    on every other step for the rest (both ways of calling ``step()``)."""

    def __init__(self, info, opt, params):
        self.info, self.opt, self.params = info, opt, params
        self.targets = _targets(params)
        self.t = 0

    def grads(self):
        loss = loss_of(self.params, self.targets)
        for p, g in zip(self.params, torch.autograd.grad(loss, self.params)):
            p.grad = g.to_sparse() if self.info.only_supports_sparse_grads else g
        return loss.detach()

    def step(self):
        use_closure = self.info.step_requires_closure or self.t % 2 == 1
        self.t += 1
        if use_closure:
            return self.opt.step(self.grads)
        loss = self.grads()
        self.opt.step()
        return loss

    def run(self, n=None):
        # One LBFGS step runs up to max_iter (20) iterations of its own: 3 are plenty.
        n = n if n is not None else (3 if self.info.step_requires_closure else STEPS)
        for _ in range(n):
            self.step()


def assert_same(a, b, where="state"):
    """Bitwise equality of nested state (tensors, lists, dicts, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def assert_same_state_dict(ortho_sd, plain_sd):
    """The state and the groups equal, the Ortho groups' ortho keys aside."""
    assert_same(ortho_sd["state"], plain_sd["state"])
    groups = [{k: v for k, v in g.items() if k not in ORTHO_KEYS} for g in ortho_sd["param_groups"]]
    assert_same(groups, plain_sd["param_groups"], "param_groups")


def kwargs_of(inp):
    return copy.deepcopy(inp.kwargs)  # a tensor lr must not be shared between optimizers


# -- ortho = 0 is the base class -----------------------------------------------------------------
@pytest.mark.parametrize("info,inp", list(_cases(with_global_flags=True)))
def test_ortho_zero_is_bitwise_the_base(info, inp):
    differentiable = inp.kwargs.get("differentiable", False)
    runs = []
    for cls, extra in ((info.optim_cls, {}), (ortho_class(info), {"ortho": 0.0})):
        params = make_params(info, differentiable=differentiable)
        opt = cls(params, **kwargs_of(inp), **extra)
        Trainer(info, opt, params).run()
        runs.append((params, opt.state_dict()))
    (plain_params, plain_sd), (ortho_params, ortho_sd) = runs
    for a, b in zip(ortho_params, plain_params):
        assert_same(a.detach(), b.detach(), "parameters")
    assert_same_state_dict(ortho_sd, plain_sd)


# -- ortho > 0: resume through torch.save / torch.load(weights_only=True) -----------------------
MODES = {
    "soft": {"ortho": BETA},
    "auto": {"ortho": "auto"},
    "hard": {"ortho": BETA, "ortho_mode": "hard"},
}


def _refusal(info, inp, mode):
    """What orthoopt refuses for this case (asserted by the caller), or None."""
    if inp.kwargs.get("differentiable", False):
        return ValueError, "differentiable=True", "construction"
    if mode == "hard" and not issubclass(info.optim_cls, HARD_BASES):
        return TypeError, "ortho_mode='hard' follows geoopt", "construction"
    if info.only_supports_sparse_grads:
        return TypeError, "sparse gradient", "step"
    return None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("info,inp", list(_cases(with_global_flags=True)))
def test_resume_is_bitwise(info, inp, mode, tmp_path):
    cls, options = ortho_class(info), MODES[mode]
    refusal = _refusal(info, inp, mode)
    if refusal is not None and refusal[2] == "construction":
        with pytest.raises(refusal[0], match=refusal[1]):
            cls(make_params(info), **kwargs_of(inp), **options)
        return
    params = make_params(info)
    opt = cls(params, **kwargs_of(inp), **options)
    trainer = Trainer(info, opt, params)
    if refusal is not None:  # refused at the first step, before anything has changed
        before = [p.detach().clone() for p in params]
        with pytest.raises(refusal[0], match=refusal[1]):
            trainer.run(1)
        for p, q in zip(params, before):
            assert torch.equal(p.detach(), q)
        assert not opt.state
        return
    trainer.run()
    first = trainer.t
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_params = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    resumed = cls(resumed_params, **kwargs_of(inp), **options)
    resumed.load_state_dict(ckpt["opt"])
    trainer.run()
    other = Trainer(info, resumed, resumed_params)
    other.t = first
    other.run()
    for a, b in zip(resumed_params, params):
        assert_same(a.detach(), b.detach(), "parameters")
    assert_same(resumed.state_dict(), opt.state_dict())
    if mode != "hard" or issubclass(info.optim_cls, HARD_BASES):
        assert opt.orthogonality_errors()  # the constraint was on


# -- copies ----------------------------------------------------------------------------------
def _copies(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return {
        "deepcopy": copy.deepcopy(opt),
        "pickle": pickle.loads(pickle.dumps(opt)),
        "torch.save": torch.load(buf, weights_only=False),
    }


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _torch_copy_failure(info, inp, kind):
    """The error torch's own class raises when its copy steps, or None (LBFGS keeps its
    parameter list outside what its __getstate__ saves)."""
    params = make_params(info)
    plain = info.optim_cls(params, **kwargs_of(inp))
    Trainer(info, plain, params).run(3)
    other = _copies(plain)[kind]
    trainer = Trainer(info, other, _params_of(other))
    trainer.t = 3
    try:
        trainer.run(1)
    except Exception as e:  # noqa: BLE001 - any failure of torch's own is the reference
        return e
    return None


@pytest.mark.parametrize("info,inp", list(_cases()))
def test_copies_keep_stepping(info, inp):
    params = make_params(info)
    opt = ortho_class(info)(params, **kwargs_of(inp), ortho=beta(info))
    Trainer(info, opt, params).run(3)
    copies = _copies(opt)
    Trainer(info, opt, params).run(3)
    for kind, other in copies.items():
        assert type(other) is type(opt), kind
        mine = _params_of(other)
        trainer = Trainer(info, other, mine)
        trainer.t = 3
        failure = _torch_copy_failure(info, inp, kind)
        if failure is not None:  # torch's own class cannot step its copy either: the same error
            with pytest.raises(type(failure), match=re.escape(str(failure).replace(info.name, type(opt).__name__))):
                trainer.run(3)
            continue
        trainer.run(3)
        for a, b in zip(mine, params):
            assert_same(a.detach(), b.detach(), f"{kind}: parameters")
        assert_same(other.state_dict(), opt.state_dict(), f"{kind}: state")


@pytest.mark.parametrize("info", _infos())
def test_add_param_group_after_copies(info):
    skip_as_torch(info, "test_param_groups_lr")
    params = make_params(info)
    opt = ortho_class(info)(params, ortho=beta(info), ortho_smoothing=0.01)
    Trainer(info, opt, params).run(2)
    for kind, other in _copies(opt).items():
        extra = nn.Parameter(torch.linalg.qr(torch.randn(6, 2))[0].contiguous())
        other.add_param_group({"params": [extra]})
        group = other.param_groups[1]
        assert (group["ortho"], group["ortho_smoothing"]) == (beta(info), 0.01), kind
        Trainer(info, other, _params_of(other)).run(2)
        assert ("group1.param0" in other.orthogonality_errors()) == (beta(info) > 0), kind


def test_generated_classes_are_one_per_base_and_found_by_name():
    cls = orthogonalize(torch.optim.RMSprop)
    assert cls is orthogonalize(torch.optim.RMSprop)
    assert (cls.__module__, cls.__qualname__) == ("orthoopt.optim", "OrthoRMSprop")
    assert orthoopt.optim.OrthoRMSprop is cls
    assert pickle.loads(pickle.dumps(cls)) is cls

    class RMSprop(torch.optim.RMSprop):  # another base with the same name
        pass

    other = orthogonalize(RMSprop)
    assert other is not cls and other.__qualname__ == "OrthoRMSprop_2"
    assert getattr(orthoopt.optim, other.__qualname__) is other


@pytest.mark.slow
def test_a_generated_class_unpickles_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    w = nn.Parameter(torch.randn(8, 3))
    opt = orthogonalize(torch.optim.Adagrad)([w], lr=0.1, ortho=BETA)
    w.grad = torch.randn_like(w)
    opt.step()
    torch.save(opt, tmp_path / "opt.pt")
    code = (
        "import torch; o = torch.load(r'%s', weights_only=False); "
        "print(type(o).__module__, type(o).__qualname__, o.param_groups[0]['ortho'])" % (tmp_path / "opt.pt")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["orthoopt.optim", "OrthoAdagrad", str(BETA)]


# -- hooks -----------------------------------------------------------------------------------
def _fresh_base(cls):
    """A subclass of ``cls`` with its own, unhooked ``step``: torch hooks a class's step the
    first time it constructs one, once per process, so the order of construction is only
    under the test's control on a class no other test has built."""
    step = cls.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return type(f"Fresh{cls.__name__}", (cls,), {"step": step, "__module__": __name__})


def _record_hooks(opt, log):
    """Register every kind of hook on ``opt`` (global ones filtered to it); return handles.

    The step pre-hook records whether the gradients are there and the parameters as they
    are; the post-hook records the parameters as it sees them."""
    params = _params_of(opt)

    def event(name):
        def hook(optimizer, *args):
            if optimizer is not opt:
                return None
            log.append(name)
            if name == "step_pre":
                log.append(("grads", all(p.grad is not None for p in params)))
                log.append(("before", [p.detach().clone() for p in params]))
            if name == "step_post":
                log.append(("after", [p.detach().clone() for p in params]))
            return None

        return hook

    return [
        register_optimizer_step_pre_hook(event("global_step_pre")),
        register_optimizer_step_post_hook(event("global_step_post")),
        opt.register_step_pre_hook(event("step_pre")),
        opt.register_step_post_hook(event("step_post")),
        opt.register_state_dict_pre_hook(event("state_dict_pre")),
        opt.register_state_dict_post_hook(event("state_dict_post")),
        opt.register_load_state_dict_pre_hook(event("load_pre")),
        opt.register_load_state_dict_post_hook(event("load_post")),
    ]


def _hook_run(info, cls, options):
    params = make_params(info)
    opt = cls(params, **options)
    log: list = []
    handles = _record_hooks(opt, log)
    try:
        trainer = Trainer(info, opt, params)
        trainer.run(2)
        final = [p.detach().clone() for p in params]
        opt.load_state_dict(opt.state_dict())
    finally:
        for h in handles:
            h.remove()
    return log, final


@pytest.mark.parametrize("order", ["plain first", "ortho first"])
@pytest.mark.parametrize("info", _infos())
def test_hooks_run_once_in_torchs_order(info, order):
    base = _fresh_base(info.optim_cls)
    if order == "plain first":
        base(make_params(info))
    ortho = orthogonalize(base)
    options = {"ortho": beta(info)}
    if issubclass(info.optim_cls, HARD_BASES):
        options["ortho_mode"] = "hard"  # its pre-hook must still see the gradients
    ortho_log, final = _hook_run(info, ortho, options)
    if order == "ortho first":
        base(make_params(info))  # hooks base.step now: must not change the next steps
        ortho_log, final = _hook_run(info, ortho, options)
    plain_log, _ = _hook_run(info, base, {})
    names = [e for e in ortho_log if isinstance(e, str)]
    assert names == [e for e in plain_log if isinstance(e, str)]
    assert names.count("step_pre") == 2 and names.count("global_step_post") == 2
    records = [e for e in ortho_log if not isinstance(e, str)]
    # The pre-hooks see the gradients exactly when the plain class's do (hard mode hides them
    # from the base step only, inside the step).
    assert [ok for tag, ok in records if tag == "grads"] == [e[1] for e in plain_log if e[0] == "grads"]
    befores = [v for tag, v in records if tag == "before"]
    afters = [v for tag, v in records if tag == "after"]
    for a, b in zip(afters[-1], final):
        assert torch.equal(a, b)  # the post-hook saw the final parameters
    for a, b in zip(befores[1], afters[0]):
        assert torch.equal(a, b)  # the pre-hook saw them before anything changed


def test_the_issues_hook_case():
    w = nn.Parameter(torch.randn(8, 4))
    w.grad = torch.randn_like(w)
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"]


# -- closures ---------------------------------------------------------------------------------
def test_lbfgs_closure_goes_to_the_base_step_and_the_penalty_follows_once():
    from orthoopt import penalty

    start = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))[0].contiguous() + 0.05
    target = torch.randn(16, 4, dtype=torch.float64)

    def run(cls, **kwargs):
        w = nn.Parameter(start.clone())
        calls = []

        def closure():
            calls.append(1)
            w.grad = None
            loss = (w - target).square().sum()
            loss.backward()
            return loss

        opt = cls([w], lr=0.5, max_iter=5, **kwargs)
        loss = opt.step(closure)
        return w.detach(), len(calls), loss

    plain, plain_calls, plain_loss = run(torch.optim.LBFGS)
    got, calls, loss = run(orthogonalize(torch.optim.LBFGS), ortho=1.0)
    assert calls == plain_calls > 1 and torch.equal(loss, plain_loss)
    r = penalty.residual(start[None])
    delta = penalty.penalty_step(r, start[None], 0.0, "l1", 2 * 0.5 * 1.0)[0]
    torch.testing.assert_close(got, plain + delta, rtol=0, atol=1e-15)


# -- group dicts --------------------------------------------------------------------------------
FORMS = {
    "list": list,
    "tuple": tuple,
    "generator": lambda ps: (p for p in ps),
    "filter": lambda ps: filter(lambda p: p.requires_grad, ps),
    "named generator": lambda ps: ((f"p{i}", p) for i, p in enumerate(ps)),
}


def _check_group_forms(info, inp, split):
    """Each form of a group's ``params`` gives the groups and the steps that a list gives."""
    reference = None
    for form, make in FORMS.items():
        params = make_params(info)
        if split:
            rest = [("rest", params[2])] if form == "named generator" else [params[2]]
            groups = [{"params": make(params[:2]), "ortho": beta(info)}, {"params": rest, "ortho": 0.0}]
        else:
            groups = [{"params": make(params), "ortho": beta(info)}]
        opt = ortho_class(info)(groups, **kwargs_of(inp))
        assert [len(g["params"]) for g in opt.param_groups] == ([2, 1] if split else [3]), form
        Trainer(info, opt, params).run(3)
        if reference is None:
            reference = [p.detach() for p in params]
        for x, y in zip(params, reference):
            assert_same(x.detach(), y, f"{form}: parameters")
    params = make_params(info)  # a single tensor is a group of one
    groups = [{"params": params[0], "ortho": beta(info)}] + ([{"params": params[1:], "ortho": 0.0}] if split else [])
    opt = ortho_class(info)(groups, **kwargs_of(inp))
    assert [len(g["params"]) for g in opt.param_groups] == ([1, 2] if split else [1])
    Trainer(info, opt, params if split else params[:1]).run(1)


@pytest.mark.parametrize("info,inp", list(_cases()))
def test_group_dicts_in_one_group(info, inp):
    _check_group_forms(info, inp, split=False)


@pytest.mark.parametrize("info,inp", list(_cases()))
def test_group_dicts_in_two_groups(info, inp):
    skip_as_torch(info, "test_param_groups_lr")
    _check_group_forms(info, inp, split=True)


def test_the_issues_generator_case():
    m = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    opt = orthoopt.OrthoAdamW([{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 1e-3}], lr=1e-2)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    with pytest.raises(TypeError, match="ordered collections"):
        orthoopt.OrthoAdamW([{"params": set(m[0].parameters())}])  # torch's refusal, kept


# -- schedulers ----------------------------------------------------------------------------------
SCHEDULERS = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda t: 0.95),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=3), lr_scheduler.ExponentialLR(o, 0.9)], [3]
    ),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3), lr_scheduler.ExponentialLR(o, 0.9)]
    ),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=2 * STEPS),
    "SWALR": lambda o: swa_utils.SWALR(o, swa_lr=5e-3, anneal_epochs=4),
}
SCHEDULED = {
    "SGD": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "Adam": (torch.optim.Adam, {"lr": 1e-2}),
}


def test_every_scheduler_kind_is_covered():
    kinds = {
        name
        for module in (lr_scheduler, swa_utils)
        for name, c in vars(module).items()
        if isinstance(c, type)
        and issubclass(c, lr_scheduler.LRScheduler)
        and c not in (lr_scheduler.LRScheduler, lr_scheduler._LRScheduler)
    }
    assert kinds == set(SCHEDULERS)


class _Scheduled:
    """An optimizer under a scheduler, stepped on ``loss_of`` (the plateau one on the loss)."""

    def __init__(self, cls, kwargs, kind, params):
        self.opt = cls(params, **copy.deepcopy(kwargs))
        self.sched = SCHEDULERS[kind](self.opt)
        self.kind, self.params, self.targets = kind, params, _targets(params)
        self.lrs, self.momenta = [], []

    def run(self, n):
        for _ in range(n):
            loss = loss_of(self.params, self.targets)
            for p, g in zip(self.params, torch.autograd.grad(loss, self.params)):
                p.grad = g
            self.opt.step()
            self.sched.step(loss.item()) if self.kind == "ReduceLROnPlateau" else self.sched.step()
            group = self.opt.param_groups[0]
            self.lrs.append(float(group["lr"]))
            self.momenta.append(group.get("momentum", group.get("betas")))


class _Info:
    only_supports_sparse_grads = False

    def __init__(self, cls):
        self.optim_cls = cls


@pytest.mark.parametrize("base", list(SCHEDULED))
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_schedulers(kind, base, tmp_path):
    base_cls, kwargs = SCHEDULED[base]
    info = _Info(base_cls)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "lr_scheduler.step() before optimizer.step()"
        # (not the drift check's: these lrs and β are the schedules', not ones that hold the constraint)
        warnings.simplefilter("ignore", orthoopt.guard.OrthogonalityWarning)
        plain = _Scheduled(base_cls, kwargs, kind, make_params(info))
        plain.run(STEPS)
        zero = _Scheduled(orthogonalize(base_cls), {**kwargs, "ortho": 0.0}, kind, make_params(info))
        zero.run(STEPS)
        for a, b in zip(zero.params, plain.params):
            assert torch.equal(a, b)
        assert zero.lrs == plain.lrs and zero.momenta == plain.momenta

        on = {**kwargs, "ortho": BETA}
        whole = _Scheduled(orthogonalize(base_cls), on, kind, make_params(info))
        whole.run(STEPS)
        assert whole.lrs == plain.lrs and whole.momenta == plain.momenta  # the schedule is the base's
        first = _Scheduled(orthogonalize(base_cls), on, kind, make_params(info))
        first.run(STEPS // 2)
        torch.save(
            {
                "params": [p.detach() for p in first.params],
                "opt": first.opt.state_dict(),
                "sched": first.sched.state_dict(),
            },
            tmp_path / "ckpt.pt",
        )
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        second = _Scheduled(orthogonalize(base_cls), on, kind, [nn.Parameter(t.clone()) for t in ckpt["params"]])
        second.opt.load_state_dict(ckpt["opt"])
        second.sched.load_state_dict(ckpt["sched"])
        second.run(STEPS - STEPS // 2)
    for a, b in zip(second.params, whole.params):
        assert torch.equal(a, b)
    assert second.lrs == whole.lrs[STEPS // 2 :]


@pytest.mark.parametrize("info", _infos())
def test_optim_db_schedulers(info):
    """The schedulers torch's own tests pair with each optimizer, on the Ortho class."""
    for i, makers in enumerate(info.scheduler_inputs):
        runs = []
        for cls, extra in ((info.optim_cls, {}), (ortho_class(info), {"ortho": beta(info)})):
            params = make_params(info)
            opt = cls(params, **extra)
            scheds = [make(opt) for make in makers]
            trainer = Trainer(info, opt, params)
            lrs = []
            for _ in range(STEPS):
                loss = trainer.step()
                for s in scheds:
                    s.step(float(loss)) if isinstance(s, lr_scheduler.ReduceLROnPlateau) else s.step()
                lrs.append([float(g["lr"]) for g in opt.param_groups])
            runs.append(lrs)
        assert runs[0] == runs[1], f"scheduler set {i}"


# -- checkpoints across the plain and the Ortho class -------------------------------------------
@pytest.mark.parametrize("info,inp", list(_cases()))
def test_plain_checkpoint_keeps_the_ortho_options(info, inp):
    params = make_params(info)
    plain = info.optim_cls(params, **kwargs_of(inp))
    Trainer(info, plain, params).run(3)
    options = {"ortho": BETA, "ortho_smoothing": 0.01, "ortho_nonfinite": "skip"}
    opt = ortho_class(info)(params, **kwargs_of(inp), **options)
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert {k: opt.param_groups[0][k] for k in options} == options
    assert_same(opt.state_dict()["state"], plain.state_dict()["state"])
    if not info.only_supports_sparse_grads:
        assert opt.orthogonality_errors()
        Trainer(info, opt, params).run(1)


@pytest.mark.parametrize("info,inp", list(_cases()))
def test_ortho_checkpoint_loads_into_the_plain_class(info, inp):
    options = {"ortho": beta(info)}
    params = make_params(info)
    opt = ortho_class(info)(params, **kwargs_of(inp), **options)
    Trainer(info, opt, params).run(3)
    saved = opt.state_dict()
    runs = []
    for state_dict in (
        saved,
        {**saved, "param_groups": [{k: v for k, v in g.items() if k not in ORTHO_KEYS} for g in saved["param_groups"]]},
    ):
        mine = [nn.Parameter(p.detach().clone()) for p in params]
        plain = info.optim_cls(mine, **kwargs_of(inp))
        plain.load_state_dict(copy.deepcopy(state_dict))
        assert not isinstance(plain, OrthoMixin)
        trainer = Trainer(info, plain, mine)
        trainer.t = 3
        trainer.run(3)
        runs.append(([p.detach() for p in mine], plain.state_dict()["state"]))
    assert_same(runs[0], runs[1])  # the ortho keys ride along and change nothing
