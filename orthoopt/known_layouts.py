"""The registered layouts of timm's and transformers' fused projections, and their positional modules.

Each entry names the class that owns the weight by its qualified name (nothing is imported
here) and reads the layout off the configuration its forward uses; a configuration the
forward would split otherwise gives None (the weight keeps ``"auto"`` and is flagged).
tests/zoo checks every entry against its module's forward (:mod:`orthoopt.probe`).
"""

from __future__ import annotations

from torch import nn

from .heads import output_features
from .registry import register_layout, register_positional

__all__ = ["blocks"]


def _rows(layer: nn.Module) -> int:
    """The output features of a Linear, Conv or Conv1D layer."""
    if (rows := output_features(layer)) is None:
        raise TypeError(f"{type(layer).__name__} is not a layer with output features")
    return rows


def blocks(sizes: list[int], heads: int = 1, rows: int | None = None) -> str | None:
    """The layout of rows that run ``heads`` times through blocks of ``sizes`` rows: ``row_groups``
    where the blocks are equal and consecutive (one stack), else ``row_blocks``; None where
    they do not add up to ``rows``."""
    if rows is not None and heads * sum(sizes) != rows:
        return None
    if heads == 1 and len(set(sizes)) == 1:
        return f"row_groups:{len(sizes)}" if len(sizes) > 1 else "auto"
    inner = ",".join(map(str, sizes))
    return f"row_blocks:{heads}x({inner})" if heads > 1 else f"row_blocks:{inner}"


def _same(n: int, layer: str) -> callable:
    """``n`` equal consecutive blocks of the rows of the owner's ``layer``."""

    def rule(m: nn.Module) -> str | None:
        rows = _rows(m.get_submodule(layer))
        return f"row_groups:{n}" if rows % n == 0 else None

    return rule


# -- transformers ------------------------------------------------------------------------------------
_HF = "transformers.models."


def _gpt2(m: nn.Module) -> str | None:
    # c_attn(x).split(split_size, dim=2): q, k, v (k, v for cross attention) by columns of the (in, out) Conv1D
    parts = 2 if m.is_cross_attention else 3
    return f"column_groups:{parts}" if m.c_attn.nf == parts * m.split_size else None


def _bigcode(m: nn.Module) -> str | None:
    if m.is_cross_attention:
        return None
    if m.multi_query:  # split((embed_dim, kv_dim, kv_dim))
        return blocks([m.embed_dim, m.kv_dim, m.kv_dim], rows=m.c_attn.out_features)
    return blocks([m.head_dim] * 3, m.num_heads, m.c_attn.out_features)  # view(heads, 3 * head_dim).split


def _falcon(m: nn.Module) -> str | None:
    rows = m.query_key_value.out_features
    if m.new_decoder_architecture:  # (kv_heads, queries of the group + 2, head_dim)
        group = m.num_heads // m.num_kv_heads
        return blocks([group * m.head_dim, m.head_dim, m.head_dim], m.num_kv_heads, rows)
    if m.multi_query:  # split([num_heads, 1, 1]) of (.., heads + 2, head_dim)
        return blocks([m.num_heads * m.head_dim, m.head_dim, m.head_dim], rows=rows)
    return blocks([m.head_dim] * 3, m.num_heads, rows)  # (heads, 3, head_dim)


def _phi3(m: nn.Module) -> str | None:
    q, kv = m.config.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    return blocks([q, kv, kv], rows=m.qkv_proj.out_features)  # qkv[..., :q], [q:q+kv], [q+kv:]


def _codegen(m: nn.Module) -> str | None:
    local = m.embed_dim // m.mp_num  # view(.., mp_num, 3 * local).split(local): q, v, k per chunk
    return blocks([local] * 3, m.mp_num, m.qkv_proj.out_features)


register_layout(_HF + "gpt2.modeling_gpt2.GPT2Attention", "c_attn.weight", _gpt2)
register_layout(_HF + "gpt_bigcode.modeling_gpt_bigcode.GPTBigCodeAttention", "c_attn.weight", _bigcode)
register_layout(
    _HF + "gpt_neox.modeling_gpt_neox.GPTNeoXAttention",
    "query_key_value.weight",
    lambda m: blocks([m.head_size] * 3, m.config.num_attention_heads, m.query_key_value.out_features),
)
register_layout(_HF + "falcon.modeling_falcon.FalconAttention", "query_key_value.weight", _falcon)
register_layout(
    _HF + "bloom.modeling_bloom.BloomAttention",
    "query_key_value.weight",
    lambda m: blocks([m.head_dim] * 3, m.num_heads, m.query_key_value.out_features),  # (heads, 3, head_dim)
)
register_layout(_HF + "phi3.modeling_phi3.Phi3Attention", "qkv_proj.weight", _phi3)
register_layout(_HF + "phi3.modeling_phi3.Phi3MLP", "gate_up_proj.weight", _same(2, "gate_up_proj"))  # chunk(2)
register_layout(_HF + "codegen.modeling_codegen.CodeGenAttention", "qkv_proj.weight", _codegen)
register_layout(_HF + "mpt.modeling_mpt.MptAttention", "Wqkv.weight", _same(3, "Wqkv"))  # chunk(3, dim=2)


