"""The NF4 weight format, as bitsandbytes defines it, and conversions to and from bitsandbytes.

A weight W of any shape is flattened row-major and cut into blocks of `blocksize` elements (the
last block may be short; blocks run across row boundaries when a row is not a multiple of the
block). Each block keeps its absolute maximum; each element becomes the index of the nearest of the
16 NF4 values (quantiles of N(0, 1), scaled to [-1, 1]) to `w / absmax`. Two indices share a byte:
the even element in the high nibble, the odd one in the low nibble (an odd element count pads the
code of 0.0, 7).

With double quantization the fp32 absmax vector is stored as 8 bits: its mean (the "offset") is
subtracted, and the rest is quantized blockwise (blocks of 256) with bitsandbytes' signed 8-bit
"dynamic" code; the per-256 absmax of those stay fp32. Dequantized absmax = code8[q] * nested + offset.

Everything here is byte-compatible with `bitsandbytes.functional.quantize_4bit(w, blocksize,
compress_statistics=double_quant, quant_type="nf4")` (see kernels/reference/nf4.py for the
quantizer), so a weight quantized by either side loads in the other.
"""
from __future__ import annotations

import json

import torch

# The 16 NF4 values (QLoRA, Dettmers et al. 2023), sorted: index i is the 4-bit code i.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 sorted fp32 values in [-1, 1]).

    Seven decades 1e-6 .. 1: decade i holds 2**i evenly spaced values on each side of zero (the
    midpoints of linspace(0.1, 1, 2**i + 1) times 10**(i - 6)), plus 0 and 1.
    The arithmetic is done in fp32 in the same order as bitsandbytes' `create_dynamic_map`, so the
    table is bit-identical to theirs (the tests check).
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class NF4Weight:
    """A frozen weight in NF4: packed codes plus per-block statistics.

    packed:         uint8 ((numel + 1) // 2,)   two 4-bit codes per byte, even element high
    absmax:         fp32 (nblocks,)             per-block absmax, or, with double quantization,
                    uint8 (nblocks,)            8-bit codes of (absmax - nested_offset)
    nested_absmax:  fp32 (ceil(nblocks / 256),) double quantization only
    nested_offset:  fp32 ()                     double quantization only
    shape, dtype:   the dense weight's shape and dtype (what dequantization returns by default)
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape,
        dtype: torch.dtype,
        blocksize: int = 64,
        nested_absmax: torch.Tensor | None = None,
        nested_offset: torch.Tensor | None = None,
    ):
        self.packed = packed.reshape(-1)
        self.absmax = absmax.reshape(-1)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.nested_absmax = None if nested_absmax is None else nested_absmax.reshape(-1)
        self.nested_offset = (None if nested_offset is None
                              else torch.as_tensor(nested_offset, dtype=torch.float32).reshape(()))
        self.validate()

    # ---- structure ------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized weight and its statistics."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (a corrupt or mismatched checkpoint)."""
        _check(self.blocksize in BLOCKSIZES, f"NF4 blocksize {self.blocksize} is not supported; use one of "
                                             f"{BLOCKSIZES}")
        _check(self.dtype in FLOAT_DTYPES, f"NF4 weight dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        _check(len(self.shape) >= 2 and self.numel > 0, f"NF4 weights must be non-empty and at least 2-D, got "
                                                        f"shape {tuple(self.shape)}")
        _check(self.packed.dtype == torch.uint8, f"NF4 packed codes must be uint8, got {self.packed.dtype}")
        want = (self.numel + 1) // 2
        _check(self.packed.numel() == want, f"NF4 packed codes hold {self.packed.numel()} bytes; shape "
                                            f"{tuple(self.shape)} needs {want}")
        _check(self.absmax.numel() == self.nblocks, f"NF4 absmax has {self.absmax.numel()} entries; {self.nblocks} "
                                                    f"blocks of {self.blocksize} expected")
        if self.double_quant:
            _check(self.absmax.dtype == torch.uint8, f"double-quantized absmax must be uint8 codes, got "
                                                     f"{self.absmax.dtype}")
            nn = -(-self.nblocks // NESTED_BLOCKSIZE)
            _check(self.nested_absmax.numel() == nn, f"nested absmax has {self.nested_absmax.numel()} entries; "
                                                     f"{nn} expected")
            _check(self.nested_offset is not None, "double-quantized NF4 weight lacks its nested offset")
        else:
            _check(self.absmax.dtype == torch.float32, f"NF4 absmax must be fp32 (or uint8 with double "
                                                       f"quantization), got {self.absmax.dtype}")

    def to(self, device) -> NF4Weight:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(mv(self.packed), mv(self.absmax), self.shape, self.dtype, self.blocksize,
                         mv(self.nested_absmax), mv(self.nested_offset))

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales as fp32 (nblocks,), undoing double quantization the way bitsandbytes does."""
        if not self.double_quant:
            return self.absmax
        code = DYNAMIC_CODE.to(self.absmax.device)
        vals = code[self.absmax.long()]                              # (nblocks,)
        nb = self.nblocks
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:nb]
        # fp32 product then fp32 add of the offset: bitsandbytes' order, so the scales match bit for bit
        return vals * scale + self.nested_offset

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")

    # ---- bitsandbytes interop -------------------------------------------------------------------
    def to_bnb(self):
        """(packed, QuantState) as `bitsandbytes.functional.quantize_4bit` would return them."""
        from bitsandbytes.functional import QuantState

        dev = self.device
        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, blocksize=NESTED_BLOCKSIZE,
                                code=DYNAMIC_CODE.to(dev), dtype=torch.float32)
            offset = self.nested_offset
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=NF4_CODE.to(dev), blocksize=self.blocksize,
                        quant_type="nf4", dtype=self.dtype, offset=offset, state2=state2)
        return self.packed.reshape(-1, 1), qs

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From bitsandbytes' packed tensor and QuantState (nf4 only; fp4 is a different format)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, this bitsandbytes weight is {quant_state.quant_type!r}")
        if packed.dtype != torch.uint8:
            # bitsandbytes can store the codes in another dtype (quant_storage); the bytes are the same
            packed = packed.contiguous().view(torch.uint8)
        nested_absmax = nested_offset = None
        if quant_state.nested:
            s2 = quant_state.state2
            if s2.blocksize != NESTED_BLOCKSIZE or not torch.equal(s2.code.cpu(), DYNAMIC_CODE):
                raise ValueError("unsupported bitsandbytes double quantization (expected the dynamic code with "
                                 "blocks of 256)")
            nested_absmax, nested_offset = s2.absmax.float(), quant_state.offset
        return cls(packed, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                   nested_absmax, nested_offset)

    def bnb_state_dict(self, prefix: str = "weight") -> dict:
        """The tensors transformers writes for a bitsandbytes 4-bit weight: `prefix` (packed codes),
        `prefix.absmax`, `prefix.quant_map`, [`prefix.nested_absmax`, `prefix.nested_quant_map`,]
        `prefix.quant_state.bitsandbytes__nf4` (JSON of the non-tensor fields, as uint8 bytes)."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).replace("torch.", ""),
                "shape": list(self.shape)}
        out = {prefix: self.packed.reshape(-1, 1), f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": NF4_CODE.to(self.device).clone()}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = DYNAMIC_CODE.to(self.device).clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.nested_offset))
        packed_meta = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = packed_meta
        return out

    @classmethod
    def from_bnb_state_dict(cls, tensors: dict, prefix: str = "weight") -> NF4Weight:
        """Inverse of `bnb_state_dict`; `tensors` maps the full key names to tensors."""
        def need(key):
            if key not in tensors:
                raise KeyError(f"bitsandbytes 4-bit checkpoint lacks {key!r} (incomplete or not an NF4 checkpoint)")
            return tensors[key]

        qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if qs_key not in tensors and f"{prefix}.quant_state.bitsandbytes__fp4" in tensors:
            raise ValueError(f"{prefix} is stored as bitsandbytes fp4; only nf4 is supported")
        meta = json.loads(bytes(need(qs_key).cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{prefix}: quant_type {meta.get('quant_type')!r}, only nf4 is supported")
        quant_map = need(f"{prefix}.quant_map")
        if not torch.equal(quant_map.cpu().float(), NF4_CODE):
            raise ValueError(f"{prefix}.quant_map is not the NF4 table")
        nested_absmax = nested_offset = None
        if "nested_offset" in meta:
            nested_absmax = need(f"{prefix}.nested_absmax").float()
            if int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
                raise ValueError(f"{prefix}: nested blocksize {meta['nested_blocksize']} is not supported (256 only)")
            nested_offset = torch.tensor(meta["nested_offset"], dtype=torch.float32, device=nested_absmax.device)
        packed = need(prefix)
        if packed.dtype != torch.uint8:
            # bnb_4bit_quant_storage: the codes stored in another dtype; the bytes are the same
            packed = packed.contiguous().view(torch.uint8)
        return cls(packed, need(f"{prefix}.absmax"), meta["shape"], getattr(torch, meta["dtype"]),
                   meta["blocksize"], nested_absmax, nested_offset)
