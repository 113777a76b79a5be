"""`python -m m2pt_fast.demo` fits the prompts to its batch and writes a prompt file."""
from m2pt_fast import demo


def test_demo_loss_falls_and_prompt_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    first, final = demo.main(["--steps", "30", "--output_dir", str(tmp_path)])
    assert final < 0.7 * first
    assert (tmp_path / "prompts.safetensors").is_file()
