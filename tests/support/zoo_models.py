"""Tiny configurations of third-party architectures, for the deferred-init model zoo.

Each entry builds a model from a small config (a few thousand to a few
hundred thousand parameters) and gives an input for its forward. Hugging Face
models come from ``transformers``; torchvision and timm models need those
packages (their entries are skipped where they cannot be imported), and
litgpt's ``GPT`` needs litgpt.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The ``--hf-config`` the command-line estimate tests pass (a Llama with
# grouped-query attention, small enough to estimate in well under a second).
# TINY_DECODER: its sizes, for transformers configs built in Python (Llama, Mixtral).
TINY_DECODER: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
LLAMA_HF_CONFIG: dict[str, Any] = {"model_type": "llama", **TINY_DECODER}

_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Entry:
    """A zoo model: how to build it, the package it needs, and an input for its forward."""

    build: Callable[[], nn.Module]
    needs: str
    inputs: Callable[[], dict[str, Any]]


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.tensor([[1, 5, 7, 2, 9, 4]])}


def _seq2seq() -> dict[str, Any]:
    return {
        "input_ids": torch.tensor([[1, 5, 7, 2]]),
        "decoder_input_ids": torch.tensor([[0, 3, 8]]),
    }


def _pixels(size: int = 32) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(1, 3, size, size, generator=g)}

    return make


def _image(size: int = 32) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        g = torch.Generator().manual_seed(1)
        return {"x": torch.randn(1, 3, size, size, generator=g)}

    return make


def _audio() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(1, 400, generator=g)}


def _features() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_features": torch.randn(1, 16, 40, generator=g),
        "decoder_input_ids": torch.tensor([[1, 2]]),
    }


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, cfg_name)(**cfg)
        model: nn.Module = getattr(transformers, cls_name)(config)
        return model.eval()

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model: nn.Module = getattr(torchvision.models, name)(**kwargs)
        return model.eval()

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
        return model.eval()

    return build


def _litgpt() -> nn.Module:
    from litgpt import GPT, Config

    cfg = Config.from_name(
        "pythia-14m", n_layer=2, n_embd=32, n_head=4, padded_vocab_size=96, block_size=32
    )
    return GPT(cfg).eval()


def _litgpt_inputs() -> dict[str, Any]:
    return {"idx": torch.tensor([[1, 5, 7, 2]])}


_LLAMA_LIKE = dict(**_TEXT, **_HEADS, max_position_embeddings=64)

ZOO: dict[str, Entry] = {
    "llama": Entry(_hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA_LIKE), "transformers", _ids),
    "mistral": Entry(
        _hf("MistralForCausalLM", "MistralConfig", **_LLAMA_LIKE), "transformers", _ids
    ),
    "qwen2": Entry(_hf("Qwen2ForCausalLM", "Qwen2Config", **_LLAMA_LIKE), "transformers", _ids),
    "qwen3": Entry(
        _hf("Qwen3ForCausalLM", "Qwen3Config", **_LLAMA_LIKE, head_dim=8), "transformers", _ids
    ),
    "gemma": Entry(
        _hf("GemmaForCausalLM", "GemmaConfig", **_LLAMA_LIKE, head_dim=8), "transformers", _ids
    ),
    "gemma3": Entry(
        _hf(
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            **_LLAMA_LIKE,
            head_dim=8,
            sliding_window=16,
        ),
        "transformers",
        _ids,
    ),
    "phi3": Entry(
        _hf("Phi3ForCausalLM", "Phi3Config", **_LLAMA_LIKE, pad_token_id=0), "transformers", _ids
    ),
    "mixtral": Entry(
        _hf(
            "MixtralForCausalLM",
            "MixtralConfig",
            **_LLAMA_LIKE,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "transformers",
        _ids,
    ),
    "qwen3_moe": Entry(
        _hf(
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            **_LLAMA_LIKE,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        "transformers",
        _ids,
    ),
    "gpt_neox": Entry(
        _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_TEXT, num_attention_heads=4),
        "transformers",
        _ids,
    ),
    "gpt2": Entry(
        _hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        "transformers",
        _ids,
    ),
    "opt": Entry(
        _hf(
            "OPTForCausalLM",
            "OPTConfig",
            vocab_size=96,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "transformers",
        _ids,
    ),
    "falcon": Entry(
        _hf(
            "FalconForCausalLM",
            "FalconConfig",
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "transformers",
        _ids,
    ),
    "mamba": Entry(
        _hf(
            "MambaForCausalLM",
            "MambaConfig",
            vocab_size=96,
            hidden_size=32,
            state_size=4,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
        ),
        "transformers",
        _ids,
    ),
    "t5": Entry(
        _hf(
            "T5ForConditionalGeneration",
            "T5Config",
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "transformers",
        _seq2seq,
    ),
    "bart": Entry(
        _hf(
            "BartForConditionalGeneration",
            "BartConfig",
            vocab_size=96,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
        "transformers",
        _seq2seq,
    ),
    "bert": Entry(
        _hf(
            "BertForMaskedLM",
            "BertConfig",
            **_TEXT,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "transformers",
        _ids,
    ),
    "roberta": Entry(
        _hf(
            "RobertaForMaskedLM",
            "RobertaConfig",
            **_TEXT,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "transformers",
        _ids,
    ),
    "distilbert": Entry(
        _hf(
            "DistilBertForMaskedLM",
            "DistilBertConfig",
            vocab_size=96,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=64,
        ),
        "transformers",
        _ids,
    ),
    "whisper": Entry(
        _hf(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            vocab_size=96,
            num_mel_bins=16,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=20,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
        "transformers",
        _features,
    ),
    "wav2vec2": Entry(
        _hf(
            "Wav2Vec2ForCTC",
            "Wav2Vec2Config",
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        "transformers",
        _audio,
    ),
    "vit": Entry(
        _hf(
            "ViTForImageClassification",
            "ViTConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=5,
        ),
        "transformers",
        _pixels(32),
    ),
    "modernbert": Entry(
        _hf(
            "ModernBertForMaskedLM",
            "ModernBertConfig",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            cls_token_id=2,
            sep_token_id=1,
            global_attn_every_n_layers=2,
            local_attention=16,
        ),
        "transformers",
        _ids,
    ),
    "litgpt": Entry(_litgpt, "litgpt", _litgpt_inputs),
    # More of other people's model code: MoE with latent attention, hybrid
    # Mamba / attention, state-space, recurrent and RWKV blocks, a windowed
    # vision transformer (found exact among 96 architectures tried by hand).
    "deepseek_v3": Entry(
        _hf(
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            # Latent attention has as many key/value heads as query heads:
            # transformers 5.24 fails the eager forward with fewer.
            **{**_LLAMA_LIKE, "num_key_value_heads": _HEADS["num_attention_heads"]},
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        "transformers",
        _ids,
    ),
    "jamba": Entry(
        _hf(
            "JambaForCausalLM",
            "JambaConfig",
            **_LLAMA_LIKE,
            num_experts=2,
            num_experts_per_tok=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            use_mamba_kernels=False,
        ),
        "transformers",
        _ids,
    ),
    "mamba2": Entry(
        _hf(
            "Mamba2ForCausalLM",
            "Mamba2Config",
            vocab_size=96,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            n_groups=1,
            head_dim=8,
            num_heads=8,
            chunk_size=8,
        ),
        "transformers",
        _ids,
    ),
    "recurrent_gemma": Entry(
        _hf(
            "RecurrentGemmaForCausalLM",
            "RecurrentGemmaConfig",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            lru_width=32,
            attention_window_size=16,
            block_types=["recurrent", "attention"],
        ),
        "transformers",
        _ids,
    ),
    "rwkv": Entry(
        _hf(
            "RwkvForCausalLM",
            "RwkvConfig",
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
            context_length=64,
        ),
        "transformers",
        _ids,
    ),
    "hf_swin": Entry(
        _hf(
            "SwinForImageClassification",
            "SwinConfig",
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
            num_labels=5,
            drop_path_rate=0.1,
        ),
        "transformers",
        _pixels(32),
    ),
    "hf_clip": Entry(
        _hf(
            "CLIPModel",
            "CLIPConfig",
            text_config=dict(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=16,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=16,
        ),
        "transformers",
        lambda: {**_ids(), **_pixels(32)()},
    ),
    # torchvision (tiny widths where the constructor allows; C ops not needed to build)
    "tv_resnet18": Entry(_tv("resnet18", num_classes=10), "torchvision", _image(32)),
    "tv_mobilenet_v3_small": Entry(
        _tv("mobilenet_v3_small", num_classes=10), "torchvision", _image(32)
    ),
    "tv_efficientnet_b0": Entry(_tv("efficientnet_b0", num_classes=10), "torchvision", _image(32)),
    "tv_vit": Entry(
        _tv(
            "VisionTransformer",
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        ),
        "torchvision",
        _image(32),
    ),
    "tv_convnext_tiny": Entry(
        _tv("convnext_tiny", num_classes=10, stochastic_depth_prob=0.1), "torchvision", _image(32)
    ),
    # timm
    "timm_resnet10t": Entry(_timm("resnet10t", num_classes=10), "timm", _image(32)),
    "timm_efficientnet_b0": Entry(_timm("efficientnet_b0", num_classes=10), "timm", _image(32)),
    "timm_vit_tiny": Entry(
        _timm("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2, drop_path_rate=0.1),
        "timm",
        _image(32),
    ),
    "timm_convnext_atto": Entry(
        _timm("convnext_atto", num_classes=10, drop_path_rate=0.1), "timm", _image(32)
    ),
    "timm_swin": Entry(
        _timm(
            "swin_tiny_patch4_window7_224",
            num_classes=10,
            img_size=56,
            depths=(1, 1),
            num_heads=(1, 2),
            embed_dim=16,
            drop_path_rate=0.1,
        ),
        "timm",
        _image(56),
    ),
}


def available(entry: Entry) -> bool:
    """Whether the package ``entry`` needs imports (torchvision's C ops need a matching torch)."""
    if importlib.util.find_spec(entry.needs) is None:
        return False
    if entry.needs in ("torchvision", "timm"):
        try:
            import torchvision  # noqa: F401
        except Exception:
            return False
    if entry.needs == "timm":
        try:
            import timm  # noqa: F401
        except Exception:
            return False
    return True
