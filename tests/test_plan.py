"""The memory planner (python -m m2pt_fast.plan): its table against direct counts, its advice, its
command line, on the tiny shape and at LLaVA-1.5-7B."""
import dataclasses
import json

import pytest

from m2pt_fast.planning import memory, plan

GIB = 2**30


def _direct_peak(request: plan.PlanRequest, micro_batch: int, checkpointing: bool) -> int:
    model, _, _ = plan.build_on_meta(request)
    return plan._count(model, request, micro_batch, checkpointing=checkpointing).peak_bytes


def _tiny(**changes) -> plan.PlanRequest:
    base = plan.PlanRequest(shape="tiny", model_max_length=40, micro_batches=(1, 2, 4, 8), margin=0,
                            fragmentation=0.0, deepspeed=False)
    return dataclasses.replace(base, **changes)


def test_the_table_is_the_count_and_the_largest_fit_is_exact():
    # a budget that the no-checkpointing step fits at 5 micro-batches but not 6
    probe = _tiny()
    at5, at6 = (_direct_peak(probe, b, False) for b in (5, 6))
    request = _tiny(gpu_memory=(at5 + at6) // 2)
    result = plan.plan(request)
    off = result["checkpointing"]["off"]
    assert off["peak_bytes"][4] == _direct_peak(request, 4, False)
    assert off["max_micro_batch"] == 5
    assert off["fits"] == {1: True, 2: True, 4: True, 8: False}
    on = result["checkpointing"]["on"]
    assert on["peak_bytes"][8] == _direct_peak(request, 8, True)
    assert on["max_micro_batch"] > 5  # checkpointing holds less per sample
    # the target 8 fits only with checkpointing
    assert result["advice"] == dict(per_device_train_batch_size=8, gradient_checkpointing=True,
                                    gradient_accumulation_steps=1)


def test_margin_fragmentation_and_deepspeed_state_count_against_the_budget():
    mib = 2**20
    request = _tiny(gpu_memory=8 * mib)
    loose = plan.plan(request)
    tight = plan.plan(dataclasses.replace(request, margin=2 * mib, fragmentation=0.5, deepspeed=True))
    assert tight["usable_peak_bytes"] == int((8 * mib - 2 * mib) / 1.5)
    assert tight["checkpointing"]["on"]["max_micro_batch"] < loose["checkpointing"]["on"]["max_micro_batch"]
    extra = plan.DEEPSPEED_BF16_BYTES_PER_TRAINED_PARAMETER * tight["trained_parameters"]
    assert tight["checkpointing"]["on"]["peak_bytes"][2] == loose["checkpointing"]["on"]["peak_bytes"][2] + extra
    assert tight["breakdown"]["bytes"]["DeepSpeed bf16 state (estimate)"] == extra


def test_advice_when_the_target_fits_nowhere():
    probe = _tiny()
    at1_on, at2_on = (_direct_peak(probe, b, True) for b in (1, 2))
    result = plan.plan(_tiny(gpu_memory=(at1_on + at2_on) // 2, per_device_train_batch_size=8))
    assert result["advice"] == dict(per_device_train_batch_size=1, gradient_checkpointing=True,
                                    gradient_accumulation_steps=8)
    nothing = plan.plan(_tiny(gpu_memory=at1_on // 2))
    assert nothing["advice"] is None
    assert "does not fit" in plan.render(nothing)


@pytest.mark.slow  # a 7B model counted at full size on meta: about 50 s on 2 cores
def test_the_7b_plan_at_24_gib():
    request = plan.PlanRequest(shape="llava-1.5-7b", model_max_length=1024, micro_batches=(8,))
    result = plan.plan(request)
    on, off = result["checkpointing"]["on"], result["checkpointing"]["off"]
    # NF4 weights alone are ~3.7 GiB: every step holds at least them
    frozen = result["breakdown"]["bytes"][memory.FROZEN]
    assert 3.4 * GIB < frozen < 4.0 * GIB
    assert result["trained_parameters"] == 22_525_952  # projector + 23·10·1024 + 32·10·4096
    assert on["peak_bytes"][8] < off["peak_bytes"][8]
    assert on["max_micro_batch"] > off["max_micro_batch"] >= 0
    assert result["advice"]["per_device_train_batch_size"] == 8
    text = plan.render(result)
    assert "| 8 |" in text and "use: --per_device_train_batch_size 8" in text


def test_the_command_line_prints_the_table_or_json(capsys):
    small = ["--gpu_memory", "8MiB", "--margin", "0"]  # the tiny model fits some tens of samples: a short search
    assert plan.main(["--shape", "tiny", "--model_max_length", "40", "--micro_batches", "1,2", "--json", *small]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["checkpointing"]["on"]["peak_bytes"]) == {"1", "2"}
    assert plan.main(["--shape", "tiny", "--model_max_length", "40", "--micro_batches", "1,2", *small]) == 0
    out = capsys.readouterr().out
    assert "| micro-batch | checkpointing off | checkpointing on |" in out and "largest that fits" in out


def test_a_model_directory_plans_like_its_shape(tmp_path, capsys):
    from m2pt_fast.models.llava import llava_config

    llava_config("tiny").save_pretrained(tmp_path)
    args = ["--model_max_length", "40", "--micro_batches", "2", "--json", "--gpu_memory", "8MiB", "--margin", "0"]
    assert plan.main(["--shape", "tiny", *args]) == 0
    by_shape = json.loads(capsys.readouterr().out)
    assert plan.main(["--model_name_or_path", str(tmp_path), *args]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert by_dir["checkpointing"] == by_shape["checkpointing"]


@pytest.mark.parametrize("args, message", [
    (["--gpu_memory", "lots"], "not a memory size"),
    (["--model_max_length", "0"], "must be positive"),
    (["--micro_batches", "2,x"], "comma-separated integers"),
    (["--margin", "30GiB"], "leaves nothing"),
])
def test_bad_options_say_what_is_wrong(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        plan.main(["--shape", "tiny", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_errors_before_counting(tmp_path, capsys):
    assert plan.main(["--model_name_or_path", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert plan.main(["--shape", "tiny", "--model_max_length", "10"]) == 2
    assert "leaves no text" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GIB), ("24G", 24 * GIB), ("80GB", 80 * 10**9), ("1.5 TiB", int(1.5 * 2**40)), ("1024", 1024),
])
def test_memory_sizes_parse(text, expected):
    assert plan.parse_bytes(text) == expected


@pytest.mark.parametrize("asked", [True, False])
def test_the_trainer_logs_the_estimate_when_asked(tmp_path, asked):
    import re

    from launch import python_run

    done = python_run(tmp_path / "run", "--max_steps", "1", "--dataloader_num_workers", "0",
                      "--per_device_train_batch_size", "4", "--gradient_checkpointing",
                      "--estimate_memory", "true" if asked else "false")
    found = re.search(r"memory estimate: a step of 4 samples x 2048 tokens \(checkpointing on\) peaks at "
                      r"([0-9.]+) [GM]iB per device", done.stdout + done.stderr)
    assert bool(found) == asked
    if asked:
        assert float(found.group(1)) > 0


def _model_directory_with_tokenizer(directory):
    """A tiny LLaVA directory as save_pretrained writes it, with a tokenizer for the synthetic data's words."""
    from m2pt_fast import build_llava
    from m2pt_fast.data import IMAGE, build_word_tokenizer, synthetic_texts, words_of
    from m2pt_fast.data.conversation import ASSISTANT, SYSTEM_PROMPT, USER

    tokenizer = build_word_tokenizer(words_of([*synthetic_texts(), SYSTEM_PROMPT, f"{USER}: {ASSISTANT}:"]))
    llava = build_llava("tiny", vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                        pad_token_id=tokenizer.pad_token_id)
    llava.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer, llava


@pytest.mark.slow  # about 20 s on 2 cores
def test_a_data_set_plans_its_longest_sample(tmp_path, capsys):
    from m2pt_fast.data import IGNORE_INDEX, ConversationEncoder, write_llava_json

    model_dir, tokenizer, llava = _model_directory_with_tokenizer(tmp_path / "model")
    data_path, images = write_llava_json(tmp_path / "data", 24, seed=2)
    # what the trainer's encoder makes of every record, worked out here without the planner
    encoder = ConversationEncoder(tokenizer, llava.config.image_token_id, 16, 300)
    encoded = [encoder.encode(r["conversations"]) for r in json.loads(open(data_path).read())]
    tokens = max(e.input_ids.numel() for e in encoded)
    labelled = max(int((e.labels != IGNORE_INDEX).sum()) for e in encoded)
    assert tokens < 300 and labelled < tokens - 17

    base = _tiny(shape=None, model_name_or_path=str(model_dir), model_max_length=300, micro_batches=(2,),
                 gpu_memory=8 * 2**20)
    from_data = plan.plan(dataclasses.replace(base, data_path=data_path, image_folder=images))
    assert from_data["data"] == {"path": data_path, "records": 24, "longest_tokens": tokens, "most_labelled": labelled}
    assert (from_data["model_max_length"], from_data["answer_tokens"]) == (tokens, labelled)
    stated = plan.plan(dataclasses.replace(base, model_max_length=tokens, answer_tokens=labelled))
    assert from_data["checkpointing"] == stated["checkpointing"]
    assert (from_data["checkpointing"]["off"]["peak_bytes"][2]
            < plan.plan(base)["checkpointing"]["off"]["peak_bytes"][2])
    assert f"the last {labelled} labelled (the longest of 24 records in {data_path})" in plan.render(from_data)

    # the command line: the same plan; without a tokenizer to measure with, a clear error
    capsys.readouterr()  # what writing the data printed
    assert plan.main(["--model_name_or_path", str(model_dir), "--data_path", data_path, "--image_folder", images,
                      "--micro_batches", "2", "--json", "--gpu_memory", "8MiB", "--margin", "0",
                      "--fragmentation", "0", "--no_deepspeed"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == from_data["data"]
    assert all(printed["checkpointing"][k]["peak_bytes"]["2"] == from_data["checkpointing"][k]["peak_bytes"][2]
               for k in ("off", "on"))
    assert plan.main(["--shape", "tiny", "--data_path", data_path]) == 2
    assert "--data_path needs --model_name_or_path" in capsys.readouterr().err


def test_the_trainer_estimates_for_its_data_s_longest_sample(tmp_path):
    import re

    from launch import python_run

    from m2pt_fast.data import write_llava_json

    data_path, images = write_llava_json(tmp_path / "data", 8, seed=3)
    done = python_run(tmp_path / "run", "--max_steps", "1", "--dataloader_num_workers", "0",
                      "--per_device_train_batch_size", "2", "--estimate_memory", "true",
                      "--data_path", data_path, "--image_folder", images)
    found = re.search(r"memory estimate: a step of 2 samples x (\d+) tokens \(the longest in --data_path, (\d+) "
                      r"labelled\) \(checkpointing off\) peaks at ([0-9.]+) [GM]iB", done.stdout + done.stderr)
    assert found, (done.stdout + done.stderr)[-2000:]
    tokens, labelled = int(found.group(1)), int(found.group(2))
    assert 0 < labelled < tokens < 2048 and float(found.group(3)) > 0
