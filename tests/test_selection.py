"""Which parameters are constrained, with which layout: the module-aware rule, patterns, names."""

from __future__ import annotations

from collections import OrderedDict
from unittest import mock

import pytest
import torch
from conftest import import_or_skip
from torch import nn

import orthoopt
from orthoopt import registry
from orthoopt.layout import resolve_layout
from orthoopt.rule import survey
from orthoopt.selection import bare_name, select


class Zoo(nn.Module):
    """One of every kind of layer the rule knows, and the parameters it must leave out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))  # timm's raw 3-D parameters
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.conv = nn.Conv2d(3, 4, 3)
        self.deconv = nn.ConvTranspose1d(4, 2, 3)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=3)
        self.gru = nn.GRU(8, 4)
        self.rnn = nn.RNN(8, 4)
        self.cell = nn.LSTMCell(8, 4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 20)
        self.dec = nn.Linear(8, 20, bias=False)
        self.dec.weight = self.emb.weight  # tied, as word_language_model's --tied


def chosen(model, **kwargs) -> dict[str, str]:
    return {name: spec for name, _, spec in select(model, **kwargs)}


def test_the_default_rule_on_every_layer_kind():
    got = chosen(Zoo())
    lstm = {f"lstm.weight_{k}_l{i}{s}": "row_groups:4" for k in ("ih", "hh") for i in (0, 1) for s in ("", "_reverse")}
    lstm |= {f"lstm.weight_hr_l{i}{s}": "auto" for i in (0, 1) for s in ("", "_reverse")}
    assert got == {
        "conv.weight": "auto",
        "deconv.weight": "auto",
        **lstm,
        "gru.weight_ih_l0": "row_groups:3",
        "gru.weight_hh_l0": "row_groups:3",
        "rnn.weight_ih_l0": "auto",
        "rnn.weight_hh_l0": "auto",
        "cell.weight_ih": "row_groups:4",
        "cell.weight_hh": "row_groups:4",
        "attn.in_proj_weight": "row_groups:3",
        "attn.out_proj.weight": "auto",
        "cross.q_proj_weight": "auto",
        "cross.k_proj_weight": "auto",
        "cross.v_proj_weight": "auto",
        "cross.out_proj.weight": "auto",
        "qkv.weight": "auto",  # a name alone says nothing of how the forward splits its rows (audit flags it)
        "head.weight": "auto",
    }
    # left out: the embedding and the decoder tied to it, norms, biases, cls_token, pos_embed


def test_param_groups_has_one_penalized_group_per_layout_with_names():
    model = Zoo()
    groups = orthoopt.param_groups(model, ortho=3.0, ortho_smoothing=1e-2, exclude=["head"])
    on = [g for g in groups if g["ortho"]]
    assert [g["ortho_layout"] for g in on] == ["auto", "row_groups:4", "row_groups:3"]  # qkv: 'auto' (unknown)
    assert all(g["ortho"] == 3.0 and g["ortho_smoothing"] == 1e-2 for g in on)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter once, named
    opt = orthoopt.OrthoAdamW(groups, lr=1e-3)
    assert set(opt.orthogonality_errors()) == set(chosen(model)) - {"head.weight"}


def test_lstm_gates_are_each_orthogonal_not_the_stack():
    """'auto' on the whole (4h, h) weight_hh would make it column-orthonormal, which leaves every
    gate's h x h block with singular values below 1; the gate blocks make each gate orthogonal."""
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 8)  # weight_ih (32, 16): gate blocks (8, 16) wide; weight_hh (32, 8): blocks (8, 8)
    orthoopt.project_(lstm)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        for gate in getattr(lstm, name).detach().chunk(4):
            torch.testing.assert_close(torch.linalg.svdvals(gate), torch.ones(8), rtol=0, atol=1e-5)
    assert max(orthoopt.named_orthogonality_errors(lstm).values()) < 1e-5
    whole = nn.LSTM(16, 8)
    orthoopt.project_([whole.weight_hh_l0])  # the old default: 'auto' on the whole stack
    sv = torch.cat([torch.linalg.svdvals(g) for g in whole.weight_hh_l0.detach().chunk(4)])
    assert sv.max() < 0.999  # no gate is orthogonal


