"""CI runs what the README tells a newcomer to run, in environments of its own."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quick_start_verbatim():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        # the same command line, at most with its output captured (`2>&1 | tee ...`)
        assert any(line == command or line.startswith(command + " 2>&1 | tee ") for line in ci_lines), command


def test_ci_works_in_fresh_environments_outside_the_checkout():
    run = (ROOT / ".ci" / "run").read_text()
    assert 'python3 -m venv "$venvs/newest"' in run and 'source "$venvs/newest/bin/activate"' in run
    assert "mktemp -d /tmp/" in run  # outside the checkout
    assert run.index("source \"$venvs/newest/bin/activate\"") < run.index("bash setup.sh &&")
    assert "bash .ci/test-env $(grep -v '^#' .ci/oldest.txt)" in run


def test_oldest_pins_are_setup_py_lower_bounds():
    setup = (ROOT / "setup.py").read_text()
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {"torch", "triton", "transformers", "deepspeed", "bitsandbytes", "peft"}
    for name, version in pins.items():
        if name == "torch":
            continue  # 2.11 (the GPU image's) cannot be installed on the CPU machines: docs/compatibility.md
        bound = re.search(rf'"{name}>=([0-9.]+),<[0-9.]+"', setup).group(1)
        parts = bound.split(".")
        assert version.split(".")[:len(parts)] == parts, (name, version, bound)


def test_the_oldest_run_names_test_files_and_tests_that_exist():
    # a renamed test would silently drop out of the oldest releases' run (pytest errors on a missing
    # file, but .ci/run should not be the first to find out)
    entries = [line for line in (ROOT / ".ci" / "oldest-tests.txt").read_text().splitlines()
               if line and not line.startswith("#")]
    assert len(entries) >= 20
    for entry in entries:
        path, _, test = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        if test:
            assert f"def {test.split('[')[0]}(" in (ROOT / path).read_text(), entry
