"""The paper's methods in the trainer (--method m2pt | vpt | text_pt | lora | full): what each trains,
what it leaves and how that loads back, PEFT's own LoRA as the oracle for ours, the parameter counts of
the paper's "% tuned" column by formula on the llava-v1-7b shape, and the refused combinations."""
import json
import re

import pytest
import torch
from launch import ROOT, TRAIN, deepspeed_run, python_run
from model_inputs import make_batch

from m2pt_fast import build_llava, trainable_report
from m2pt_fast.method.methods import METHODS, OUTPUT_NAMES, LoraSettings, apply_method, lora_config
from m2pt_fast.training.config import parse_args

peft = pytest.importorskip("peft")

PROBE = ROOT / "tests" / "method_probe.py"
SMALL_LORA = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
PROJECTOR = r"llava\.model\.multi_modal_projector\.(modules_to_save\.default\.)?linear_[12]\.(weight|bias)"
# what each method may change, by parameter name (the model is an M2PTLlava around transformers' LLaVA)
TRAINS = {
    "m2pt": [r"vision_prompts", r"text_prompts", PROJECTOR],
    "vpt": [r"vision_prompts", PROJECTOR],
    "text_pt": [r"text_prompts", PROJECTOR],
    "lora": [r"llava\.model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.default\.weight",
             PROJECTOR],
    "full": [r"llava\.model\.language_model\..*", r"llava\.lm_head\.weight", PROJECTOR],
}


@pytest.fixture(scope="module")
def method_run(tmp_path_factory):
    """method_run(method, config, *extra): the output directory of a 4-step, 2-process run (cached)."""
    done = {}

    def run(method: str, config: str, *extra: str):
        key = (method, config, extra)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{method}-{config}")
            deepspeed_run(out, "--method", method, "--ds_config", f"configs/{config}.json", "--max_steps", "4",
                          "--save_steps", "2", "--dataloader_num_workers", "0", "--warmup_ratio", "0",
                          "--learning_rate", "3e-3", *(SMALL_LORA if method == "lora" else []), *extra,
                          script=PROBE if config != "zero3" else TRAIN)
            done[key] = out
        return done[key]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [(m, []) for m in METHODS] + [("lora", ["--quant", "nf4"])],
                         ids=[*METHODS, "qlora"])
