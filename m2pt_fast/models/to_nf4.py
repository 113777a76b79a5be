"""Write any LLaVA source as an NF4 model directory, once, so every later run loads it in 4 bits.

    python -m m2pt_fast.to_nf4 /models/llava-v1.5-7b OUT --vision_tower /models/clip-vit-large-patch14-336
    python -m m2pt_fast.to_nf4 /models/vicuna-7b-v1.3 OUT --vision_tower /models/clip-vit-large-patch14 \\
        --pretrain_mm_mlp_adapter /models/llava-pretrain-vicuna-7b-v1.3/mm_projector.bin
    python -m m2pt_fast.to_nf4 /models/llava-1.5-7b-hf OUT

The source is anything the trainer's --model_name_or_path takes (m2pt_fast.models.llava.load_llava: a
transformers LLaVA directory, LLaVA's own layout, the paper's assembly). OUT gets our NF4 format
(m2pt_fast.models.quantize.save_quantized: config.json + nf4_model.safetensors), the tokenizer (with
LLaVA's image token added for its own layout, as the loader adds it) and the image processor's
config, so `--model_name_or_path OUT --quant nf4` trains on it. A transformers directory streams in
shard by shard, quantized as it arrives; LLaVA's own layout is assembled in the float dtype first
(--dtype, default bfloat16) and then quantized layer by layer.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.models import llava_original
from m2pt_fast.models.llava import load_llava
from m2pt_fast.models.quantize import QuantizeConfig, load_quantized, quantize_model, save_quantized

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def convert(source: str, out: str, *, vision_tower: str | None = None, pretrain_mm_mlp_adapter: str | None = None,
            mm_vision_select_layer: int | None = None, mm_vision_select_feature: str | None = None,
            dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True) -> Path:
    """Quantize the LLaVA at `source` and write it, its tokenizer and its image processor to `out`."""
    src, target = Path(source), Path(out)
    if not (src / "config.json").is_file():
        raise MissingInput(f"{src} has no config.json: not a model directory (local files only)")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty: name a new directory")
    config = json.loads((src / "config.json").read_text())
    original = llava_original.checkpoint_layout(config, pretrain_mm_mlp_adapter) == "original"
    settings = QuantizeConfig(blocksize=blocksize, double_quant=double_quant)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if original:
        llava = load_llava(src, vision_tower=vision_tower, pretrain_mm_mlp_adapter=pretrain_mm_mlp_adapter,
                           mm_vision_select_layer=mm_vision_select_layer,
                           mm_vision_select_feature=mm_vision_select_feature, dtype=dtype)
        quantize_model(llava, settings)
        llava_original.add_image_token(tokenizer, llava)
        processor = Path(vision_tower or config.get("mm_vision_tower") or "")
    else:
        llava = load_quantized(src, settings, dtype=dtype)
        processor = src
    save_quantized(llava, target)
    tokenizer.save_pretrained(target)
    if (processor / "preprocessor_config.json").is_file():
        shutil.copy(processor / "preprocessor_config.json", target / "preprocessor_config.json")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2pt_fast.to_nf4", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a local LLaVA (any layout the trainer takes), or a LLaMA with the adapter")
    parser.add_argument("out", help="a new directory for the NF4 model")
    parser.add_argument("--vision_tower")
    parser.add_argument("--pretrain_mm_mlp_adapter")
    parser.add_argument("--mm_vision_select_layer", type=int)
    parser.add_argument("--mm_vision_select_feature")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="of what stays dense (norms, embeddings, projector, lm_head)")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no_double_quant", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out, vision_tower=args.vision_tower,
                      pretrain_mm_mlp_adapter=args.pretrain_mm_mlp_adapter,
                      mm_vision_select_layer=args.mm_vision_select_layer,
                      mm_vision_select_feature=args.mm_vision_select_feature, dtype=DTYPES[args.dtype],
                      blocksize=args.blocksize, double_quant=not args.no_double_quant)
    except (FileNotFoundError, FileExistsError, UserError) as error:
        print(f"python -m m2pt_fast.to_nf4: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: train with --model_name_or_path {out} --quant nf4")
    return 0
