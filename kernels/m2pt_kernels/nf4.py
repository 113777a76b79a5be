"""NF4 frozen weights: quantize, dequantize and `x @ W.T` with W in NF4.

Layers, top to bottom: Triton kernels -> launchers (shape checks, grids) -> autograd Function ->
public functions `nf4_quantize`, `nf4_dequantize`, `nf4_linear`. The format and its bitsandbytes
conversions are in nf4_format.py; the pure-PyTorch oracle is reference/nf4.py.

Where the time goes (docs/nf4.md): for training shapes (M in the thousands) the matmul dwarfs the
weight, so the win is a fast single-pass dequantize followed by cuBLAS. For decoding shapes
(M of a few rows) reading 4-bit weights instead of 16-bit ones is the win, so a fused kernel
dequantizes tiles in registers and never writes the dense weight.
"""
from __future__ import annotations

import functools

import torch

from . import _dispatch
from .nf4_format import DYNAMIC_CODE, NF4_CODE, NF4Weight
from .reference import nf4 as _ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works; _dispatch.use_triton() reports False
    triton = None

# nf4_linear runs the fused dequant-GEMM kernel for M <= FUSED_MAX_M rows and "dequantize, then
# cuBLAS" above. PROVISIONAL: chosen without a GPU (bitsandbytes fuses only at M == 1; tiles of 16
# rows are the smallest tl.dot tile, so up to 16 rows cost one tile pass). Re-measure on H100 with
# bench/test_bench_nf4.py (M in {1, 16, 256, 5632}) and move this one number.
FUSED_MAX_M = 16

# output elements per program: 1 KiB of codes in, 4 KiB of bf16 out (ptxas, sm_90: 48 registers)
_DEQUANT_BLOCK = 2048

