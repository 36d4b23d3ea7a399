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
    # its option initial_accumulator_value is no scheduler's mark
    "Adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1, initial_accumulator_value=0.1),
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
            lambda opt: setattr(opt, "_kept", torch.optim.lr_scheduler.StepLR(opt, 10)),
            {},
            ValueError,
            r"scheduler \(StepLR\) was already built.*then build the scheduler",
        ),
        (  # dropped, but its wrapper of the step stays, and would step the base class after the swap
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
            {},
            ValueError,
            r"scheduler \(its step is wrapped by one\) was already built",
        ),
        (
            lambda opt: setattr(opt, "_kept", torch.optim.lr_scheduler.ReduceLROnPlateau(opt)),
            {},
            ValueError,
            r"scheduler \(ReduceLROnPlateau\) was already built on this AdamW.*then build the scheduler",
        ),
        (lambda opt: orthoopt.constrain_(opt, opt._model), {}, ValueError, "already constrains parameters"),
        (
            lambda opt: None,
            {"ortho_mdoe": "hard"},
            TypeError,
            r"unknown option 'ortho_mdoe'.*did you mean 'ortho_mode'",
        ),
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


def test_lightning_warns_at_the_users_fit_line():
    """orthoopt's warnings point past Lightning's loops, at the user's line."""
    pl = import_or_skip("pytorch_lightning")

    class Hard(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()  # off the manifold: hard mode projects it at its first step

        def training_step(self, batch, batch_idx):
            return _forward(self.net, batch[0]).square().mean()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return orthoopt.constrain_(opt, self, ortho=1.0, ortho_mode="hard", ortho_init="warn", exclude=["net.head"])

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8) % 10), batch_size=4)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(orthoopt.OrthogonalityWarning, match="projected onto the Stiefel manifold") as rec:
        trainer.fit(Hard(), data)
    assert {w.filename for w in rec if issubclass(w.category, orthoopt.OrthogonalityWarning)} == {__file__}


def test_lightning_backbone_finetuning_adds_its_group_to_the_swapped_optimizer():
    """BackboneFinetuning unfreezes the backbone with add_param_group({'params': ..., 'lr': ...})."""
    pl = import_or_skip("pytorch_lightning")

    class Finetuned(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            return self.head(self.backbone(batch[0])).square().mean()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)
            return orthoopt.constrain_(opt, self, ortho=3.0, exclude=["head.2"])

    module = Finetuned()
    frozen = [p.detach().clone() for p in module.backbone.parameters()]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        callbacks=[pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    (opt,) = trainer.optimizers
    added = opt.param_groups[-1]
    index = len(opt.param_groups) - 1
    assert added["param_names"] == [f"group{index}.param0", f"group{index}.param1"] and added["ortho"] == 0.0
    assert [p is q for p, q in zip(added["params"], module.backbone.parameters())] == [True, True]
    assert not any(torch.equal(p, q) for p, q in zip(module.backbone.parameters(), frozen))  # it trained
    assert set(opt.orthogonality_errors()) == {"head.0.weight"}


def test_timm_scheduler_built_before_the_swap_is_refused():
    """timm's schedulers leave the optimizer's step alone, and would schedule only the groups they saw."""
    timm_scheduler = import_or_skip("timm.scheduler")
    model = _model()
    opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2)
    scheduler = timm_scheduler.CosineLRScheduler(opt, t_initial=10)
    with pytest.raises(ValueError, match=r"scheduler \(CosineLRScheduler\) was already built on this AdamW"):
        orthoopt.constrain_(opt, model, exclude=["head"])
    assert type(opt) is torch.optim.AdamW and scheduler.optimizer is opt


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


def test_hf_trainer_warns_at_the_users_train_line(tmp_path):
    """orthoopt's warnings point past accelerate's and the Trainer's frames, at the user's line."""
    transformers = import_or_skip("transformers")
    model = _bert(transformers)
    trainer = _trainer(transformers, model, tmp_path, steps=1)
    trainer.create_optimizer()
    orthoopt.constrain_(
        trainer.optimizer, model, ortho=1.0, ortho_mode="hard", ortho_init="warn", exclude=["classifier"]
    )
    with pytest.warns(orthoopt.OrthogonalityWarning, match="projected onto the Stiefel manifold") as rec:
        trainer.train()
    assert {w.filename for w in rec if issubclass(w.category, orthoopt.OrthogonalityWarning)} == {__file__}