def test_mha_in_proj_blocks_are_q_k_v():
    """MultiheadAttention splits in_proj_weight into q, k, v by rows: the three blocks of row_groups:3."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    orthoopt.project_(attn)
    for block in attn.in_proj_weight.detach().chunk(3):
        torch.testing.assert_close(block @ block.T, torch.eye(8), rtol=0, atol=1e-5)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        _, weights = attn(x, x, x, need_weights=True, average_attn_weights=False)
        (wq, wk, _), (bq, bk, _) = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
        q = (x @ wq.T + bq).view(1, 3, 2, 4).transpose(1, 2)
        k = (x @ wk.T + bk).view(1, 3, 2, 4).transpose(1, 2)
        torch.testing.assert_close(weights, torch.softmax(q @ k.mT / 2.0, dim=-1))


# -- patterns ---------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(body=nn.Linear(16, 8), act=nn.Tanh(), head=nn.Linear(8, 3)))


def test_a_string_is_one_pattern():
    """exclude='head' is the one pattern 'head', not the patterns h, e, a, d."""
    assert chosen(_mlp(), exclude="head") == {"body.weight": "auto"}
    assert chosen(_mlp(), include="head") == {"head.weight": "auto"}
    groups = orthoopt.param_groups(_mlp(), exclude="head")
    assert [n for g in groups if g["ortho"] for n in g["param_names"]] == ["body.weight"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"exclude": ["classifier"]},
            r"exclude pattern 'classifier' matches no parameter of Sequential.*modules are body, head",
        ),
        ({"include": ["bodyy"]}, r"include pattern 'bodyy'.*closest: 'body'"),
        ({"exclude": ["head", "*.wieght"]}, r"'\*\.wieght' matches no parameter.*'body\.weight'"),
        ({"layouts": {"tail": "rows"}}, r"layouts pattern 'tail' matches no parameter"),
    ],
)
def test_a_pattern_that_matches_nothing_raises_with_real_names(kwargs, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        orthoopt.param_groups(model, **kwargs)


def test_resnet_exclude_head_raises_naming_fc():
    """exclude=['head'] on a ResNet, whose classifier is 'fc', is refused naming 'fc'."""
    tv = import_or_skip("torchvision")
    model = tv.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match=r"'head' matches no parameter of ResNet.*layer4, fc.*'fc\.weight'"):
        orthoopt.param_groups(model, exclude=["head"])
    assert "fc.weight" not in chosen(model, exclude=["fc"])
    assert "fc.weight" not in chosen(model)  # the output layer, by torchvision's convention
    assert chosen(model, include=["fc"]) == {"fc.weight": "auto"}
    vgg = tv.models.vgg11(num_classes=10)  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
    assert {n for n in chosen(vgg) if n.startswith("classifier")} == {"classifier.0.weight", "classifier.3.weight"}


def test_wrapped_model_names_match_the_bare_patterns():
    model = _mlp()
    compiled = torch.compile(model)  # names gain '_orig_mod.' (nothing is compiled until called)
    parallel = nn.DataParallel(model)  # names gain 'module.', as under DDP
    assert [n for n, _ in compiled.named_parameters()][0] == "_orig_mod.body.weight"
    for wrapped, prefix in ((compiled, "_orig_mod."), (parallel, "module.")):
        assert chosen(wrapped, exclude=["head"]) == {prefix + "body.weight": "auto"}
        assert chosen(wrapped, include=["head.weight"]) == {prefix + "head.weight": "auto"}
        assert chosen(wrapped, include=[prefix + "head"]) == {prefix + "head.weight": "auto"}
    assert bare_name("module._orig_mod.layers.0._checkpoint_wrapped_module.fc.weight") == "layers.0.fc.weight"
    assert bare_name("module") == "module"


def test_include_of_a_weight_tied_to_an_embedding_wins():
    """include=['dec.weight'] on a weight tied to an nn.Embedding selects it."""
    model = Zoo()
    got = select(model, include=["dec.weight"])
    assert [(n, p is model.emb.weight, spec) for n, p, spec in got] == [("dec.weight", True, "auto")]
    assert "dec.weight" not in chosen(model) and "emb.weight" not in chosen(model)


def test_include_adds_raw_parameters_and_filters_modules():
    model = Zoo()
    assert chosen(model, include=["cls_token", "pos_embed"]) == {"cls_token": "auto", "pos_embed": "auto"}
    assert chosen(model, include=["gru"]) == {"gru.weight_ih_l0": "row_groups:3", "gru.weight_hh_l0": "row_groups:3"}
    # a glob names parameters: it passes over 1-D ones and takes an embedding it names
    assert chosen(model, include=["emb.*"]) == {"emb.weight": "auto"}
    assert chosen(model, include=["gru.*"]) == chosen(model, include=["gru"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"include": ["head.bias"]}, r"'head\.bias' of shape \(20,\).*fewer than 2 dimensions"),
        ({"include": ["norm"]}, r"'norm' matches 2 parameter\(s\) but selects none: 'norm\.weight' \(fewer than"),
        ({"include": ["attn", "emb"]}, r"'emb' matches 1 parameter\(s\) .*'emb\.weight' \(of an embedding or norm"),
        ({"exclude": ["conv", "deconv", "lstm", "gru", "rnn", "cell", "attn", "cross", "qkv", "head"]}, "no parameter"),
        ({"include": ["dec"]}, r"'dec' matches 1 parameter\(s\) but selects none.*name a parameter in full"),
        ({"include": ["head"], "layouts": {"qkv": "rows"}}, r"layouts pattern 'qkv' matches no constrained"),
        ({"include": 3}, r"include must be a string or an iterable of strings"),
    ],
)
def test_selection_errors_name_the_parameter_and_the_fix(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        orthoopt.param_groups(Zoo(), **kwargs)


def test_nothing_to_constrain_is_an_error():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Parameter(torch.randn(4, 3, 2))

    with pytest.raises(ValueError, match=r"no parameter of Raw is constrained.*include"):
        orthoopt.param_groups(Raw())
    assert chosen(Raw(), include=["phi"], layout="group_axis:1") == {"phi": "group_axis:1"}


def test_layout_overrides():
    model = Zoo()
    assert set(chosen(model, layout="rows", include=["head", "conv"]).values()) == {"rows"}
    assert chosen(model, layouts={"qkv.weight": "rows", "qkv": "columns"})["qkv.weight"] == "rows"  # the first wins
    assert chosen(model, layouts={"qkv": "columns"})["qkv.weight"] == "columns"
    assert chosen(model, layouts={"qkv": "columns"})["head.weight"] == "auto"
    with pytest.raises(ValueError, match="unknown layout"):
        chosen(model, layouts={"qkv": "diagonal"})


def test_lazy_modules_must_be_initialized_first():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"'0\.weight' is not initialized yet.*forward pass"):
        orthoopt.param_groups(model)
    model(torch.randn(2, 3))
    assert chosen(model) == {"0.weight": "auto"}


def test_every_default_layout_resolves_on_its_parameter():
    model = Zoo()
    for name, p, spec in select(model):
        assert resolve_layout(spec, p.shape, name) is not None


# -- the frameworks' models ---------------------------------------------------------------
def test_hf_bert_selects_the_projections_not_embeddings_or_norms():
    transformers = import_or_skip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)
    got = chosen(model, exclude=["classifier"])
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    per_layer += ["intermediate.dense", "output.dense"]
    want = {f"bert.encoder.layer.{i}.{m}.weight": "auto" for i in range(2) for m in per_layer}
    assert got == {**want, "bert.pooler.dense.weight": "auto"}


def test_hf_gpt2_c_attn_gets_its_three_column_blocks():
    transformers = import_or_skip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=8, n_embd=12, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    got = chosen(model)
    assert got == {
        "transformer.h.0.attn.c_attn.weight": "column_groups:3",
        "transformer.h.0.attn.c_proj.weight": "auto",
        "transformer.h.0.mlp.c_fc.weight": "auto",
        "transformer.h.0.mlp.c_proj.weight": "auto",
    }  # lm_head is tied to the token embedding
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 3, 12)
    q, k, v = attn.c_attn(x).split(12, dim=2)  # GPT-2's own split, by columns of the (in, 3·in) weight
    w = attn.c_attn.weight
    torch.testing.assert_close(k, x @ w[:, 12:24] + attn.c_attn.bias[12:24])


def test_timm_vit_selects_blocks_not_tokens_and_qkv_rows_are_q_k_v():
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    got = chosen(model)
    assert "cls_token" not in got and "pos_embed" not in got  # raw parameters stay free
    assert got["patch_embed.proj.weight"] == "auto" and "head.weight" not in got  # timm's get_classifier()
    assert got["blocks.0.attn.qkv.weight"] == "row_groups:3"
    assert {n.split(".", 2)[2] for n in got if n.startswith("blocks.0.")} == {
        "attn.qkv.weight",
        "attn.proj.weight",
        "mlp.fc1.weight",
        "mlp.fc2.weight",
    }
    # timm's forward reads q, k, v off the three row blocks of qkv (as nn.MultiheadAttention does)
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, 192)
    seen = {}

    def capture(q, k, v, *args, **kwargs):
        seen.update(q=q, k=k, v=v)
        return torch.zeros_like(q)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", capture), torch.no_grad():
        attn(x)
    assert seen, "timm's attention did not call scaled_dot_product_attention"
    w, b = attn.qkv.weight, attn.qkv.bias
    for i, key in enumerate("qkv"):
        block = (x @ w[192 * i : 192 * (i + 1)].T + b[192 * i : 192 * (i + 1)]).view(1, 5, 3, 64).transpose(1, 2)
        torch.testing.assert_close(seen[key], block)


# -- what each layer computes ----------------------------------------------------------------------
class Convs(nn.Module):
    """Convolutions of every kind of grouping, and the matrices that are single vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            OrderedDict(
                dense=nn.Conv2d(8, 16, 3),
                grouped=nn.Conv2d(16, 32, 3, groups=4),  # (32, 4, 3, 3): 4 groups of (8, 36)
                depthwise=nn.Conv2d(32, 32, 3, groups=32),  # (32, 1, 3, 3)
                multiplier=nn.Conv2d(32, 64, 3, groups=32),  # depthwise with 2 filters per channel
                scale=nn.Conv2d(64, 64, 1, groups=64),  # (64, 1, 1, 1): a per-channel scale
                tgrouped=nn.ConvTranspose2d(64, 32, 2, groups=2),  # (64, 16, 2, 2): 2 groups of (32, 64)
            )
        )
        self.to_vector = nn.Linear(4, 1)  # (1, 4): one row
        self.from_scalar = nn.Linear(1, 3)  # (3, 1): one column
        self.tiny_qkv = nn.Linear(1, 3)


