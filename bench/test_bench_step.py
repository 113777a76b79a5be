"""End-to-end benchmark: one M²PT training step (forward, backward, optimizer), ours vs the baseline.

    pytest bench/test_bench_step.py --benchmark-only

On CUDA: the headline shape of docs/benchmarks.md (LLaVA-1.5-7B, NF4, bf16, micro-batch 8, 576 image + 128 text
tokens, 32 answer tokens, n_v = n_t = 10), reporting samples/s, tokens/s, peak memory (beside its count
on meta, m2pt_fast.planning.memory) and MFU against the dense bf16 rate measured in the same run, plus the largest
micro-batch that fits in 24 GiB; the run also writes bench/results/headline-<gpu>-<date>.json. On a CPU: a
tiny shape, to prove the harness (CPU timings are not performance figures).
"""
import importlib.util

import pytest
import torch
import workloads

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPE = workloads.default_shape()
ROUNDS, WARMUP = (10, 2) if HAS_CUDA else (3, 1)
_dense_rate = {}


def _skip_unless_available(provider):
    if SHAPE.quant == "nf4" and provider == "baseline" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the baseline needs bitsandbytes (pip install bitsandbytes)")
    if SHAPE.quant == "nf4" and provider == "ours" and importlib.util.find_spec("m2pt_fast.models.quantize") is None:
        pytest.skip("m2pt_fast.models.quantize (the NF4 backbone) is not in this checkout")


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _pytorch_paths_on_cpu(monkeypatch):
    # On a CPU the Triton interpreter (a numpy simulation) would time the simulator, not the method:
    # compare the PyTorch paths of both sides instead.
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("checkpointing", ["ckpt", "no-ckpt"])
@pytest.mark.parametrize("provider", ["ours", "baseline"])
def test_train_step(benchmark, provider, checkpointing):
    _skip_unless_available(provider)
    workloads.release_memory()
    model, optimizer = workloads.build(provider, SHAPE, DEVICE, checkpointing=checkpointing == "ckpt")
    batch = workloads.make_batch(model, SHAPE)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        fits = True
        try:  # without checkpointing a side may not fit: that is a result, not an error
            workloads.train_step(model, optimizer, batch)
        except torch.OutOfMemoryError:
            fits = False  # release outside the handler: the live exception holds the step's tensors
        if not fits:
            model = optimizer = batch = None  # the step's tensors go before the skip
            workloads.release_memory()
            pytest.skip(f"{provider} without checkpointing does not fit at micro-batch {SHAPE.batch}")

    def step():
        loss = workloads.train_step(model, optimizer, batch)
        _sync()
        return loss

    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert torch.isfinite(loss)
    seconds = benchmark.stats.stats.median
    tokens = batch[0].numel()
    figures = {
        "samples_per_s": SHAPE.batch / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if HAS_CUDA else None,
        "useful_tflop_per_step": workloads.useful_flops_per_sample(model, SHAPE) * SHAPE.batch / 1e12,
    }
    if HAS_CUDA:
        # the same two steps counted on meta (m2pt_fast.planning.memory) against what the allocator recorded
        counted = workloads.count_memory(SHAPE, provider, checkpointing == "ckpt").peak_bytes
        figures["counted_peak_bytes"] = counted
        figures["counted_over_measured"] = counted / figures["peak_mem_bytes"]
        if "rate" not in _dense_rate:
            _dense_rate["rate"] = workloads.dense_bf16_rate()
        figures["dense_bf16_tflops"] = _dense_rate["rate"] / 1e12
        figures["mfu"] = figures["useful_tflop_per_step"] * 1e12 / seconds / _dense_rate["rate"]
    benchmark.extra_info.update(shape=str(SHAPE), device=DEVICE, checkpointing=checkpointing, **figures)
    workloads.HEADLINE_RESULTS.setdefault(provider, {}).setdefault("steps", {})[checkpointing] = figures
    model = optimizer = batch = loss = None  # the loss's graph keeps the NF4 weights alive (autograd ctx)
    workloads.release_memory()


@pytest.mark.skipif(not HAS_CUDA, reason="the 24 GiB micro-batch search needs a CUDA GPU")
@pytest.mark.parametrize("provider", ["ours", "baseline"])
def test_max_microbatch_24gib(benchmark, provider):
    # Timed once through the benchmark fixture: `--benchmark-only`, how bench/ is run, skips every
    # test that does not take it.
    _skip_unless_available(provider)
    largest = benchmark.pedantic(workloads.max_microbatch, args=(provider, SHAPE, DEVICE), rounds=1, iterations=1)
    # peak memory is meaningless here (the search resets it): keep conftest from recording one
    benchmark.extra_info.update(shape=str(SHAPE), device=DEVICE, max_microbatch_24gib=largest, peak_mem_bytes=None)
    workloads.HEADLINE_RESULTS.setdefault(provider, {})["max_microbatch_24gib"] = largest
