"""The one-line swap (``orthoopt.constrain_``): the script's own groups, options and state kept,
and through the wrappers that frameworks put around the optimizer."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from conftest import import_or_skip
from torch import nn

import orthoopt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            emb=nn.Embedding(10, 8),
            body=nn.Linear(8, 16),
            norm=nn.LayerNorm(16),
            gates=nn.GRUCell(16, 4),
            head=nn.Linear(4, 3),
        )
    )


def _forward(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    h = model.norm(model.body(model.emb(idx)))
    return model.head(model.gates(torch.tanh(h)))


def _timm_like_groups(model: nn.Module) -> list[dict]:
    """What timm's param_groups_weight_decay and HF's Trainer build: no decay on 1-D parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}]


def _grads(model: nn.Module, steps: int, seed: int = 1):
    """Fixed gradients per step, the same whatever the weights: the unconstrained parameters'
    trajectories then depend on nothing the penalty changes."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(steps)]


def _run(model: nn.Module, opt, grads) -> None:
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()


def test_swap_splits_each_group_and_keeps_its_options():
    model = _model()
    opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2, betas=(0.8, 0.9))
    same = orthoopt.constrain_(opt, model, ortho=3.0, ortho_smoothing=1e-2, exclude=["head"])
    assert same is opt and type(opt) is orthoopt.OrthoAdamW  # the named class: it pickles
    summary = [(g["weight_decay"], g["ortho"], g["ortho_layout"], g["param_names"]) for g in opt.param_groups]
    assert summary == [
        (0.0, 0.0, "auto", ["body.bias", "norm.weight", "norm.bias", "gates.bias_ih", "gates.bias_hh", "head.bias"]),
        (0.05, 3.0, "auto", ["body.weight"]),
        (0.05, 3.0, "row_groups:3", ["gates.weight_ih", "gates.weight_hh"]),
        (0.05, 0.0, "auto", ["emb.weight", "head.weight"]),
    ]
    assert all(g["lr"] == 1e-2 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    assert opt.param_groups[1]["ortho_smoothing"] == 1e-2 and opt.param_groups[3]["ortho_smoothing"] == 0.0
    # later groups (progressive unfreezing) get the ortho defaults: unpenalized unless asked
    assert opt.defaults["ortho"] == 0.0 and opt.defaults["lr"] == 1e-2


OPTIMIZERS = {
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "AdamW-fused": lambda groups: torch.optim.AdamW(groups, lr=1e-2, fused=True),
    "Adam-amsgrad-foreach": lambda groups: torch.optim.Adam(groups, lr=1e-2, amsgrad=True, foreach=True),
    "SGD-nesterov": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "Adadelta": lambda groups: torch.optim.Adadelta(groups, lr=1.0),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("already_stepped", [0, 3])
def test_unconstrained_parameters_step_bitwise_and_state_is_kept(already_stepped, kind):
    """The swapped optimizer is the original for every unconstrained parameter, also when it
    had already stepped (its moments and step counts go on)."""
    model, ref = _model(), _model()
    opt = OPTIMIZERS[kind](_timm_like_groups(model))
    ref_opt = OPTIMIZERS[kind](_timm_like_groups(ref))
    grads = _grads(model, already_stepped + 5)
    _run(model, opt, grads[:already_stepped])
    _run(ref, ref_opt, grads[:already_stepped])
    states = {id(p): opt.state[p] for p in model.parameters() if p in opt.state}
    orthoopt.constrain_(opt, model, ortho=3.0, exclude=["head"])
    assert all(opt.state[p] is states[id(p)] for p in model.parameters() if id(p) in states)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, opt, grads[already_stepped:])
    _run(ref, ref_opt, grads[already_stepped:])
    constrained = {"body.weight", "gates.weight_ih", "gates.weight_hh"}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name in constrained:
            assert not torch.equal(p, q), name  # the penalty acted
        else:
            assert torch.equal(p, q), name
    assert set(opt.orthogonality_errors()) == constrained
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_swap_is_the_ortho_optimizer_built_on_the_same_groups():
    model, twin = _model(), _model()
    opt = torch.optim.SGD(_timm_like_groups(model), lr=0.1, momentum=0.9)
    orthoopt.constrain_(opt, model, ortho=2.0, exclude=["head"])
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    named = dict(twin.named_parameters())
    for g in groups:
        g["params"] = [named[n] for n in g["param_names"]]
    direct = orthoopt.OrthoSGD(groups, lr=0.1, momentum=0.9)
    grads = _grads(model, 5)
    _run(model, opt, grads)
    _run(twin, direct, grads)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["param_groups"] == direct.state_dict()["param_groups"]


def test_swap_of_an_orthogonalized_class_and_a_list_of_groups():
    model = _model()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    orthoopt.constrain_(opt, model, ortho=1.0)
    assert type(opt).__name__ == "OrthoAdadelta" and isinstance(opt, torch.optim.Adadelta)
    groups = _timm_like_groups(model)
    listed = orthoopt.constrain_(groups, model, ortho="auto", exclude="head")
    assert listed is groups and [g["ortho"] for g in groups] == [0.0, "auto", "auto", 0.0]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05, 0.05, 0.05]
    opt = orthoopt.OrthoAdamW(groups, lr=1e-3)
    assert set(opt.orthogonality_errors()) == {"body.weight", "gates.weight_ih", "gates.weight_hh"}
    named = orthoopt.constrain_(list(model.named_parameters()), model, ortho=1.0, include=["body"])
    assert [g["param_names"] for g in named][0] == ["body.weight"]


def _snapshot(opt):
    return type(opt), [dict(g) for g in opt.param_groups], dict(opt.defaults), dict(opt.state)


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda opt: None, {"exclude": ["classifier"]}, ValueError, r"'classifier' matches no parameter.*'head"),
        (lambda opt: None, {"ortho": -1.0}, ValueError, "ortho must be a finite number"),
        (lambda opt: None, {"ortho_layout": "rows"}, ValueError, r"'body\.weight'.*16 orthonormal vectors of length 8"),
        (lambda opt: None, {"include": ["emb"]}, ValueError, r"'emb' matches 1 parameter.*of an embedding"),
        (
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
            {},
            ValueError,
            "scheduler was already built.*then build the scheduler",
        ),
        (lambda opt: orthoopt.constrain_(opt, opt._model), {}, ValueError, "already constrains parameters"),
    ],
)
def test_refusals_change_nothing(make, kwargs, error, match):
    model = _model()
    opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2)
    opt._model = model
    make(opt)
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        orthoopt.constrain_(opt, model, **{"ortho": 1.0, **kwargs})
    after = _snapshot(opt)
    assert after[0] is before[0] and after[1:] == before[1:]


def test_hard_mode_needs_a_fresh_state():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _run(model, opt, _grads(model, 1))
    with pytest.raises(ValueError, match=r"ortho_mode='hard' on parameters .* already stepped \(body\.weight"):
        orthoopt.constrain_(opt, model, ortho=1.0, ortho_mode="hard")
    assert type(opt) is torch.optim.AdamW
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    orthoopt.constrain_(fresh, model, ortho=1.0, ortho_mode="hard", exclude=["head"])
    orthoopt.project_(fresh)
    _run(model, fresh, _grads(model, 3))
    assert max(orthoopt.named_orthogonality_errors(fresh).values()) < 1e-5


def test_the_optimizer_must_hold_what_include_names():
    model = _model()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("body")], lr=1e-2)
    with pytest.raises(ValueError, match=r"'body' matches 2 parameter.*'body\.weight' \(not held by this optimizer"):
        orthoopt.constrain_(opt, model, include=["body"])
    with pytest.raises(TypeError, match="for a generator such as model.parameters"):
        orthoopt.constrain_(model.parameters(), model)


def test_project_and_errors_refuse_a_plain_optimizer():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="plain AdamW.*constrain_"):
        orthoopt.project_(opt)
    with pytest.raises(TypeError, match="plain AdamW.*constrain_"):
        orthoopt.named_orthogonality_errors(opt)


# -- the frameworks ----------------------------------------------------------------------
def _assert_held(errors: dict, control: dict, bound: float = 0.05, factor: float = 10) -> None:
    """From the manifold, the swapped run stayed within ``bound`` where the same run without
    the penalty drifted at least ``factor`` times as far."""
    assert errors.keys() == control.keys()
    assert max(errors.values()) < bound, errors
    assert max(control.values()) > factor * max(errors.values()), control


def test_accelerate_wrapper():
    accelerate = import_or_skip("accelerate")

    def run(swap: bool) -> dict:
        model = _model()
        orthoopt.project_(model)  # start on the manifold
        wrapped = accelerate.Accelerator(cpu=True).prepare(torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert not isinstance(wrapped, orthoopt.OrthoMixin)
        if swap:
            orthoopt.constrain_(wrapped, model, ortho=3.0, exclude=["head"])
            assert isinstance(wrapped.optimizer, orthoopt.OrthoMixin)
        for _ in range(20):
            wrapped.zero_grad()
            _forward(model, torch.arange(10) % 10).square().mean().backward()
            wrapped.step()  # the wrapper's step runs the penalty of the optimizer inside
        errors = orthoopt.named_orthogonality_errors(wrapped if swap else model, exclude=["head"])
        if swap:
            orthoopt.project_(wrapped)
            assert max(orthoopt.named_orthogonality_errors(wrapped).values()) < 1e-5
        return errors

    errors = run(swap=True)
    assert set(errors) == {"body.weight", "gates.weight_ih", "gates.weight_hh"}
    control = run(swap=False)
    # gates.weight_hh gets no gradient here (the cell starts from h = 0): compare the others
    _assert_held(
        {n: e for n, e in errors.items() if n != "gates.weight_hh"},
        {n: e for n, e in control.items() if n != "gates.weight_hh"},
    )


def test_lightning_optimizer_wrapper():
    pl = import_or_skip("pytorch_lightning")
    model = _model()
    wrapped = pl.core.optimizer.LightningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert isinstance(wrapped, torch.optim.AdamW)  # it imitates the class, not the attributes
    orthoopt.constrain_(wrapped, model, ortho=3.0, exclude=["head"])
    assert isinstance(wrapped.optimizer, orthoopt.OrthoMixin)
    orthoopt.project_(wrapped)
    assert max(orthoopt.named_orthogonality_errors(wrapped).values()) < 1e-5


class _LitModel:
    """Built lazily: the Lightning module class needs pytorch_lightning."""

    @staticmethod
    def make(pl, swap: bool = True):
        class LitModel(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = _model()
                orthoopt.project_(self.net)  # start on the manifold

            def training_step(self, batch, batch_idx):
                return _forward(self.net, batch[0]).square().mean()

            def configure_optimizers(self):
                opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
                if swap:
                    orthoopt.constrain_(opt, self, ortho=3.0, exclude=["net.head"])
                return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5)}

        return LitModel()


def _lightning_fit(pl, callbacks=(), logger=False, steps=20, swap=True, **trainer_options):
    module = _LitModel.make(pl, swap)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(40) % 10), batch_size=8)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        **trainer_options,
    )
    trainer.fit(module, data)
    return module, trainer


def test_lightning_configure_optimizers():
    pl = import_or_skip("pytorch_lightning")
    module, trainer = _lightning_fit(pl)
    (opt,) = trainer.optimizers
    assert isinstance(opt, orthoopt.OrthoMixin) and trainer.global_step == 20
    errors = orthoopt.named_orthogonality_errors(opt)
    assert set(errors) == {"net.body.weight", "net.gates.weight_ih", "net.gates.weight_hh"}
    control, _ = _lightning_fit(pl, swap=False)
    control_errors = orthoopt.named_orthogonality_errors(control, exclude=["net.head"])
    _assert_held(
        {n: e for n, e in errors.items() if n != "net.gates.weight_hh"},  # no gradient: the cell starts at h = 0
        {n: e for n, e in control_errors.items() if n != "net.gates.weight_hh"},
    )


def _bert(transformers):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    return transformers.BertForSequenceClassification(config)


def _bert_data(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, 6), generator=g)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(n)]


def _trainer(transformers, model, tmp_path, steps=10, **args):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.01,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=5,
        **args,
    )
    return transformers.Trainer(model=model, args=arguments, train_dataset=_bert_data())


def test_hf_trainer_keeps_its_no_decay_groups(tmp_path):
    transformers = import_or_skip("transformers")
    model = _bert(transformers)
    trainer = _trainer(transformers, model, tmp_path)
    trainer.create_optimizer()
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    orthoopt.constrain_(trainer.optimizer, model, ortho=3.0, exclude=["classifier"])
    after = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert after == decayed  # the Trainer's own decay rule survives the split
    names = {n for g in trainer.optimizer.param_groups if g["ortho"] for n in g["param_names"]}
    assert "bert.embeddings.word_embeddings.weight" not in names and "classifier.weight" not in names
    assert "bert.encoder.layer.0.attention.self.query.weight" in names and len(names) == 13
    orthoopt.project_(trainer.optimizer)  # start on the manifold (std-0.02 init is far from it)
    trainer.train()
    # after train() the Trainer's optimizer is accelerate's wrapper; the functions unwrap it
    assert not isinstance(trainer.optimizer, orthoopt.OrthoMixin)
    errors = orthoopt.named_orthogonality_errors(trainer.optimizer)
    assert set(errors) == names
    control = _bert(transformers)
    orthoopt.project_(control)
    _trainer(transformers, control, tmp_path).train()
    _assert_held(errors, orthoopt.named_orthogonality_errors(control, exclude=["classifier"]), bound=0.02)
    orthoopt.project_(trainer.optimizer)
    assert max(orthoopt.named_orthogonality_errors(trainer.optimizer).values()) < 1e-5


def test_timm_create_optimizer_v2_keeps_its_groups():
    timm = import_or_skip("timm")
    import_or_skip("timm.optim")

    def vit():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
        orthoopt.project_(model)  # start on the manifold (timm's std-0.02 init is far from it)
        return model, timm.optim.create_optimizer_v2(model, "adamw", lr=5e-3, weight_decay=0.05)

    def train(model, opt):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for _ in range(10):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model, opt = vit()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    count = sum(len(g["params"]) for g in opt.param_groups)
    orthoopt.constrain_(opt, model, ortho=3.0, ortho_smoothing=1e-2, exclude=["head"])
    assert {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]} == decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == count
    layouts = {n: g["ortho_layout"] for g in opt.param_groups if g["ortho"] for n in g["param_names"]}
    assert "cls_token" not in layouts and "pos_embed" not in layouts and "head.weight" not in layouts
    assert layouts["blocks.0.attn.qkv.weight"] == "row_groups:3" and layouts["patch_embed.proj.weight"] == "auto"
    assert len(layouts) == 1 + 12 * 4
    train(model, opt)
    control, plain = vit()
    train(control, plain)
    errors, plain_errors = opt.orthogonality_errors(), orthoopt.named_orthogonality_errors(control, exclude=["head"])
    # measured: 0.083 (blocks.9.mlp.fc2) against 0.59 without the penalty, at this lr and weight decay
    _assert_held(errors, plain_errors, bound=0.1, factor=5)


def test_names_given_to_the_optimizer_are_kept_and_foreign_parameters_left_alone():
    model = _model()
    temperature = nn.Parameter(torch.ones(2, 2))  # not the model's: unconstrained, named by position
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": [temperature]}], lr=1e-2)
    orthoopt.constrain_(opt, model, ortho=1.0, exclude=["head"])
    assert opt.param_groups[-1]["param_names"] == ["group1.param0"] and opt.param_groups[-1]["ortho"] == 0.0
    named = [("w." + n, p) for n, p in model.named_parameters()]  # the script's own names
    opt = torch.optim.AdamW([{"params": named}, {"params": [("temperature", temperature)]}], lr=1e-2)
    orthoopt.constrain_(opt, model, ortho=1.0, exclude=["head"])
    assert [g["param_names"] for g in opt.param_groups if g["ortho"]] == [
        ["w.body.weight"],
        ["w.gates.weight_ih", "w.gates.weight_hh"],
    ]
    assert set(opt.orthogonality_errors()) == {"w.body.weight", "w.gates.weight_ih", "w.gates.weight_hh"}