def test_timm_create_optimizer_v2_keeps_its_groups():
    timm = import_or_skip("timm")
    import_or_skip("timm.optim")

    def vit():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
        orthoopt.project_(model)  # start on the manifold (timm's std-0.02 init is far from it)
        orthoopt.project_([model.head.weight])  # and the head too, which the default rule leaves out
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


# -- optimizers the swap meets -----------------------------------------------------------
@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.Adagrad])
def test_swap_of_an_ortho_optimizer_built_with_ortho_zero(base):
    """An orthoopt optimizer with nothing constrained swaps as its base class does."""
    model, twin = _model(), _model()
    opt = orthoopt.orthogonalize(base)(_timm_like_groups(model), lr=1e-2, ortho=0)
    orthoopt.constrain_(opt, model, ortho=3.0, exclude=["head"])
    assert type(opt) is orthoopt.orthogonalize(base)
    plain = base(_timm_like_groups(twin), lr=1e-2)
    orthoopt.constrain_(plain, twin, ortho=3.0, exclude=["head"])
    grads = _grads(model, 4)
    _run(model, opt, grads)
    _run(twin, plain, grads)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["param_groups"] == plain.state_dict()["param_groups"]


def test_a_group_added_without_names_after_the_swap():
    """As Lightning's BackboneFinetuning unfreezes: add_param_group({'params': ..., 'lr': ...})."""
    model = _model()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("head")], lr=1e-2)
    orthoopt.constrain_(opt, model, ortho=1.0)
    opt.add_param_group({"params": [model.head.bias], "lr": 1e-3})
    opt.add_param_group({"params": [model.head.weight], "ortho": 2.0, "ortho_layout": "rows"})
    assert [g["param_names"] for g in opt.param_groups[-2:]] == [["group3.param0"], ["group4.param0"]]
    assert opt.param_groups[-1]["ortho"] == 2.0 and opt.param_groups[-2]["ortho"] == 0.0
    assert "group4.param0" in opt.orthogonality_errors()
    _run(model, opt, _grads(model, 2))
    with pytest.raises(ValueError, match=r"'group5\.param0'.*5 orthonormal vectors of length 3"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(5, 3))], "ortho": 1.0, "ortho_layout": "rows"})


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _lbfgs_steps(model: nn.Module, opt, steps: int = 3) -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("already_stepped", [0, 2])
def test_lbfgs_is_swapped_into_its_one_group_where_only_vectors_are_left_out(already_stepped):
    """LBFGS takes one group: the swap keeps it whole, in its order (LBFGS's state is one flat
    vector over it), with layout 'auto', which leaves the biases alone."""
    model, twin = _mlp(), _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    _lbfgs_steps(model, opt, already_stepped)
    orthoopt.constrain_(opt, model, ortho=1.0)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert set(opt.orthogonality_errors()) == {"0.weight", "2.weight"}
    direct = orthoopt.orthogonalize(torch.optim.LBFGS)(
        list(twin.named_parameters()), lr=0.5, max_iter=3, ortho=1.0, ortho_init="project"
    )
    _lbfgs_steps(twin, torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=3), already_stepped)
    if already_stepped:
        direct.load_state_dict(
            {"state": copy.deepcopy(opt.state_dict()["state"]), "param_groups": direct.state_dict()["param_groups"]}
        )
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    _lbfgs_steps(model, opt)
    _lbfgs_steps(twin, direct)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    plain = _mlp()
    _lbfgs_steps(plain, torch.optim.LBFGS(plain.parameters(), lr=0.5, max_iter=3), already_stepped + 3)
    plain_errors = orthoopt.named_orthogonality_errors(plain)
    # measured: 0.11 and 0.26 (0.06 and 0.14 after 2 plain steps) against 0.59 and 0.82 (0.62, 0.86)
    assert all(e < plain_errors[n] / 2 for n, e in opt.orthogonality_errors().items())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"exclude": ["2"]}, r"leaves out the weight matrix '2\.weight'"),
        ({"layouts": {"2": "columns"}}, r"constrains its matrices with several layouts \('auto', 'columns'\)"),
    ],
)
def test_lbfgs_needing_several_groups_is_refused_with_what_to_do(kwargs, match):
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters())
    before = _snapshot(opt)
    with pytest.raises(
        ValueError, match=r"constrain_: LBFGS takes one parameter group.*" + match + ".*another optimizer"
    ):
        orthoopt.constrain_(opt, model, ortho=1.0, **kwargs)
    after = _snapshot(opt)
    assert after[0] is before[0] and after[1:] == before[1:]


