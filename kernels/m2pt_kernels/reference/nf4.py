"""NF4 quantize / dequantize / linear in plain PyTorch: the oracle for the Triton kernels and the
native CPU quantizer, and the CPU fallback.

Bit-compatible with bitsandbytes 0.50.2 (its "default" quantize_4bit op, and its CPU 8-bit
blockwise quantizer for double quantization). Every rounding step below mirrors theirs; where the
order of fp32 operations matters a comment says so, because reordering them changes bytes.
"""
from __future__ import annotations

import functools

import torch

from ..nf4_format import BLOCKSIZES, DYNAMIC_CODE, FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4_CODE, NF4Weight

# Decision boundaries between neighbouring NF4 values (fp32 midpoints).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
ZERO_CODE = 7  # NF4_CODE[7] == 0.0


def check_quantizable(w: torch.Tensor, blocksize: int) -> None:
    """The checks every quantizer runs first, with errors that say what to change."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"nf4_quantize expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"nf4_quantize expects a float32/float16/bfloat16 weight, got {w.dtype}; "
                        "cast it with .float() first (integer tensors are not weights)")
    if w.dim() < 2:
        raise ValueError(f"nf4_quantize expects a weight matrix of at least 2 dimensions, got shape {tuple(w.shape)}; "
                         "1-D tensors (biases, norms) stay in floating point")
    if w.numel() == 0:
        raise ValueError(f"nf4_quantize got an empty weight of shape {tuple(w.shape)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize} is not supported; use one of {BLOCKSIZES} (64 is "
                         f"bitsandbytes' default)")


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) -> (nblocks, blocksize), the short last block zero-padded (zeros never raise an absmax)."""
    n = flat.numel()
    nb = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)


def nf4_codes_reference(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (n,) uint8 and fp32 absmax (nblocks,) of the flattened weight."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)                                 # (nblocks,)
    # bitsandbytes scales full blocks by a reciprocal but divides the short last block; the two
    # differ in the last bit, which can move a value across a midpoint. 1e-38 guards all-zero blocks.
    safe = absmax.clamp(min=1e-38)
    scaled = (blocks * (1.0 / safe[:, None])).reshape(-1)[:n]
    if full < n:
        scaled[full:] = flat[full:] / safe[-1]
        # bitsandbytes stores the clamped absmax for a short last block (but not for full blocks)
        absmax = torch.cat([absmax[:-1], safe[-1:]])
    scaled = scaled.clamp(-1, 1)
    # nearest NF4 value; a value exactly on a midpoint goes to the lower code (bucketize, right=False)
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(flat.device), out_int32=True).to(torch.uint8)
    return codes, absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes < 16 -> ((n + 1) // 2,) bytes, even element in the high nibble."""
    if codes.numel() % 2:
        # an odd count pads the code of 0.0 (bitsandbytes pads the value 0 before coding it)
        codes = torch.nn.functional.pad(codes, (0, 1), value=ZERO_CODE)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: (n,) int64 codes."""
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


@functools.cache
def dynamic_lut(device="cpu") -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer does not search the code: it rounds the normalized value to
    one of 65536 evenly spaced points in [-1, 1] and looks the code up in a table built from the
    code's midpoints. Values within ~1.5e-5 of a midpoint can therefore land on the farther code;
    reproducing the table reproduces their bytes."""
    mids = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.bucketize(grid, mids, right=False).to(torch.uint8).to(device)


def quantize_blockwise_8bit_reference(x: torch.Tensor,
                                      blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-code 8-bit blockwise quantization of a 1-D fp32 tensor: (codes uint8 (n,), absmax fp32)."""
    n = x.numel()
    blocks = _blocks(x.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax
    v = (blocks * inv[:, None]).clamp(-1, 1)
    # ((v + 1) * 0.5) * 65535 + 0.5, each step rounded to fp32, then truncated: their exact sequence
    idx = ((((v + 1.0) * 0.5) * 65535.0) + 0.5).to(torch.int64).clamp(0, 65535)
    q = dynamic_lut(x.device)[idx]
    q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)    # an all-zero block codes as 0
    return q.reshape(-1)[:n], absmax


def nf4_quantize_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight (any shape, >= 2-D) to NF4 exactly as bitsandbytes does."""
    check_quantizable(w, blocksize)
    codes, absmax = nf4_codes_reference(w, blocksize)
    packed = pack_nibbles(codes)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    qabsmax, nested, offset = double_quantize_reference(absmax)
    return NF4Weight(packed, qabsmax, w.shape, w.dtype, blocksize, nested_absmax=nested, nested_offset=offset)


def double_quantize_reference(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax -> (uint8 codes, nested fp32 absmax per 256, fp32 offset = mean)."""
    offset = absmax.mean()
    q, nested = quantize_blockwise_8bit_reference(absmax - offset, NESTED_BLOCKSIZE)
    return q, nested, offset


def nf4_dequantize_reference(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight: NF4 value * block absmax in fp32, rounded once to `dtype` (default q.dtype)."""
    dtype = q.dtype if dtype is None else dtype
    n = q.numel
    values = NF4_CODE.to(q.device)[unpack_nibbles(q.packed, n)]           # (n,) fp32
    scale = q.absmax_fp32().repeat_interleave(q.blocksize)[:n]             # (n,) fp32
    return (values * scale).reshape(q.shape).to(dtype)


def nf4_linear_reference(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T + bias with W (N, K) dequantized to x's dtype: the "dequantize, then matmul" path."""
    return torch.nn.functional.linear(x, nf4_dequantize_reference(q, x.dtype), bias)
