"""The installed transformers release against what m2pt_fast/compat.py assumes of it.

When a new release moves something again, these tests name what moved; the rest of the suite then
says what it broke.
"""
import inspect
import os
import subprocess
import sys
import tempfile

import torch
from model_inputs import make_batch
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from m2pt_fast import apply_m2pt, build_llava, compat


def test_cache_argument_name_is_the_layers_own():
    # A name the layers do not take would vanish into their **kwargs: nothing cached, no error.
    for forward in (LlamaDecoderLayer.forward, LlamaModel.forward):
        assert compat.CACHE_KWARG in inspect.signature(forward).parameters, inspect.signature(forward)


def test_checkpointing_flags_are_the_ones_layers_read():
    # Both layer families must be transformers' checkpointing layers, reading the flags compat sets.
    assert issubclass(LlamaDecoderLayer, compat.GradientCheckpointingLayer)
    assert issubclass(CLIPEncoderLayer, compat.GradientCheckpointingLayer)
    model = apply_m2pt(build_llava("tiny", seed=1), 2, 3).train()
    calls = []

    def recompute(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    for layer in model.language_model.layers:
        compat.set_layer_checkpointing(layer, True, recompute)
    ids, pixels, labels = make_batch(model, seed=2)
    model(ids, pixels, labels=labels).loss.backward()
    assert len(calls) == len(model.language_model.layers)


def test_decoding_fills_the_cache_on_both_backends():
    model = apply_m2pt(build_llava("tiny-gqa", seed=3), 2, 3)
    ids, pixels, _ = make_batch(model, batch=2, seed=4)
    for backend in ("reference", "fused"):
        model.backend = backend
        with torch.no_grad():
            out = model(ids, pixels, use_cache=True)
            assert isinstance(out.cache, compat.Cache)
            assert out.cache.get_seq_length() == 3 + ids.shape[1]  # the prompt rows, then the text
            step = model(ids[:, -1:], attention_mask=torch.ones(2, ids.shape[1] + 1, dtype=torch.long),
                         cache=out.cache, use_cache=True)
            assert step.cache.get_seq_length() == 3 + ids.shape[1] + 1


def test_new_cache_is_empty_and_sized_for_the_decoder():
    config = build_llava("tiny").config.text_config
    cache = compat.new_cache(config)
    assert cache.get_seq_length() == 0


# Every public path of the package, in a fresh process so that transformers' warn-once messages are
# not already spent by earlier tests. Warnings become errors; transformers' log is captured.
_PUBLIC_PATHS = r"""
import logging, warnings
import torch
messages = []

class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logging.getLogger("transformers").addHandler(Keep())
warnings.simplefilter("error", DeprecationWarning)
warnings.simplefilter("error", FutureWarning)
from m2pt_fast import DeepTextPrompts, DeepVisionPrompts, apply_m2pt, build_llava, quantize_model
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

for quantized in (False, True):
    llava = build_llava("tiny-gqa", seed=0)
    if quantized:
        quantize_model(llava)
    model = apply_m2pt(llava, 2, 3)
    model.gradient_checkpointing_enable()
    s = model.image_seq_length
    ids = torch.tensor([[1] + [model.image_token_id] * s + [5, 6, 7, 8]] * 2)
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    labels = ids.clone(); labels[:, : 1 + s] = -100
    for backend in ("reference", "fused"):
        model.backend = backend
        model.train()
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        model.eval()
        model.generate(ids, pixels, max_new_tokens=3)
        model.generate(ids, pixels, max_new_tokens=3, do_sample=True, top_p=0.9)
llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
text = DeepTextPrompts(llama, num_prompts=3)
ids = torch.randint(1, 100, (2, 7))
text(ids, labels=ids).loss.backward()
text.generate(ids, max_new_tokens=3)
clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=16, patch_size=8))
DeepVisionPrompts(clip, num_prompts=3)(torch.randn(2, 3, 16, 16)).pooler_output.sum().backward()
print("\n".join(m for m in messages if "deprecat" in m.lower()))
print("done")
"""


def test_public_paths_raise_no_deprecation_warnings():
    env = dict(os.environ, TRITON_INTERPRET="0")  # the PyTorch paths; the kernels' own tests run them
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run([sys.executable, "-c", _PUBLIC_PATHS], capture_output=True, text=True,
                                env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "done", f"deprecation messages from our calls:\n{result.stdout}"


def test_loading_never_kernelizes(tmp_path, monkeypatch):
    # 5.25 kernelizes whatever from_pretrained loads unless told not to; compat.from_pretrained must
    # keep transformers' own layers on every release. The recorder sees what the load asked for.
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(tmp_path)
    asked = []
    if hasattr(PreTrainedModel, "set_use_kernels"):
        original = PreTrainedModel.set_use_kernels
        monkeypatch.setattr(PreTrainedModel, "set_use_kernels",
                            lambda self, use_kernels, *a, **k: (asked.append(use_kernels),
                                                                original(self, use_kernels, *a, **k))[1])
    model = compat.from_pretrained(LlamaForCausalLM, tmp_path)
    assert not any(asked), asked
    assert not getattr(model, "use_kernels", False)
    assert type(model.model.norm) is LlamaRMSNorm
    assert not [name for name, module in model.named_modules() if type(module).__module__.startswith("kernels")]
