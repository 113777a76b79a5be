"""The frozen base model of a run, built or loaded as its options say: the trainer's and evaluate's.

The embedded default (no --model_name_or_path) is a tiny random LLaVA with a word-level tokenizer
built from the synthetic set's vocabulary (and a LLaVA JSON's, when one is given): the same options
give the same weights and vocabulary, so an output loads back onto it. A model directory is loaded
from local files (transformers' layout, LLaVA's own, or the paper's assembly: m2pt_fast/models/llava_original.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from m2pt_fast.data import IMAGE, build_word_tokenizer, synthetic_texts, words_of
from m2pt_fast.data.conversation import ASSISTANT, LLAVA_SYSTEM_PROMPT, SYSTEM_PROMPT, USER
from m2pt_fast.models import llava_original
from m2pt_fast.models.llava import build_llava, llava_config, load_llava
from m2pt_fast.models.loading import load_model
from m2pt_fast.models.quantize import load_quantized, quantize_model

EMBEDDED_SHAPE = "tiny"
# Weight init of the embedded model's text side. With LLaMA's 0.02, a random frozen lm_head caps every
# logit near +-1.3, so no prompt can lower the loss much; 0.1 stands in for a trained model's larger
# weights and lets the demo's loss fall visibly (about 4.8 -> 2.5 in its first 100 steps).
EMBEDDED_TEXT_INIT = 0.1



def _texts_of_llava_json(path: str) -> list[str]:
    """Every conversation string of a LLaVA JSON file (malformed entries are left to the data loader)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # load_llava_records says what is wrong
        return []
    texts = []
    for entry in entries if isinstance(entries, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                texts.append(turn["value"])
    return texts



def load_base(cfg, device: torch.device, bf16: bool, quant: str):
    """(the frozen model, its tokenizer) for a TrainConfig `cfg`, on `device`; quant: nf4, bf16 or fp32. The
    model is a LLaVA, or the Qwen-VL model of a Qwen2.5-VL / Qwen3-VL directory (cfg.family)."""
    # the dtype of everything that stays dense (and of the NF4 weights once dequantized)
    dtype = torch.bfloat16 if bf16 or quant == "bf16" else torch.float32
    if cfg.embedded_model:
        texts = [*synthetic_texts(), SYSTEM_PROMPT, f"{USER}: {ASSISTANT}:"]
        if cfg.version == "llava_v1":  # its system prompt's words, for the word-level tokenizer
            texts.append(LLAVA_SYSTEM_PROMPT)
        if cfg.data_path:
            texts += _texts_of_llava_json(cfg.data_path)
        tokenizer = build_word_tokenizer(words_of(texts))
        shape = llava_config(EMBEDDED_SHAPE)
        shape.text_config.initializer_range = EMBEDDED_TEXT_INIT
        llava = build_llava(
            shape, device=device, dtype=dtype, seed=cfg.seed, vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), pad_token_id=tokenizer.pad_token_id,
        )
        if quant == "nf4":
            quantize_model(llava)
        return llava, tokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, local_files_only=True)
    if cfg.family != "llava":  # Qwen-VL: the directory's model and tokenizer; NF4: quantized once loaded
        model = load_model(cfg.model_name_or_path, device=device, dtype=dtype)
        if quant == "nf4":
            quantize_model(model)
        return model, tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA's choice for LLaMA tokenizers
    if cfg.llava_source == "original":
        llava = load_llava(cfg.model_name_or_path, vision_tower=cfg.vision_tower,
                           pretrain_mm_mlp_adapter=cfg.pretrain_mm_mlp_adapter,
                           mm_vision_select_layer=cfg.mm_vision_select_layer,
                           mm_vision_select_feature=cfg.mm_vision_select_feature, device=device, dtype=dtype)
        llava_original.add_image_token(tokenizer, llava)
        if quant == "nf4":
            quantize_model(llava)
        return llava, tokenizer
    if quant == "nf4":
        # an NF4 directory (ours or bitsandbytes') loads as is; a float one is quantized as it streams in
        return load_quantized(cfg.model_name_or_path, dtype=dtype).to(device), tokenizer
    return load_llava(cfg.model_name_or_path, device=device, dtype=dtype), tokenizer
