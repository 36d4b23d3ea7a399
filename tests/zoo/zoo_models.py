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
    it, how to run its forward, and the names of its output layers."""

    key: str
    config: str
    sizes: dict[str, Any]
    model: str
    inputs: str = "tokens"  # tokens, pixels, audio, seq2seq, speech2seq
    outputs: tuple[str, ...] = ("lm_head",)  # the output layers: the labels' or the vocabulary's


HF_MODELS = [
    HF("bert", "BertConfig", DECODER | dict(num_labels=3), "BertForSequenceClassification", outputs=("classifier",)),
    HF(
        "roberta",
        "RobertaConfig",
        DECODER | dict(num_labels=3),
        "RobertaForSequenceClassification",
        outputs=("classifier.out_proj",),
    ),
    HF(
        "distilbert",
        "DistilBertConfig",
        dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=48),
        "DistilBertForMaskedLM",
        outputs=("vocab_projector",),
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
        outputs=("lm_head",),
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
        outputs=("lm_head",),
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
        outputs=("classifier",),
    ),
    HF(
        "swin",
        "SwinConfig",
        dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4, num_labels=5),
        "SwinForImageClassification",
        "pixels",
        outputs=("classifier",),
    ),
    HF(
        "swinv2",
        "Swinv2Config",
        dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4, num_labels=5),
        "Swinv2ForImageClassification",
        "pixels",
        outputs=("classifier",),
    ),
    HF(
        "convnext",
        "ConvNextConfig",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32),
        "ConvNextForImageClassification",
        "pixels",
        outputs=("classifier",),
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
        outputs=(),
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
        outputs=("proj_out",),
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


# -- timm -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timm:
    """A timm model at a small size: ``timm.create_model(name, pretrained=False, **kwargs)`` on
    images of ``size`` pixels."""

    name: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)


TIMM_MODELS = [
    # ViT-like
    Timm("vit_tiny_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2)),
    Timm("deit_tiny_distilled_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2)),  # two heads
    Timm("test_vit3", 160),  # a latent attention pool: its kv holds k and v
    Timm("test_vit_relpos", 160),  # rel_pos.mlp, a positional MLP
    Timm("vit_base_patch16_xp_224", 32, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    Timm("vit_dpwee_patch16_reg1_gap_256", 32, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    Timm("vit_dwee_patch16_reg1_gap_256", 32, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    Timm("beit_base_patch16_224", 32, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    Timm(
        "samvit_base_patch16",
        64,
        dict(img_size=64, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4),
    ),
    Timm("convit_tiny", 32, dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2)),  # GPSA, pos_proj
    Timm("cait_xxs24_224", 32, dict(img_size=32, patch_size=8, depth=2)),
    Timm("eva02_tiny_patch14_224", 56, dict(img_size=56, depth=2)),  # SwiGLU fc1, chunked
    Timm("eva02_tiny_patch14_224", 56, dict(img_size=56, depth=2, attn_type="rope")),
    Timm("xcit_nano_12_p16_224", 64, dict(img_size=64, depth=2)),  # XCA, Fourier positions
    Timm("crossvit_tiny_240", 240),
    Timm("tnt_s_patch16_224", 64, dict(img_size=64, depth=2)),
    Timm(
        "swin_tiny_patch4_window7_224",
        64,
        dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    ),
    Timm(
        "swinv2_tiny_window8_256",
        64,
        dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    ),  # cpb_mlp
    Timm(
        "swinv2_cr_tiny_224",
        64,
        dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    ),  # meta_mlp
    Timm("mixer_s32_224", 64, dict(img_size=64)),
    Timm("levit_128s", 64, dict(img_size=64)),  # qkv and kv: (heads, [key_dim, key_dim, val_dim])
    Timm("efficientformer_l1", 224),  # qkv: (heads, [key_dim, key_dim, val_dim])
    Timm("tiny_vit_5m_224", 224),
    Timm("hiera_tiny_224", 64, dict(img_size=(64, 64), embed_dim=32, num_heads=1, stages=(1, 1, 1, 1))),
    Timm("sam2_hiera_tiny", 64, dict(embed_dim=32, num_heads=1)),
    Timm("davit_tiny", 64, dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))),
    Timm("mvitv2_tiny", 64, dict(img_size=64)),
    Timm("nest_tiny", 64, dict(img_size=64)),
    Timm("coat_lite_tiny", 64, dict(img_size=64)),
    Timm("caformer_s18", 64),
    Timm("visformer_tiny", 64, dict(img_size=64)),
    # convolutions: depthwise, per-channel scales, groups
    Timm("resnet18", 32),
    Timm("convnext_atto", 64),
    Timm("efficientnet_b0", 64),
    Timm("mobilenetv3_small_050", 64),
    Timm("mobilenetv2_050", 64),
    Timm("ghostnet_050", 64),
    Timm("repvit_m0_9", 64),
    Timm("mobileone_s0", 64),  # conv_scale (C, 1, 1, 1)
    Timm("fastvit_t8", 64),
    Timm("fastvit_mci0", 64),
    Timm("lcnetv2_small", 64),
    Timm("regnetx_002", 64),
    Timm("regnety_002", 64),
    Timm("dpn48b", 64),
    Timm("resnest14d", 64),
    Timm("seresnext26t_32x4d", 64, dict(layers=(1, 1, 1, 1))),
    Timm("edgenext_xx_small", 64),  # pos_embd.token_projection
    # attention with fused projections of unequal blocks or interleaved heads
    Timm("efficientvit_m0", 64),  # one qkv conv per head: [key_dim, key_dim, val_dim]
    Timm("efficientvit_b0", 64),  # LiteMLA: (heads, 3 * dim)
    Timm("shvit_s1", 64),
    Timm("test_maxvit", 160),  # head_first attention: q, k, v per head
    Timm("test_coatnet", 160),
    Timm("mobilevitv2_050", 64),  # the context-score query: one free row
    Timm("focalnet_tiny_srf", 64),  # q, ctx, free gates
    Timm("botnet26t_256", 64, dict(img_size=64)),
    Timm("halonet26t", 256),
    Timm("lambda_resnet26t", 64, dict(img_size=64)),
    Timm("cpubone_nano", 64),
    Timm("lowformer_b0", 64),
    Timm("test_mambaout", 64),  # fc1: gate | (identity, conv)
    Timm("efficientvim_m1", 64),
    Timm("iformer_t", 64),
    # k and v only
    Timm("pvt_v2_b0", 64),
    Timm("twins_svt_small", 64, dict(depths=(2, 2, 2, 2))),  # local and global (k, v) attention in turn
    Timm("volo_d1_224", 64, dict(img_size=64)),
    Timm("gcvit_xxtiny", 64, dict(img_size=64)),
    Timm("csatv2", 64),  # nn.Linear(1, 3) qkv: single vectors
]


def build_timm(spec: Timm) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