def test_grouped_convs_get_a_block_per_group_and_depthwise_ones_and_vectors_are_left_out():
    model = Convs()
    assert chosen(model) == {
        "blocks.dense.weight": "auto",
        "blocks.grouped.weight": "row_groups:4",
        "blocks.tgrouped.weight": "row_groups:2",
    }
    verdicts = {n: survey(model)[id(p)] for n, p in model.named_parameters()}
    assert verdicts["blocks.depthwise.weight"].reason.startswith("depthwise conv")
    assert verdicts["blocks.multiplier.weight"].reason.startswith("depthwise conv")
    assert verdicts["blocks.scale.weight"].reason.startswith("per-channel scale")
    for name in ("to_vector", "from_scalar", "tiny_qkv"):
        assert verdicts[f"{name}.weight"].reason == "each matrix is a single vector (a normalisation)"


def test_a_grouped_conv_is_made_orthogonal_group_by_group():
    """Each group maps its own input channels: its (out/G, in/G·k·k) block gets orthonormal rows,
    and the whole-weight 'auto' (filters of different groups orthogonal to each other) does not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, groups=4)
    orthoopt.project_(conv)
    blocks = conv.weight.detach().reshape(4, 8, 36)
    torch.testing.assert_close(blocks @ blocks.mT, torch.eye(8).expand(4, 8, 8), rtol=0, atol=1e-5)
    whole = resolve_layout("auto", conv.weight.shape, "w").matrices(conv.weight.detach())
    assert (whole.mT @ whole - torch.eye(32)).abs().max() > 0.2  # filters of different groups: not orthogonal


def test_include_naming_a_left_out_layer_brings_it_back_with_the_rule_s_layout():
    model = Convs()
    assert chosen(model, include=["blocks.depthwise"]) == {"blocks.depthwise.weight": "row_groups:32"}
    assert chosen(model, include=["blocks.scale", "to_vector"]) == {
        "blocks.scale.weight": "row_groups:64",
        "to_vector.weight": "auto",
    }
    assert chosen(model, include=["blocks"]) == {  # a module above them: the default rule inside it
        "blocks.dense.weight": "auto",
        "blocks.grouped.weight": "row_groups:4",
        "blocks.tgrouped.weight": "row_groups:2",
    }
    assert chosen(model, include=["blocks.depthwise"], layouts={"blocks.depthwise": "auto"}) == {
        "blocks.depthwise.weight": "auto"
    }


class WordLM(nn.Module):
    """pytorch/examples' word_language_model: the decoder maps onto the embedding's vocabulary."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 16)
        self.decoder = nn.Linear(16, 50)
        if tied:
            self.decoder.weight = self.encoder.weight


