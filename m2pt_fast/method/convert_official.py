"""Convert a checkpoint of the released M²PT code into our prompt file.

    python -m m2pt_fast.convert_official CHECKPOINT_DIR OUT.safetensors

The released checkpoints are whole-model shards (.bin or .safetensors) that hold, besides the frozen
weights: `model.prompts.{j}` (1, n_t, d_text) for each decoder layer,
`model.vision_tower.vision_tower.vision_model.encoder.prompts.{i}` (1, n_v, d_vision) for every CLIP
layer, `model.mm_projector.weight` / `.bias` (LLaVA v1's linear projector) and a tuned `lm_head.weight`.
The prompt file keeps them all and records official_vision_features=true: the released code's
vision feature selection (docs/method.md) reads the raw prompts of the feature layer's input, so
the converted prompts compute what they were trained to compute only with that setting, which
`apply_m2pt(..., official_vision_features=True)` (and `methods.load_output`) turn on. The base model
is the paper's assembly (m2pt_fast/models/llava_original.py): its lm_head keeps Vicuna's vocabulary, as here.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from m2pt_fast.errors import UserError
from m2pt_fast.method.prompt_io import FORMAT, FORMAT_VERSION
from m2pt_fast.models.llava_original import read_tensors, weight_files

TEXT = re.compile(r"model\.prompts\.(\d+)$")
VISION = re.compile(r"model\.vision_tower\.vision_tower\.vision_model\.encoder\.prompts\.(\d+)$")
# what the released code trains with (its scripts): LLaVA v1's feature layer and selection
FEATURE_LAYER, STRATEGY = -2, "default"


class ConversionError(UserError):
    """A checkpoint that is not one of the released code's, or lacks what the prompt file needs."""


def _stack(found: dict[int, torch.Tensor], what: str) -> torch.Tensor:
    if not found:
        raise ConversionError(f"no {what} prompts in the checkpoint")
    indices = sorted(found)
    if indices != list(range(len(indices))):
        raise ConversionError(f"{what} prompts for layers {indices}: some layers are missing")
    shapes = {tuple(t.shape) for t in found.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 1:
        raise ConversionError(f"{what} prompts of shapes {sorted(shapes)}; the released code's are (1, n, d)")
    return torch.cat([found[i].float() for i in indices], dim=0)


def convert(checkpoint: str | Path, out: str | Path) -> Path:
    """Read the released checkpoint at `checkpoint` one shard at a time; write the prompt file `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ConversionError(f"{checkpoint} is not a checkpoint directory")
    text, vision, projector, lm_head = {}, {}, {}, None
    for shard in weight_files(checkpoint):
        for key, tensor in read_tensors(shard).items():
            if match := TEXT.match(key):
                text[int(match.group(1))] = tensor
            elif match := VISION.match(key):
                vision[int(match.group(1))] = tensor
            elif key in ("model.mm_projector.weight", "model.mm_projector.bias"):
                projector[key.rsplit(".", 1)[1]] = tensor.float()
            elif key == "lm_head.weight":
                lm_head = tensor.float()
    text_prompts, vision_prompts = _stack(text, "decoder"), _stack(vision, "vision")
    if set(projector) != {"weight", "bias"}:
        raise ConversionError("no model.mm_projector.weight and .bias (the released code trains LLaVA v1's linear "
                              "projector)")
    tensors = {"vision_prompts": vision_prompts.contiguous(), "text_prompts": text_prompts.contiguous(),
               "projector.linear.weight": projector["weight"].contiguous(),
               "projector.linear.bias": projector["bias"].contiguous()}
    if lm_head is not None:
        tensors["lm_head.weight"] = lm_head.contiguous()
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "num_vision_prompts": str(vision_prompts.shape[1]), "num_text_prompts": str(text_prompts.shape[1]),
        "vision_prompt_layers": str(vision_prompts.shape[0]), "text_prompt_layers": str(text_prompts.shape[0]),
        "vision_hidden_size": str(vision_prompts.shape[2]), "text_hidden_size": str(text_prompts.shape[2]),
        "vision_feature_layer": json.dumps(FEATURE_LAYER), "vision_feature_select_strategy": STRATEGY,
        "tune_projector": "true", "tune_lm_head": str(lm_head is not None).lower(),
        "official_vision_features": "true", "converted_from": str(checkpoint),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2pt_fast.convert_official", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory of the released M²PT code")
    parser.add_argument("out", help="the prompt file to write (.safetensors)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.out)
    except (UserError, OSError) as e:  # ConversionError, LlavaSourceError (no weights), unreadable files
        print(f"convert_official: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
