"""The prompt file: round trip, contents, and refusal of files made for another model."""
import pytest
import torch
from model_inputs import make_batch
from safetensors import safe_open

from m2pt_fast import apply_m2pt, build_llava, load_prompts, save_prompts


def test_round_trip_restores_outputs(tmp_path):
    trained = apply_m2pt(build_llava("tiny", seed=0), 3, 4)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = save_prompts(trained, tmp_path / "out" / "prompts.safetensors")

    fresh = apply_m2pt(build_llava("tiny", seed=0), 3, 4)  # same backbone, other prompts/projector
    ids, pixels, labels = make_batch(fresh)
    assert not torch.allclose(fresh(ids, pixels).logits, trained(ids, pixels).logits)
    metadata = load_prompts(fresh, path)
    assert torch.equal(fresh(ids, pixels, labels=labels).logits, trained(ids, pixels, labels=labels).logits)
    assert metadata["num_vision_prompts"] == "3" and metadata["num_text_prompts"] == "4"


def test_file_holds_only_tuned_tensors(tmp_path):
    model = apply_m2pt(build_llava("tiny"), 2, 2, tune_lm_head=True)
    path = save_prompts(model, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert f.get_tensor("vision_prompts").shape == (2, 2, 32)
        assert f.get_tensor("text_prompts").shape == (2, 2, 64)
    projector = {f"projector.{k}" for k in model.projector.state_dict()}
    assert keys == {"vision_prompts", "text_prompts", "lm_head.weight"} | projector
    assert meta["format"] == "m2pt-prompts" and meta["tune_lm_head"] == "true"


@pytest.mark.parametrize("other", [
    dict(name="tiny", nv=2, nt=3),        # other prompt count
    dict(name="tiny", nv=3, nt=2),
])
def test_file_for_another_model_is_refused(tmp_path, other):
    source = apply_m2pt(build_llava(other["name"]), other["nv"], other["nt"])
    path = save_prompts(source, tmp_path / "p.safetensors")
    target = apply_m2pt(build_llava("tiny"), 2, 2)
    before = target.text_prompts.detach().clone()
    with pytest.raises(ValueError, match="does not fit this model") as info:
        load_prompts(target, path)
    assert "num_" in str(info.value)
    assert torch.equal(target.text_prompts, before)  # nothing was loaded


def test_file_for_another_width_is_refused(tmp_path):
    config_path = tmp_path / "p.safetensors"
    wide = build_llava("tiny")
    save_prompts(apply_m2pt(wide, 2, 2), config_path)
    from m2pt_fast.models.llava import llava_config
    config = llava_config("tiny")
    config.text_config.hidden_size = 96
    narrow = apply_m2pt(build_llava(config), 2, 2)
    with pytest.raises(ValueError, match="text_hidden_size: file 64, model 96"):
        load_prompts(narrow, config_path)


def test_missing_or_foreign_file(tmp_path):
    model = apply_m2pt(build_llava("tiny"), 1, 1)
    with pytest.raises(FileNotFoundError):
        load_prompts(model, tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.randn(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an m2pt prompt file"):
        load_prompts(model, tmp_path / "foreign.safetensors")


def test_file_is_fp32_and_takes_the_values_given_for_parameters(tmp_path):
    # a bf16 model, as DeepSpeed's bf16 mode leaves it; the masters are what training produced
    model = apply_m2pt(build_llava("tiny", seed=0, dtype=torch.bfloat16), 3, 5)
    master = model.text_prompts.detach().float() + 1e-3 * torch.rand(model.text_prompts.shape)
    assert not master.equal(master.bfloat16().float())  # bits a bf16 copy cannot hold
    path = save_prompts(model, tmp_path / "p.safetensors", {model.text_prompts: master})
    with safe_open(str(path), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert saved["text_prompts"].equal(master)
    assert saved["vision_prompts"].equal(model.vision_prompts.detach().float())  # bf16 widens exactly
    weight = model.projector.linear_1.weight
    assert saved["projector.linear_1.weight"].equal(weight.detach().float())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "prompts" in k or "projector" in k}


def test_a_file_missing_what_its_metadata_promises_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = apply_m2pt(build_llava("tiny", seed=1), 2, 3)  # tune_projector=True
    path = save_prompts(model, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("projector.")}
    save_file(tensors, str(path), metadata=metadata)
    fresh = apply_m2pt(build_llava("tiny", seed=1), 2, 3)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"projector\.linear_1\.weight: missing from the file \(its metadata says"):
        load_prompts(fresh, path)
    assert all(torch.equal(v, before[k]) for k, v in _state(fresh).items())  # nothing changed


@pytest.mark.parametrize("damage", ["truncated", "empty", "torch_pickle", "text"])
def test_an_unreadable_file_gets_our_error_with_its_path(tmp_path, damage):
    from m2pt_fast.method.prompt_io import PromptFileError

    model = apply_m2pt(build_llava("tiny", seed=2), 2, 3)
    path = save_prompts(model, tmp_path / "p.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "torch_pickle":
        torch.save({"vision_prompts": model.vision_prompts.detach()}, path)
    else:
        path.write_text("not a prompt file\n")
    before = _state(model)
    with pytest.raises(PromptFileError, match=str(path)):
        load_prompts(model, path)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
