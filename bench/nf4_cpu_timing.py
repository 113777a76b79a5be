"""NF4 on the CPU: the native OpenMP library vs the PyTorch reference (and bitsandbytes' CPU path) on
one LLaMA-7B MLP weight, 4096 x 11008 bf16. The figure in docs/nf4.md comes from this script.

    python bench/nf4_cpu_timing.py [--reps 5] > bench/results/nf4_cpu_timing.json

Best of `reps` wall-clock times; the machine's other load shows up as noise, so quote ratios.
Prints one JSON object with the timings, the thread count, versions and the date.
"""
import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2pt_kernels import _native
from m2pt_kernels.reference import nf4_dequantize_reference, nf4_quantize_reference

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def best_of(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if not _native.available():
        sys.exit(f"{_native.describe()}: build it first (pip install -e . or cmake -S . -B build && cmake --build "
                 f"build)")
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    q = nf4_quantize_reference(w, 64, True)
    rows = {
        "quantize (double quant)": (lambda: nf4_quantize_reference(w, 64, True), lambda: _native.quantize(w, 64, True)),
        "quantize": (lambda: nf4_quantize_reference(w, 64, False), lambda: _native.quantize(w, 64, False)),
        "dequantize -> bf16": (lambda: nf4_dequantize_reference(q, torch.bfloat16),
                               lambda: _native.dequantize(q, torch.bfloat16)),
    }
    result = {"shape": [4096, 11008], "dtype": "bfloat16", "blocksize": 64, "threads": torch.get_num_threads(),
              "native": _native.describe(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "commit": _commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": {}}
    for name, (reference, native) in rows.items():
        t_ref, t_nat = best_of(reference, args.reps), best_of(native, args.reps)
        result["seconds"][name] = {"reference": round(t_ref, 4), "native": round(t_nat, 4),
                                   "speedup": round(t_ref / t_nat, 1)}
    try:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        result["seconds"]["bitsandbytes"] = {
            "quantize (double quant)": round(best_of(
                lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"), args.reps), 4),
            "dequantize -> bf16": round(best_of(lambda: F.dequantize_4bit(packed, state), args.reps), 4),
        }
    except ImportError:
        pass
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
