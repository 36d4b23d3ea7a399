"""The zoo: small configurations of timm and transformers models, built without downloads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# -- transformers -----------------------------------------------------------------------------------
DECODER = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


@dataclass(frozen=True)
class HF:
    """A transformers model: its config class, the config's small sizes, the class that builds
    it, and how to run its forward."""

    key: str
    config: str
    sizes: dict[str, Any]
    model: str
    inputs: str = "tokens"  # tokens, pixels, audio, seq2seq, speech2seq
    extra: dict[str, Any] = field(default_factory=dict)


HF_MODELS = [
    HF("bert", "BertConfig", DECODER | dict(num_labels=3), "BertForSequenceClassification"),
    HF("roberta", "RobertaConfig", DECODER | dict(num_labels=3), "RobertaForSequenceClassification"),
    HF(
        "distilbert",
        "DistilBertConfig",
        dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=48),
        "DistilBertForMaskedLM",
    ),
    HF("gpt2", "GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    HF(
        "gpt_bigcode",
        "GPTBigCodeConfig",
        dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True),
        "GPTBigCodeForCausalLM",
    ),
    HF("gpt_neox", "GPTNeoXConfig", DECODER | dict(rotary_pct=0.5), "GPTNeoXForCausalLM"),
    HF("llama", "LlamaConfig", DECODER | dict(num_key_value_heads=2), "LlamaForCausalLM"),
    HF("mistral", "MistralConfig", DECODER | dict(num_key_value_heads=2), "MistralForCausalLM"),
    HF("qwen2", "Qwen2Config", DECODER | dict(num_key_value_heads=2), "Qwen2ForCausalLM"),
    HF("phi3", "Phi3Config", DECODER | dict(num_key_value_heads=2, pad_token_id=0), "Phi3ForCausalLM"),
    HF("gemma", "GemmaConfig", DECODER | dict(num_key_value_heads=1, head_dim=8), "GemmaForCausalLM"),
    HF(
        "falcon",
        "FalconConfig",
        dict(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        "FalconForCausalLM",
    ),
    HF(
        "falcon_mq",
        "FalconConfig",
        dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True),
        "FalconForCausalLM",
    ),
    HF("bloom", "BloomConfig", dict(vocab_size=96, hidden_size=32, n_layer=2, n_head=4), "BloomForCausalLM"),
    HF(
        "codegen",
        "CodeGenConfig",
        dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
        "CodeGenForCausalLM",
    ),
    HF("mpt", "MptConfig", dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=64), "MptForCausalLM"),
    HF(
        "opt",
        "OPTConfig",
        dict(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
        ),
        "OPTForCausalLM",
    ),
    HF(
        "t5",
        "T5Config",
        dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, tie_word_embeddings=False),
        "T5ForConditionalGeneration",
        "seq2seq",
    ),
    HF(
        "bart",
        "BartConfig",
        dict(
            vocab_size=96,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
        ),
        "BartForConditionalGeneration",
        "seq2seq",
    ),
    HF(
        "vit",
        "ViTConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
            num_labels=5,
        ),
        "ViTForImageClassification",
        "pixels",
    ),
    HF(
        "swin",
        "SwinConfig",
        dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4, num_labels=5),
        "SwinForImageClassification",
        "pixels",
    ),
    HF(
        "swinv2",
        "Swinv2Config",
        dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4, num_labels=5),
        "Swinv2ForImageClassification",
        "pixels",
    ),
    HF(
        "convnext",
        "ConvNextConfig",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32),
        "ConvNextForImageClassification",
        "pixels",
    ),
    HF(
        "clip_vision",
        "CLIPVisionConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        "CLIPVisionModel",
        "pixels",
    ),
    HF(
        "whisper",
        "WhisperConfig",
        dict(
            vocab_size=96,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
        "WhisperForConditionalGeneration",
        "speech2seq",
    ),
    HF(
        "wav2vec2",
        "Wav2Vec2Config",
        dict(
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        "Wav2Vec2ForCTC",
        "audio",
    ),
]


def build_hf(spec: HF) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, spec.config)(**spec.sizes)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, spec.model)(config)


def hf_inputs(spec: HF, model: torch.nn.Module) -> Callable[[torch.nn.Module], Any]:
    """The forward of the model on a small batch."""
    g = torch.Generator().manual_seed(0)
    if spec.inputs == "tokens":
        ids = torch.randint(1, 90, (2, 7), generator=g)
        return lambda m: m(input_ids=ids)
    if spec.inputs == "seq2seq":
        ids = torch.randint(1, 90, (2, 7), generator=g)
        return lambda m: m(input_ids=ids, decoder_input_ids=ids[:, :5])
    if spec.inputs == "pixels":
        x = torch.randn(2, 3, 32, 32, generator=g)
        return lambda m: m(pixel_values=x)
    if spec.inputs == "audio":
        x = torch.randn(2, 400, generator=g)
        return lambda m: m(input_values=x)
    if spec.inputs == "speech2seq":
        x = torch.randn(2, model.config.num_mel_bins, 64, generator=g)
        ids = torch.randint(1, 90, (2, 5), generator=g)
        return lambda m: m(input_features=x, decoder_input_ids=ids)
    raise AssertionError(spec.inputs)