# -- timm ----------------------------------------------------------------------------------------------
_T = "timm.models."
_L = "timm.layers."


def _per_head(layer: str, sizes: callable, heads: str = "num_heads") -> callable:
    """Rows laid out head by head, each head running through blocks of ``sizes(owner)`` rows."""

    def rule(m: nn.Module) -> str | None:
        return blocks(sizes(m), getattr(m, heads), _rows(m.get_submodule(layer)))

    return rule


def _maxxvit(layer: str = "qkv") -> callable:
    def rule(m: nn.Module) -> str | None:
        rows = _rows(m.get_submodule(layer))
        if m.head_first:  # view(.., heads, 3 * dim_head).chunk(3): q, k, v per head
            return blocks([m.dim_head] * 3, m.num_heads, rows)
        return blocks([m.num_heads * m.dim_head] * 3, rows=rows)  # reshape(.., 3, heads, dim_head)

    return rule


def _gcvit(m: nn.Module) -> str | None:
    # with a global query the qkv layer holds k and v only: reshape(B, N, 2, heads, head_dim)
    parts = 2 if m.use_global else 3
    return blocks([m.num_heads * m.head_dim] * parts, rows=m.qkv.out_features)


# attentions that reshape their qkv output as (3, heads, head_dim): q, k, v in three equal blocks
for _owner in (
    _L + "attention.Attention",
    _L + "attention.AttentionRope",
    _T + "cait.TalkingHeadAttn",
    _T + "coat.FactorAttnConvRelPosEnc",
    _T + "convit.MHSA",
    _T + "davit.ChannelAttention",
    _T + "davit.WindowAttention",
    _T + "edgenext.CrossCovarianceAttn",
    _T + "eva.EvaAttention",
    _T + "fastvit.Attention",
    _T + "hiera.MaskUnitAttention",
    _T + "metaformer.Attention",
    _T + "mvitv2.MultiScaleAttention",
    _T + "nest.Attention",
    _T + "csatv2.SpatialTransformerBlock",
    _T + "twins.LocallyGroupedAttn",
    _T + "visformer.Attention",
    _T + "volo.Attention",
    _T + "xcit.XCA",
    _T + "vision_transformer_relpos.RelPosAttention",
    _T + "vision_transformer_sam.Attention",
    _T + "swin_transformer.WindowAttention",
    _T + "swin_transformer_v2.WindowAttention",
    _T + "swin_transformer_v2_cr.WindowMultiHeadAttention",
    _T + "hieradet_sam2.MultiScaleAttention",
    _T + "beit.Attention",
):
    register_layout(_owner, "qkv.weight", _same(3, "qkv"))
# k and v only (q from another layer): reshape(B, N, 2, heads, head_dim)
for _owner in (_T + "twins.GlobalSubSampleAttn", _T + "volo.ClassAttention", _L + "attention_pool.AttentionPoolLatent"):
    register_layout(_owner, "kv.weight", _same(2, "kv"))
