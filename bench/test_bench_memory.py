"""Peak memory of the headline training step, counted tensor by tensor on the `meta` device.

    pytest bench/test_bench_memory.py --benchmark-only

The headline of docs/benchmarks.md at full size (LLaVA-1.5-7B, NF4 — ours and bitsandbytes' storage
— bf16, micro-batch 8, 576 image + 128 text tokens, 32 answer tokens, n_v = n_t = 10), ours (fused)
and the baseline (reference + transformers' checkpointing), checkpointing on and off: the peak
`torch.cuda.max_memory_allocated` would report after two steps (m2pt_fast.planning.memory; docs/memory.md
says what the count covers), what holds it, and each side's largest micro-batch whose counted peak
is within 24 GiB (checkpointing on and off). Machine-independent: the same numbers on any computer, so the
run writes them to bench/results/memory-<date>.json wherever it runs (bench/conftest.py). The timed
figure is only how long a count takes.

Asserted are facts, never the counts themselves: checkpointing lowers each side's peak; the
breakdown accounts for every byte of the peak; ours holds no vocabulary-sized logits at its peak.
"""
import importlib.util

import pytest
import workloads

from m2pt_fast.planning import memory

SHAPE = workloads.HEADLINE
LIMIT = 24 * 2**30


def _skip_unless_available(provider):
    if provider == "baseline" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the baseline needs bitsandbytes (pip install bitsandbytes)")


def _record(benchmark, **info) -> None:
    # peak memory of this process means nothing here: keep conftest from recording the GPU's
    benchmark.extra_info.update(shape=str(SHAPE), device="meta", peak_mem_bytes=None, **info)


@pytest.mark.parametrize("checkpointing", ["no-ckpt", "ckpt"])
@pytest.mark.parametrize("provider", ["baseline", "ours"])
def test_headline_peak(benchmark, provider, checkpointing):
    _skip_unless_available(provider)
    on = checkpointing == "ckpt"
    report = benchmark.pedantic(workloads.count_memory, args=(SHAPE, provider, on), rounds=1, iterations=1)
    _record(benchmark, checkpointing=checkpointing, counted_peak_bytes=report.peak_bytes,
            peak_phase=report.peak_phase, breakdown=report.breakdown)
    workloads.MEMORY_RESULTS.setdefault(provider, {})[checkpointing] = {
        "peak_bytes": report.peak_bytes, "peak_phase": report.peak_phase, "breakdown": report.breakdown}

    assert sum(report.breakdown.values()) == report.peak_bytes
    assert report.breakdown[memory.FROZEN] > 0 and report.breakdown.get(memory.ACTIVATIONS, 0) > 0
    if on:
        off = workloads.MEMORY_RESULTS[provider].get("no-ckpt", {}).get("peak_bytes") \
            or workloads.count_memory(SHAPE, provider, False).peak_bytes
        assert report.peak_bytes < off
    if provider == "ours":
        # the fused loss takes logits at answer tokens only, in checkpointed chunks
        assert report.breakdown.get(memory.LOGITS, 0) < 2**30


@pytest.mark.parametrize("checkpointing", ["no-ckpt", "ckpt"])
@pytest.mark.parametrize("provider", ["baseline", "ours"])
def test_max_microbatch_24gib_counted(benchmark, provider, checkpointing):
    _skip_unless_available(provider)
    on = checkpointing == "ckpt"

    def search():
        peaks = memory.PeaksByMicroBatch(
            lambda b: workloads.count_memory(SHAPE, provider, on, b, warm=True, timeline=True))
        return peaks.largest_within(LIMIT), peaks

    largest, peaks = benchmark.pedantic(search, rounds=1, iterations=1)
    _record(benchmark, checkpointing=checkpointing, max_microbatch_24gib=largest, counted=sorted(peaks.reports))
    workloads.MEMORY_RESULTS.setdefault(provider, {})[f"max_microbatch_24gib_{checkpointing}"] = largest
    if largest:
        assert peaks[largest].peak_bytes <= LIMIT
    assert peaks[largest + 1].peak_bytes > LIMIT
    if on:
        assert largest >= 1