# -- resuming a plain run's checkpoint that had a scheduler ------------------------------
_LR = torch.optim.lr_scheduler


def _by_kind(low: float, high: float):
    """A per-group value by the group's kind (no decay, decayed), whatever the grouping."""
    return lambda opt: [high if g["weight_decay"] else low for g in opt.param_groups]


SCHEDULERS = {
    "StepLR": lambda opt: _LR.StepLR(opt, 2, gamma=0.5),
    "warmup LambdaLR": lambda opt: _LR.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4)),
    "warmup then cosine": lambda opt: _LR.SequentialLR(
        opt, [_LR.LinearLR(opt, 0.1, total_iters=3), _LR.CosineAnnealingLR(opt, 9)], milestones=[3]
    ),
    # the LambdaLR inside reads its own base_lrs at every step
    "warmup then decay": lambda opt: _LR.SequentialLR(
        opt, [_LR.LinearLR(opt, 0.1, total_iters=3), _LR.LambdaLR(opt, lambda t: 0.8**t)], milestones=[3]
    ),
    "OneCycleLR": lambda opt: _LR.OneCycleLR(opt, 0.05, total_steps=12),  # it cycles beta1 too
    "CyclicLR": lambda opt: _LR.CyclicLR(opt, _by_kind(1e-3, 3e-4)(opt), _by_kind(1e-2, 5e-3)(opt), step_size_up=3),
    "ReduceLROnPlateau": lambda opt: _LR.ReduceLROnPlateau(
        opt, patience=0, factor=0.5, min_lr=_by_kind(1e-4, 2e-3)(opt)
    ),
}
_LOSSES = [3.0, 2.0, 2.0, 2.5, 1.0, 1.0, 1.5, 0.5, 0.5, 0.7, 0.4, 0.4]  # ReduceLROnPlateau's metric
_HYPER = ("lr", "betas")


def _scheduler_step(scheduler, t: int) -> None:
    """The scheduler's step after the optimizer's step ``t`` (from 0), as each kind takes it."""
    if isinstance(scheduler, _LR.ReduceLROnPlateau):
        scheduler.step(_LOSSES[t])
    elif isinstance(scheduler, _LR.LRScheduler):
        scheduler.step()
    else:
        scheduler.step_update(t + 1)  # timm's, counted in updates


def _scheduled(model: nn.Module, opt, scheduler, grads, start: int) -> list:
    """Steps ``start``, ``start + 1``, ... with fixed gradients and the scheduler; each group's
    (lr, betas) at each step."""
    trace = []
    for t, step in enumerate(grads, start):
        trace.append([tuple(g[k] for k in _HYPER) for g in opt.param_groups])
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()
        _scheduler_step(scheduler, t)
    return trace


def _two_rates(model: nn.Module) -> list[dict]:
    """timm's groups, each with its own learning rate: the schedule of each is its own."""
    groups = _timm_like_groups(model)
    groups[1]["lr"] = 3e-3
    return groups


def _by_hand(model: nn.Module, opt, grads, trace) -> None:
    """Steps with fixed gradients, each group's (lr, betas) set from ``trace``."""
    for step, row in zip(grads, trace):
        for group, values in zip(opt.param_groups, row, strict=True):
            group.update(zip(_HYPER, values))
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()


