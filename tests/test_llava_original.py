"""LLaVA's own checkpoint layout and the paper's assembly (LLaMA + CLIP + LLaVA's stage-1 projector),
loaded into transformers' Llava: the logits equal LLaVA's computation done by hand from the same
files (CLIP features of the selected layer, the projector, the LLaMA decoder on the spliced
sequence), and every bad source is refused naming what is wrong."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from llava_fixtures import VOCAB, clip_directory, llama_directory, llava_directory, projector_file, projector_tensors
from transformers import CLIPVisionModel, LlamaForCausalLM

from m2pt_fast import compat, load_llava
from m2pt_fast.models.llava_original import LlavaSourceError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"root": root, "clip": clip_directory(root / "clip"),
            "clip_vision": clip_directory(root / "cv", whole=False), "llama": llama_directory(root / "llama")}


def llava_by_hand(llama_dir, clip_dir, projector, layer, feature, before, after, pixels):
    """What LLaVA computes: CLIP hidden states of `layer` (CLS dropped for "patch"), the projector,
    spliced between the text before and after the image, through the LLaMA decoder."""
    tower = compat.from_pretrained(CLIPVisionModel, clip_dir).eval()
    llama = compat.from_pretrained(LlamaForCausalLM, llama_dir).eval()
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True).hidden_states[layer]
        states = states[:, 1:] if feature == "patch" else states
        if "model.mm_projector.weight" in projector:
            image = F.linear(states, projector["model.mm_projector.weight"], projector["model.mm_projector.bias"])
        else:
            hidden = F.gelu(F.linear(states, projector["model.mm_projector.0.weight"],
                                     projector["model.mm_projector.0.bias"]))
            image = F.linear(hidden, projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"])
        embed = llama.get_input_embeddings()
        sequence = torch.cat([embed(before), image, embed(after)], dim=1)
        return llama(inputs_embeds=sequence).logits, image.shape[1]


def ours(model, before, after, image_tokens, pixels):
    ids = torch.cat([before, torch.full((before.shape[0], image_tokens), model.config.image_token_id), after], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


CASES = {  # name: (how the source is made, projector kind, select layer, select feature, tower)
    "llava-mlp2x-bin": ("llava", "mlp2x_gelu", -2, "patch", "clip"),
    "llava-linear-safetensors-cls_patch": ("llava-st", "linear", -1, "cls_patch", "clip_vision"),
    "paper-assembly-linear": ("assembly", "linear", -2, "patch", "clip"),
    "assembly-mlp2x": ("assembly", "mlp2x_gelu", -2, "patch", "clip_vision"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_source_computes_what_llava_computes(files, case, tmp_path):
    how, kind, layer, feature, tower = CASES[case]
    clip = files[tower]
    if how == "assembly":
        model = load_llava(files["llama"], vision_tower=clip,
                           pretrain_mm_mlp_adapter=projector_file(tmp_path / "mm_projector.bin", kind))
    else:
        source = llava_directory(tmp_path / "llava", files["llama"], clip, kind, select_layer=layer,
                                 select_feature=feature, safetensors=how == "llava-st")
        model = load_llava(source)  # the tower named by the config's mm_vision_tower (a local directory)
    assert model.config.image_token_id == VOCAB and model.lm_head.out_features == VOCAB
    g = torch.Generator().manual_seed(0)
    before, after = torch.randint(1, VOCAB, (2, 3), generator=g), torch.randint(1, VOCAB, (2, 5), generator=g)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    expected, image_tokens = llava_by_hand(files["llama"], clip, projector_tensors(kind), layer, feature, before,
                                           after, pixels)
    torch.testing.assert_close(ours(model, before, after, image_tokens, pixels), expected, rtol=1e-5, atol=1e-5)


def test_a_vision_tower_argument_wins_over_the_config(files, tmp_path):
    source = llava_directory(tmp_path / "llava", files["llama"], tmp_path / "gone", "linear")
    with pytest.raises(LlavaSourceError, match="is not a local directory: pass vision_tower"):
        load_llava(source)
    assert load_llava(source, vision_tower=files["clip"]).config.vision_config.hidden_size == 32


def _without_projector(source):
    weights = torch.load(source / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in weights.items() if "mm_projector" not in k}, source / "pytorch_model.bin")


@pytest.mark.parametrize("problem, says", [
    ("no projector", "no projector weights"),
    ("projector of another width", "the projector maps 48 -> 64 features but the vision tower gives 32"),
    ("tower not CLIP", "is a 'llama' model, not CLIP"),
    ("plain llama, no adapter", "give pretrain_mm_mlp_adapter"),
    ("adapter without LLaVA keys", "holds no model.mm_projector.* tensors"),
    ("config says linear, weights are mlp", "mm_projector_type is 'linear' but the weights are a mlp2x_gelu"),
])
def test_bad_sources_are_refused_naming_what_is_wrong(files, tmp_path, problem, says):
    kwargs = {}
    if problem == "no projector":
        source = llava_directory(tmp_path / "llava", files["llama"], files["clip"])
        _without_projector(source)
    elif problem == "projector of another width":
        source = files["llama"]
        torch.save({"model.mm_projector.weight": torch.zeros(64, 48), "model.mm_projector.bias": torch.zeros(64)},
                   tmp_path / "p.bin")
        kwargs = dict(vision_tower=files["clip"], pretrain_mm_mlp_adapter=tmp_path / "p.bin")
    elif problem == "tower not CLIP":
        source, kwargs = files["llama"], dict(vision_tower=files["llama"],
                                              pretrain_mm_mlp_adapter=projector_file(tmp_path / "p.bin", "linear"))
    elif problem == "plain llama, no adapter":
        source, kwargs = files["llama"], dict(vision_tower=files["clip"])
    elif problem == "adapter without LLaVA keys":
        torch.save({"weight": torch.zeros(1)}, tmp_path / "p.bin")
        source, kwargs = files["llama"], dict(vision_tower=files["clip"], pretrain_mm_mlp_adapter=tmp_path / "p.bin")
    else:
        source = llava_directory(tmp_path / "llava", files["llama"], files["clip"], "mlp2x_gelu")
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(LlavaSourceError, match=says.replace("(", r"\(").replace("*", r"\*").replace(".", r"\.")):
        load_llava(source, **kwargs)


def test_add_image_token_gives_the_model_s_id_and_refuses_another_vocabulary(files):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from m2pt_fast.models.llava_original import add_image_token

    model = load_llava(files["llama"], vision_tower=files["clip"],
                       pretrain_mm_mlp_adapter=projector_file(files["root"] / "p.bin", "linear"))
    words = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")))
    add_image_token(tokenizer, model)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == VOCAB
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"w{i}": i for i in range(VOCAB - 1)}, unk_token="w0")))
    with pytest.raises(LlavaSourceError, match="a tokenizer of another vocabulary"):
        add_image_token(small, model)


@pytest.mark.slow
def test_the_trainer_starts_from_the_paper_s_assembly(files, tmp_path):
    from launch import python_run

    from m2pt_fast.data import build_word_tokenizer, synthetic_texts, words_of, write_llava_json
    from m2pt_fast.data.conversation import SYSTEM_PROMPT

    data_path, images = write_llava_json(tmp_path / "data", 8, seed=1)
    texts = [*synthetic_texts(), SYSTEM_PROMPT, "USER: ASSISTANT:", Path(data_path).read_text()]
    tokenizer = build_word_tokenizer(words_of(texts))  # its <image> is the last id: the LLaMA lacks that row
    llama = llama_directory(tmp_path / "vicuna", vocab=len(tokenizer) - 1, tokenizer=tokenizer)
    adapter = projector_file(tmp_path / "mm_projector.bin", "linear")
    out = tmp_path / "out"
    result = python_run(out, "--model_name_or_path", str(llama), "--vision_tower", str(files["clip"]),
                        "--pretrain_mm_mlp_adapter", str(adapter), "--data_path", str(data_path), "--image_folder",
                        str(images), "--per_device_train_batch_size", "4", "--max_steps", "2",
                        "--dataloader_num_workers", "0")
    assert "method m2pt" in result.stderr
    run = json.loads((out / "run_config.json").read_text())
    assert run["config"]["pretrain_mm_mlp_adapter"] == str(adapter)
    assert (out / "prompts.safetensors").is_file()


def test_the_paper_s_recipe_names_the_assembly_with_trainer_options():
    import dataclasses

    import yaml

    from m2pt_fast.training.config import TrainConfig

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "m2pt_llava_v1_7b.yaml").read_text())
    assert set(recipe) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"vision_tower", "pretrain_mm_mlp_adapter"} <= set(recipe)
    assert recipe["mm_vision_select_layer"] == -2 and recipe["mm_vision_select_feature"] == "patch"


def test_any_source_is_written_once_as_an_nf4_directory_that_trains(files, tmp_path):
    from launch import python_run

    from m2pt_fast.data import build_word_tokenizer, synthetic_texts, words_of, write_llava_json
    from m2pt_fast.data.conversation import SYSTEM_PROMPT
    from m2pt_fast.models.quantize import load_quantized, quantize_model
    from m2pt_fast.models.to_nf4 import main as to_nf4

    data_path, images = write_llava_json(tmp_path / "data", 8, seed=1)
    texts = [*synthetic_texts(), SYSTEM_PROMPT, "USER: ASSISTANT:", Path(data_path).read_text()]
    tokenizer = build_word_tokenizer(words_of(texts))  # <image> is its last id, which the LLaMA lacks
    llama = llama_directory(tmp_path / "vicuna", vocab=len(tokenizer) - 1, tokenizer=tokenizer)
    source = llava_directory(tmp_path / "llava", llama, files["clip"], "linear")  # LLaVA's own layout
    tokenizer.save_pretrained(source)
    out = tmp_path / "nf4"
    assert to_nf4([str(source), str(out)]) == 0
    assert {"config.json", "nf4_model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()}
    # the directory loads to what quantizing the loaded source gives: the same logits, bit for bit
    loaded = load_quantized(out)
    expected = load_llava(source, dtype=torch.bfloat16)
    # every half in the dtype asked for (a LLaMA config's "float32" once left the decoder in fp32)
    assert {p.dtype for p in expected.parameters()} == {torch.bfloat16}
    quantize_model(expected)
    ids = torch.tensor([[1, 5, 6] + [expected.config.image_token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits,
                           expected(input_ids=ids, pixel_values=pixels).logits)
    assert loaded.lm_head.out_features == len(tokenizer) - 1  # the original vocabulary's logits only
    result = python_run(tmp_path / "run", "--model_name_or_path", str(out), "--quant", "nf4", "--data_path",
                        str(data_path), "--image_folder", str(images), "--per_device_train_batch_size", "4",
                        "--max_steps", "2", "--dataloader_num_workers", "0")
    assert "nf4 backbone" in result.stderr and (tmp_path / "run" / "prompts.safetensors").is_file()
    # a second write never overwrites, and a quantized checkpoint in LLaVA's layout is named
    assert to_nf4([str(source), str(out)]) == 2
    quantized = tmp_path / "llava-8bit"
    quantized.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaSourceError, match="only bitsandbytes' 4-bit NF4 loads"):
        load_llava(quantized)


def test_a_bitsandbytes_4bit_checkpoint_in_llava_s_layout_loads_its_nf4_weights(files, tmp_path):
    # What saving a LLaVA loaded in 4 bits gives: the decoder's linear weights as transformers serializes
    # bitsandbytes' (packed codes + weight.* statistics), the rest dense, a quantization_config.
    from m2pt_fast.models.quantize import NF4Linear
    from m2pt_kernels import nf4_quantize

    source = llava_directory(tmp_path / "llava", files["llama"], files["clip"], "mlp2x_gelu")
    weights = torch.load(source / "pytorch_model.bin")
    packed = {}
    for key, tensor in weights.items():
        if key.startswith("model.layers.") and key.endswith("_proj.weight"):
            packed.update({f"{key[:-len('.weight')]}.{k}": v
                           for k, v in nf4_quantize(tensor).bnb_state_dict("weight").items()})
        else:
            packed[key] = tensor
    quantized = tmp_path / "llava-4bit"
    quantized.mkdir()
    torch.save(packed, quantized / "pytorch_model.bin")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (quantized / "config.json").write_text(json.dumps(config))

    loaded = load_llava(quantized)
    layers = [m for m in loaded.model.language_model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7  # every decoder projection of both layers, in 4 bits
    expected = load_llava(source)  # the float model with the same layers quantized by hand
    for name, module in list(expected.model.language_model.named_modules()):
        if name.endswith("_proj"):
            parent, _, child = name.rpartition(".")
            setattr(expected.model.language_model.get_submodule(parent), child, NF4Linear.from_linear(module))
    ids = torch.tensor([[1, 5, 6] + [expected.config.image_token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits,
                           expected(input_ids=ids, pixel_values=pixels).logits)
