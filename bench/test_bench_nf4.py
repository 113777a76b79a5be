"""Benchmark: NF4 dequantize and nf4_linear against bitsandbytes (docs/benchmarks.md).

    pytest bench/test_bench_nf4.py --benchmark-only [--benchmark-json=bench/results/nf4.json]

Providers:
- dequantize: `nf4_dequantize` (ours: Triton on CUDA; on CPU the native OpenMP library or the
  PyTorch reference, or the interpreter under TRITON_INTERPRET=1) vs
  `bitsandbytes.functional.dequantize_4bit`, on the same bytes (nf4, blocksize 64, double quant);
- linear (forward, and forward + input-gradient backward): `nf4_linear` vs `bitsandbytes.matmul_4bit`,
  and `dense` (F.linear on the bf16 weight) as the floor.
On CUDA: bf16, the LLaMA-7B projections' K x N and M in {1, 16, 256, 5632}; the M at which ours
switches from the fused kernel to dequantize + cuBLAS is m2pt_kernels.nf4.FUSED_MAX_M, and these
rows are where to read the crossover. On CPU: one small fp32 shape proves the harness (CPU timings are
not performance figures). Each result carries its shape, path and device in extra_info.
"""
import platform

import pytest
import torch

from m2pt_kernels import _dispatch, _native, nf4_dequantize, nf4_linear, nf4_quantize
from m2pt_kernels import nf4 as nf4_ops

try:
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
except ImportError:
    bitsandbytes = None

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if HAS_CUDA:
    DTYPE = torch.bfloat16
    # (name, N, K): nn.Linear(K, N) of LLaMA-7B
    WEIGHTS = [("qkvo-4096x4096", 4096, 4096), ("gate_up-11008x4096", 11008, 4096), ("down-4096x11008", 4096, 11008)]
    DEQUANT_WEIGHTS = [("4096x11008", 4096, 11008)]
    MS = [1, 16, 256, 5632]
    ROUNDS, WARMUP = 30, 5
else:
    # under the interpreter the fused kernel at M=16 on this shape takes ~0.1 s: the file stays < 1 min
    DTYPE = torch.float32
    WEIGHTS = [("tiny-256x192", 256, 192)]
    DEQUANT_WEIGHTS = [("tiny-256x192", 256, 192)]
    if not _dispatch.interpreter_enabled():
        # native OpenMP library vs bitsandbytes' CPU kernel: a size where threads matter
        DEQUANT_WEIGHTS.append(("cpu-1024x2048", 1024, 2048))
    MS = [1, 16, 64]
    ROUNDS, WARMUP = 3, 1


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _info(benchmark, **extra):
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else platform.processor() or "cpu",
        torch=torch.__version__, dtype=str(DTYPE), triton_path=_dispatch.use_triton(torch.empty(1, device=DEVICE)),
        native=_native.describe(), **extra,
    )


def _weight(n, k):
    g = torch.Generator().manual_seed(n * 7 + k)
    return (torch.randn(n, k, generator=g) * 0.02).to(DEVICE, DTYPE)


def _run(benchmark, fn):
    def timed():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("provider", ["ours", "bitsandbytes"])
@pytest.mark.parametrize("weight", DEQUANT_WEIGHTS, ids=[w[0] for w in DEQUANT_WEIGHTS])
def test_bench_nf4_dequantize(benchmark, weight, provider):
    name, n, k = weight
    w = _weight(n, k)
    if provider == "bitsandbytes":
        if bitsandbytes is None:
            pytest.skip("bitsandbytes is not installed (offline: its wheel in .whl/, see bench/gpu_session.sh)")
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda: bnb_functional.dequantize_4bit(packed, state)  # noqa: E731
    else:
        q = nf4_quantize(w.cpu(), 64, True).to(DEVICE)
        fn = lambda: nf4_dequantize(q, DTYPE)  # noqa: E731
    # bytes moved: the dense output written, the packed codes (half a byte each) and the 8-bit
    # double-quantized block scales (one per 64) read; the nested statistics are negligible
    _info(benchmark, op="dequantize", weight=name, N=n, K=k, bytes_out=n * k * w.element_size(),
          bytes_moved=n * k * w.element_size() + n * k // 2 + n * k // 64)
    _run(benchmark, fn)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "bitsandbytes", "dense"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("weight", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_bench_nf4_linear(benchmark, weight, M, provider, pass_):
    name, n, k = weight
    w = _weight(n, k)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, k, generator=g).to(DEVICE, DTYPE).requires_grad_(pass_ == "fwd+bwd")
    dy = torch.randn(M, n, generator=g).to(DEVICE, DTYPE)
    if provider == "bitsandbytes":
        if bitsandbytes is None:
            pytest.skip("bitsandbytes is not installed (offline: its wheel in .whl/, see bench/gpu_session.sh)")
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        # matmul_4bit takes the packed weight transposed, as bitsandbytes' Linear4bit passes it
        forward = lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)  # noqa: E731
    elif provider == "dense":
        forward = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    else:
        q = nf4_quantize(w.cpu(), 64, True).to(DEVICE)
        forward = lambda: nf4_linear(x, q)  # noqa: E731

    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return forward()
    else:
        def fn():
            x.grad = None
            forward().backward(dy)

    path = "fused" if (provider == "ours" and M <= nf4_ops.FUSED_MAX_M) else "dequantize+matmul"
    # fwd: 2·M·N·K; backward adds only the input gradient (another 2·M·N·K), never dW (frozen)
    _info(benchmark, op="linear", weight=name, M=M, N=n, K=k, pass_=pass_,
          flops=(2 if pass_ == "fwd" else 4) * M * n * k,
          path=path if provider == "ours" else provider, fused_max_m=nf4_ops.FUSED_MAX_M)
    _run(benchmark, fn)
