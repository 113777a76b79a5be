"""quantize_model / save_quantized / load_quantized on a tiny LLaVA built from config (nothing is
downloaded), including a checkpoint serialized by bitsandbytes itself."""
import json
import logging

import pytest
import torch
from torch import nn

from m2pt_fast.models.quantize import NF4Linear, QuantizeConfig, load_quantized, quantize_model, save_quantized
from m2pt_kernels import nf4_quantize
from m2pt_kernels.reference import nf4_dequantize_reference

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 127
N_IMAGE_TOKENS = (28 // 7) ** 2  # one per patch with the "default" feature strategy


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=7),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128),
        image_token_id=IMAGE_TOKEN,
    )
    return LlavaForConditionalGeneration(config).eval()


def batch(seed=1, n_text=12, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN, (batch_size, n_text), generator=g)
    ids = torch.cat([text[:, :2], torch.full((batch_size, N_IMAGE_TOKENS), IMAGE_TOKEN), text[:, 2:]], dim=1)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(batch_size, 3, 28, 28, generator=g)}


@pytest.fixture(scope="module")
def fp_model():
    return tiny_llava()


@pytest.fixture(scope="module")
def inputs():
    return batch()


def _clone(model):
    import copy

    return copy.deepcopy(model)


def _n_linear(model, fragment):
    return sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if fragment in n)


def test_quantize_model_replaces_backbone_linears_only(fp_model, caplog):
    model = _clone(fp_model)
    n_vision, n_text = _n_linear(model, "vision_tower"), _n_linear(model, "language_model")
    with caplog.at_level(logging.INFO, logger="m2pt_fast.models.quantize"):
        report = quantize_model(model)
    assert len(report.quantized) == n_vision + n_text == 3 * 6 + 2 * 7
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in report.quantized)
    assert _n_linear(model, "vision_tower") == _n_linear(model, "language_model") == 0
    assert isinstance(model.lm_head, nn.Linear)
    assert _n_linear(model, "multi_modal_projector") == 2
    assert isinstance(model.model.language_model.embed_tokens, nn.Embedding)
    assert report.bytes_after < report.bytes_before
    assert "MiB" in caplog.text


def test_quantize_model_config_is_respected(fp_model):
    model = _clone(fp_model)
    report = quantize_model(model, QuantizeConfig(targets=("language_model",), blocksize=32, double_quant=False))
    assert all("language_model" in n for n in report.quantized)
    layer = model.get_submodule(report.quantized[0])
    assert layer.blocksize == 32 and not layer.double_quant
    assert _n_linear(model, "vision_tower") == 18
    with pytest.raises(ValueError, match="blocksize"):
        QuantizeConfig(blocksize=100)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(model, targets=("nonexistent",))


def test_quantized_weights_are_the_reference_bytes(fp_model):
    model = _clone(fp_model)
    w = model.model.language_model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize_model(model)
    layer = model.model.language_model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight_packed, nf4_quantize(w).packed)
    assert torch.equal(layer.weight, nf4_dequantize_reference(nf4_quantize(w)))


def test_quantized_loss_is_close_to_fp32(fp_model, inputs):
    model = _clone(fp_model)
    with torch.no_grad():
        loss_fp = fp_model(**inputs).loss
        quantize_model(model)
        loss_q = model(**inputs).loss
    assert torch.isfinite(loss_q)
    # NF4 keeps ~20 dB of each weight; on this random model that moves the loss by well under 1%
    assert abs(loss_q - loss_fp) < 0.01 * loss_fp, (loss_q.item(), loss_fp.item())


def test_gradients_reach_inputs_through_nf4_layers(fp_model, inputs):
    model = _clone(fp_model)
    quantize_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    out = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], labels=inputs["labels"])
    out.loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all() and embeds.grad.abs().sum() > 0


@pytest.mark.parametrize("double_quant", [True, False])
def test_save_load_round_trip(fp_model, inputs, tmp_path, double_quant):
    model = _clone(fp_model)
    quantize_model(model, double_quant=double_quant)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert type(loaded) is type(model)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_float_checkpoint_is_quantized_while_streaming(fp_model, inputs, tmp_path):
    fp_model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_quantized(tmp_path)
    expected = _clone(fp_model)
    quantize_model(expected)
    assert {n for n, m in loaded.named_modules() if isinstance(m, NF4Linear)} == \
           {n for n, m in expected.named_modules() if isinstance(m, NF4Linear)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)


