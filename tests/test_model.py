"""The reference M²PT model against transformers' own LLaVA forward."""
import pytest
import torch
from model_inputs import IMAGE_TOKEN, make_batch

from m2pt_fast import apply_m2pt, build_llava, trainable_report


@pytest.fixture(params=["tiny", "tiny-gqa", "tiny-siglip-qwen2"])
def llava(request):
    return build_llava(request.param, seed=1)


def hooked_oracle(model, ids, pixels, labels, attention_mask=None):
    """M²PT's reference form built a second way: forward hooks on the unmodified transformers model.

    Vision prompts are prepended by a hook on CLIP's pre-layernorm (SigLIP's embeddings) and
    overwritten by pre-hooks on the encoder layers; features come from transformers' own
    hidden_states, without the prompt rows and, for the "default" strategy, CLS; the text side runs
    transformers' LLaVA forward on [prompts; embeddings] with pre-hooks on the decoder layers.
    """
    llava = model.llava
    tower = llava.model.vision_tower
    nv, nt = model.num_vision_prompts, model.num_text_prompts
    vp, tp = model.vision_prompts, model.text_prompts
    first = tower.pre_layrnorm if hasattr(tower, "pre_layrnorm") else tower.embeddings
    handles = [first.register_forward_hook(
        lambda mod, args, out: torch.cat([vp[0].expand(out.shape[0], -1, -1), out], 1))]

    def overwrite(prompts, layer):
        def hook(mod, args):
            h = args[0]
            return (torch.cat([prompts[layer].expand(h.shape[0], -1, -1), h[:, prompts.shape[1]:]], 1), *args[1:])
        return hook

    for i, layer in enumerate(tower.encoder.layers[1:vp.shape[0]], start=1):
        handles.append(layer.register_forward_pre_hook(overwrite(vp, i)))
    for j, layer in enumerate(llava.model.language_model.layers[1:], start=1):
        handles.append(layer.register_forward_pre_hook(overwrite(tp, j)))
    try:
        states = tower(pixels, output_hidden_states=True).hidden_states
        drop = nv + (1 if llava.config.vision_feature_select_strategy == "default" else 0)
        features = llava.model.multi_modal_projector(states[llava.config.vision_feature_layer][:, drop:])
        embeds = llava.model.language_model.embed_tokens(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
        b = ids.shape[0]
        embeds = torch.cat([tp[0].expand(b, -1, -1), embeds], 1)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        mask = torch.cat([mask.new_ones(b, nt), mask], 1)
        labels = torch.cat([labels.new_full((b, nt), -100), labels], 1)
        out = llava(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    finally:
        for h in handles:
            h.remove()
    return out.loss, out.logits[:, nt:]


def test_zero_prompts_equal_the_unwrapped_model(llava):
    model = apply_m2pt(llava, 0, 0)
    ids, pixels, labels = make_batch(model)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    labels[1, -4:] = -100
    ours = model(ids, pixels, mask, labels)
    theirs = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.loss, theirs.loss)


@pytest.mark.parametrize("nv,nt", [(1, 1), (7, 7), (3, 0), (0, 5)])
def test_reference_form_matches_hooked_transformers(llava, nv, nt):
    model = apply_m2pt(llava, nv, nt)
    ids, pixels, labels = make_batch(model, seed=nv + nt)
    loss, logits = model(ids, pixels, labels=labels).loss, model(ids, pixels).logits
    oracle_loss, oracle_logits = hooked_oracle(model, ids, pixels, labels)
    torch.testing.assert_close(logits, oracle_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, oracle_loss, rtol=1e-5, atol=1e-6)


def test_prompts_change_the_output(llava):
    model = apply_m2pt(llava, 2, 2)
    ids, pixels, labels = make_batch(model)
    before = model(ids, pixels, labels=labels)
    with torch.no_grad():
        model.vision_prompts.add_(torch.randn_like(model.vision_prompts))
    after_vision = model(ids, pixels, labels=labels)
    with torch.no_grad():
        model.text_prompts.add_(torch.randn_like(model.text_prompts))
    after_text = model(ids, pixels, labels=labels)
    assert not torch.allclose(before.logits, after_vision.logits)
    assert not torch.allclose(after_vision.logits, after_text.logits)
    assert before.logits.shape == (2, ids.shape[1], llava.config.text_config.vocab_size)


def test_gradients_reach_prompts_and_projector_only(llava):
    model = apply_m2pt(llava, 3, 4)
    ids, pixels, labels = make_batch(model)
    model(ids, pixels, labels=labels).loss.backward()
    tuned = {"vision_prompts", "text_prompts"} | {
        f"llava.model.multi_modal_projector.{n}" for n, _ in model.projector.named_parameters()}
    for name, param in model.named_parameters():
        if name in tuned:
            assert param.requires_grad and param.grad is not None, name
            # every prompt layer influences the output, so each layer's slice gets a gradient
            per_layer = param.grad.flatten(1).abs().sum(1) if "prompts" in name else param.grad.abs().sum()[None]
            assert (per_layer > 0).all(), name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_vision_prompt_layers_follow_the_feature_layer(llava):
    model = apply_m2pt(llava, 2, 2)
    # 3-layer towers; feature layer -2 (CLIP): hidden_states[2] depends on layers 0 and 1 only,
    # -1 (SigLIP): on all three
    depth = {-2: 2, -1: 3}[llava.config.vision_feature_layer]
    assert model.vision_prompts.shape == (depth, 2, llava.config.vision_config.hidden_size)
    assert model.text_prompts.shape == (2, 2, llava.config.text_config.hidden_size)


def test_tune_lm_head_and_projector_flags(llava):
    model = apply_m2pt(llava, 1, 1, tune_projector=False, tune_lm_head=True)
    assert all(p.requires_grad for p in model.llava.lm_head.parameters())
    assert not any(p.requires_grad for p in model.projector.parameters())
    report = trainable_report(model)
    assert report.groups["lm_head"].trainable == llava.lm_head.weight.numel()
    assert report.groups["projector"].trainable == 0


def test_right_padded_batch_equals_each_sample_alone(llava):
    model = apply_m2pt(llava, 3, 3)
    ids, pixels, labels = make_batch(model, batch=3, text_after=10, seed=5)
    lengths = [ids.shape[1], ids.shape[1] - 4, ids.shape[1] - 7]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        labels[b, n:] = -100
        ids[b, n:] = 0  # pad id
    out = model(ids, pixels, mask, labels)
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, :n], pixels[b:b + 1], labels=labels[b:b + 1, :n])
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0], rtol=1e-5, atol=1e-5)
        valid = int((labels[b, 1:n] != -100).sum())
        total, count = total + alone.loss * valid, count + valid
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(llava):
    model = apply_m2pt(llava, 2, 3).train()
    ids, pixels, labels = make_batch(model)
    model(ids, pixels, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, pixels, labels=labels).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    ref = apply_m2pt(build_llava("tiny-gqa", seed=2), 3, 3)
    half = apply_m2pt(build_llava("tiny-gqa", seed=2, dtype=dtype), 3, 3)
    with torch.no_grad():
        half.vision_prompts.copy_(ref.vision_prompts)
        half.text_prompts.copy_(ref.text_prompts)
    assert half.vision_prompts.dtype == dtype and half.text_prompts.dtype == dtype
    ids, pixels, labels = make_batch(ref)
    loss32 = ref(ids, pixels, labels=labels).loss
    loss16 = half(ids, pixels, labels=labels).loss
    loss16.backward()
    # bf16 keeps 8 mantissa bits; a 2-layer model's loss stays within a few parts in a thousand
    assert abs(loss16.item() - loss32.item()) / loss32.item() < 2e-2
    assert half.text_prompts.grad.dtype == dtype and torch.isfinite(half.text_prompts.grad).all()


def test_backend_attribute_is_validated(llava):
    model = apply_m2pt(llava, 1, 1)
    assert model.backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "turbo"


@pytest.mark.parametrize("nv,nt", [(-1, 2), (2, -3), (1.5, 1)])
def test_bad_prompt_counts_are_refused(llava, nv, nt):
    with pytest.raises(ValueError, match="non-negative integer"):
        apply_m2pt(llava, nv, nt)


def test_image_token_count_must_match_the_images(llava):
    model = apply_m2pt(llava, 1, 1)
    ids, pixels, labels = make_batch(model)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids[:, 4:], pixels)  # the first image token of each row cut off
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixels[:1])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, None)


def test_wrong_pixel_shape_is_refused(llava):
    model = apply_m2pt(llava, 1, 1)
    ids, pixels, _ = make_batch(model)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(ids, pixels[:, :, :20, :20])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(ids, pixels[:, 0])


def test_not_a_llava_is_refused():
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        apply_m2pt(torch.nn.Linear(2, 2))
