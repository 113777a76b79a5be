"""Benchmark: prefix_attention vs what users write today (docs/benchmarks.md).

    pytest bench/test_bench_prefix_attention.py --benchmark-only [--benchmark-json=bench/results/prefix_attention.json]

Providers, each timed forward, backward and forward+backward:
- prefix_attention: ours (Triton on CUDA; on CPU whatever the dispatcher picks — the interpreter
  under TRITON_INTERPRET=1, the reference otherwise);
- sdpa_concat: SDPA over the materialised [prefix ; sequence] keys and values, the concatenation and
  the batch expansion of the shared prefix included, with a bottom-right causal mask when causal;
- sdpa_no_prefix: plain SDPA without any prefix, the floor a fused prefix should come close to;
- flash_attn_concat: flash-attn over the materialised concatenation (its causal mask is bottom-right),
  when flash-attn is installed (CUDA only).
On CUDA the shapes are a ViT-L/14-336 and a LLaMA-7B attention layer with a 10-row prompt in bf16; on
CPU one tiny fp32 shape only proves the harness (CPU timings are not performance figures, and the
interpreter is a numpy simulation). Each result carries its shape, FLOPs and device in extra_info.
"""
import os
import platform
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.nn.functional as F

from m2pt_kernels import prefix_attention

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # torch < 2.3
    causal_lower_right = None

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    seq_len: int
    prefix_len: int
    head_dim: int
    causal: bool

    def __str__(self):
        return self.name


if HAS_CUDA:
    DTYPE = torch.bfloat16
    SHAPES = [
        Shape("vit-l", 8, 16, 577, 10, 64, causal=False),
        Shape("llama-7b", 8, 32, 704, 10, 128, causal=True),
    ]
    ROUNDS, WARMUP = 30, 5
else:
    # Under the interpreter one forward at this shape takes ~0.1 s; the whole file stays well under
    # a minute.
    DTYPE = torch.float32
    SHAPES = [Shape("tiny-cpu", 1, 2, 33, 10, 32, causal=True)]
    ROUNDS, WARMUP = 3, 1


def sdpa_concat(q, k, v, prefix_k, prefix_v, causal):
    batch, heads_kv, seq_len, head_dim = k.shape
    prefix_len = prefix_k.shape[-2]
    keys = torch.cat([prefix_k.expand(batch, heads_kv, prefix_len, head_dim), k], dim=2)  # (B, H, P + N, D)
    values = torch.cat([prefix_v.expand(batch, heads_kv, prefix_len, head_dim), v], dim=2)
    # is_causal=True would align the mask top-left and hide keys from early queries: lower-right it is.
    mask = causal_lower_right(seq_len, prefix_len + seq_len) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def sdpa_no_prefix(q, k, v, prefix_k, prefix_v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def flash_attn_concat(q, k, v, prefix_k, prefix_v, causal):
    batch, heads_kv, _, head_dim = k.shape
    prefix_len = prefix_k.shape[-2]
    keys = torch.cat([prefix_k.expand(batch, heads_kv, prefix_len, head_dim), k], dim=2)  # (B, H, P + N, D)
    values = torch.cat([prefix_v.expand(batch, heads_kv, prefix_len, head_dim), v], dim=2)
    # flash-attn wants (B, N, H, D); these transposes are the copies a (B, H, N, D) caller pays.
    out = flash_attn_func(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)  # (B, H, N, D)


def ours(q, k, v, prefix_k, prefix_v, causal):
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal)


PROVIDERS = {
    "prefix_attention": ours,
    "sdpa_concat": sdpa_concat,
    "sdpa_no_prefix": sdpa_no_prefix,
    "flash_attn_concat": flash_attn_concat,
}


def skip_reason(provider: str, shape: Shape):
    if provider == "flash_attn_concat":
        if flash_attn_func is None:
            return "flash-attn is not installed"
        if not HAS_CUDA:
            return "flash-attn runs on CUDA only"
    if provider == "sdpa_concat" and shape.causal and causal_lower_right is None:
        return "this torch has no torch.nn.attention.bias.causal_lower_right"
    return None


def useful_flops(shape: Shape, mode: str, with_prefix: bool) -> float:
    # Forward: two matmuls (QKᵀ, PV) of 2·N·keys·D each per head; backward: five (FlashAttention's
    # count, recomputation of QKᵀ included). Causal counts only the visible half of the sequence keys.
    keys = shape.seq_len / 2 if shape.causal else shape.seq_len
    if with_prefix:
        keys += shape.prefix_len
    forward = 4 * shape.batch * shape.heads * shape.seq_len * keys * shape.head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def make_inputs(shape: Shape):
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=DEVICE, dtype=DTYPE).requires_grad_()

    b, h, n, p, d = shape.batch, shape.heads, shape.seq_len, shape.prefix_len, shape.head_dim
    return [randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d), randn(h, p, d), randn(h, p, d)]


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bench_prefix_attention(benchmark, shape, provider, mode):
    reason = skip_reason(provider, shape)
    if reason:
        pytest.skip(reason)
    fn = PROVIDERS[provider]
    inputs = make_inputs(shape)
    grad_out = torch.randn_like(inputs[0])

    def forward():
        out = fn(*inputs, shape.causal)
        sync()
        return out

    # torch.autograd.grad rather than .backward(): no accumulation into .grad across rounds
    # (allow_unused: sdpa_no_prefix ignores the prefix).
    def forward_backward():
        torch.autograd.grad(fn(*inputs, shape.causal), inputs, grad_out, allow_unused=True)
        sync()

    def run_forward_then_time_backward():
        out = fn(*inputs, shape.causal)
        sync()
        return (out,), {}

    def backward(out):
        torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        sync()

    benchmark.group = f"prefix_attention {shape} {mode}"
    benchmark.extra_info.update(
        asdict(shape),
        mode=mode,
        provider=provider,
        dtype=str(DTYPE),
        flops=useful_flops(shape, mode, with_prefix=provider != "sdpa_no_prefix"),
        device=torch.cuda.get_device_name() if HAS_CUDA else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton_version(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
    )
    if mode == "fwd":
        # With autograd on, as in training: what a forward saves for backward is part of its cost.
        benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=WARMUP)
    elif mode == "bwd":
        # The forward runs in setup, outside the timed region; iterations must be 1 with a setup.
        benchmark.pedantic(backward, setup=run_forward_then_time_backward, rounds=ROUNDS, warmup_rounds=WARMUP)
    else:
        benchmark.pedantic(forward_backward, rounds=ROUNDS, warmup_rounds=WARMUP)