def _check_resume(make_scheduler) -> None:
    """Build the plain optimizer, load its state, swap, build the scheduler, load its state:
    the run goes on as the uninterrupted one, swapped at the checkpoint, does."""
    k, m = 5, 7
    grads = _grads(_model(), k + m)
    model = _model()
    opt = torch.optim.AdamW(_two_rates(model), lr=1e-2)
    scheduler = make_scheduler(opt)
    plain = _scheduled(model, opt, scheduler, grads[:k], 0)
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
    )
    plain += _scheduled(model, opt, scheduler, grads[k:], k)  # the schedule of the plain run
    # the no-decay group stays whole; the decayed one splits into body, the GRU's gates and the rest
    origin = [0, 1, 1, 1]
    schedule = [[row[i] for i in origin] for row in plain[k:]]

    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    opt = torch.optim.AdamW(_two_rates(resumed), lr=1e-2)
    opt.load_state_dict(checkpoint["optimizer"])
    orthoopt.constrain_(opt, resumed, ortho=3.0, exclude=["head"])
    scheduler = make_scheduler(opt)
    orthoopt.load_scheduler_state(scheduler, checkpoint["scheduler"])
    if isinstance(scheduler, _LR.LRScheduler):
        assert scheduler.get_last_lr() == [lr for lr, _ in schedule[0]]
    trace = _scheduled(resumed, opt, scheduler, grads[k:], k)
    assert trace == schedule

    uninterrupted = _model()
    opt = torch.optim.AdamW(_two_rates(uninterrupted), lr=1e-2)
    _by_hand(uninterrupted, opt, grads[:k], plain[:k])
    orthoopt.constrain_(opt, uninterrupted, ortho=3.0, exclude=["head"])
    _by_hand(uninterrupted, opt, grads[k:], schedule)
    for (name, p), q in zip(resumed.named_parameters(), uninterrupted.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_a_plain_runs_checkpoint_resumes_with_its_scheduler(kind):
    _check_resume(SCHEDULERS[kind])


def test_a_plain_runs_checkpoint_resumes_with_its_timm_scheduler():
    timm_scheduler = import_or_skip("timm.scheduler")
    _check_resume(
        lambda opt: timm_scheduler.CosineLRScheduler(
            opt, t_initial=12, warmup_t=3, warmup_lr_init=1e-4, t_in_epochs=False
        )
    )


def test_scheduler_states_that_do_not_fit_the_swap_are_refused():
    model = _model()
    opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2)
    saved = _LR.LambdaLR(torch.optim.AdamW(model.parameters()), lambda t: 1.0).state_dict()  # one group
    with pytest.raises(ValueError, match="was not swapped by constrain_.*scheduler.load_state_dict"):
        orthoopt.load_scheduler_state(_LR.LambdaLR(opt, lambda t: 1.0), saved)
    opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2)
    orthoopt.constrain_(opt, model, ortho=1.0, exclude=["head"])
    scheduler = _LR.LambdaLR(opt, lambda t: 1.0)
    with pytest.raises(ValueError, match=r"'base_lrs' holds 1 value.*2 groups before the swap and 4 after"):
        orthoopt.load_scheduler_state(scheduler, saved)
    # a state saved after the swap, one value per group as it is now, loads as it is
    orthoopt.load_scheduler_state(scheduler, scheduler.state_dict())
    # once the optimizer has stepped or loaded a state, its groups are no longer those of the swap
    for change in (lambda o: o.step(), lambda o: o.load_state_dict(o.state_dict())):
        opt = torch.optim.AdamW(_timm_like_groups(model), lr=1e-2)
        orthoopt.constrain_(opt, model, ortho=1.0, exclude=["head"])
        scheduler = _LR.LambdaLR(opt, lambda t: 1.0)
        change(opt)
        with pytest.raises(ValueError, match="has stepped or loaded a state since"):
            orthoopt.load_scheduler_state(scheduler, saved)
