"""The registered layouts of timm's and transformers' fused projections, and their positional modules.

Each entry names the class that owns the weight by its qualified name (nothing is imported
here) and reads the layout off the configuration its forward uses; a configuration the
forward would split otherwise gives None (the weight keeps ``"auto"`` and is flagged).
tests/zoo checks every entry against its module's forward (:mod:`orthoopt.probe`).
"""

from __future__ import annotations

from torch import nn

from .registry import register_layout

__all__ = ["blocks"]


def _rows(layer: nn.Module) -> int:
    """The output features of a Linear, Conv or Conv1D layer."""
    for attr in ("out_features", "out_channels", "nf"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise TypeError(f"{type(layer).__name__} is not a layer with output features")


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