if triton is not None:

    @triton.jit
    def _block_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr):
        # fp32 scale of each element's block; with double quantization dyn[q] * nested + offset, two
        # separately rounded fp32 ops (the launcher turns off FMA fusion so the bytes match bitsandbytes)
        if DOUBLE_QUANT:
            q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)  # NESTED_BLOCKSIZE
            offset = tl.load(offset_ptr)
            scale = tl.load(dyn_ptr + q8, mask=mask, other=0.0) * nested + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, out_ptr,
        n, nbytes,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # one program turns BLOCK // 2 bytes into BLOCK consecutive elements of the flattened weight.
        # Working per byte loads each byte and each scale once; both nibbles of a byte share a block
        # because every supported blocksize is even.
        pid = tl.program_id(0)
        b = pid.to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)   # byte index (BLOCK/2,)
        bmask = b < nbytes
        byte = tl.load(packed_ptr + b, mask=bmask, other=0).to(tl.int32)
        scale = _block_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, (2 * b) // BLOCKSIZE, bmask, DOUBLE_QUANT)
        hi = tl.load(code_ptr + (byte >> 4), mask=bmask, other=0.0) * scale     # even elements
        lo = tl.load(code_ptr + (byte & 0xF), mask=bmask, other=0.0) * scale    # odd elements
        values = tl.reshape(tl.join(hi, lo), (BLOCK,))                   # (BLOCK/2, 2) -> interleaved
        e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + e, values.to(out_ptr.dtype.element_ty), mask=e < n)

    @triton.jit
    def _nf4_fused_linear_kernel(
        x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, bias_ptr, out_ptr,
        stride_x_m, stride_x_k, stride_out_m, stride_out_n,
        M, N, K,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # out[m, n] = sum_k x[m, k] * W[n, k]; W tiles are dequantized in registers, never stored.
        # W is addressed through its flattened index n * K + k, so rows that are not a multiple of the
        # block (blocks that straddle rows) and odd K need no special case.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # (BLOCK_M,)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # (BLOCK_N,)
        rk = tl.arange(0, BLOCK_K)                                   # (BLOCK_K,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x_mask = (rm[:, None] < M) & (k[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_x_m + k[None, :] * stride_x_k, mask=x_mask, other=0.0)
            w_mask = (k[:, None] < K) & (rn[None, :] < N)
            e = rn[None, :].to(tl.int64) * K + k[:, None]            # (BLOCK_K, BLOCK_N) flat index of W[n, k]
            byte = tl.load(packed_ptr + e // 2, mask=w_mask, other=0).to(tl.int32)
            nib = tl.where((e % 2) == 0, byte >> 4, byte & 0xF)
            value = tl.load(code_ptr + nib, mask=w_mask, other=0.0)
            scale = _block_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, e // BLOCKSIZE, w_mask, DOUBLE_QUANT)
            # round W to x's dtype first, as the dequantize-then-matmul path does
            w = (value * scale).to(x.dtype)                          # (BLOCK_K, BLOCK_N) = W.T tile
            acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * stride_out_m + rn[None, :] * stride_out_n,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ---- launchers ----------------------------------------------------------------------------------
@functools.cache
def _tables(device: torch.device):
    """The NF4 and 8-bit dynamic code tables on `device`, copied there once, not on every call."""
    return NF4_CODE.to(device), DYNAMIC_CODE.to(device)


def _stat_args(q: NF4Weight):
    """Kernel pointer arguments for the statistics; unused ones get a valid dummy (never read)."""
    code, dyn = _tables(q.device)
    if q.double_quant:
        return q.absmax, q.nested_absmax, q.nested_offset.reshape(1), dyn, code
    return q.absmax, q.absmax, q.absmax, code, code


def _launch_dequantize(q: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight into `out` (new if None; tests pass a NaN-poisoned one)."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    n = q.numel
    absmax, nested, offset, dyn, code = _stat_args(q)
    grid = (triton.cdiv(n, _DEQUANT_BLOCK),)
    with _dispatch.launching_on(out.device):
        _nf4_dequant_kernel[grid](
            q.packed, absmax, nested, offset, dyn, code, out, n, q.packed.numel(),
            BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, BLOCK=_DEQUANT_BLOCK,
            enable_fp_fusion=False,
        )
    return out


def _launch_fused_linear(x2d: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """x2d (M, K) @ W.T (+ bias) -> (M, N) in x2d's dtype, into `out` (new if None)."""
    M, K = x2d.shape
    N = q.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    absmax, nested, offset, dyn, code = _stat_args(q)
    # PROVISIONAL tiles (no GPU this session): 16 rows is tl.dot's smallest M; 32 output columns per
    # program give a 4096-wide layer 128 programs, about one per H100 SM, where 64 would idle half.
    # ptxas (sm_90, 4 warps, bf16, double quant): 126 registers, no spills; 64 columns take 222.
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 64
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    with _dispatch.launching_on(out.device):
        _nf4_fused_linear_kernel[grid](
            x2d, q.packed, absmax, nested, offset, dyn, code, bias.contiguous() if bias is not None else x2d,
            out, x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
            M, N, K,
            BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            enable_fp_fusion=False,
        )
    return out


def _check_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> None:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"nf4_linear expects an NF4Weight (from nf4_quantize), got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"nf4_linear needs a 2-D weight (N, K), got shape {tuple(q.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"nf4_linear expects a floating-point input (float32/float16/bfloat16), got {x.dtype}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_linear: input has {x.shape[-1]} features, the weight expects {q.shape[1]} (shape "
                         f"{tuple(q.shape)})")
    if x.device != q.device:
        raise ValueError(f"nf4_linear: input on {x.device}, weight on {q.device}; move one of them")
    if bias is not None and bias.shape != (q.shape[0],):
        raise ValueError(f"nf4_linear: bias shape {tuple(bias.shape)}, expected ({q.shape[0]},)")


def _dense(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight by the fastest available path on q's device."""
    if q.device.type == "meta":
        return torch.empty(q.shape, dtype=dtype, device=q.device)  # what the kernel allocates: the output
    if _dispatch.use_triton(q.packed):
        if dtype == torch.bfloat16 and q.device.type == "cpu":
            # the interpreter (numpy has no bf16) truncates fp32 -> bf16 instead of rounding to
            # nearest even; let torch round so CPU results stay equal to bitsandbytes'
            return _launch_dequantize(q, torch.float32).to(dtype)
        return _launch_dequantize(q, dtype)
    from . import _native  # CPU: the OpenMP build when present, else the reference
    if _native.available() and q.device.type == "cpu":
        return _native.dequantize(q, dtype)
    return _ref.nf4_dequantize_reference(q, dtype)


def _forward(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])                                 # (M, K)
    # the interpreter's bf16 tl.dot returns garbage (docs/nf4.md): on CPU bf16 takes the dense path
    interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    if x2d.shape[0] <= FUSED_MAX_M and _dispatch.meta_takes_kernels(x2d, q.packed):
        out = x2d.new_empty((x2d.shape[0], q.shape[0]))  # the fused kernel allocates its output alone
    elif x2d.shape[0] <= FUSED_MAX_M and not interpreted_bf16 and _dispatch.use_triton(x2d, q.packed):
        out = _launch_fused_linear(x2d, q, bias)
    else:
        out = torch.nn.functional.linear(x2d, _dense(q, x.dtype), bias)
    return out.reshape(*x.shape[:-1], q.shape[0])


# ---- autograd -----------------------------------------------------------------------------------
class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ W.T + b with W frozen in NF4: backward gives dx (and db), never dW.

    Nothing dense is saved for backward, which dequantizes the weight again: only the packed weight
    stays between forward and backward. Under activation checkpointing this costs one dequantization
    more per layer (forward, recompute, backward) than keeping the recompute's dense copy for the
    backward would, and saves that copy: a decoder block's dense weights, 0.29 GiB of a 7B step's
    peak at micro-batch 8 (docs/memory.md). Checkpointing is the memory-saving setting, so memory wins.
    """

    @staticmethod
    def forward(ctx, x, bias, q):
        ctx.q = q
        ctx.has_bias = bias is not None
        return _forward(x, q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        q = ctx.q
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dx = dy @ W at every M: backward runs at training shapes, where dequantize + cuBLAS wins
            grad_x = grad_out @ _dense(q, grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


# ---- public API ---------------------------------------------------------------------------------
def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight (>= 2-D) to NF4, byte-identical to
    `bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type="nf4")`.

    CPU tensors use the native OpenMP quantizer when it was built (same bytes), else the reference;
    other devices run the reference on-device (quantization happens once per model, off the hot path).
    """
    _ref.check_quantizable(w, blocksize)
    if w.device.type == "cpu":
        from . import _native
        if _native.available():
            return _native.quantize(w, blocksize, double_quant)
    return _ref.nf4_quantize_reference(w, blocksize, double_quant)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight, shape q.shape, in `dtype` (default: the dtype it was quantized from).
    Equal value for value to `bitsandbytes.functional.dequantize_4bit` on the same bytes."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"nf4_dequantize expects an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"nf4_dequantize can produce float32/float16/bfloat16, not {dtype}")
    return _dense(q, dtype)


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N), W = q (N, K) in NF4, computed in x's dtype.

    Differentiable in x (and bias); the weight is frozen, so backward computes only the input gradient.
    """
    _check_linear(x, q, bias)
    return _NF4LinearFunction.apply(x, bias, q)