def test_the_output_layer_is_left_out_and_include_brings_it_back():
    model = WordLM()
    assert set(chosen(model)) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    why = survey(model)[id(model.decoder.weight)].reason
    assert why == "output layer (a decoder onto the vocabulary of embedding 'encoder')"
    assert chosen(model, include=["decoder"]) == {"decoder.weight": "auto"}
    assert chosen(model, include=["rnn", "decoder"])["decoder.weight"] == "auto"
    assert set(chosen(WordLM(tied=True))) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}


@pytest.mark.parametrize(
    "exclude",
    [("rnn.weight_hh_l0",), ["rnn.weight_hh_l0"], {"rnn.weight_hh_l0"}, (n for n in ["rnn.weight_hh_l0"])],
    ids=["tuple", "list", "set", "generator"],
)
def test_exclude_takes_any_iterable_of_strings(exclude):
    assert set(chosen(WordLM(), exclude=exclude)) == {"rnn.weight_ih_l0"}


def test_exclude_takes_a_tuple_inside_its_list():
    """timm's pretrained_cfg['classifier'] is a tuple for a model with two heads."""
    model = nn.Sequential(OrderedDict(body=nn.Linear(8, 8), head=nn.Linear(8, 3), head_dist=nn.Linear(8, 3)))
    assert set(chosen(model, exclude=[("head", "head_dist")])) == {"body.weight"}
    with pytest.raises(TypeError, match="exclude must be a string or an iterable of strings"):
        chosen(model, exclude=[("head", 3)])


