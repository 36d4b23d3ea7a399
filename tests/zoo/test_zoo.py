"""The one-line swap on a zoo of timm's and transformers' models at small sizes (no download):
construct, ``constrain_`` on the framework's own optimizer (timm's ``create_optimizer_v2``,
the Trainer's AdamW with its no-decay groups), 2 steps.  Each model asserts that

* no weight of a class the default rule leaves out is selected (depthwise convs, per-channel
  scales, single vectors, positional modules by name, parametrized weights, output layers),
  judged by checks that do not use the rule's code;
* every selected weight's layout gives each block its forward splits it into its own matrix
  (:mod:`orthoopt.probe`), and no fused-looking weight is left at ``"auto"``;
* weights tied to an embedding are never selected;
* the framework's weight decay of every parameter is kept, and the weights left out move by
  no more than two AdamW steps can move them (the cross-channel constraint had shrunk a
  depthwise filter from 0.565 to 0.185 in one step).

A last test checks that every registered layout and positional module of timm and
transformers was met by some model of the zoo, and so checked against its forward.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import import_or_skip
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from zoo_models import HF_MODELS, TIMM_MODELS, build_hf, build_timm, hf_inputs

import orthoopt
from orthoopt import probe, registry
from orthoopt.layout import resolve_layout
from orthoopt.selection import select

LR, WEIGHT_DECAY = 1e-3, 0.05
POSITIONAL = re.compile(r"(^|[._])(pos|posemb|position|positional|rel_pos|relpos|cpb)([._]|$)")
MET: set[registry.Entry] = set()  # the registry entries the zoo's models hold
RAN: set[str] = set()


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    return {id(p): (name, m) for name, m in reversed(list(model.named_modules())) for p in m.parameters(recurse=False)}


def _left_out_class(name: str, module: nn.Module, p: torch.Tensor, spec: str) -> str | None:
    """The class of weight the default rule must leave out, judged without its code."""
    if isinstance(module, _ConvNd) and module.groups > 1 and module.in_channels == module.groups:
        return "depthwise conv or per-channel scale"
    if POSITIONAL.search(name):
        return "positional"
    if parametrize.is_parametrized(module):
        return "parametrized"
    if all(n == 1 for _, _, n in resolve_layout(spec, p.shape, name).stack_shapes(p.shape)):
        return "single vectors"
    return None


def check_rule(model: nn.Module, run, outputs: list[nn.Module]) -> dict[str, str]:
    """The default rule's selection on ``model``: nothing of the left-out classes, layouts that
    agree with the forward ``run(model)``, no tied or output weight; ``{name: layout}``."""
    chosen = select(model)
    owners = _owners(model)
    for name, p, spec in chosen:
        module_name, module = owners[id(p)]
        assert _left_out_class(module_name, module, p, spec) is None, (name, spec)
    taken = {id(p) for _, p, _ in chosen}
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    assert not taken & embedded, "a weight of (or tied to) an embedding is selected"
    heads = {id(p) for m in outputs for p in m.parameters()}
    assert not taken & heads, "the output layer is selected"
    specs = {name: spec for name, _, spec in chosen}
    blocks = probe.feature_blocks(model, run)
    assert probe.disagreements(model, specs, blocks) == {}
    flagged = [name for name, row in _flags(model).items() if any("kept 'auto'" in f for f in row)]
    assert flagged == [], f"fused-looking weights without a registered layout: {flagged}"
    MET.update(registry.entries_in(model))
    return specs


def _flags(model: nn.Module) -> dict[str, tuple[str, ...]]:
    return {row.name: row.flags for row in orthoopt.audit(model).rows}


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return next(t for t in (out.values() if isinstance(out, dict) else out) if isinstance(t, torch.Tensor))


def swap_and_step(model: nn.Module, opt: torch.optim.Optimizer, run, chosen: dict[str, str]) -> None:
    """constrain_ on the framework's optimizer keeps its weight decay; 2 steps; the weights left
    out move as plain AdamW moves them."""
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    # ortho_init='warn': the projection at the first step (an SVD of every weight) would be most of the
    # zoo's time; tests/test_selection.py projects composite layouts, tests/test_guard.py the rest
    orthoopt.constrain_(opt, model, ortho=1.0, ortho_init="warn")
    assert {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]} == decay
    layouts = {n: g["ortho_layout"] for g in opt.param_groups if g["ortho"] for n in g["param_names"]}
    assert {orthoopt.selection.bare_name(n): s for n, s in layouts.items()} == chosen
    taken = {id(p) for g in opt.param_groups if g["ortho"] for p in g["params"]}
    left = {
        n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2 and id(p) in decay.keys() - taken
    }
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    model.train()
    for _ in range(2):
        opt.zero_grad()
        _first_tensor(run(model)).float().square().mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name in left:  # AdamW moves an entry by at most lr (1 + wd |w|) per step on its first steps
            lr, w = lrs[id(p)], left[name]
            bound = 2 * lr * (1.01 + decay[id(p)] * w.abs().max().item())
            assert (p.detach() - w).abs().max().item() <= bound, name
    errors = opt.orthogonality_errors()
    assert errors and all(e == e for e in errors.values())


@pytest.mark.parametrize("spec", TIMM_MODELS, ids=[s.name + "-rope" * ("attn_type" in s.kwargs) for s in TIMM_MODELS])
def test_timm(spec):
    timm = import_or_skip("timm")
    import_or_skip("timm.optim")
    model = build_timm(spec)
    x = torch.randn(2, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    heads = model.get_classifier()  # the layer, or a head whose last layer is the output layer
    heads = [h for h in (heads if isinstance(heads, tuple) else (heads,)) if isinstance(h, nn.Module)]
    layers = [[m for m in h.modules() if isinstance(m, (nn.Linear, _ConvNd))][-1:] for h in heads]
    chosen = check_rule(model, lambda m: m(x), [layer for found in layers for layer in found])
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    assert any(g["weight_decay"] == 0 for g in opt.param_groups)  # timm's no-decay group of 1-D parameters
    swap_and_step(model, opt, lambda m: m(x), chosen)
    RAN.add(f"timm:{spec.name}:{sorted(spec.kwargs.items())}")


@pytest.mark.parametrize("spec", HF_MODELS, ids=[s.key for s in HF_MODELS])
def test_transformers(spec, tmp_path):
    transformers = import_or_skip("transformers")
    import_or_skip("accelerate")
    model = build_hf(spec)
    run = hf_inputs(spec, model)
    chosen = check_rule(model, run, [model.get_submodule(name) for name in spec.outputs])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=LR, weight_decay=WEIGHT_DECAY
    )
    trainer = transformers.Trainer(model=model, args=args)
    opt = trainer.create_optimizer()
    assert any(g["weight_decay"] == 0 for g in opt.param_groups)  # the Trainer's no-decay group (biases, norms)
    swap_and_step(model, opt, run, chosen)
    RAN.add(f"hf:{spec.key}")


def test_every_registered_entry_of_timm_and_transformers_met_a_zoo_model():
    """Every registered layout and positional module of timm and transformers was checked
    against its forward by a model above (run the whole module)."""
    if len(RAN) < len(TIMM_MODELS) + len(HF_MODELS):
        pytest.skip(f"only {len(RAN)} of the zoo's models ran here; the check needs all of them")
    layouts, positional = registry.registered()
    third_party = [e for e in layouts + positional if e.owner.startswith(("timm.", "transformers."))]
    missed = [f"{e.owner} {e.path}" for e in third_party if e not in MET]
    assert missed == []


def test_the_sweep_script_on_one_model_and_its_table(tmp_path, capsys):
    """tools/zoo_sweep.py: one record per model, its table counts what it found, and a
    disagreement or a selected weight of a left-out class shows in the table."""
    import_or_skip("timm")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "zoo_sweep.py"
    spec = importlib.util.spec_from_file_location("zoo_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep.jsonl"
    assert sweep.main(["--out", str(out), "--models", "test_vit"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    qkv = next(w for w in record["weights"] if w["name"] == "blocks.0.attn.qkv.weight")
    assert (qkv["layout"], qkv["agrees"], qkv["forward_blocks"]) == ("row_groups:3", True, 3)
    table = capsys.readouterr().out
    assert "| selected layouts that disagree with the forward | 0 |" in table
    assert "| of those, selected | 0 |" in table
    record["model"] = "planted"
    qkv.update(layout="auto", agrees=False, forward=[[0, 64], [64, 64], [128, 64]])
    depthwise = dict(qkv, name="dw.weight", selected=True, agrees=True, **{"class": "depthwise conv"})
    record["weights"] += [depthwise]
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    table = sweep.table(out)
    assert "| selected layouts that disagree with the forward | 1 |" in table
    assert "| of those, selected | 1 |" in table and "planted dw.weight (depthwise conv)" in table
