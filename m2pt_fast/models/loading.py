"""Any model M²PT takes, from a local directory: its config.json's model_type picks the family.

  llava (and LLaVA's own layout, the paper's assembly)   models/llava.load_llava
  qwen2_5_vl                                              Qwen2_5_VLForConditionalGeneration
  qwen3_vl                                                Qwen3VLForConditionalGeneration
Nothing is downloaded, and no layer is swapped for a hub kernel (compat.from_pretrained).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from m2pt_fast import compat
from m2pt_fast.errors import MissingInput
from m2pt_fast.models.llava import load_llava

QWEN_FAMILIES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}


def model_type(path: str | os.PathLike) -> str | None:
    """config.json's model_type of the directory `path` (None where it names none)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise MissingInput(f"{str(path)!r} has no config.json: is it a transformers model directory?")
    return json.loads(config.read_text()).get("model_type")


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               attn_implementation: str = "sdpa", **llava_options):
    """The model in the local directory `path`, in eval mode on `device`. llava_options: load_llava's
    (vision_tower, pretrain_mm_mlp_adapter, mm_vision_select_*), for the LLaVA layouts."""
    if not Path(path).is_dir():
        raise MissingInput(f"model directory {str(path)!r} does not exist (local directories only; "
                           "nothing is downloaded)")
    family = QWEN_FAMILIES.get(model_type(path))
    if family is None:
        return load_llava(path, device=device, dtype=dtype, attn_implementation=attn_implementation, **llava_options)
    model = compat.from_pretrained(family, path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()
