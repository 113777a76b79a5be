"""Construct transformers LLaVA models: from a local directory, or from a named shape with random weights.

Named shapes serve tests, demos and benchmarks; nothing is ever downloaded. Random weights are
materialised directly on the target device and in the target dtype (a 7B shape on a GPU never passes
through host memory), or not at all on the `meta` device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from m2pt_fast import compat
from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.models import llava_original
from m2pt_fast.models.layers import LinearProjector, default_dtype


def _clip_vit_l14(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )


def _vicuna_7b(vocab_size: int, pad_token_id: int | None) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=pad_token_id,
    )


def _tiny(gqa: bool) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, vocab_size=128, max_position_embeddings=512,
        pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=127, projector_hidden_act="gelu")


def _tiny_siglip_qwen2() -> LlavaConfig:
    # The llava-interleave-qwen family in miniature: a SigLIP tower (no CLS, no pre-layernorm, every
    # patch kept: strategy "full", the last layer's features) and a Qwen2 decoder (q/k/v biases).
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7,
    )
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=127, projector_hidden_act="gelu",
                       vision_feature_layer=-1, vision_feature_select_strategy="full")


def _llava_15_7b() -> LlavaConfig:
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 patches), 2-layer GELU MLP projector,
    # Vicuna-7B v1.5 with 64 extra rows of vocabulary, the image token at 32000.
    return LlavaConfig(
        vision_config=_clip_vit_l14(336), text_config=_vicuna_7b(32064, 32001), image_token_id=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def _llava_15_13b() -> LlavaConfig:
    # llava-hf/llava-1.5-13b-hf: the 7B's vision side and projector input, Vicuna-13B v1.5 (40 layers,
    # width 5120, 40 heads, MLP 13824), the same vocabulary.
    text = LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=_clip_vit_l14(336), text_config=text, image_token_id=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def _llava_interleave_qwen_7b() -> LlavaConfig:
    # llava-hf/llava-interleave-qwen-7b-hf: SigLIP so400m at 384 px (26 layers, width 1152, 729 patches,
    # no CLS, every patch kept from the last layer), a 2-layer GELU projector, Qwen1.5-7B-Chat (Qwen2's
    # classes: q/k/v biases; 32 layers, width 4096, MLP 11008, vocabulary 152000), image token 151646.
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    text = Qwen2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=152000, max_position_embeddings=32768,
                       rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=151646, projector_hidden_act="gelu",
                       vision_feature_layer=-1, vision_feature_select_strategy="full")


def _llava_v1_7b() -> LlavaConfig:
    # The M²PT paper's model: LLaVA v1 (Vicuna-7B v1.3, CLIP ViT-L/14 at 224 px, linear projector).
    # build_llava swaps transformers' MLP projector for a LinearProjector for this shape.
    config = LlavaConfig(
        vision_config=_clip_vit_l14(224), text_config=_vicuna_7b(32003, 0), image_token_id=32000,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config.m2pt_linear_projector = True
    return config


NAMED_CONFIGS = {
    "tiny": lambda: _tiny(gqa=False),
    "tiny-gqa": lambda: _tiny(gqa=True),
    "tiny-siglip-qwen2": _tiny_siglip_qwen2,
    "llava-1.5-7b": _llava_15_7b,
    "llava-1.5-13b": _llava_15_13b,
    "llava-interleave-qwen-7b": _llava_interleave_qwen_7b,
    "llava-v1-7b": _llava_v1_7b,
}


def llava_config(name: str) -> LlavaConfig:
    """A fresh LlavaConfig for one of NAMED_CONFIGS."""
    if name not in NAMED_CONFIGS:
        raise UserError(f"unknown model shape {name!r}; named shapes are {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]()


def build_llava(
    name_or_config: str | LlavaConfig = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration with random weights, built directly on `device` in `dtype`.

    `vocab_size`, `image_token_id` and `pad_token_id` override the text side of a named shape (a
    locally built tokenizer brings its own). On `device="meta"` nothing is allocated.
    """
    config = llava_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    if image_token_id is not None:
        config.image_token_id = image_token_id
    if pad_token_id is not None:
        config.text_config.pad_token_id = pad_token_id
    vocab = config.text_config.vocab_size
    if not 0 <= config.image_token_id < vocab:
        raise UserError(
            f"image_token_id {config.image_token_id} must lie inside the vocabulary [0, {vocab}): "
            "pass image_token_id= or a larger vocab_size="
        )
    if not dtype.is_floating_point:
        raise UserError(f"dtype must be a floating-point dtype, got {dtype}")
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlavaForConditionalGeneration(config)
        if getattr(config, "m2pt_linear_projector", False):
            in_features = config.vision_config.hidden_size
            model.model.multi_modal_projector = LinearProjector(in_features, config.text_config.hidden_size)
    return model.eval()


def load_llava(
    path: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    pretrain_mm_mlp_adapter: str | os.PathLike | None = None,
    mm_vision_select_layer: int | None = None,
    mm_vision_select_feature: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """Load a LLaVA from local files (never from the hub), with LLaVA's own option names:

      * a transformers LLaVA directory;
      * a directory in LLaVA's own layout (LlavaLlamaForCausalLM, mm_* config keys), its vision tower
        the local CLIP directory `vision_tower` (or the config's mm_vision_tower);
      * the paper's assembly: a plain LLaMA/Vicuna directory + `vision_tower` + `pretrain_mm_mlp_adapter`
        (LLaVA's stage-1 mm_projector.bin or .safetensors).
    The last two go through m2pt_fast.models.llava_original (its docstring says what the loader adds: an
    image token row in the input embeddings). mm_vision_select_layer / _feature override a config's.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"model directory {str(path)!r} does not exist (local directories only; "
                           "nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise MissingInput(f"{str(path)!r} has no config.json: is it a transformers model directory?")

    config = json.loads((path / "config.json").read_text())
    if llava_original.checkpoint_layout(config, pretrain_mm_mlp_adapter) == "original":
        model = llava_original.load_original(
            path, vision_tower=vision_tower, pretrain_mm_mlp_adapter=pretrain_mm_mlp_adapter,
            mm_vision_select_layer=mm_vision_select_layer, mm_vision_select_feature=mm_vision_select_feature,
            device=device, dtype=dtype)
        model.config._attn_implementation = attn_implementation
        return model
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.safetensors.index.json")]
    if not weights:
        raise MissingInput(f"{str(path)!r} has a config.json but no weights (*.safetensors or *.bin)")
    model = compat.from_pretrained(LlavaForConditionalGeneration, path, dtype=dtype,
                                   attn_implementation=attn_implementation)
    return model.to(device).eval()
