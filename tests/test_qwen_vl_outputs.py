"""What a Qwen2.5-VL or Qwen3-VL run leaves, and the baselines on them: the prompt file (the LLaVA format,
the merger(s) under projector., the family in the metadata) reads back into a fresh model; local model
directories load through load_model; VPT, text prompts, LoRA and full fine-tuning train what they say,
and their outputs load back to the same logits; on an NF4 backbone (tower and decoder quantized, the
mergers and lm_head dense) M²PT computes what it computes on the dequantized weights."""
import pytest
import torch
from test_qwen_vl import FAMILIES, batch, build

from m2pt_fast import apply_m2pt, load_prompts, quantize_model, save_prompts, trainable_report
from m2pt_fast.method.methods import apply_method, load_output, save_output
from m2pt_fast.method.prompt_io import PromptFileError
from m2pt_fast.models.loading import load_model
from m2pt_fast.models.quantize import NF4Linear

pytest.importorskip("peft")


def fp32_batch(seed):
    """test_qwen_vl's batch with fp32 pixels: these models are fp32, as prompt files are."""
    inputs = batch(seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].float()
    return inputs


def logits(model, inputs):
    model.eval()  # LoRA's dropout off
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def perturb(module, seed):
    """Move every parameter of `module` off its initial value (what training would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_prompt_file_reads_back_into_a_fresh_model(family, tmp_path):
    tuned = apply_m2pt(build(family, torch.float32), 3, 2)
    perturb(tuned.projector, seed=1)
    path = save_prompts(tuned, tmp_path / "prompts.safetensors")
    inputs = fp32_batch(seed=2)
    expected = logits(tuned, inputs)
    fresh = apply_m2pt(build(family, torch.float32), 3, 2)  # the same base weights, new prompts and an untrained merger
    assert not torch.equal(logits(fresh, inputs), expected)
    metadata = load_prompts(fresh, path)
    assert metadata["family"] == family
    assert torch.equal(logits(fresh, inputs), expected)


def test_a_prompt_file_of_another_family_is_refused_with_nothing_changed(tmp_path):
    path = save_prompts(apply_m2pt(build("qwen2_5_vl", torch.float32), 3, 2), tmp_path / "prompts.safetensors")
    other = apply_m2pt(build("qwen3_vl", torch.float32), 3, 2)
    before = other.vision_prompts.detach().clone()
    with pytest.raises(PromptFileError, match="trained on a qwen2_5_vl model; this is a qwen3_vl"):
        load_prompts(other, path)
    assert torch.equal(other.vision_prompts, before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_local_directory_loads_through_load_model(family, tmp_path):
    original = build(family, torch.float32)
    original.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model", dtype=torch.float32)
    assert type(loaded) is type(original)
    inputs = fp32_batch(seed=3)
    assert torch.equal(logits(loaded, inputs), logits(original, inputs))


TRAINED_GROUPS = {"vpt": {"vision prompts", "projector"}, "text_pt": {"text prompts", "projector"},
                  "lora": {"lora", "projector"}, "full": {"backbone", "lm_head", "projector"}}


@pytest.mark.parametrize("method", sorted(TRAINED_GROUPS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_baseline_trains_its_groups_and_its_output_loads_back(family, method, tmp_path):
    prompts = {"vpt": (3, 0), "text_pt": (0, 2)}.get(method, (0, 0))
    model = apply_method(build(family, torch.float32), method, num_vision_prompts=prompts[0],
                         num_text_prompts=prompts[1], tune_projector=True)
    report = trainable_report(model)
    assert {name for name, group in report.groups.items() if group.trainable} == TRAINED_GROUPS[method]
    trained = [p for p in model.parameters() if p.requires_grad]
    perturb_target = torch.nn.ParameterList(trained)
    perturb(perturb_target, seed=4)
    inputs = fp32_batch(seed=5)
    expected = logits(model, inputs)
    path = save_output(model, tmp_path / method)
    back = load_output(build(family, torch.float32), path, method)
    assert back.method == method
    assert torch.equal(logits(back, inputs), expected)


def dequantized(model):
    """`model` with every NF4Linear replaced by an nn.Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_m2pt_on_an_nf4_backbone_computes_what_it_does_on_the_dequantized_weights(family, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch paths
    quantized = build(family, torch.float32)
    report = quantize_model(quantized)
    assert any(".visual.blocks." in name for name in report.quantized)
    assert any(".language_model.layers." in name for name in report.quantized)
    assert not any("merger" in name or "lm_head" in name for name in report.quantized)
    twin = build(family, torch.float32)  # the same weights (build is seeded), quantized the same way
    quantize_model(twin)
    dense = dequantized(twin)
    inputs = fp32_batch(seed=6)
    losses, grads = [], []
    for backbone in (quantized, dense):
        torch.manual_seed(7)
        model = apply_m2pt(backbone, 2, 2, backend=backend)
        loss = model(**inputs).loss
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [model.vision_prompts, model.text_prompts]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)  # fp32: nf4_linear vs F.linear
    for ours, theirs in zip(*grads):
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