def test_each_method_trains_its_parameters_only_and_its_output_loads_back(method, extra, method_run):
    tmp_path = method_run(method, "zero2", *extra)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    probe = json.loads((tmp_path / "probe.json").read_text())
    allowed = re.compile("|".join(f"(?:{p})" for p in TRAINS[method]))
    assert probe["changed"], "training changed nothing"
    strays = [name for name in probe["changed"] if not allowed.fullmatch(name)]
    assert not strays, f"{method} changed parameters it must not train: {strays[:5]}"
    # every pattern's parameters did train (the method is not a subset of itself)
    for pattern in TRAINS[method]:
        assert any(re.fullmatch(pattern, name) for name in probe["changed"]), pattern
    assert probe["changed"] == probe["trainable"]
    # the output, loaded onto a freshly built base model, is the trained model (fp32, same batch)
    assert probe["loaded_loss"] == pytest.approx(probe["trained_loss"], rel=1e-6, abs=1e-6)
    run = json.loads((tmp_path / "run_config.json").read_text())
    assert run["method"] == method and 0 < run["trainable_parameters"] < run["total_parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_under_zero3_train_like_zero2(method, method_run):
    zero2, zero3 = method_run(method, "zero2"), method_run(method, "zero3")
    losses = [[json.loads(r)["loss"] for r in (p / "metrics.jsonl").read_text().splitlines()] for p in (zero2, zero3)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    output = OUTPUT_NAMES[method]
    ours, theirs = _safetensors_in(zero3 / output), _safetensors_in(zero2 / output)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:  # the same function partitioned differently: equal up to fp32 reduction order
        assert (ours[name] - theirs[name]).abs().max() < 1e-5, name


def test_lora_computes_what_peft_s_own_lora_model_computes():
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0)
    ours = apply_method(build_llava("tiny", seed=3), "lora", lora=settings)
    with torch.no_grad():  # PEFT starts B at zero: give the adapter a value that shows
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    # PEFT's own model of the same LLaVA weights, through transformers' LLaVA forward
    theirs = peft.get_peft_model(build_llava("tiny", seed=3), lora_config(settings, tune_projector=True))
    missing, unexpected = theirs.load_state_dict(
        {f"base_model.model.{k}": v for k, v in ours.llava.state_dict().items()}, strict=False)
    assert not missing and not unexpected
    ours.eval(), theirs.eval()
    ids, pixels, _ = make_batch(ours)
    with torch.no_grad():
        mine = ours(ids, pixels).logits
        peft_logits = theirs(input_ids=ids, pixel_values=pixels).logits
        plain = build_llava("tiny", seed=3)(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(peft_logits, plain, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(mine, peft_logits, rtol=1e-5, atol=1e-5)


def _clip_tower(c) -> int:
    d, ff, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    positions = (c.image_size // c.patch_size) ** 2 + 1
    embeddings = d + 3 * c.patch_size ** 2 * d + positions * d
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    return embeddings + 2 * d + layers * layer + 2 * d  # pre- and post-layernorm


def _llama_decoder(c) -> int:
    d, ff, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    return 2 * c.vocab_size * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d  # embeddings, lm_head untied


@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts_on_the_llava_v1_7b_shape_equal_the_formulas(method):
    with torch.device("meta"):
        llava = build_llava("llava-v1-7b", device="meta", dtype=torch.bfloat16, seed=None)
        config = llava.config
        v, t = config.vision_config, config.text_config
        n_v, n_t = {"m2pt": (10, 10), "vpt": (10, 0), "text_pt": (0, 10)}.get(method, (0, 0))
        model = apply_method(llava, method, num_vision_prompts=n_v, num_text_prompts=n_t,
                             lora=LoraSettings(r=128))
    report = trainable_report(model)
    projector = v.hidden_size * t.hidden_size + t.hidden_size  # LLaVA v1's single linear layer
    d, ff = t.hidden_size, t.intermediate_size
    base = _clip_tower(v) + projector + _llama_decoder(t)
    prompts = 23 * n_v * v.hidden_size + 32 * n_t * d  # vision layers 1..23 feed layer -2's features
    lora = 32 * 128 * (4 * (d + d) + 2 * (d + ff) + (ff + d))
    trainable = {"m2pt": prompts + projector, "vpt": prompts + projector, "text_pt": prompts + projector,
                 "lora": lora + projector, "full": _llama_decoder(t) + projector}[method]
    # PEFT keeps the projector's frozen original beside the copy it trains
    total = base + {"lora": lora + projector}.get(method, prompts)
    assert (report.trainable, report.total) == (trainable, total)


@pytest.mark.parametrize("args, says", [
    (["--method", "vpt", "--num_text_prompts", "5"], "vpt tunes visual prompts only"),
    (["--method", "text_pt", "--num_vision_prompts", "5"], "text_pt tunes textual prompts only"),
    (["--method", "lora", "--num_text_prompts", "5"], "lora trains no prompts"),
    (["--method", "full", "--quant", "nf4"], "cannot train a 4-bit backbone"),
    (["--method", "full", "--tune_lm_head"], "trains lm_head already"),
    (["--method", "lora", "--lora_target_modules", "q_proj,qkv"], "['qkv']"),
    (["--method", "lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
])
def test_impossible_method_settings_are_refused_with_what_works(args, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_args(args)


def test_method_defaults_set_the_prompt_counts():
    assert (parse_args(["--method", "vpt"]).num_vision_prompts, parse_args(["--method", "vpt"]).num_text_prompts) \
        == (10, 0)
    assert parse_args(["--method", "text_pt"]).num_vision_prompts == 0
    assert parse_args(["--method", "lora"]).num_text_prompts == 0
    assert parse_args([]).num_vision_prompts == parse_args([]).num_text_prompts == 10


def test_a_real_model_s_default_learning_rate_follows_the_method(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "preprocessor_config.json").write_text("{}")
    rates = {m: parse_args(["--model_name_or_path", str(tmp_path), "--method", m]).learning_rate for m in METHODS}
    assert rates == {"m2pt": 7e-4, "vpt": 7e-4, "text_pt": 7e-4, "lora": 2e-4, "full": 2e-5}
    assert parse_args(["--method", "full"]).learning_rate == 5e-3  # the embedded model's


@pytest.mark.slow
def test_qlora_under_zero3_is_refused_before_any_weights_are_read(tmp_path):
    result = python_run(tmp_path, "--method", "lora", "--quant", "nf4", "--ds_config", "configs/zero3.json",
                        expect=2)
    assert "ZeRO-3 with --quant nf4" in result.stderr and "configs/zero2.json" in result.stderr
    assert "backend" not in result.stderr  # the model is reported once built: it never was


def _safetensors_in(directory):
    from safetensors.torch import load_file

    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("method, output", [("lora", "adapter"), ("full", "model")])
def test_lora_and_full_runs_resume_bit_for_bit(method, output, tmp_path):
    import shutil

    args = ["--method", method, "--max_steps", "4", "--save_steps", "2", "--dataloader_num_workers", "0",
            "--warmup_ratio", "0", "--learning_rate", "3e-3", *(SMALL_LORA if method == "lora" else [])]
    whole = tmp_path / "whole"
    python_run(whole, *args)
    resumed = tmp_path / "resumed"  # what the run had written by its step-2 checkpoint
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / output)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    python_run(resumed, *args, "--resume")
    lines = [(p / "metrics.jsonl").read_text().splitlines() for p in (whole, resumed)]
    assert [json.loads(r)["loss"] for r in lines[0]] == [json.loads(r)["loss"] for r in lines[1]]
    ours, theirs = _safetensors_in(resumed / output), _safetensors_in(whole / output)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        assert ours[name].equal(theirs[name]), name
