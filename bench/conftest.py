"""Benchmark harness: every run saves its data with device, versions, commit and date.

    pytest bench/ --benchmark-only                      # results: bench/results/<date>-<device>-<commit>.json
    pytest bench/ --benchmark-only --benchmark-json=F   # results: F

GPU runs are the product's figures and are committed; CPU runs only prove the harness and go to
bench/results/cpu/ (ignored by git).
"""
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))  # importlib mode leaves bench/ off sys.path; shared workloads live here


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "bitsandbytes", "deepspeed", "flash_attn"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or broken on this machine: record that, do not fail
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


RUN_INFO = {
    "device": device_name(),
    "versions": versions(),
    "commit": commit(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
}


def results_dir() -> Path:
    return RESULTS if torch.cuda.is_available() else RESULTS / "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Default --benchmark-json to a dated file, before pytest-benchmark reads its options.
    if getattr(config.option, "benchmark_json", "absent") is None and not config.option.benchmark_disable:
        folder = results_dir()
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{RUN_INFO['date'][:10]}-{slug(RUN_INFO['device'])}-{RUN_INFO['commit'][:8]}.json"
        # pytest-benchmark < 5.3 takes an open binary file here, later versions a path.
        from packaging.version import Version
        from pytest_benchmark import __version__ as plugin_version

        path = folder / name
        config.option.benchmark_json = path if Version(plugin_version) >= Version("5.3") else open(path, "wb")


@pytest.fixture(autouse=True)
def derived_figures(request):
    """After each bench: peak device memory, and TFLOP/s or GB/s from the median where the bench
    recorded its useful `flops` or `bytes_moved` in extra_info."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is None or getattr(bench, "stats", None) is None:
        return
    median = bench.stats.stats.median
    info = bench.extra_info
    if torch.cuda.is_available():
        info.setdefault("peak_mem_bytes", torch.cuda.max_memory_allocated())
    if median > 0 and isinstance(info.get("flops"), (int, float)):
        info["tflops"] = info["flops"] / median / 1e12
    if median > 0 and isinstance(info.get("bytes_moved"), (int, float)):
        info["gb_per_s"] = info["bytes_moved"] / median / 1e9


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["m2pt"] = RUN_INFO


HEADLINE_KEYS = ("samples_per_s", "tokens_per_s", "peak_mem_bytes", "counted_peak_bytes", "mfu", "max_microbatch_24gib")


def write_memory_figures(workloads) -> Path | None:
    """The counted headline memory (bench/test_bench_memory.py) to bench/results/memory-<date>.json,
    on any machine (a count, not a measurement), once both sides and both searches are in."""
    found = workloads.MEMORY_RESULTS
    need = ("ckpt", "no-ckpt", "max_microbatch_24gib_ckpt", "max_microbatch_24gib_no-ckpt")
    if not all(key in found.get(p, {}) for p in ("ours", "baseline") for key in need):
        return None
    import json

    shape = workloads.HEADLINE

    def side(p):
        return {"peak_bytes": found[p]["ckpt"]["peak_bytes"],
                "max_microbatch_24gib": found[p]["max_microbatch_24gib_ckpt"],
                "peak_phase": found[p]["ckpt"]["peak_phase"], "breakdown": found[p]["ckpt"]["breakdown"],
                "no_checkpointing": {**found[p]["no-ckpt"],
                                     "max_microbatch_24gib": found[p]["max_microbatch_24gib_no-ckpt"]}}

    figures = {
        "shape": {k: str(v) for k, v in vars(shape).items()},
        "commit": RUN_INFO["commit"], "date": RUN_INFO["date"], "micro_batch": shape.batch,
        "gradient_checkpointing": True,
        "ours": side("ours"), "baseline": side("baseline"),
        "ratio": found["ours"]["ckpt"]["peak_bytes"] / found["baseline"]["ckpt"]["peak_bytes"],
        "ratio_no_checkpointing": found["ours"]["no-ckpt"]["peak_bytes"] / found["baseline"]["no-ckpt"]["peak_bytes"],
        "counted_on": "meta (m2pt_fast.planning.memory: the CUDA allocator's view, kernels as on a GPU; "
                      "docs/memory.md)",
        "versions": RUN_INFO["versions"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory-{RUN_INFO['date'][:10]}.json"
    path.write_text(json.dumps(figures, indent=2))
    return path


def pytest_sessionfinish(session):
    """The counted memory figures (any machine) to memory-<date>.json; on a GPU, the ours-vs-baseline
    step figures also go to headline-<gpu>-<date>.json."""
    workloads = sys.modules.get("workloads")
    if workloads is None:
        return
    write_memory_figures(workloads)
    if not torch.cuda.is_available():
        return
    found = {p: workloads.headline_figures(workloads.HEADLINE_RESULTS.get(p, {})) for p in ("ours", "baseline")}
    if not all(found.values()):
        return
    import json

    shape = workloads.default_shape()
    headline = {
        **RUN_INFO,
        "shape": {k: str(v) for k, v in vars(shape).items()},
        "ours": {k: found["ours"].get(k) for k in HEADLINE_KEYS},
        "baseline": {k: found["baseline"].get(k) for k in HEADLINE_KEYS},
        "detail": {"chosen": found, "all": workloads.HEADLINE_RESULTS},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"headline-{slug(RUN_INFO['device'])}-{RUN_INFO['date'][:10]}.json"
    path.write_text(json.dumps(headline, indent=2))
