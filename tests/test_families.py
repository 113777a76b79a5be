"""Decoders beyond LLaMA and Qwen2 inside a LLaVA, with tiny random configs (docs/models.md).

Each runs through the same tests the two named families pass, in brief: with zero prompts the
wrapped model is transformers' own; the reference form equals the hooked construction on the
unmodified model; the fused backend's loss and gradients equal the reference's on a right-padded
batch; decoding equals the greedy loop. What differs in each:

- Mistral: every layer may slide (config.sliding_window); the reference builds that mask.
- Qwen3: q/k RMSNorms inside attention, head_dim not hidden / heads.
- Phi-3: one fused qkv_proj (the capture computes it whole) and a fused gate_up_proj.
- Gemma: input embeddings scaled by sqrt(d), GELU-tanh MLP, RMSNorm with (1 + w).
And what is refused, rather than computed wrongly: Gemma 2's logit soft-capping, and a sliding
window shorter than the keys in the fused backend (the reference computes it).
"""
import pytest
import torch
from transformers import (CLIPVisionConfig, GemmaConfig, Gemma2Config, LlavaConfig, MistralConfig, Phi3Config,
                          Qwen3Config)

from m2pt_fast import apply_m2pt, build_llava

from model_inputs import IMAGE_TOKEN, make_batch
from test_fused import padded_batch, rel_err, run
from test_generation import greedy_loop
from test_model import hooked_oracle

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
DECODERS = {
    "mistral": lambda **kw: MistralConfig(**SMALL, **kw),
    "qwen3": lambda **kw: Qwen3Config(**SMALL, head_dim=24, **kw),
    "phi3": lambda **kw: Phi3Config(**SMALL, **kw),
    "gemma": lambda **kw: GemmaConfig(**SMALL, head_dim=16, **kw),
}


def llava_with(text_config, seed=0, attn_implementation="sdpa"):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=IMAGE_TOKEN,
                         projector_hidden_act="gelu")
    return build_llava(config, seed=seed, attn_implementation=attn_implementation)


@pytest.fixture(autouse=True)
def pytorch_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("family", DECODERS)
def test_zero_prompts_are_the_unwrapped_model(family):
    llava = llava_with(DECODERS[family](), seed=1)
    ids, pixels, labels = make_batch(apply_m2pt(llava_with(DECODERS[family]()), 0, 0), seed=2)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels, labels=labels)
    model = apply_m2pt(llava, 0, 0)
    with torch.no_grad():
        got = model(ids, pixels, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", DECODERS)
def test_reference_equals_the_hooked_construction(family):
    model = apply_m2pt(llava_with(DECODERS[family](), seed=3), 3, 4)
    ids, pixels, labels = make_batch(model, seed=4)
    with torch.no_grad():
        loss, logits = hooked_oracle(model, ids, pixels, labels)
        out = model(ids, pixels, labels=labels)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", DECODERS)
def test_fused_loss_and_gradients_equal_reference(family):
    model = apply_m2pt(llava_with(DECODERS[family](), seed=5), 3, 4)
    ids, pixels, mask, labels = padded_batch(model, seed=6)
    ref_loss, ref_grads = run(model, "reference", ids, pixels, mask, labels)
    loss, grads = run(model, "fused", ids, pixels, mask, labels)
    # the same function in fp32; only the order of the sums differs
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert set(grads) == set(ref_grads) and {"vision_prompts", "text_prompts"} <= set(grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("family", DECODERS)
def test_generation_equals_the_greedy_loop(family):
    llava = llava_with(DECODERS[family](), seed=7)
    llava.generation_config.eos_token_id = None  # the loop never stops early
    model = apply_m2pt(llava, 3, 4)
    ids, pixels, _ = make_batch(model, batch=2, seed=8)
    assert torch.equal(model.generate(ids, pixels, max_new_tokens=5), greedy_loop(model, ids, pixels, 5))


def test_a_sliding_window_is_the_reference_s_mask_and_the_fused_backend_refuses_it():
    # A window of 8 positions, shorter than the prompt rows + image + text of the batch: the reference
    # is transformers' own model (zero prompts), attends within the window with prompts (hooked
    # construction), and differs from attending to everything.
    window = 8
    llava = llava_with(DECODERS["mistral"](sliding_window=window), seed=9)
    model = apply_m2pt(llava, 0, 0)
    ids, pixels, labels = make_batch(model, seed=10)
    assert ids.shape[1] > window
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(model(ids, pixels).logits, expected, rtol=1e-5, atol=1e-5)
    model = apply_m2pt(llava, 3, 4)
    with torch.no_grad():
        loss, logits = hooked_oracle(model, ids, pixels, labels)
        out = model(ids, pixels, labels=labels)
        torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
        llava.config.text_config.sliding_window = None  # the same weights, attending to everything
        unwindowed = model(ids, pixels, labels=labels).logits
        assert not torch.allclose(unwindowed, out.logits, atol=1e-3)
        llava.config.text_config.sliding_window = window
    model.backend = "fused"
    with pytest.raises(ValueError, match="sliding window of 8 positions"):
        model(ids, pixels, labels=labels)
    # within the window the fused backend computes the reference
    short = apply_m2pt(llava_with(DECODERS["mistral"](sliding_window=512), seed=9), 3, 4)
    short.load_state_dict(model.state_dict())
    ids, pixels, mask, labels = padded_batch(short, seed=11)
    ref_loss, _ = run(short, "reference", ids, pixels, mask, labels)
    loss, _ = run(short, "fused", ids, pixels, mask, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())


def test_logit_soft_capping_is_refused():
    text = Gemma2Config(**SMALL, head_dim=16)
    assert text.attn_logit_softcapping and text.final_logit_softcapping
    with pytest.raises(ValueError, match="caps logits"):
        apply_m2pt(llava_with(text, attn_implementation="eager"), 3, 4)
