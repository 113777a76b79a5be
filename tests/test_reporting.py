"""--report_to: HF Trainer's option, read as HF reads it, and each integration's files read back with its
own package (TensorBoard's event reader, wandb's offline run directory)."""
import json
from pathlib import Path

import pytest
from launch import python_run

from m2pt_fast.training import recipe, reporting
from m2pt_fast.training.config import parse_args

tensorboard = pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")


@pytest.mark.parametrize("argv, expected", [
    ([], ()),                                              # HF's default since v5: none
    (["--report_to", "none"], ()),
    (["--report_to", "tensorboard"], ("tensorboard",)),
    (["--report_to", "tensorboard", "wandb"], ("tensorboard", "wandb")),   # HF's list form
    (["--report_to", "wandb,tensorboard"], ("wandb", "tensorboard")),
    (["--report_to", "TensorBoard", "tensorboard"], ("tensorboard",)),
    (["--report_to", "all"], ("tensorboard", "wandb")),    # both installed here (importorskip above)
])
def test_report_to_reads_as_hf_trainer_reads_it(argv, expected, tmp_path):
    assert parse_args([*argv, "--output_dir", str(tmp_path)]).reporters == expected


def test_report_to_from_a_yaml_list(tmp_path):
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("report_to: [wandb, tensorboard]\n")
    assert parse_args(["--config", str(yaml_file)]).reporters == ("wandb", "tensorboard")


@pytest.mark.parametrize("value", [["mlflow"], ["none", "wandb"], ["all", "wandb"]])
def test_an_unknown_or_mixed_report_to_is_refused(value, tmp_path):
    with pytest.raises(ValueError, match="--report_to"):
        parse_args(["--report_to", *value, "--output_dir", str(tmp_path)])


def test_a_missing_integration_is_refused_before_any_weights_are_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda name: name != "wandb")

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(recipe.M2PTRecipe, "setup", never)
    assert recipe.main(["--report_to", "tensorboard", "wandb", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--report_to wandb: the package is not installed; pip install wandb" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_wandb_credentials_are_found_where_wandb_login_puts_them(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not reporting.wandb_credentials()           # no file
    netrc.write_text("machine example.org\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert not reporting.wandb_credentials()           # another host's entry
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert reporting.wandb_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert reporting.wandb_credentials()


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_receive_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    # no credentials anywhere and WANDB_MODE unset: wandb must go offline on its own, not try the network
    env = {"HOME": str(tmp_path / "home"), "NETRC": str(tmp_path / "no-netrc"), "WANDB_API_KEY": None,
           "WANDB_MODE": None, "TENSORBOARD_LOGGING_DIR": None}
    result = python_run(out, "--max_steps", "3", "--dataloader_num_workers", "0", "--num_synthetic_samples", "48",
                        "--report_to", "tensorboard", "wandb", "--run_name", "tiny-check", env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "reporting to wandb (offline)" in result.stderr and "wandb sync" in result.stderr

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/samples_per_s", "samples_per_s"), ("train/peak_mem_mb", "peak_mem_mb")]:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3], tag
        # TensorBoard stores scalars as float32
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), tag

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    records = wandb_records(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("tiny-check", "m2pt-fast")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [h["train/global_step"] for h in history] == [1, 2, 3]
    for h, row in zip(history, rows):  # JSON both ways: every digit of the float64 survives
        assert (h["train/loss"], h["train/learning_rate"], h["train/peak_mem_mb"]) == \
            (row["loss"], row["lr"], row["peak_mem_mb"])


def wandb_records(path: Path) -> list:
    """The records of a wandb transaction log (run-*.wandb): a 7-byte header (":W&B", magic, version),
    then LevelDB's log format, 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle,
    4 last), each record a wandb_internal_pb2.Record protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:7]
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block too short for a chunk header, zero-filled
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
