"""Every command-line entry point tells the user's mistakes from ours: bad input prints its message and
exits 2 with no traceback (m2pt_fast.errors.UserError); an internal error keeps its traceback."""
import subprocess
import sys

import pytest
from launch import ROOT, TRAIN, trainer_env
from PIL import Image

from m2pt_fast import UserError
from m2pt_fast.training import recipe


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                          timeout=300)


def _cases(tmp_path):
    missing = str(tmp_path / "missing")
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    return {
        "train": ([str(TRAIN), "--max_steps", "0", "--output_dir", str(tmp_path / "out")],
                  "--max_steps must be a positive number"),
        "train_ds_config": ([str(TRAIN), "--ds_config", str(image), "--output_dir", str(tmp_path / "out")],
                            "is not valid JSON"),
        "plan": (["-m", "m2pt_fast.plan", "--model_name_or_path", missing], "has no config.json"),
        "evaluate": (["-m", "m2pt_fast.evaluate", "--run_dir", missing, "--benchmark", "synthetic",
                      "--output_dir", str(tmp_path / "eval")], "has no run_config.json"),
        "evaluate_compare": (["-m", "m2pt_fast.evaluate", "--compare", missing], "has no scores.json"),
        "chat": (["-m", "m2pt_fast.chat", "--image", str(image), "--run_dir", missing, "--question", "hi"],
                 "has no run_config.json"),
        "convert_official": (["-m", "m2pt_fast.convert_official", missing, str(tmp_path / "p.safetensors")],
                             "is not a checkpoint directory"),
        "to_nf4": (["-m", "m2pt_fast.to_nf4", missing, str(tmp_path / "nf4")], "has no config.json"),
    }


@pytest.mark.slow  # a fresh interpreter per CLI: about 7 s each
@pytest.mark.parametrize("cli", ["train", "train_ds_config", "plan", "evaluate", "evaluate_compare", "chat",
                                 "convert_official", "to_nf4"])
def test_bad_input_exits_2_with_the_message_and_no_traceback(cli, tmp_path):
    args, message = _cases(tmp_path)[cli]
    result = _run(args)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("error, code", [(UserError("bad --data_path"), 2), (ValueError("internal"), None)])
def test_only_user_errors_are_turned_into_exit_2(error, code, tmp_path, monkeypatch, caplog):
    def setup(self):
        raise error

    monkeypatch.setattr(recipe.M2PTRecipe, "setup", setup)
    monkeypatch.setattr(recipe.M2PTRecipe, "cleanup", lambda self: None)
    argv = ["--output_dir", str(tmp_path / "out")]
    if code is None:  # ours: the traceback reaches the user
        with pytest.raises(ValueError, match="internal"):
            recipe.main(argv)
    else:
        assert recipe.main(argv) == code
        assert "bad --data_path" in caplog.text  # the trainer's log, as an error line
