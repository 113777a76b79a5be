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
window shorter than the keys in the fused backend (the reference computes it). The deep prompt
tuners without LLaVA take these decoders (and Qwen2) as causal LMs, and SigLIP as a vision model.
"""
import pytest
import torch
from model_inputs import IMAGE_TOKEN, make_batch
from test_fused import padded_batch, rel_err, run
from test_generation import greedy_loop
from test_model import hooked_oracle
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    Gemma2Config,
    GemmaConfig,
    LlavaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from m2pt_fast import DeepTextPrompts, DeepVisionPrompts, apply_m2pt, build_llava

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
    llava.generation_config.suppress_tokens = [IMAGE_TOKEN]  # as test_generation's fixture
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


@pytest.mark.parametrize("family", [*DECODERS, "qwen2"])
def test_deep_text_prompts_on_each_causal_lm(family):
    config = DECODERS[family]() if family in DECODERS else Qwen2Config(**SMALL)
    torch.manual_seed(12)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        plain = lm(input_ids=ids, labels=ids)
        empty = DeepTextPrompts(lm, 0, backend="reference")(ids, labels=ids)
    torch.testing.assert_close(empty.logits, plain.logits, rtol=1e-5, atol=1e-5)

    tuned = DeepTextPrompts(lm, 4)
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for backend in ("reference", "fused"):
        tuned.backend = backend
        tuned.zero_grad()
        out = tuned(ids, mask, labels)
        out.loss.backward()
        results[backend] = (out.loss.detach(), tuned.text_prompts.grad.clone())
    assert abs(results["fused"][0].item() - results["reference"][0].item()) <= 1e-5 * results["reference"][0].item()
    assert rel_err(results["fused"][1], results["reference"][1]) < 1e-5

    lm.generation_config.eos_token_id = None
    expected = ids[:1]
    for _ in range(4):  # the greedy loop over full forwards
        with torch.no_grad():
            expected = torch.cat([expected, tuned(expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tuned.generate(ids[:1], max_new_tokens=4), expected)


@pytest.mark.parametrize("head", [True, False])
def test_vpt_deep_on_siglip(head):
    torch.manual_seed(14)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=28, patch_size=7,
                                                  vision_use_head=head)).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        plain = siglip(pixels)
        empty = DeepVisionPrompts(siglip, 0, backend="reference")(pixels)
    torch.testing.assert_close(empty.last_hidden_state, plain.last_hidden_state, rtol=1e-6, atol=1e-6)
    if head:
        torch.testing.assert_close(empty.pooler_output, plain.pooler_output, rtol=1e-6, atol=1e-6)
    else:
        assert empty.pooler_output is None and plain.pooler_output is None

    tuned = DeepVisionPrompts(siglip, 5)
    weights = torch.randn(2, 16, 32)
    results = {}
    for backend in ("reference", "fused"):
        tuned.backend = backend
        tuned.zero_grad()
        out = tuned(pixels)
        loss = (out.last_hidden_state * weights).sum() + (out.pooler_output.square().sum() if head else 0)
        loss.backward()
        results[backend] = (out.last_hidden_state.detach(), tuned.prompts.grad.clone())
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-5, atol=1e-5)
    assert rel_err(results["fused"][1], results["reference"][1]) < 1e-5
    assert (results["fused"][1].flatten(1).abs().sum(1) > 0).all()  # every layer's prompts learn