register_layout(_T + "tnt.Attention", "qk.weight", _same(2, "qk"))
register_layout(_T + "tiny_vit.Attention", "qkv.weight", _per_head("qkv", lambda m: [m.key_dim, m.key_dim, m.val_dim]))
register_layout(
    _T + "shvit.SHSA",
    "qkv.c.weight",
    lambda m: blocks([m.qk_dim, m.qk_dim, m.pdim], rows=m.qkv.c.out_channels),  # split([qk, qk, pdim])
)
register_layout(
    _L + "diff_attention.DiffAttention",
    "qkv.weight",
    # chunk(3); q and k as (2 heads, head_dim) pairs: q1 = the even heads, q2 the odd; v whole
    lambda m: (
        f"row_blocks:{m.num_heads}x({m.head_dim},{m.head_dim})+{m.num_heads}x({m.head_dim},{m.head_dim})"
        f"+{2 * m.num_heads * m.head_dim}"
        if m.qkv.out_features == 6 * m.num_heads * m.head_dim
        else None
    ),
)
register_layout(
    _T + "vision_transformer.DiffParallelScalingBlock",
    "in_proj.weight",
    # split([mlp hidden, dim, dim, dim]); q and k as (2 heads, head_dim) pairs: q1 = the even heads, q2 the odd
    lambda m: (
        f"row_blocks:{m.in_split[0]}+{m.num_heads}x({m.head_dim},{m.head_dim})"
        f"+{m.num_heads}x({m.head_dim},{m.head_dim})+{m.in_split[3]}"
        if m.in_split[1] == 2 * m.num_heads * m.head_dim and sum(m.in_split) == m.in_proj.out_features
        else None
    ),
)
register_layout(
    _T + "vision_transformer.ParallelScalingBlock",
    "in_proj.weight",
    lambda m: blocks(list(m.in_split), rows=m.in_proj.out_features),  # split([mlp hidden, dim, dim, dim])
)
register_layout(_T + "convit.GPSA", "qk.weight", _same(2, "qk"))  # reshape(B, N, 2, heads, head_dim)
register_layout(_T + "pvt_v2.Attention", "kv.weight", _same(2, "kv"))  # k, v
register_layout(_T + "gcvit.WindowAttentionGlobal", "qkv.weight", _gcvit)
register_layout(_T + "maxxvit.Attention2d", "qkv.weight", _maxxvit())
register_layout(_T + "maxxvit.AttentionCl", "qkv.weight", _maxxvit())
register_layout(
    _L + "bottleneck_attn.BottleneckAttn",
    "qkv.weight",
    lambda m: blocks([m.dim_out_qk, m.dim_out_qk, m.dim_out_v], rows=m.qkv.out_channels),  # split(dim=1)
)
register_layout(
    _L + "halo_attn.HaloAttn",
    "kv.weight",
    _per_head("kv", lambda m: [m.dim_head_qk, m.dim_head_v]),  # (heads, dim_head_qk + dim_head_v) split
)
register_layout(
    _L + "lambda_layer.LambdaLayer",
    "qkv.weight",
    lambda m: blocks([m.num_heads * m.dim_qk, m.dim_qk, m.dim_v], rows=m.qkv.out_channels),
)
# the (heads, [key_dim, key_dim, val_dim]) split of EfficientFormer's and LeViT's attention
_KQV = _per_head("qkv", lambda m: [m.key_dim, m.key_dim, m.val_dim])
register_layout(_T + "efficientformer.Attention", "qkv.weight", _KQV)
register_layout(
    _T + "levit.Attention", "qkv.linear.weight", _per_head("qkv.linear", lambda m: [m.key_dim, m.key_dim, m.val_dim])
)
register_layout(
    _T + "levit.AttentionDownsample", "kv.linear.weight", _per_head("kv.linear", lambda m: [m.key_dim, m.val_dim])
)
register_layout(
    _T + "efficientvit_msra.CascadedGroupAttention",
    "qkvs.*.conv.weight",
    lambda m: blocks([m.key_dim, m.key_dim, m.val_dim], rows=m.qkvs[0].conv.out_channels),  # per head its own conv
)
register_layout(
    _T + "efficientvit_mit.LiteMLA",
    "qkv.conv.weight",
    lambda m: blocks([m.dim] * 3, m.qkv.conv.out_channels // (3 * m.dim), m.qkv.conv.out_channels),
)
for _owner in (_T + "cpubone.ConvAttention", _T + "lowformer.ConvAttention"):
    # reshape(N, heads, num_keys * head_dim, hw).chunk(3): q, k, v per head
    register_layout(_owner, "pwise.weight", _per_head("pwise", lambda m: [m.head_dim] * m.num_keys))
register_layout(
    _T + "mobilevit.LinearSelfAttention",
    "qkv_proj.weight",
    # split([1, embed_dim, embed_dim]): the context-score query is one vector, left free
    lambda m: f"row_blocks:~1,{m.embed_dim},{m.embed_dim}" if m.qkv_proj.out_channels == 1 + 2 * m.embed_dim else None,
)
register_layout(
    _T + "focalnet.FocalModulation",
    "f.weight",
    # split([dim, dim, focal_level + 1]): q, the context, and one gate per level (single vectors, free)
    lambda m: f"row_blocks:{m.input_split[0]},{m.input_split[1]},~{m.input_split[2]}",
)
# gated MLPs: x1, x2 = fc1(x).chunk(2); x1 * act(x2)
register_layout(_L + "mlp.GluMlp", "fc1.weight", _same(2, "fc1"))
register_layout(_T + "mambaout.GatedConvBlock", "fc1.weight", _same(2, "fc1"))  # g | (i, c): split(hidden, ...)
register_layout(_T + "iformer.SHMA", "v_gate.c.weight", _same(2, "v_gate.c"))
register_layout(_T + "efficientvim.HSMSSD", "hz_proj.conv.weight", _same(2, "hz_proj.conv"))  # h * act(z)
register_layout(_T + "efficientvim.HSMSSD", "BCdt_proj.conv.weight", _same(3, "BCdt_proj.conv"))  # b, c, dt

# positional encodings built from layers
register_positional(_T + "convit.GPSA", "pos_proj")
register_positional(_T + "swin_transformer_v2.WindowAttention", "cpb_mlp")
register_positional(_T + "swin_transformer_v2_cr.WindowMultiHeadAttention", "meta_mlp")
register_positional(_L + "pos_embed_rel.RelPosMlp")
register_positional(_T + "edgenext.PositionalEncodingFourier")
register_positional(_T + "xcit.PositionalEncodingFourier")
