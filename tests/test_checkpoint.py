"""Checkpoints: bitwise resume through torch.save / torch.load(weights_only=True), old states."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthoopt


def _regression(ortho):
    """A 6-12-1 tanh MLP under OrthoAdamW, its last layer free, its first where nn.Linear starts
    it (ortho_init='warn'): far from orthonormal, so that the step sizes (and with 'auto' the
    threshold estimate) shape every step of the first twenty."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    groups = orthoopt.param_groups(model, ortho=ortho, exclude=["2"], ortho_init="warn")
    return model, orthoopt.OrthoAdamW(groups, lr=1e-2)


def _fit(model, opt, n):
    """``n`` full-batch steps of the mean squared error on fixed data."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g)
    for _ in range(n):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _checkpointed(tmp_path, ortho):
    """10 steps, a checkpoint through torch.save, then 10 more: the model, the optimizer and the
    checkpoint read back with ``torch.load(weights_only=True)``."""
    model, opt = _regression(ortho)
    _fit(model, opt, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _fit(model, opt, 10)
    return model, opt, torch.load(tmp_path / "ckpt.pt", weights_only=True)


def _resumed(ckpt, ortho):
    model, opt = _regression(ortho)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return model, opt


@pytest.mark.parametrize("ortho", [1.0, "auto"])
def test_state_dict_round_trip_is_bitwise(tmp_path, ortho):
    """A run resumed from a checkpoint takes the steps of the run that went on, bitwise; with
    ortho='auto' it continues from the saved threshold estimate ('ortho_multiplier')."""
    model, _, ckpt = _checkpointed(tmp_path, ortho)
    resumed, resumed_opt = _resumed(ckpt, ortho)
    if ortho == "auto":
        saved = ckpt["opt"]["state"][0]["ortho_multiplier"]
        assert torch.equal(resumed_opt.state[resumed[0].weight]["ortho_multiplier"], saved)
    _fit(resumed, resumed_opt, 10)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_auto_resumed_without_its_estimate_ends_elsewhere(tmp_path):
    """The estimate steers the step: a run resumed without it does not take the same steps."""
    model, _, ckpt = _checkpointed(tmp_path, "auto")
    forgetful, forgetful_opt = _resumed(ckpt, "auto")
    del forgetful_opt.state[forgetful[0].weight]["ortho_multiplier"]
    _fit(forgetful, forgetful_opt, 10)
    assert (forgetful[0].weight - model[0].weight).abs().max() > 1e-5


def test_old_checkpoint_without_ortho_keys_gets_defaults():
    w = nn.Parameter(torch.randn(8, 3))
    plain = torch.optim.AdamW([w], lr=1e-2)
    w.grad = torch.randn_like(w)
    plain.step()
    opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=3.0)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["ortho"] == 3.0 and opt.param_groups[0]["ortho_layout"] == "auto"
    # The next step continues the plain optimizer's moments and adds the default penalty step
    # (decoupled, from the value before the step): the same as the two taken apart.
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    continued = nn.Parameter(before.clone())
    reference = torch.optim.AdamW([continued], lr=1e-2)
    reference.load_state_dict(copy.deepcopy(plain.state_dict()))  # torch's load shares the tensors
    continued.grad = w.grad.clone()
    reference.step()
    penalized = nn.Parameter(before.clone())
    penalized.grad = torch.zeros_like(penalized)
    orthoopt.OrthoSGD([penalized], lr=1e-2, ortho=3.0).step()  # SGD with a zero gradient: the penalty step alone
    opt.step()
    assert opt.state[w]["step"].item() == 2
    torch.testing.assert_close(w.detach(), continued.detach() + (penalized.detach() - before), rtol=0, atol=1e-7)
    assert (penalized.detach() - before).abs().max() > 1e-3  # the penalty step is there


def test_float32_state_of_bfloat16_parameters_stays_float32():
    w = nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))
    opt = orthoopt.OrthoSGD([w], lr=0.1, momentum=0.9, ortho=1.0)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].float() * 1.001
    saved = opt.state_dict()
    plain = torch.optim.SGD([nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))], lr=0.1, momentum=0.9)
    plain.load_state_dict(saved)
    (q,) = plain.param_groups[0]["params"]
    assert plain.state[q]["momentum_buffer"].dtype == torch.bfloat16  # what torch alone does
    fresh = orthoopt.OrthoSGD([nn.Parameter(torch.randn(8, 3, dtype=torch.bfloat16))], lr=0.1, momentum=0.9, ortho=1.0)
    fresh.load_state_dict(saved)
    (p,) = fresh.param_groups[0]["params"]
    assert fresh.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _train(model, opt, n=3):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_plain_checkpoint_keeps_each_groups_ortho_options():
    # The README's swap, then a resume from the checkpoint of the plain optimizer it replaced.
    model = _model()
    groups = orthoopt.param_groups(model, ortho=3.0, ortho_smoothing=0.01)
    plain = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)
    _train(model, plain)
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=3.0, ortho_smoothing=0.01), lr=1e-2)
    opt.load_state_dict(plain.state_dict())
    assert [g["ortho"] for g in opt.param_groups] == [3.0, 0.0]
    assert opt.param_groups[0]["ortho_smoothing"] == 0.01
    assert set(opt.orthogonality_errors()) == {"0.weight", "2.weight"}
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], plain.state[model[0].weight]["exp_avg"])
    _train(model, opt, 1)  # and it steps


def test_ortho_checkpoint_loads_into_the_plain_class():
    model = _model()
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=1.0), lr=1e-2)
    _train(model, opt)
    saved = opt.state_dict()
    plain_model, stripped_model = _model(), _model()
    for m in (plain_model, stripped_model):
        m.load_state_dict(model.state_dict())

    def same_groups(m):
        named = dict(m.named_parameters())
        return [{"params": [named[n] for n in g["param_names"]]} for g in saved["param_groups"]]

    plain = torch.optim.AdamW(same_groups(plain_model), lr=1e-2)
    plain.load_state_dict(copy.deepcopy(saved))  # torch's load shares the checkpoint's tensors
    ortho_keys = set(orthoopt.optim.ORTHO_DEFAULTS) | {"param_names"}
    stripped = {
        "state": saved["state"],
        "param_groups": [{k: v for k, v in g.items() if k not in ortho_keys} for g in saved["param_groups"]],
    }
    reference = torch.optim.AdamW(same_groups(stripped_model), lr=1e-2)
    reference.load_state_dict(stripped)
    _train(plain_model, plain)
    _train(stripped_model, reference)
    for a, b in zip(plain_model.parameters(), stripped_model.parameters()):
        assert torch.equal(a, b)  # the ortho keys ride along and change nothing


def test_load_state_dict_pre_hook_runs_before_orthoopts_checks():
    # A pre-hook that drops the state of a resized head, as one does for fine-tuning: torch runs
    # pre-hooks first, so orthoopt's shape check must see the checkpoint after the hook.
    old = _model()
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(old, ortho=1.0), lr=1e-2)
    _train(old, opt)
    saved = opt.state_dict()
    new = _model()
    new[2] = nn.Linear(12, 5)  # a new head
    fresh = orthoopt.OrthoAdamW(orthoopt.param_groups(new, ortho=1.0), lr=1e-2)
    with pytest.raises(ValueError, match="belongs to another model"):
        fresh.load_state_dict(saved)
    calls = []

    def drop_head(optimizer, state_dict):
        calls.append("pre")
        names = [n for g in state_dict["param_groups"] for n in g["param_names"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        state = {i: s for i, s, n in zip(ids, [state_dict["state"].get(i) for i in ids], names) if s and "2." not in n}
        return {**state_dict, "state": state}

    fresh.register_load_state_dict_pre_hook(drop_head)
    fresh.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    fresh.load_state_dict(saved)
    assert calls == ["pre", "post"]
    assert new[2].weight not in fresh.state and new[0].weight in fresh.state
    assert len(fresh._optimizer_load_state_dict_pre_hooks) == 1  # orthoopt's own check hook is gone again


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_copies_keep_the_ortho_defaults_and_add_param_group(copy_kind):
    w = nn.Parameter(torch.randn(8, 3))
    opt = orthoopt.OrthoSGD([w], lr=0.1, ortho=2.0, ortho_smoothing=0.01)
    w.grad = torch.randn_like(w)
    opt.step()
    other = copy.deepcopy(opt) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(opt))
    extra = nn.Parameter(torch.randn(6, 2))
    other.add_param_group({"params": [extra]})
    assert other.param_groups[1]["ortho"] == 2.0 and other.param_groups[1]["ortho_smoothing"] == 0.01
    for p in (extra, *other.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
    other.step()
    assert set(other.orthogonality_errors()) == {"group0.param0", "group1.param0"}


def test_state_of_a_transposed_parameter_is_refused_at_load():
    # Momentum of a (4, 6) weight loaded into a (6, 4) one has the right size but not the right
    # shape: refused by load_state_dict, not left to fail at the first step (or worse).
    old = nn.Parameter(torch.randn(4, 6))
    opt = orthoopt.OrthoAdamW([old], lr=1e-2, ortho=1.0)
    old.grad = torch.randn_like(old)
    opt.step()
    new = nn.Parameter(torch.randn(6, 4))
    fresh = orthoopt.OrthoAdamW([new], lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError, match=r"shape \(4, 6\), but the parameter has shape \(6, 4\).*another model"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state


def test_a_plain_checkpoint_of_other_groups_is_refused_with_the_way_to_resume():
    # The plain optimizer's one group against param_groups' split ones: torch maps state by the
    # order over the groups, so the load is refused (before any change), saying how to resume.
    model = _model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, plain)
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(model, ortho=1.0), lr=1e-2)
    with pytest.raises(ValueError, match=r"different number of parameter groups.*orthoopt\.constrain_"):
        opt.load_state_dict(plain.state_dict())
    assert not opt.state
    swapped = torch.optim.AdamW(model.parameters(), lr=1e-2)
    swapped.load_state_dict(plain.state_dict())
    orthoopt.constrain_(swapped, model, ortho=1.0)  # the documented way: state kept
    assert all(torch.equal(swapped.state[p]["exp_avg"], plain.state[p]["exp_avg"]) for p in model.parameters())


_RESUME_ADVICE = (
    "A checkpoint of the optimizer before the swap (param_groups or constrain_ split its groups) loads into that "
    "optimizer: load it there, then swap with orthoopt.constrain_(optimizer, model), which keeps the state"
)


@pytest.mark.parametrize(
    "saved_split, split, what",
    [
        ([4], [2, 2], "loaded state dict has a different number of parameter groups"),
        (
            [3, 1],
            [2, 2],
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group",
        ),
    ],
)
def test_a_checkpoint_of_other_groups_gives_torchs_reason_the_sizes_and_the_way_to_resume(saved_split, split, what):
    params = list(_model().parameters())

    def groups(sizes):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [{"params": params[s : s + n]} for s, n in zip(starts, sizes)]

    saved = orthoopt.OrthoAdamW(groups(saved_split), lr=1e-2, ortho=1.0)
    opt = orthoopt.OrthoAdamW(groups(split), lr=1e-2, ortho=1.0)
    with pytest.raises(ValueError) as refused:
        opt.load_state_dict(saved.state_dict())
    assert str(refused.value) == (
        f"{what}: the checkpoint's groups hold {saved_split} parameters, this optimizer's {split}. {_RESUME_ADVICE}"
    )


class _FlatMomentumSGD(torch.optim.SGD):
    """A user's optimizer that keeps its momentum flattened, one vector per parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                flat = self.state[p].setdefault("flat_momentum", torch.zeros(p.numel(), dtype=p.dtype))
                flat.mul_(0.9).add_(p.grad.reshape(-1))
                p.add_(flat.view_as(p), alpha=-group["lr"])


def test_a_users_flat_state_of_the_parameters_size_resumes_bitwise():
    # A flat vector of the parameter's size fits a parameter of any shape (another shape of the
    # same size does not, see above), also where several parameters make the total larger.
    model = _model()
    make = lambda: orthoopt.orthogonalize(_FlatMomentumSGD)(orthoopt.param_groups(model, ortho=1.0), lr=1e-2)  # noqa: E731
    opt = make()
    _train(model, opt)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(saved[0])
    resumed = make()
    resumed.load_state_dict(saved[1])
    assert resumed.state[model[0].weight]["flat_momentum"].shape == (72,)
    _train(model, resumed)
    for n, p in model.named_parameters():
        assert torch.equal(p, after[n]), n
