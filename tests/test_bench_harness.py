"""The CUDA-only parts of the benchmark harness, exercised on a CPU: how the benches are collected,
the 24 GiB micro-batch search against a stand-in CUDA allocator, and the GPU session script."""
import ast
import importlib.util
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load_workloads(monkeypatch):
    name = "bench_workloads_under_test"
    spec = importlib.util.spec_from_file_location(name, BENCH / "workloads.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_every_bench_takes_the_benchmark_fixture():
    # bench/ runs with --benchmark-only, and pytest-benchmark then skips every test that does not
    # take the `benchmark` fixture: such a test would never run, on a CPU or a GPU.
    missing = []
    for path in sorted(BENCH.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if "benchmark" not in [a.arg for a in node.args.args]:
                    missing.append(f"{path.name}::{node.name}")
    assert not missing, f"skipped under --benchmark-only: {missing}"


class _Activations:
    """Stands for the tensors a failed step still had alive when it ran out of memory."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """A 80 GiB device whose allocator calls are recorded, and a step that fits up to 20 samples."""
    workloads = _load_workloads(monkeypatch)
    events = []
    held = []  # weak references to the activations of steps that ran out of memory

    def empty_cache():
        events.append(("empty_cache", all(ref() is None for ref in held)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: events.append(("fraction", fraction)))
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(workloads, "build", lambda provider, shape, device: ("model", "optimizer"))
    monkeypatch.setattr(workloads, "make_batch", lambda model, shape, batch=None: batch)

    def train_step(model, optimizer, batch):
        activations = _Activations()
        held.append(weakref.ref(activations))
        if batch > 20:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        held.pop()

    monkeypatch.setattr(workloads, "train_step", train_step)
    return workloads, events


def test_max_microbatch_finds_the_largest_fit_and_restores_the_allocator(fake_cuda):
    workloads, events = fake_cuda
    assert workloads.max_microbatch("ours", workloads.CPU_SHAPE, "cuda") == 16
    assert events[0] == ("empty_cache", True)
    assert events[1] == ("fraction", 24 / 80)
    # the limit is lifted last, after a cache release that found the failed step's tensors gone
    assert events[-2:] == [("empty_cache", True), ("fraction", 1.0)]


def test_max_microbatch_lifts_the_limit_when_the_model_does_not_fit(fake_cuda, monkeypatch):
    workloads, events = fake_cuda

    def build(provider, shape, device):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(workloads, "build", build)
    with pytest.raises(torch.OutOfMemoryError):
        workloads.max_microbatch("baseline", workloads.CPU_SHAPE, "cuda")
    assert events[-1] == ("fraction", 1.0)


def test_gpu_session_writes_results_under_an_absolute_out(tmp_path):
    # The device runner hands the script an absolute $OUT; the result files must land inside it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "python3-calls.txt"
    for name, body in (("python3", f'printf "%s\\n" "$*" >> "{calls}"'), ("nvidia-smi", "echo 'name, H100'")):
        (fake_bin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake_bin / name).chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", OUT=str(out))
    subprocess.run(["bash", str(BENCH / "gpu_session.sh"), "kernels"], env=env, check=True, capture_output=True,
                   timeout=60)
    pytest_calls = [line for line in calls.read_text().splitlines() if line.startswith("-m pytest")]
    assert len(pytest_calls) == 1
    assert f"--benchmark-json={out}/kernels.json" in pytest_calls[0].split()
