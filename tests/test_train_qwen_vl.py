"""`python m2pt_fast/train.py --model_name_or_path DIR --data_path data.jsonl` on the Qwen-VL families:
a tiny local directory (random weights, the word-level tokenizer with Qwen-VL's chat layout, the image
processor's config, all made here) and HF "messages" records train, in fp32 and on an NF4 backbone,
the prompt file reads back into the same model, and a refusal comes before any weights are read."""
import json

import numpy as np
import pytest
import torch
from launch import python_run
from PIL import Image
from test_chat_template import WORDS
from test_qwen_vl import FAMILIES, build
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from m2pt_fast import apply_m2pt, load_prompts
from m2pt_fast.models.loading import load_model
from m2pt_fast.models.qwen2_5_vl import tiny_tokenizer

ANSWERS = ["A red square .", "A blue circle .", "two", "what is this ?"]


def model_directory(family, path):
    build(family, torch.float32).save_pretrained(path)
    tiny_tokenizer(WORDS).save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=2, merge_size=2,
                             temporal_patch_size=2).save_pretrained(path)
    return path


def data(path, count=8):
    """`count` records, one image each (16x16 or 12x20 pixels), in JSON Lines; images under path/images."""
    (path / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        size = (16, 16) if i % 2 else (12, 20)
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(path / "images" / f"{i}.png")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % len(ANSWERS)]}]}]
        lines.append(json.dumps({"messages": messages, "images": [f"{i}.png"]}))
    (path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return path / "data.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("family, quant", [(f, "fp32") for f in sorted(FAMILIES)] + [("qwen2_5_vl", "nf4")])
def test_a_qwen_vl_directory_trains_and_its_prompts_read_back(family, quant, tmp_path):
    model_dir = model_directory(family, tmp_path / "model")
    records = data(tmp_path / "data")
    out = tmp_path / "out"
    python_run(out, "--model_name_or_path", str(model_dir), "--data_path", str(records), "--image_folder",
               str(tmp_path / "data" / "images"), "--max_steps", "4", "--per_device_train_batch_size", "2",
               "--learning_rate", "3e-2", "--num_vision_prompts", "2", "--num_text_prompts", "2",
               "--dataloader_num_workers", "0", "--warmup_ratio", "0", "--quant", quant)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    model = apply_m2pt(load_model(model_dir), 2, 2)
    untrained = model.text_prompts.detach().clone()
    assert load_prompts(model, out / "prompts.safetensors")["family"] == family
    assert not torch.equal(model.text_prompts, untrained)


@pytest.mark.slow  # a trainer process: about 8 s
def test_a_qwen_vl_directory_without_records_is_refused(tmp_path):
    model_dir = model_directory("qwen2_5_vl", tmp_path / "model")
    result = python_run(tmp_path / "out", "--model_name_or_path", str(model_dir), expect=2)
    assert "is a qwen2_5_vl model: give --data_path" in result.stderr and "Traceback" not in result.stderr
