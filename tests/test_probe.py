"""The forward probe: which output features of a layer its forward uses apart, and whether a layout agrees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoopt import probe


class Attention(nn.Module):
    """A fused q/k/v projection: rows (3, heads, head_dim), or per head (heads, 3, head_dim)."""

    def __init__(self, dim=8, heads=2, head_first=False, manual=False, gated=False):
        super().__init__()
        self.heads, self.head_first, self.manual = heads, head_first, manual
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, 4 * dim) if gated else None

    def forward(self, x):
        b, n, c = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(b, n, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.manual:
            attn = (q @ k.transpose(-2, -1) * 100).softmax(-1)  # saturated: one-hot rows
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        if self.mlp is not None:
            a, g = self.mlp(x).chunk(2, dim=-1)
            x = x + (a * F.relu(g)).sum(-1, keepdim=True)
        return x


def _blocks(model, x, name):
    return sorted(sorted(b) for b in probe.feature_blocks(model, lambda m: m(x))[name])


def test_a_fused_projection_splits_into_q_k_v():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = nn.Sequential(Attention(), Attention())  # the second block's q reaches the first only through x
    assert _blocks(model, x, "0.qkv.weight") == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert _blocks(model, x, "1.qkv.weight") == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert _blocks(model, x, "0.proj.weight") == [list(range(8))]  # used whole


def test_per_head_rows_and_a_manual_saturated_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = Attention(head_first=True, manual=True)
    q = [0, 1, 2, 3] + [12, 13, 14, 15]  # heads of 12 rows: [q(4), k(4), v(4)] each
    k = [r + 4 for r in q]
    v = [r + 8 for r in q]
    assert _blocks(model, x, "qkv.weight") == sorted([q, k, v])


def test_a_gated_product_splits_its_layer_in_two():
    """a * relu(g) of the two halves of one layer; relu's dead units and the x * scalar products do not split."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = Attention(gated=True)
    with torch.no_grad():
        model.mlp.bias[20:24] = -1e3  # these units of g are dead for every input
    assert _blocks(model, x, "mlp.weight") == [list(range(16)), list(range(16, 32))]


class UncalledWeight(nn.Module):
    """timm's Beit and Swin V2: F.linear(x, self.qkv.weight, bias) without calling the layer."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 18, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros(6), self.q_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_a_weight_used_without_its_layer():
    torch.manual_seed(0)
    blocks = _blocks(UncalledWeight(), torch.randn(2, 4, 6), "qkv.weight")
    assert blocks == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]


class Channels(nn.Module):
    """A depthwise conv between a layer and the split keeps its channels apart (the probe does not
    cut there); a grouped conv splits by its groups; an in-place activation on a layer's output is
    no error; a slice of a layer's output into another layer says nothing of the first."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv1d(4, 12, 1)
        self.dw = nn.Conv1d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv1d(12, 12, 1, groups=6)
        self.pre = nn.Conv1d(4, 8, 1)
        self.qkv = nn.Conv1d(4, 12, 1)

    def forward(self, x):
        q, k, v = self.dw(F.relu(self.pw(x), inplace=True)).chunk(3, dim=1)
        a = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)
        q, k, v = self.grouped(self.dw(self.pw(x))).chunk(3, dim=1)
        b = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)
        q, k, v = self.qkv(self.pre(x)[:, :4]).chunk(3, dim=1)  # pre's first 4 channels feed an attention
        return a + b + F.scaled_dot_product_attention(q.mT, k.mT, v.mT)


def test_depthwise_convs_keep_channels_apart_grouped_convs_split_and_layers_cut():
    torch.manual_seed(0)
    blocks = probe.feature_blocks(Channels(), lambda m: m(torch.randn(2, 4, 7)))
    thirds = [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]
    assert sorted(sorted(b) for b in blocks["pw.weight"]) == thirds  # through dw, not through grouped
    assert sorted(sorted(b) for b in blocks["grouped.weight"]) == [list(range(i, i + 2)) for i in range(0, 12, 2)]
    assert sorted(sorted(b) for b in blocks["qkv.weight"]) == thirds
    assert sorted(sorted(b) for b in blocks["pre.weight"]) == [list(range(8))]  # the qkv layer is a cut


def test_a_softmax_saturated_in_one_head_does_not_split_the_heads():
    """softmax(q k^T) of a saturated head has a zero gradient; the probe passes gradients through it."""

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            scale = torch.tensor([1e4, 1e-2]).view(1, 2, 1, 1)  # head 0 saturates, head 1 does not
            return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v

    torch.manual_seed(0)
    blocks = _blocks(TwoScales(), torch.randn(2, 5, 8), "qkv.weight")
    assert blocks == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_the_model_comes_back_in_its_mode_and_with_its_grad_flags():
    model = Attention()
    model.train()
    model.qkv.weight.requires_grad_(False)
    probe.feature_blocks(model, lambda m: m(torch.randn(1, 3, 8)))
    assert model.training and not model.qkv.weight.requires_grad and model.proj.weight.requires_grad
    assert model.qkv.weight.grad is None


@pytest.mark.parametrize(
    "spec, agrees",
    [
        ("row_groups:3", True),
        ("auto", False),  # one matrix over q, k and v
        ("row_groups:2", False),
        ("row_blocks:8,8,8", True),
        ("row_blocks:8,16", False),
        ("row_blocks:8,8,~8", True),  # v free: the forward's other block
        ("row_blocks:4,4,~16", False),  # q split in two
        ("row_blocks:2x(4,4,4)", False),  # per head: not this forward's rows
    ],
)
def test_agreement_of_layouts_with_the_forward(spec, agrees):
    forward = frozenset(frozenset(range(i, i + 8)) for i in (0, 8, 16))
    assert probe.agrees(spec, (24, 8), 0, forward) is agrees


def test_disagreements_name_the_weight():
    torch.manual_seed(0)
    model = Attention()
    blocks = probe.feature_blocks(model, lambda m: m(torch.randn(2, 5, 8)))
    assert probe.disagreements(model, {"qkv.weight": "row_groups:3", "proj.weight": "auto"}, blocks) == {}
    found = probe.disagreements(model, {"qkv.weight": "auto"}, blocks)
    assert list(found) == ["qkv.weight"] and found["qkv.weight"][0] == "auto"


def test_the_blocks_of_a_layout_along_the_output_axis():
    """GPT-2's Conv1D holds its weight as (in, out): its output features run along dim 1."""
    thirds = frozenset(frozenset(range(i, i + 4)) for i in (0, 4, 8))
    assert probe.layout_blocks("column_groups:3", (4, 12), 1) == (thirds, frozenset())
    assert probe.layout_blocks("row_blocks:4,~4,4", (12, 3), 0) == (
        frozenset({frozenset(range(4)), frozenset(range(8, 12))}),
        frozenset(range(4, 8)),
    )


def test_a_tied_decoder_is_read_at_its_output_not_through_the_embedding_lookup():
    """The decoder's weight is the embedding's: the rows the input's tokens look up feed q, k and v,
    which says nothing of how the decoder's output is used."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.attn = Attention()
            self.decoder = nn.Linear(8, 20, bias=False)
            self.decoder.weight = self.emb.weight

        def forward(self, tokens):
            return self.decoder(self.attn(self.emb(tokens)))

    tokens = torch.tensor([[1, 2, 3], [3, 4, 5]])
    blocks = probe.feature_blocks(TiedLM(), lambda m: m(tokens))
    assert blocks["decoder.weight"] == frozenset({frozenset(range(20))})