def _save_with_bitsandbytes(model, directory, double_quant=True):
    """The checkpoint transformers writes for a bitsandbytes 4-bit LLaVA, made with bitsandbytes'
    own Linear4bit (transformers' loader would need accelerate): same keys, same quantization_config."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    model = _clone(model)
    skip = ("multi_modal_projector", "lm_head")
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and not any(s in name for s in skip):
            layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type="nf4", blocksize=64)
            layer.bias = lin.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to() quantizes
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": list(skip),
    }
    (directory / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_checkpoint_loads(fp_model, inputs, tmp_path, double_quant):
    bnb_model = _save_with_bitsandbytes(fp_model, tmp_path, double_quant)
    loaded = load_quantized(tmp_path)
    ours = _clone(fp_model)
    quantize_model(ours, double_quant=double_quant)
    # the same bytes as quantizing ourselves, hence the same function
    name = "model.language_model.layers.1.self_attn.o_proj"
    assert torch.equal(loaded.get_submodule(name).weight_packed, ours.get_submodule(name).weight_packed)
    with torch.no_grad():
        ref = ours(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, ref, rtol=0, atol=0)
    # bitsandbytes' own CPU forward of this model is not a usable oracle: its 0.50.2 CPU dequantize
    # misplaces scales when a row is shorter than a block, as the vision tower's 32 features are
    del bnb_model


def test_truncated_checkpoint_is_a_clear_error(fp_model, tmp_path):
    model = _clone(fp_model)
    quantize_model(model)
    save_quantized(model, tmp_path)
    path = tmp_path / "nf4_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(tmp_path)


def test_missing_tensors_are_a_clear_error(fp_model, tmp_path):
    from safetensors.torch import load_file, save_file

    fp_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    # transformers writes LLaVA under its legacy names (language_model.model.*); the loader maps them
    (key,) = [k for k in tensors if k.endswith("model.norm.weight")]
    del tensors[key]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="incomplete.*language_model.norm.weight"):
        load_quantized(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path)


def test_apply_m2pt_on_a_quantized_model(fp_model, inputs):
    from m2pt_fast import apply_m2pt

    llava = _clone(fp_model)
    quantize_model(llava)
    model = apply_m2pt(llava, 2, 3)
    ids, pixels, labels = inputs["input_ids"], inputs["pixel_values"], inputs["labels"]
    with torch.no_grad():
        loss_reference = model(ids, pixels, labels=labels).loss
    model.backend = "fused"
    loss = model(ids, pixels, labels=labels).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    for prompts in (model.vision_prompts, model.text_prompts):
        assert prompts.grad is not None and torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    # nothing inside the NF4 layers trains
    assert not any(p.requires_grad for m in llava.modules() if isinstance(m, NF4Linear) for p in m.parameters())


@pytest.mark.slow  # about 30 s on 2 cores
def test_gradient_checkpointing_on_a_quantized_model(fp_model, inputs):
    from m2pt_fast import apply_m2pt

    llava = _clone(fp_model)
    quantize_model(llava)
    model = apply_m2pt(llava, 2, 3, backend="fused")
    ids, pixels, labels = inputs["input_ids"], inputs["pixel_values"], inputs["labels"]
    model.train()
    model(ids, pixels, labels=labels).loss.backward()
    plain = model.text_prompts.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, pixels, labels=labels).loss.backward()
    torch.testing.assert_close(model.text_prompts.grad, plain, rtol=1e-5, atol=1e-7)


def test_bitsandbytes_checkpoint_errors(fp_model, tmp_path):
    from safetensors.torch import load_file, save_file

    _save_with_bitsandbytes(fp_model, tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fp4.*only nf4"):
        load_quantized(tmp_path)
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    config_path.write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (key,) = [k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight.nested_absmax") and "language" in k]
    del tensors[key]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="nested_absmax"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("double_quant", [True, False])
def test_casting_the_model_keeps_nf4_statistics_fp32(fp_model, inputs, double_quant):
    # DeepSpeed's bf16 mode calls module.bfloat16(): dense parameters change dtype, the NF4 format not
    model = _clone(fp_model)
    quantize_model(model, double_quant=double_quant)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    before = layer.nf4_weight()
    model.bfloat16()
    after = layer.nf4_weight()
    assert after.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert torch.equal(nf4_dequantize_reference(after), nf4_dequantize_reference(before))
    assert model.model.language_model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        batch_bf16 = dict(inputs, pixel_values=inputs["pixel_values"].bfloat16())
        assert torch.isfinite(model(**batch_bf16).loss)
