"""The optional native CPU NF4 quantizer/dequantizer (csrc/nf4_cpu.cpp, C++ with OpenMP).

setup.py builds it through CMake when CMake and a C++ compiler are present, into
`m2pt_kernels/libm2pt_nf4*.so`; an install without it is complete, only slower at quantizing large
checkpoints on the CPU. It is a plain C ABI loaded with ctypes, so it does not depend on the torch
build it meets at run time. Byte-identical to reference/nf4.py (the tests check).

`M2PT_NATIVE=0` in the environment turns it off (to compare paths or to rule it out).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .nf4_format import NESTED_BLOCKSIZE, NF4Weight
from .reference.nf4 import dynamic_lut as _dynamic_lut

LIBRARY_NAME = "libm2pt_nf4.so"
ABI_VERSION = 1  # csrc/nf4_cpu.cpp m2pt_nf4_abi_version()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_loaded = False


def _candidates():
    here = Path(__file__).resolve().parent
    env = os.environ.get("M2PT_NATIVE_LIB")
    if env:
        yield Path(env)
    # setup.py puts it beside this file (named like an extension module: libm2pt_nf4.cpython-*.so)
    yield from sorted(here.glob("libm2pt_nf4*.so"))
    # a standalone development build (cmake -S . -B build) at the checkout's root
    yield here.parents[1] / "build" / LIBRARY_NAME


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error, _loaded
    if _loaded:
        return _lib
    _loaded = True
    if os.environ.get("M2PT_NATIVE", "1") == "0":
        _load_error = "turned off by M2PT_NATIVE=0"
        return None
    for path in _candidates():
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                _load_error = f"{path}: {exc}"
                continue
            version = getattr(lib, "m2pt_nf4_abi_version", None)
            if version is None or version() != ABI_VERSION:
                found = version() if version is not None else "none"
                _load_error = f"{path} is a stale build (ABI {found}, need {ABI_VERSION}): rebuild it"
                continue
            vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
            lib.m2pt_nf4_quantize.argtypes = [vp, i32, i64, i64, vp, vp]
            lib.m2pt_nf4_quantize.restype = i32
            lib.m2pt_nf4_dequantize.argtypes = [vp, vp, i64, i64, vp, i32]
            lib.m2pt_nf4_dequantize.restype = i32
            lib.m2pt_blockwise8_quantize.argtypes = [vp, i64, i64, vp, vp, vp]
            lib.m2pt_blockwise8_quantize.restype = i32
            lib.m2pt_nf4_num_threads.restype = i32
            _lib = lib
            return lib
    _load_error = _load_error or f"{LIBRARY_NAME} not built (pure-Python install)"
    return None


def available() -> bool:
    return _load() is not None


def describe() -> str:
    """Which NF4 CPU path is in use, in words (printed by setup and the bench)."""
    lib = _load()
    if lib is None:
        return f"NF4 CPU path: PyTorch reference ({_load_error})"
    return f"NF4 CPU path: native OpenMP library ({lib.m2pt_nf4_num_threads()} threads)"


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def quantize(w: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Weight:
    lib = _load()
    src = w.detach().contiguous()
    n = src.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    rc = lib.m2pt_nf4_quantize(_ptr(src), _DTYPE_CODES[src.dtype], n, blocksize, _ptr(packed), _ptr(absmax))
    if rc != 0:
        raise RuntimeError(f"native NF4 quantize failed (code {rc})")
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    # the mean stays torch's: its summation order fixes the offset's last bit, and the reference uses it
    offset = absmax.mean()
    centered = absmax - offset
    nn = -(-nblocks // NESTED_BLOCKSIZE)
    q8 = torch.empty(nblocks, dtype=torch.uint8)
    nested = torch.empty(nn, dtype=torch.float32)
    rc = lib.m2pt_blockwise8_quantize(_ptr(centered), nblocks, NESTED_BLOCKSIZE, _ptr(_dynamic_lut()),
                                      _ptr(q8), _ptr(nested))
    if rc != 0:
        raise RuntimeError(f"native 8-bit quantize failed (code {rc})")
    return NF4Weight(packed, q8, w.shape, w.dtype, blocksize, nested_absmax=nested, nested_offset=offset)


def dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    lib = _load()
    scales = q.absmax_fp32().contiguous()
    out = torch.empty(q.shape, dtype=dtype)
    rc = lib.m2pt_nf4_dequantize(_ptr(q.packed.contiguous()), _ptr(scales), q.numel, q.blocksize, _ptr(out),
                                 _DTYPE_CODES[dtype])
    if rc != 0:
        raise RuntimeError(f"native NF4 dequantize failed (code {rc})")
    return out

