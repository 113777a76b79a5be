"""The trainer end to end, as users run it: the real `deepspeed` launcher with 2 processes (gloo) under
ZeRO-2 and ZeRO-3, bit-exact resume, bad records, a non-finite loss, `python m2pt_fast/train.py`
with no launcher, and bf16 (DeepSpeed's CPU accelerator) under every ZeRO config. Every run is the
embedded default (tiny LLaVA, synthetic data) cut to a few steps.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import ROOT, TRAIN, deepspeed_launcher, deepspeed_run, python_run, trainer_env
from launch import free_port as _free_port

pytest.importorskip("deepspeed")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.slow

SHORT = ["--max_steps", "4", "--save_steps", "2", "--dataloader_num_workers", "1", "--warmup_ratio", "0",
         "--learning_rate", "3e-3"]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict:
    return safetensors_torch.load_file(str(path))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    deepspeed_run(out, "--ds_config", "configs/zero2.json", *SHORT)
    return out


def _check_finished_run(out: Path, steps: int = 4):
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_mem_mb"):
        assert all(isinstance(r[key], float) and r[key] >= 0 for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    # the schedule asked for (cosine from 3e-3, no warmup) is the one that ran
    cosine = [3e-3 * 0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert [r["lr"] for r in rows] == pytest.approx(cosine, rel=1e-12)
    prompts = tensors(out / "prompts.safetensors")
    assert {"vision_prompts", "text_prompts"} <= set(prompts) and any(k.startswith("projector.") for k in prompts)
    checkpoint = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert (checkpoint / "state").is_dir() and (checkpoint / "prompts.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*")), "no half-written checkpoint is left behind"
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2


def test_deepspeed_zero2_two_processes(zero2_run):
    _check_finished_run(zero2_run)


def test_deepspeed_zero3_two_processes_matches_zero2(zero2_run, tmp_path):
    # the reference backend here, the fused one (the default) in zero2_run: one function, two forms
    deepspeed_run(tmp_path, "--ds_config", "configs/zero3.json", "--backend", "reference", *SHORT)
    _check_finished_run(tmp_path)
    assert json.loads((tmp_path / "run_config.json").read_text())["backend"] == "reference"
    # Same data, same function, partitioned differently: equal up to the order of fp32 reductions.
    ours, theirs = tensors(tmp_path / "prompts.safetensors"), tensors(zero2_run / "prompts.safetensors")
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max() < 1e-5, name


def _interrupted_copy(run: Path, dest: Path, step: int) -> Path:
    """What `run` had written by its step-`step` checkpoint: a copy without later checkpoints (the end's
    among them) and without the final prompt file."""
    shutil.copytree(run, dest)
    (dest / "prompts.safetensors").unlink()
    for later in (dest / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    return dest


def test_resume_ends_bit_for_bit_like_an_uninterrupted_run(zero2_run, tmp_path):
    # The interrupted run: everything the uninterrupted one had written by its step-2 checkpoint.
    resumed = _interrupted_copy(zero2_run, tmp_path / "run", 2)
    # and a save of step 3 that was killed half-way: it must be ignored, and cleared
    partial = resumed / "checkpoints" / ".tmp-step-3" / "state"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    deepspeed_run(resumed, "--ds_config", "configs/zero2.json", *SHORT, "--resume")
    ours, theirs = tensors(resumed / "prompts.safetensors"), tensors(zero2_run / "prompts.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].equal(theirs[name]), name
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(zero2_run)]
    assert not (resumed / "checkpoints" / ".tmp-step-3").exists()


def _llava_json_with_bad_records(directory: Path) -> tuple[Path, Path]:
    from m2pt_fast.data import write_llava_json

    data_path, images = write_llava_json(directory, 11, seed=2)
    records = json.loads(Path(data_path).read_text())
    good = records[0]["conversations"]
    png = (Path(images) / "000000.png").read_bytes()
    (Path(images) / "truncated.png").write_bytes(png[: len(png) // 2])  # header fine, pixels missing
    (Path(images) / "corrupt.png").write_bytes(b"not an image")
    records += [
        {"id": "truncated", "image": "truncated.png", "conversations": good},
        {"id": "missing", "image": "missing.png", "conversations": good},
        {"id": "corrupt", "image": "corrupt.png", "conversations": good},
        {"id": "no-answer", "image": "000001.png", "conversations": good[:1]},
        {"id": "malformed", "image": "000001.png", "conversations": "USER: hi"},
    ]
    Path(data_path).write_text(json.dumps(records))
    return Path(data_path), Path(images)


def test_python_without_launcher_skips_bad_records(tmp_path):
    data_path, images = _llava_json_with_bad_records(tmp_path / "data")
    out = tmp_path / "out"
    # 12 usable records, 4 per step: one epoch of 3 steps reads the truncated image exactly once
    result = python_run(out, "--data_path", str(data_path), "--image_folder", str(images),
                        "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
                        "--dataloader_num_workers", "1")
    assert "skipped 4 of 16 records" in result.stderr
    assert "'missing image': 1" in result.stderr and "'corrupt image': 1" in result.stderr
    rows = metrics(out)
    assert len(rows) == 3 and sum(r["skipped_records"] for r in rows) == 1
    assert "truncated" in result.stderr
    assert (out / "prompts.safetensors").is_file()


def _local_model_directory(directory: Path) -> Path:
    """A tiny LLaVA saved as a user would have one: weights, tokenizer, preprocessor_config.json."""
    from transformers import CLIPImageProcessor

    from m2pt_fast import build_llava
    from m2pt_fast.data import IMAGE, build_word_tokenizer, synthetic_texts, words_of
    from m2pt_fast.data.conversation import SYSTEM_PROMPT

    tokenizer = build_word_tokenizer(words_of([*synthetic_texts(), SYSTEM_PROMPT, "USER: ASSISTANT:"]))
    llava = build_llava("tiny", vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                        pad_token_id=tokenizer.pad_token_id)
    llava.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = llava.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(directory)
    return directory


def test_local_model_directory_quantized_to_nf4_with_zero2(tmp_path):
    from m2pt_fast.data import write_llava_json

    model = _local_model_directory(tmp_path / "model")
    data_path, images = write_llava_json(tmp_path / "data", 32, seed=4)
    out = tmp_path / "out"
    python_run(out, "--model_name_or_path", str(model), "--data_path", data_path, "--image_folder", images,
               "--quant", "nf4", "--ds_config", "configs/zero2.json", "--gradient_checkpointing",
               "--max_steps", "2", "--dataloader_num_workers", "0")
    run = json.loads((out / "run_config.json").read_text())
    assert run["quant"] == "nf4" and run["config"]["learning_rate"] == 7e-4
    assert len(metrics(out)) == 2 and (out / "prompts.safetensors").is_file()


def test_non_finite_loss_never_reaches_a_checkpoint(tmp_path):
    # An absurd learning rate blows the prompts up in the first step (finite, ~1e30); the second loss is
    # NaN. Step 1's state is that blown-up one: it must not be offered as a checkpoint to resume from.
    result = python_run(tmp_path, "--max_steps", "4", "--save_steps", "1", "--warmup_ratio", "0",
                        "--learning_rate", "1e30", "--dataloader_num_workers", "0", expect=1)
    assert "non-finite loss at step 2" in result.stderr and "no checkpoint was written" in result.stderr
    assert not list((tmp_path / "checkpoints").glob("step-*"))
    assert not (tmp_path / "prompts.safetensors").exists()
    assert len(metrics(tmp_path)) == 1  # step 1 ran and was logged


def test_a_checkpoint_is_written_once_the_next_loss_is_finite(tmp_path):
    python_run(tmp_path, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5",
               "--dataloader_num_workers", "0")
    # step-1 and step-2 once the next loss came out finite; step-3, the end, so that --resume can go on
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert (tmp_path / "prompts.safetensors").is_file()


def test_bad_options_stop_before_training_with_the_fix(tmp_path):
    result = python_run(tmp_path, "--max_steps", "0", expect=2)
    assert "--max_steps must be a positive number" in result.stderr
    result = python_run(tmp_path, "--ds_config", "configs/zero3.json", "--quant", "nf4", expect=2)
    assert "ZeRO-3 with --quant nf4" in result.stderr
    if not torch.cuda.is_available():
        result = python_run(tmp_path, "--quant", "bf16", expect=2)
        assert "needs bf16 compute: add --bf16" in result.stderr


# bf16: DeepSpeed keeps bf16 module parameters and fp32 masters in its optimizer; its CPU accelerator
# runs that mode too (gloo), so every wrapper the trainer meets on a GPU is tested here.
BF16_CONFIGS = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
BF16_SHORT = ["--bf16", "--max_steps", "3", "--save_steps", "2", "--dataloader_num_workers", "0", "--warmup_ratio", "0",
              "--learning_rate", "3e-3", "--weight_decay", "0.1"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """bf16_run(config): the output directory of a 3-step bf16 run with a checkpoint at step 2."""
    done = {}

    def run(config: str) -> Path:
        if config not in done:
            out = tmp_path_factory.mktemp(f"bf16-{config}")
            deepspeed_run(out, "--ds_config", f"configs/{config}.json", *BF16_SHORT)
            done[config] = out
        return done[config]

    return run


def _prompt_file_key(module_key: str) -> str:
    return module_key.replace("llava.model.multi_modal_projector.", "projector.")


def _checkpointed_masters(checkpoint: Path) -> dict:
    """The fp32 masters DeepSpeed saved in a checkpoint's optimizer state, under prompt-file keys."""
    state = checkpoint / "state"
    partitions = sorted(state.glob("*zero_pp_rank_*_optim_states.pt"),
                        key=lambda path: int(path.name.split("zero_pp_rank_")[1].split("_")[0]))  # rank order
    first = torch.load(partitions[0], map_location="cpu", weights_only=False) if partitions else None
    if first is not None and "zero_stage" not in first["optimizer_state_dict"]:
        # ZeRO-0 in bf16 before deepspeed 0.18: BF16_Optimizer, whose flat fp32 copy of the tuned
        # parameters is cut into one partition per rank; each rank's param_slice_mappings give the
        # (start, numel) of every parameter piece it holds, so a parameter is its pieces in rank order.
        module = torch.load(state / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        pieces = {}
        for path in partitions:
            saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            for flat, mapping in zip(saved["single_partition_of_fp32_groups"], saved["param_slice_mappings"]):
                for name, fragment in mapping.items():
                    pieces.setdefault(name, []).append(flat[fragment.start:fragment.start + fragment.numel])
        masters = {name: torch.cat(parts).view(module[name].shape) for name, parts in pieces.items()}
    elif partitions:  # ZeRO 1-3: fp32 partitions, one per rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=state.name,
                                                           exclude_frozen_parameters=True)
    else:  # ZeRO-0: FP16_UnfusedOptimizer's whole fp32 copies, in the order of the tuned parameters
        saved = torch.load(state / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        copies = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
        assert len(copies) == len(saved["module"])
        masters = dict(zip(saved["module"], copies))
    return {_prompt_file_key(k): v.detach() for k, v in masters.items()}


@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_bf16_prompt_file_holds_the_fp32_masters(bf16_run, config):
    out = bf16_run(config)
    assert len(metrics(out)) == 3
    checkpoint = out / "checkpoints" / "step-2"
    saved, masters = tensors(checkpoint / "prompts.safetensors"), _checkpointed_masters(checkpoint)
    assert saved.keys() == masters.keys()
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and saved[name].equal(master), name
        # the masters carry bits a bf16 copy cannot: the old file (the module's bf16 copies) lost them
        assert not master.equal(master.bfloat16().float()), name
        if not config.startswith("zero3"):  # ZeRO-3 saves no whole module state
            module = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                                weights_only=False)["module"]
            copy = module[next(k for k in module if _prompt_file_key(k) == name)]
            assert copy.dtype == torch.bfloat16 and copy.equal(master.bfloat16()), name
    final = tensors(out / "prompts.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())
    assert not final["text_prompts"].equal(final["text_prompts"].bfloat16().float())


def test_bf16_zero0_trains_like_zero1(bf16_run):
    # ZeRO-0 and ZeRO-1 take the same AdamW steps on the same fp32 masters; DeepSpeed's ZeRO-0 bf16
    # wrapper once took an extra step on zero gradients at start (bias corrections one step off,
    # weight decay applied once more), which moved the step-2 loss by about 2%.
    zero0, zero1 = metrics(bf16_run("zero0")), metrics(bf16_run("zero1"))
    assert [r["loss"] for r in zero0] == pytest.approx([r["loss"] for r in zero1], rel=1e-3)
    ours = tensors(bf16_run("zero0") / "prompts.safetensors")
    theirs = tensors(bf16_run("zero1") / "prompts.safetensors")
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max() < 1e-3, name


def test_bf16_resume_ends_bit_for_bit_like_an_uninterrupted_run(bf16_run, tmp_path):
    # bf16 state is two copies of each tuned tensor: the bf16 module's and the optimizer's fp32 masters
    uninterrupted = bf16_run("zero2")
    resumed = _interrupted_copy(uninterrupted, tmp_path / "run", 2)
    deepspeed_run(resumed, "--ds_config", "configs/zero2.json", *BF16_SHORT, "--resume")
    ours, theirs = tensors(resumed / "prompts.safetensors"), tensors(uninterrupted / "prompts.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].equal(theirs[name]), name
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(uninterrupted)]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 3-step run with checkpoints step-1, step-2 and step-3 (its end; one process), to damage copies of."""
    out = tmp_path_factory.mktemp("two-checkpoints")
    python_run(out, *RESUMABLE)
    return out


RESUMABLE = ("--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5", "--dataloader_num_workers", "0")


def _damage(checkpoint: Path, how: str) -> None:
    states = checkpoint / "state" / "mp_rank_00_model_states.pt"
    if how == "truncated":
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    elif how == "empty_file":
        states.write_bytes(b"")
    elif how == "empty_dir":
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
    elif how == "no_state":
        shutil.rmtree(checkpoint / "state")
    elif how == "no_rng":
        (checkpoint / "rng-rank0.pt").unlink()


@pytest.mark.parametrize("how", ["truncated", "empty_file", "empty_dir", "no_state", "no_rng"])
def test_damage_is_found_by_the_checkpoint_check(two_checkpoints, tmp_path, how):
    from m2pt_fast.training.checkpoints import checkpoint_problems

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    step2 = out / "checkpoints" / "step-2"
    assert checkpoint_problems(step2, world_size=1) == []
    _damage(step2, how)
    problems = checkpoint_problems(step2, world_size=1)
    assert problems, how
    expected = {"truncated": "mp_rank_00_model_states.pt cannot be read", "empty_file": "is empty",
                "empty_dir": "state/ (DeepSpeed's files) is missing",
                "no_state": "state/ (DeepSpeed's files) is missing",
                "no_rng": "rng-rank0.pt (rank 0's RNG state) is missing"}[how]
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("how", ["truncated", "no_rng"])
def test_resume_passes_over_a_damaged_newest_checkpoint(two_checkpoints, tmp_path, how):
    out = _interrupted_copy(two_checkpoints, tmp_path / "run", 2)  # step-2 is the newest, and damaged
    _damage(out / "checkpoints" / "step-2", how)
    result = python_run(out, *RESUMABLE, "--resume")
    assert "checkpoints/step-2 is damaged" in result.stderr and "checkpoints/step-1" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and (out / "prompts.safetensors").is_file()
    # steps 2 and 3 ran again from step 1's state: bit for bit the losses of the uninterrupted run
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(two_checkpoints)]


def test_resume_with_every_checkpoint_damaged_names_each(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _damage(out / "checkpoints" / "step-3", "empty_file")
    _damage(out / "checkpoints" / "step-2", "truncated")
    _damage(out / "checkpoints" / "step-1", "no_state")
    result = python_run(out, *RESUMABLE, "--resume", expect=2)
    assert "every checkpoint is damaged" in result.stderr
    assert "step-2: state/mp_rank_00_model_states.pt cannot be read" in result.stderr
    assert "step-1: state/ (DeepSpeed's files) is missing" in result.stderr


@pytest.mark.parametrize("case", ["output_is_a_file", "read_only_output", "no_config_json", "no_preprocessor",
                                  "ds_config_list", "stage_two", "grad_norm_nan"])
def test_bad_paths_and_options_are_refused_before_any_weights_are_read(tmp_path, case, capsys, monkeypatch):
    from m2pt_fast.training import recipe

    def never(*args, **kwargs):
        raise AssertionError("the model was being built")

    monkeypatch.setattr(recipe.M2PTRecipe, "setup", never)
    args = ["--output_dir", str(tmp_path / "out")]
    if case == "output_is_a_file":
        (tmp_path / "out").write_text("")
        expected = "is a file, not a directory"
    elif case == "read_only_output":
        if os.geteuid() == 0:
            # root writes through permission bits: a file where a parent directory should be is the
            # read-only location every user gets
            (tmp_path / "ro").write_text("")
            args = ["--output_dir", str(tmp_path / "ro" / "out")]
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            args = ["--output_dir", str(tmp_path / "ro" / "out")]
        expected = "cannot be written"
    elif case in ("no_config_json", "no_preprocessor"):
        model = tmp_path / "model"
        model.mkdir()
        (model / ("preprocessor_config.json" if case == "no_config_json" else "config.json")).write_text("{}")
        args += ["--model_name_or_path", str(model)]
        expected = "has no config.json" if case == "no_config_json" else "has no preprocessor_config.json"
    elif case in ("ds_config_list", "stage_two"):
        ds = tmp_path / "ds.json"
        ds.write_text("[]" if case == "ds_config_list" else '{"zero_optimization": {"stage": "two"}}')
        args += ["--ds_config", str(ds)]
        expected = ("holds a JSON list" if case == "ds_config_list"
                    else "stage must be the number 0, 1, 2 or 3, got 'two'")
    else:
        args += ["--max_grad_norm", "nan"]
        expected = "--max_grad_norm must be a finite number"
    assert recipe.main(args) == 2
    assert expected in capsys.readouterr().err


def test_an_output_directory_held_by_a_live_run_is_refused_with_its_pid(tmp_path, capsys, monkeypatch):
    import socket

    from m2pt_fast.training import recipe
    from m2pt_fast.training.checkpoints import LOCK_NAME

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(recipe.M2PTRecipe, "setup", lambda self: None)
    monkeypatch.setattr(recipe.M2PTRecipe, "train", lambda self: 0)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert recipe.main(["--output_dir", str(out)]) == 2
        assert f"in use by a live run (PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, as after a crash): its lock is taken over, and released at the end
    assert recipe.main(["--output_dir", str(out)]) == 0
    assert "took over the lock of a run that is gone" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib): a fresh tmpfs of that size (root only: mount). Unmounted afterwards."""
    mounted = []

    def make(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here to fill up ({done.stderr.strip()})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(small_disk, tmp_path):
    disk = small_disk(400)  # room for the run's files and two checkpoints, not a third
    out = disk / "out"
    args = ("--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5", "--dataloader_num_workers", "0")
    result = python_run(out, *args, expect=1)
    assert "could not write checkpoint step-3" in result.stderr and "the disk is full" in result.stderr
    assert "checkpoints/step-2 is intact" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no partial left
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    python_run(roomy, *args, "--resume")  # the kept checkpoint continues the run
    assert [m["step"] for m in metrics(roomy)] == [1, 2, 3, 4] and (roomy / "prompts.safetensors").is_file()


def test_a_full_disk_under_two_ranks_stops_both_and_keeps_the_previous_checkpoint(small_disk, tmp_path):
    disk = small_disk(720)  # two 2-rank checkpoints (about 280 KiB each) and the run's files, not a third
    out = disk / "out"
    args = ("--ds_config", "configs/zero2.json", "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5",
            "--dataloader_num_workers", "0")
    result = deepspeed_run(out, *args, expect=1)
    assert "could not write checkpoint step-3" in result.stderr and "the disk is full" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no partial left
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    deepspeed_run(roomy, *args, "--resume")  # both ranks continue from the kept checkpoint
    assert [m["step"] for m in metrics(roomy)] == [1, 2, 3, 4] and (roomy / "prompts.safetensors").is_file()


def test_a_failed_final_write_does_not_lose_the_run(small_disk):
    disk = small_disk(48)  # the run's small files fit, the prompt file does not
    result = python_run(disk / "out", "--max_steps", "2", "--dataloader_num_workers", "0", expect=1)
    assert "could not write the prompt file" in result.stderr and "the disk is full" in result.stderr
    fallback = Path(result.stderr.split("the trained prompts were written to ")[1].split(" instead")[0])
    try:
        assert tensors(fallback)["text_prompts"].dtype == torch.float32
    finally:
        fallback.unlink(missing_ok=True)


def test_a_finished_run_trains_further_with_a_larger_max_steps(tmp_path):
    args = ("--save_steps", "2", "--dataloader_num_workers", "0", "--warmup_ratio", "0", "--lr_scheduler_type",
            "linear", "--learning_rate", "1e-3")
    python_run(tmp_path, "--max_steps", "3", *args)
    result = python_run(tmp_path, "--max_steps", "3", *args, "--resume", expect=2)
    assert "is at step 3 and this run has 3 steps: it is done" in result.stderr
    result = python_run(tmp_path, "--max_steps", "5", *args, "--resume")
    assert "schedule continues to the new end: step 3 of 5 (the checkpoint's run had 3 steps)" in result.stderr
    steps = metrics(tmp_path)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    # linear decay to the new end from where it was: step k uses 1e-3 * (1 - (k - 1) / 5)
    assert [m["lr"] for m in steps[3:]] == pytest.approx([1e-3 * 0.4, 1e-3 * 0.2], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step-5"


def _ranks_writing(output_dir: Path) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if str(output_dir) in (process.info["cmdline"] or []) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_deepspeed_command_alone_stops_every_rank(tmp_path, sig):
    import time

    command = [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN), "--output_dir",
               str(tmp_path), "--max_steps", "100000", "--dataloader_num_workers", "0"]
    # as a terminal starts it: a background job of a non-interactive shell (a CI script's `cmd &`) is
    # started with SIGINT ignored, and its children inherit that, so the signal would do nothing at all
    runner = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics_file = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics_file.exists() and metrics_file.read_text()) and runner.poll() is None:
            assert time.monotonic() < deadline, "no step finished in 300 s"
            time.sleep(0.5)
        assert runner.poll() is None, runner.stderr.read()[-4000:]
        runner.send_signal(getattr(signal, sig))  # to the runner's PID alone, as `timeout` sends it
        runner.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _ranks_writing(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ranks_writing(tmp_path), "train.py still runs after the deepspeed command was stopped"
    finally:
        for process in _ranks_writing(tmp_path):
            process.kill()
        if runner.poll() is None:
            runner.kill()
        runner.wait()
    steps = len(metrics_file.read_text().splitlines())
    time.sleep(3)
    assert len(metrics_file.read_text().splitlines()) == steps


def test_a_run_without_save_steps_ends_with_a_checkpoint_it_can_be_trained_further_from(tmp_path):
    args = ("--dataloader_num_workers", "0", "--warmup_ratio", "0")
    python_run(tmp_path, "--max_steps", "2", *args)  # --save_steps 0, the default
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert json.loads((tmp_path / "checkpoints" / "step-2" / "run_state.json").read_text()) == {
        "step": 2, "total_steps": 2}
    result = python_run(tmp_path, "--max_steps", "3", *args, "--resume")
    assert "schedule continues to the new end: step 2 of 3" in result.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    # a new run over the finished one starts over (said), as over a directory without checkpoints
    result = python_run(tmp_path, "--max_steps", "1", *args)
    assert "holds a finished run (its final checkpoint is step-3): starting a new run over it" in result.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]


def test_a_new_run_over_an_unfinished_one_is_refused(tmp_path):
    args = ("--dataloader_num_workers", "0", "--save_steps", "1")
    python_run(tmp_path, "--max_steps", "3", *args)
    shutil.rmtree(tmp_path / "checkpoints" / "step-3")  # as if the run had been stopped after step 2
    result = python_run(tmp_path, "--max_steps", "3", *args, expect=2)
    assert "holds checkpoints of an unfinished run: pass --resume to continue it" in result.stderr
