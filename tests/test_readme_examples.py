"""The README's Python examples marked `# runnable example` run as written."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
          if b.startswith("# runnable example")]


def test_the_readme_has_runnable_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write under outputs/
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths: the interpreter is slow
    block = BLOCKS[index]
    exec(compile(block, f"README example {index}", "exec"), {})
    for path in re.findall(r'save_prompts\(model, "([^"]+)"\)', block):
        assert os.path.isfile(path)