class Positions(nn.Module):
    """A ConViT-like attention: its positional projection, a Fourier-like positional module."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(3, 4)
        self.proj = nn.Linear(8, 8)
        self.encoding = Fourier()
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))


class Fourier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(32, 8, 1)


def test_positional_modules_by_name_and_by_registration():
    model = Positions()
    assert set(chosen(model)) == {"proj.weight", "encoding.token_projection.weight"}
    registry.register_positional(Fourier)
    try:
        assert set(chosen(model)) == {"proj.weight"}
        why = survey(model)[id(model.encoding.token_projection.weight)].reason
        assert why == "encodes positions (registered positional module Fourier)"
    finally:
        registry._POSITIONAL.pop(registry.qualified(Fourier))
    assert survey(model)[id(model.pos_proj.weight)].reason == "encodes positions (its name says positional)"
    assert chosen(model, include=["cpb_mlp.0"]) == {"cpb_mlp.0.weight": "auto"}


def test_parametrized_weights_are_left_out_and_said_so():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(8, 8)),
        parametrizations.orthogonal(nn.Linear(8, 8)),
        nn.utils.spectral_norm(nn.Linear(8, 8)),  # the old hook: weight_orig
        nn.Linear(8, 8),
    )
    assert set(chosen(model)) == {"3.weight"}
    reasons = {n: survey(model)[id(p)].reason for n, p in model.named_parameters() if p.dim() >= 2}
    assert reasons["0.parametrizations.weight.original1"] == (
        "parametrized: 'weight' under torch.nn.utils.parametrize (_WeightNorm)"
    )
    assert reasons["1.parametrizations.weight.original"].endswith("(_Orthogonal)")
    assert reasons["2.weight_orig"] == "parametrized: 'weight' under torch.nn.utils.SpectralNorm hook"


# -- the registry --------------------------------------------------------------------------------------
class Fused(nn.Module):
    """A user's attention: rows of qkv run head by head through q (4), k (4) and v (8)."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(16, heads * 16)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (self.heads, 16)).transpose(-3, -2).split([4, 4, 8], dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class SameForward(Fused):
    pass


class OwnForward(Fused):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.fixture
def fused_registered():
    registry.register_layout(Fused, "qkv.weight", lambda m: f"row_blocks:{m.heads}x(4,4,8)" if m.heads > 1 else None)
    yield
    registry._LAYOUTS.pop(registry.qualified(Fused))


