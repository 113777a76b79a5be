"""Prompt K/V through transformers' attention interface (m2pt_fast/method/attention.py)."""
import copy
import sys

import pytest
import torch
from model_inputs import make_batch
from torch import nn

from m2pt_fast import apply_m2pt, build_llava
from m2pt_fast.method import attention


@pytest.fixture
def pytorch_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def prefix_calls(monkeypatch):
    """Every prefix_attention call the fused backend makes: (q shape, prefix K shape or None)."""
    calls = []
    inner = attention.prefix_attention

    def record(q, k, v, prefix_k, prefix_v, **kwargs):
        calls.append((tuple(q.shape), None if prefix_k is None else tuple(prefix_k.shape)))
        return inner(q, k, v, prefix_k, prefix_v, **kwargs)

    monkeypatch.setattr(attention, "prefix_attention", record)
    return calls


def test_fused_attention_gets_a_shared_prefix_and_no_prompt_rows(pytorch_kernels, prefix_calls):
    model = apply_m2pt(build_llava("tiny-gqa", seed=1), 3, 4)
    model.backend = "fused"
    ids, pixels, labels = make_batch(model, batch=2, seed=5)
    model(ids, pixels, labels=labels).loss.backward()
    vision, text = model.llava.config.vision_config, model.llava.config.text_config
    tokens = 1 + (vision.image_size // vision.patch_size) ** 2  # CLS + patches: no prompt rows
    vision_heads, text_kv_heads = vision.num_attention_heads, text.num_key_value_heads
    expected = [((2, vision_heads, tokens, vision.hidden_size // vision_heads),
                 (vision_heads, 3, vision.hidden_size // vision_heads))] * max(model.feature_layers)
    head_dim = text.hidden_size // text.num_attention_heads
    expected += [((2, text.num_attention_heads, ids.shape[1], head_dim), (text_kv_heads, 4, head_dim))
                 ] * text.num_hidden_layers
    # the vision layers past the selected one are skipped; the last prompt row's own pass runs only
    # when the first text token has a label (not here)
    assert prefix_calls == expected


def test_fused_checkpointing_recomputes_through_the_layers_own_wrapper(pytorch_kernels, prefix_calls):
    model = apply_m2pt(build_llava("tiny", seed=2), 2, 2).train()
    model.backend = "fused"
    ids, pixels, labels = make_batch(model, seed=6)
    model(ids, pixels, labels=labels).loss.backward()
    plain = len(prefix_calls)
    prefix_calls.clear()
    model.gradient_checkpointing_enable()
    model(ids, pixels, labels=labels).loss.backward()
    assert len(prefix_calls) == 2 * plain  # every layer's attention ran again in backward


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_routed_model_without_prefix_is_the_model_itself(implementation):
    llava = build_llava("tiny-gqa", seed=3, attn_implementation=implementation)
    plain = copy.deepcopy(llava)
    model = apply_m2pt(llava, 0, 0)  # routes llava's attention through "m2pt_prefix"
    assert llava.model.language_model.config._attn_implementation == attention.NAME
    ids, pixels, _ = make_batch(model, seed=7)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        expected = plain(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert torch.equal(got, expected)


def test_route_refuses_an_attention_it_cannot_wrap():
    llava = build_llava("tiny", seed=4)
    llava.model.language_model.config._attn_implementation = "no_such_attention"
    with pytest.raises(ValueError, match="no_such_attention"):
        attention.route_attention(llava)


def test_a_layer_whose_attention_bypasses_the_interface_cannot_carry_prompts():
    class OwnAttention(nn.Module):  # computes attention itself, never through transformers' registry
        def forward(self, hidden, mask, **kwargs):
            heads = hidden[:, None]  # (B, 1, N, d)
            return torch.nn.functional.scaled_dot_product_attention(heads, heads, heads)[:, 0]

    with pytest.raises(RuntimeError, match="OwnAttention"):
        attention.prefix_kv(OwnAttention(), torch.randn(3, 8), None)


def test_eager_inner_attention_is_the_modeling_files_own():
    llava = build_llava("tiny", seed=6, attn_implementation="eager")
    attention.route_attention(llava)
    module = llava.model.language_model.layers[0].self_attn
    assert attention._inner_attention(module) is sys.modules[type(module).__module__].eager_attention_forward


def test_a_prefix_no_attention_received_is_an_error():
    llava = build_llava("tiny", seed=7)
    attention.route_attention(llava)
    module = llava.model.language_model.layers[0].self_attn
    context = attention.PrefixContext({module: (torch.zeros(4, 2, 16), torch.zeros(4, 2, 16))})
    with pytest.raises(RuntimeError, match="never received their prompt K/V"):
        context.check_used()


def test_siglip_attention_drops_keywords_and_still_gets_its_prefix(pytorch_kernels, prefix_calls):
    # SiglipAttention calls the attention interface without the forward's keyword arguments
    # (transformers 5.17-5.24): the prefix reaches it through run_layer's context variable.
    model = apply_m2pt(build_llava("tiny-siglip-qwen2", seed=8), 3, 4)
    model.backend = "fused"
    ids, pixels, labels = make_batch(model, seed=9)
    model(ids, pixels, labels=labels).loss.backward()
    vision = model.llava.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2  # no CLS, no prompt rows
    vision_calls = [call for call in prefix_calls if call[0][2] == patches]
    assert len(vision_calls) == vision.num_hidden_layers and all(call[1][1] == 3 for call in vision_calls)


@pytest.mark.parametrize("shape", ["tiny-gqa", "tiny-siglip-qwen2"])
def test_prompt_kv_capture_multiplies_by_the_qkv_projections_only(shape):
    # The method's work for prompt rows is their K and V (docs/method.md): 2·n·d_in·d_out FLOPs for
    # each of k_proj and v_proj per layer, worked from the configs, plus the unused queries (q_proj,
    # 2·n·d_in·d_q: the layer computes them before its attention). The output projection or the MLP
    # running on the prompt rows would show up here.
    from torch.utils.flop_counter import FlopCounterMode

    from m2pt_fast.method.model import clip_parts

    model = apply_m2pt(build_llava(shape, seed=10), 3, 4)
    model.backend = "fused"
    n = 5
    for layers, config in ((clip_parts(model.llava.model.vision_tower).encoder.layers,
                            model.llava.config.vision_config),
                           (model.llava.model.language_model.layers, model.llava.config.text_config)):
        layer = layers[0]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_width = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
        rows = torch.randn(n, config.hidden_size, requires_grad=True)
        kwargs = {"attention_mask": None}
        if hasattr(config, "num_key_value_heads"):  # a decoder layer: prompt positions 0..n-1
            positions = torch.arange(n)[None]
            kwargs.update(position_ids=positions,
                          position_embeddings=model.llava.model.language_model.rotary_emb(rows[None], positions))
        with FlopCounterMode(display=False) as counter:
            module, (key, value) = attention.prefix_kv(layer, rows, **kwargs)
        q_width = config.num_attention_heads * head_dim
        assert counter.get_total_flops() == 2 * n * config.hidden_size * (2 * kv_width + q_width)
        assert key.shape[-2:] == value.shape[-2:] == (n, head_dim)
        assert module is layer.self_attn
