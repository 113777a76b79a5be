"""Deep prompts on a plain CLIPVisionModel (VPT-deep) and a plain LlamaForCausalLM."""
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from m2pt_fast.method.prompt_tuning import DeepTextPrompts, DeepVisionPrompts


@pytest.fixture(autouse=True)
def pytorch_kernels(monkeypatch):
    # The Triton kernels are covered by test_fused / test_prefix_attention; the interpreter is slow.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def clip(seed=0):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=7)
    return CLIPVisionModel(config).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def grads_of(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_vpt_deep_with_no_prompts_is_the_plain_model():
    model = clip()
    tuned = DeepVisionPrompts(model, 0, backend="reference")
    pixels = torch.randn(2, 3, 28, 28)
    plain = model(pixels)
    ours = tuned(pixels)
    torch.testing.assert_close(ours.last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooler_output, plain.pooler_output, rtol=0, atol=0)


def test_vpt_deep_fused_equals_reference():
    tuned = DeepVisionPrompts(clip(1), 5)
    pixels = torch.randn(3, 3, 28, 28)
    weights = torch.randn(3, 17, 40)
    results = {}
    for backend in ("reference", "fused"):
        tuned.backend = backend
        out = tuned(pixels, output_hidden_states=True)
        loss = (out.last_hidden_state * weights).sum() + out.pooler_output.square().sum()
        results[backend] = (out.last_hidden_state.detach(), grads_of(tuned, loss))
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-5, atol=1e-5)
    assert set(results["fused"][1]) == {"prompts"}
    torch.testing.assert_close(results["fused"][1]["prompts"], results["reference"][1]["prompts"], rtol=1e-5, atol=1e-6)
    assert (results["fused"][1]["prompts"].flatten(1).abs().sum(1) > 0).all()  # every layer's prompts learn


def test_deep_text_prompts_with_no_prompts_is_the_plain_model():
    lm = llama()
    tuned = DeepTextPrompts(lm, 0, backend="reference")
    ids = torch.randint(1, 97, (2, 11))
    plain = lm(input_ids=ids, labels=ids)
    ours = tuned(ids, labels=ids)
    assert torch.equal(ours.logits, plain.logits) and torch.equal(ours.loss, plain.loss)


@pytest.mark.parametrize("n", [1, 6])
def test_deep_text_prompts_fused_equals_reference(n):
    tuned = DeepTextPrompts(llama(2), n)
    ids = torch.randint(1, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for backend in ("reference", "fused"):
        tuned.backend = backend
        out = tuned(ids, mask, labels)
        results[backend] = (out.loss.detach(), grads_of(tuned, out.loss))
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-5, atol=0)
    assert set(results["fused"][1]) == {"text_prompts"}
    torch.testing.assert_close(results["fused"][1]["text_prompts"], results["reference"][1]["text_prompts"],
                               rtol=1e-5, atol=1e-7)
    assert tuned.causal_lm.lm_head.weight.grad is None


def test_deep_text_prompts_generate_like_a_greedy_loop():
    tuned = DeepTextPrompts(llama(3), 4)
    ids = torch.randint(1, 97, (1, 7))
    expected = ids
    for _ in range(5):
        with torch.no_grad():
            logits = tuned(expected).logits  # fused, no cache: logits when no labels
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], 1)
    for backend in ("fused", "reference"):
        tuned.backend = backend
        assert torch.equal(tuned.generate(ids, max_new_tokens=5), expected)


def test_wrong_models_are_refused():
    with pytest.raises(TypeError, match="CLIPVisionModel or SiglipVisionModel"):
        DeepVisionPrompts(llama())
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        DeepTextPrompts(clip())
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        DeepTextPrompts(llama().model)  # the decoder without its lm_head
    with pytest.raises(ValueError, match="non-negative"):
        DeepTextPrompts(llama(), -2)


def test_checkpointing_keeps_the_gradients():
    tuned = DeepTextPrompts(llama(4), 3).train()
    ids = torch.randint(1, 97, (2, 9))
    plain = grads_of(tuned, tuned(ids, labels=ids).loss)["text_prompts"]
    tuned.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in tuned.causal_lm.model.layers)
    recomputed = grads_of(tuned, tuned(ids, labels=ids).loss)["text_prompts"]
    torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-8)
    tuned.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in tuned.causal_lm.model.layers)
    with pytest.raises(ValueError, match="positive integer"):
        tuned.gradient_checkpointing_enable(every_n_layers=0)
