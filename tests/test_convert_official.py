"""python -m m2pt_fast.convert_official: a checkpoint of the released M²PT code (its key names, tiny
random weights written here) becomes our prompt file, and with official_vision_features the model
computes the released code's vision features, checked against that function built independently
(hooks on a plain transformers CLIP that write each layer's prompts in, as its encoder does)."""
import pytest
import torch
import torch.nn.functional as F
from llava_fixtures import VISION, clip_directory, llama_directory, projector_file
from transformers import CLIPVisionModel, LlamaForCausalLM

from m2pt_fast import compat, load_llava
from m2pt_fast.method.convert_official import main
from m2pt_fast.method.methods import load_output

N_V, N_T = 4, 3


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A released-code checkpoint directory and the tensors put in it."""
    root = tmp_path_factory.mktemp("official")
    clip, llama = clip_directory(root / "clip"), llama_directory(root / "vicuna")
    g = torch.Generator().manual_seed(7)
    state = compat.from_pretrained(LlamaForCausalLM, llama).state_dict()
    put = {
        "vision": [torch.randn(1, N_V, VISION["hidden_size"], generator=g) for _ in range(VISION["num_hidden_layers"])],
        "text": [torch.randn(1, N_T, 64, generator=g) for _ in range(2)],
        "projector": (torch.randn(64, VISION["hidden_size"], generator=g) * 0.2, torch.randn(64, generator=g) * 0.2),
        "lm_head": torch.randn_like(state["lm_head.weight"]),
    }
    checkpoint = dict(state, **{"lm_head.weight": put["lm_head"], "model.mm_projector.weight": put["projector"][0],
                                "model.mm_projector.bias": put["projector"][1]})
    for i, p in enumerate(put["vision"]):
        checkpoint[f"model.vision_tower.vision_tower.vision_model.encoder.prompts.{i}"] = p
    for j, p in enumerate(put["text"]):
        checkpoint[f"model.prompts.{j}"] = p
    for key, tensor in compat.from_pretrained(CLIPVisionModel, clip).state_dict().items():  # it saves the tower too
        checkpoint[f"model.vision_tower.vision_tower.vision_model.{key.removeprefix('vision_model.')}"] = tensor
    (root / "ckpt").mkdir()
    torch.save(checkpoint, root / "ckpt" / "pytorch_model.bin")
    return {"root": root, "clip": clip, "llama": llama, "put": put}


def _converted(official):
    out = official["root"] / "prompts.safetensors"
    assert main([str(official["root"] / "ckpt"), str(out)]) == 0
    base = load_llava(official["llama"], vision_tower=official["clip"],
                      pretrain_mm_mlp_adapter=projector_file(official["root"] / "mm_projector.bin", "linear"))
    return load_output(base, out)


def released_vision_features(clip_dir, prompts, weight, bias, pixels):
    """The released code's function: prompts[0] prepended after the pre-layernorm, prompts[i]
    written over the prompt rows before layer i, hidden_states[-2] (the last layer's input, its
    prompts in it) minus row 0, then the linear projector."""
    tower = compat.from_pretrained(CLIPVisionModel, clip_dir).eval()
    parts = getattr(tower, "vision_model", tower)
    inputs = []

    def prepend(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = torch.cat([prompts[0].expand(embeds.shape[0], -1, -1), embeds], dim=1)
        return args, kwargs

    def overwrite(index):
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[:, :N_V] = prompts[index]
            inputs.append(hidden)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return hook

    handles = [parts.encoder.register_forward_pre_hook(prepend, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(overwrite(i), with_kwargs=True)
                for i, layer in enumerate(parts.encoder.layers)]
    with torch.no_grad():
        tower(pixels)
    for h in handles:
        h.remove()
    return F.linear(inputs[-1][:, 1:], weight, bias)  # hidden_states[-2] is the last layer's input


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_converted_prompts_compute_the_released_code_s_vision_features(official, backend):
    model = _converted(official)
    model.backend = backend
    put = official["put"]
    assert model.m2pt_config.official_vision_features and model.m2pt_config.tune_lm_head
    assert torch.equal(model.vision_prompts, torch.cat(put["vision"]))  # all 3 layers: the last one's raw rows
    assert torch.equal(model.text_prompts, torch.cat(put["text"]))
    assert torch.equal(model.llava.lm_head.weight, put["lm_head"])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = released_vision_features(official["clip"], [p for p in put["vision"]], *put["projector"], pixels)
    assert model.image_seq_length == expected.shape[1] == N_V - 1 + 1 + 16  # prompt rows but row 0, CLS, patches
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(pixels), expected, rtol=1e-5, atol=1e-5)


def test_the_method_s_selection_differs_and_refuses_official_prompts(official):
    from m2pt_fast import apply_m2pt, load_prompts
    from m2pt_fast.method.prompt_io import PromptFileError

    _converted(official)
    base = load_llava(official["llama"], vision_tower=official["clip"],
                      pretrain_mm_mlp_adapter=official["root"] / "mm_projector.bin")
    plain = apply_m2pt(base, N_V, N_T, tune_lm_head=True)
    with pytest.raises(PromptFileError, match="official_vision_features: file true, model false"):
        load_prompts(plain, official["root"] / "prompts.safetensors")


def test_a_checkpoint_without_prompts_is_refused(official, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    torch.save({"model.mm_projector.weight": torch.zeros(2, 2)}, tmp_path / "ckpt" / "pytorch_model.bin")
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert "no decoder prompts in the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
