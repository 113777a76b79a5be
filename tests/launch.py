"""Running the trainer as users do, for the tests: `python m2pt_fast/train.py` and the `deepspeed`
launcher, each run a subprocess of the tests' interpreter with a free port of its own."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "m2pt_fast" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env() -> dict:
    # One thread per rank: the 2-process runs share the machine's cores. TRITON_INTERPRET (set by
    # conftest for the kernel tests) is dropped so the trainer runs as a user's would.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return env


def run(command: list[str], expect: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` from the repository root in trainer_env() updated by `env` (None: unset); it must exit `expect`."""
    env = {name: value for name, value in {**trainer_env(), **(env or {})}.items() if value is not None}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def deepspeed_launcher() -> list[str]:
    launcher = shutil.which("deepspeed")
    return [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]


def deepspeed_run(output_dir: Path, *args: str, processes: int = 2, script: Path = TRAIN,
                  expect: int = 0) -> subprocess.CompletedProcess:
    # a free port of its own: other test runs on the machine may hold DeepSpeed's default one
    port = free_port()
    result = run([*deepspeed_launcher(), "--num_gpus", str(processes), "--master_port", str(port),
                  str(script), "--output_dir", str(output_dir), *args], expect=expect)
    # DeepSpeed's CPU shared-memory all-reduce leaves a segment per rank, named by the port, that
    # nothing removes; the trainer keeps that op out of CPU runs
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left
    return result


def python_run(output_dir: Path, *args: str, expect: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, str(TRAIN), "--output_dir", str(output_dir), *args], expect=expect, env=env)
