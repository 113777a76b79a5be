"""Tiny checkpoints in the layouts people hold, written by the tests (random weights, config files
spelled as their tools write them): a CLIP directory as openai/clip-vit-large-patch14 holds it (text
half included) and a CLIPVisionModel alone, a plain LLaMA directory, LLaVA's stage-1 projector file
(mm_projector.bin), and a LLaVA-layout directory (LlavaLlamaForCausalLM with mm_* keys)."""
import json
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from m2pt_fast import compat

IMAGE_SIZE, PATCH = 28, 7
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
TEXT_WIDTH, VOCAB = 64, 96


def _processor(directory: Path) -> None:
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(directory)


def clip_directory(directory: Path, whole: bool = True, seed: int = 0) -> Path:
    """A CLIP directory: a whole CLIPModel (as openai's repositories hold it) or a CLIPVisionModel."""
    torch.manual_seed(seed)
    if whole:
        text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=50, projection_dim=16)
        CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=VISION, projection_dim=16)
                  ).save_pretrained(directory)
    else:
        CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(directory)
    _processor(directory)
    return directory


def _llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0,
                       tie_word_embeddings=False)


def llama_directory(directory: Path, seed: int = 1, vocab: int = VOCAB, tokenizer=None) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config(vocab)).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def projector_tensors(kind: str, seed: int = 2) -> dict[str, torch.Tensor]:
    """LLaVA's projector under LLaVA's names: linear, or mlp2x_gelu (Linear, GELU, Linear)."""
    g = torch.Generator().manual_seed(seed)
    d_v = VISION["hidden_size"]
    if kind == "linear":
        return {"model.mm_projector.weight": torch.randn(TEXT_WIDTH, d_v, generator=g) * 0.2,
                "model.mm_projector.bias": torch.randn(TEXT_WIDTH, generator=g) * 0.2}
    return {"model.mm_projector.0.weight": torch.randn(TEXT_WIDTH, d_v, generator=g) * 0.2,
            "model.mm_projector.0.bias": torch.randn(TEXT_WIDTH, generator=g) * 0.2,
            "model.mm_projector.2.weight": torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=g) * 0.2,
            "model.mm_projector.2.bias": torch.randn(TEXT_WIDTH, generator=g) * 0.2}


def projector_file(path: Path, kind: str) -> Path:
    torch.save(projector_tensors(kind), path)  # LLaVA writes mm_projector.bin with torch.save
    return path


def llava_directory(directory: Path, llama: Path, clip: Path, kind: str = "mlp2x_gelu", *, select_layer: int = -2,
                    select_feature: str = "patch", safetensors: bool = False) -> Path:
    """A LLaVA-layout directory: the LLaMA weights under LLaVA's names plus the projector; config.json
    as LLaVA writes it (model_type "llava", LlavaLlamaForCausalLM, mm_* keys)."""
    directory.mkdir(parents=True)
    weights = compat.from_pretrained(LlamaForCausalLM, llama).state_dict()
    weights.update(projector_tensors(kind))
    config = json.loads((llama / "config.json").read_text())
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_hidden_size=VISION["hidden_size"],
                  mm_projector_type=kind, mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature,
                  mm_vision_tower=str(clip), mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  image_aspect_ratio="pad", freeze_mm_mlp_adapter=False, tune_mm_mlp_adapter=False, use_mm_proj=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    return directory