def test_a_registered_layout_is_read_off_the_module_and_checked_against_its_forward(fused_registered):
    from orthoopt import probe

    model = nn.Sequential(Fused(), SameForward(), OwnForward(), Fused(heads=1))
    got = chosen(model)
    assert got["0.qkv.weight"] == got["1.qkv.weight"] == "row_blocks:2x(4,4,8)"  # a subclass keeping forward
    assert got["2.qkv.weight"] == "auto"  # another forward: not the base's entry
    assert got["3.qkv.weight"] == "auto"  # a configuration the rule does not know
    assert survey(model)[id(model[3].qkv.weight)].flags == ("fused projection kept 'auto'",)
    assert survey(model)[id(model[2].qkv.weight)].flags == ("fused name kept 'auto'",)
    x = torch.randn(2, 3, 16)
    blocks = probe.feature_blocks(model[0], lambda m: m(x))
    assert probe.disagreements(model[0], {"qkv.weight": got["0.qkv.weight"]}, blocks) == {}
    assert set(probe.disagreements(model[0], {"qkv.weight": "row_groups:2"}, blocks)) == {"qkv.weight"}


def test_a_registration_is_checked_when_it_is_made():
    with pytest.raises(ValueError, match=r"register_layout\('.*Fused', 'qkv.weight'\): unknown layout 'rows:3'"):
        registry.register_layout(Fused, "qkv.weight", "rows:3")
    with pytest.raises(TypeError, match="owner must be a module class or its qualified name"):
        registry.register_layout("Fused", "qkv.weight", "auto")
    with pytest.raises(TypeError, match="path must name a parameter"):
        registry.register_layout(Fused, "", "auto")
    with pytest.raises(TypeError, match="a layout string or a function of the module"):
        registry.register_layout(Fused, "qkv.weight", 3)
    assert registry.qualified(Fused) not in registry._LAYOUTS


@pytest.mark.parametrize(
    "name, positional",
    [
        ("pos_embed", True),
        ("pos_embd", True),
        ("pos_proj", True),
        ("rel_pos", True),
        ("shared_rel_pos", True),
        ("cpb_mlp", True),
        ("pos_conv_embed", True),
        ("continuous_position_bias_mlp", True),
        ("pos_ff", False),  # Transformer-XL's position-wise feed-forward layer
        ("position_wise_ffn", False),
        ("post_proj", False),
        ("pos", False),
    ],
)
def test_which_names_say_positional(name, positional):
    model = nn.Sequential(OrderedDict([(name, nn.Linear(8, 8)), ("body", nn.Linear(8, 8))]))
    assert (f"{name}.weight" in chosen(model)) is not positional


def _block_errors(w: torch.Tensor) -> list[float]:
    """Orthogonality errors of q, k and v of Fused(heads=2), read off the weight's rows directly."""
    q, k, v = [0, 1, 2, 3, 16, 17, 18, 19], [4, 5, 6, 7, 20, 21, 22, 23], [*range(8, 16), *range(24, 32)]
    errors = []
    for rows in (q, k, v):
        block = w.detach().double()[rows]  # (8 or 16, 16): not taller than wide, its rows orthonormal
        errors.append((block @ block.T - torch.eye(len(rows), dtype=torch.float64)).abs().max().item())
    return errors


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_registered_composite_layout_end_to_end(fused_registered, mode):
    """project_, the soft and the hard step and the errors work on each block of the per-head
    interleaved rows (the pieces), as the forward uses them."""
    torch.manual_seed(0)
    model = Fused()
    assert max(_block_errors(model.qkv.weight)) > 0.3
    orthoopt.project_(model)
    assert max(_block_errors(model.qkv.weight)) < 1e-5
    with torch.no_grad():
        model.qkv.weight.add_(0.05 * torch.randn_like(model.qkv.weight))
    start = _block_errors(model.qkv.weight)
    groups = orthoopt.param_groups(model, ortho=1.0, ortho_mode=mode, ortho_init="warn")
    opt = orthoopt.OrthoSGD(groups, lr=0.05)
    x = torch.randn(4, 3, 16)
    for _ in range(30):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    errors = _block_errors(model.qkv.weight)
    assert opt.orthogonality_errors()["qkv.weight"] == pytest.approx(max(errors), abs=1e-6)
    if mode == "hard":  # projected at the first hard step, then kept on the manifold
        assert max(errors) < 1e-5
    else:  # the decoupled step pulls every block back
        assert max(errors) < 0.2 * min(start)
