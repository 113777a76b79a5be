"""bench/gpu_session.sh, the one command a GPU session runs: its stages fit the 8-minute command
budget in priority order, and on a machine without a GPU the budget logic still holds (a stage cut
short times out, the later ones are skipped, the table and session.json are written)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _run(*args, env=None, timeout=120):
    # the tests' interpreter first on PATH: the script calls python3
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **(env or {})})


def test_dry_run_lists_the_stages_in_priority_order_within_8_minutes():
    result = _run("--dry-run")
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 2) for line in result.stdout.splitlines()[1:]]
    stages = [(name, int(limit)) for name, limit, _ in rows[:-1]]
    assert [name for name, _ in stages] == ["versions", "correctness", "kernels", "step", "search"]
    total, budget = int(rows[-1][1]), int(rows[-1][2].split()[1])
    assert total == sum(limit for _, limit in stages) <= budget <= 8 * 60 - 15  # 15 s for wheels and summary
    # every file a stage names exists
    text = SCRIPT.read_text()
    for path in ("tests/test_prefix_attention.py", "tests/test_nf4.py", "tests/test_fused.py",
                 "bench/test_bench_prefix_attention.py", "bench/test_bench_nf4.py", "bench/test_bench_step.py"):
        assert path in text and (ROOT / path).is_file(), path
    for name in ("test_train_step", "test_max_microbatch_24gib"):
        assert f"def {name}(" in (ROOT / "bench" / "test_bench_step.py").read_text()


def test_an_unknown_stage_is_refused():
    result = _run("everything")
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.slow
def test_the_budget_cuts_a_stage_short_and_skips_the_rest(tmp_path):
    began = time.monotonic()
    result = _run(env={"M2PT_GPU_BUDGET_S": "45", "OUT": str(tmp_path)})
    took = time.monotonic() - began
    assert took < 45 + 15, took
    session = json.loads((tmp_path / "session.json").read_text())
    statuses = {s["stage"]: s["status"] for s in session["stages"]}
    assert statuses["versions"] in ("ok", "failed (exit 1)")  # no nvidia-smi / CUDA device here
    assert statuses["correctness"] == "timed out"  # the CPU suite of those files takes minutes
    assert all(statuses[name] == "skipped (no time left)" for name in ("kernels", "step", "search"))
    assert (tmp_path / "correctness.log").is_file() and "torch" in session["versions"]
    assert result.stdout.rstrip().splitlines()[-1].startswith("total ")
