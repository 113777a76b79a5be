"""NF4: bit-compatibility with bitsandbytes (the oracle, on CPU), Triton kernels against the
reference (under the interpreter on CPU), nf4_linear forward and input gradient, bad input."""
import copy
import json

import pytest
import torch

from m2pt_kernels import NF4Weight, _dispatch, _native, nf4_dequantize, nf4_linear, nf4_quantize
from m2pt_kernels import nf4 as nf4_ops
from m2pt_kernels.nf4_format import DYNAMIC_CODE, NF4_CODE
from m2pt_kernels.reference import nf4_dequantize_reference, nf4_linear_reference, nf4_quantize_reference

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the NF4 format")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(
    not _dispatch.use_triton(torch.empty(1, device="cuda" if CUDA else "cpu")),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)

# nf4_linear against "dequantize to x.dtype, then torch matmul": the two sum in different orders.
# fp32: reassociation only. fp16/bf16: both accumulate in fp32 and round the output once, so about
# one output ulp apart (2**-10 / 2**-7 relative) plus reassociation.
LINEAR_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
if CUDA:
    # on CUDA fp32 tl.dot runs in TF32 (10-bit mantissa inputs), as torch's matmul may not
    LINEAR_TOL[torch.float32] = (2e-2, 2e-2)

SHAPES = [(64, 64), (3, 5), (1, 7), (113, 203), (17, 64 * 5 + 3), (2, 3, 33), (48, 96)]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def bnb_dequantize(packed, qs):
    """bitsandbytes' dequantization. Its 0.50.2 CPU kernel indexes scales per row, which is wrong when
    a row is not a whole number of blocks (CUDA and its default path are right); for those shapes
    use its device-independent default implementation (called uncompiled: compiling costs seconds)."""
    k = qs.shape[-1]
    if k % qs.blocksize == 0:
        return bnb_functional.dequantize_4bit(packed, qs)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = bnb_functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute.__wrapped__(packed.view(-1), absmax, NF4_CODE, qs.blocksize, qs.shape, qs.dtype)


# ---- the format -----------------------------------------------------------------------------------
def test_tables_match_bitsandbytes():
    assert torch.equal(DYNAMIC_CODE, bnb_functional.create_dynamic_map())
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_is_byte_identical_to_bitsandbytes(shape, dtype, double_quant):
    w = _weight(shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = nf4_quantize_reference(w, 64, double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, qs.absmax)
    assert q.shape == w.shape and q.dtype == dtype
    if double_quant:
        assert torch.equal(q.nested_absmax, qs.state2.absmax)
        assert torch.equal(q.nested_offset, qs.offset)
    # and the public entry point (native or reference) gives the same bytes
    q2 = nf4_quantize(w, 64, double_quant)
    assert torch.equal(q2.packed, q.packed) and torch.equal(q2.absmax, q.absmax)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_other_blocksizes(blocksize, double_quant):
    w = _weight((70, 300), seed=blocksize)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                              quant_type="nf4")
    q = nf4_quantize_reference(w, blocksize, double_quant)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, qs.absmax)
    assert torch.equal(nf4_dequantize_reference(q), bnb_dequantize(packed, qs))


def test_double_quant_with_many_nested_blocks():
    # more than 256 blocks: several nested blocks, a short last one
    w = _weight((300, 130), seed=3)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize_reference(w, 64, True)
    assert q.nested_absmax.numel() == qs.state2.absmax.numel() == 3
    assert torch.equal(q.absmax, qs.absmax) and torch.equal(q.nested_absmax, qs.state2.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes(shape, double_quant):
    w = _weight(shape, torch.bfloat16, seed=7)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = bnb_dequantize(packed, qs)
    q = NF4Weight.from_bnb(packed, qs)
    assert torch.equal(nf4_dequantize_reference(q), expected)
    assert torch.equal(nf4_dequantize(q), expected)
    assert torch.equal(nf4_dequantize(q, torch.float32), bnb_dequantize(packed, _retyped(qs, torch.float32)))


def _retyped(qs, dtype):
    out = copy.copy(qs)
    out.dtype = dtype
    return out


@pytest.mark.parametrize("double_quant", [False, True])
def test_conversions_both_ways(double_quant):
    w = _weight((40, 72), torch.float16, seed=11)
    q = nf4_quantize_reference(w, 64, double_quant)
    packed, qs = q.to_bnb()
    # bitsandbytes reads ours ...
    assert torch.equal(bnb_dequantize(packed, qs), nf4_dequantize_reference(q))
    assert qs.nested == double_quant and qs.quant_type == "nf4" and qs.shape == w.shape
    # ... and ours reads bitsandbytes'
    packed_b, qs_b = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q_b = NF4Weight.from_bnb(packed_b, qs_b)
    assert torch.equal(q_b.packed, q.packed) and torch.equal(q_b.absmax, q.absmax)
    assert qs == qs_b


@pytest.mark.parametrize("double_quant", [False, True])
def test_serialized_keys_match_bitsandbytes(double_quant):
    w = _weight((40, 72), torch.bfloat16, seed=12)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    theirs = {f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    theirs["weight"] = packed
    ours = nf4_quantize_reference(w, 64, double_quant).bnb_state_dict("weight")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(value.tolist()))
        else:
            assert torch.equal(ours[key].reshape(value.shape), value), key
    back = NF4Weight.from_bnb_state_dict(theirs, "weight")
    assert torch.equal(nf4_dequantize_reference(back), bnb_dequantize(packed, qs))


def test_sqnr_is_what_nf4_gives():
    # A sanity figure, not bit-compatibility: NF4 on Gaussian weights keeps ~20 dB of signal.
    w = _weight((256, 256), seed=5)
    err = nf4_dequantize_reference(nf4_quantize_reference(w)) - w
    sqnr = 10 * torch.log10(w.pow(2).mean() / err.pow(2).mean())
    assert 18 < sqnr < 24


# ---- Triton kernels against the reference -----------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((37, 45), 64), ((64, 128), 32), ((300, 7), 256), ((5, 2051), 64)])
def test_triton_dequantize_is_exact(shape, blocksize, dtype, double_quant):
    dev = "cuda" if CUDA else "cpu"
    q = nf4_quantize_reference(_weight(shape, seed=1), blocksize, double_quant).to(dev)
    poisoned = torch.full(q.shape, float("nan"), dtype=dtype, device=dev)
    out = nf4_ops._launch_dequantize(q, dtype, out=poisoned)
    assert torch.equal(out, nf4_dequantize_reference(q, dtype))


@needs_triton
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (5, 37, 45), (16, 70, 129), (3, 128, 200)])
def test_triton_fused_linear_matches_reference(M, N, K, dtype, double_quant):
    dev = "cuda" if CUDA else "cpu"
    q = nf4_quantize_reference(_weight((N, K), seed=M), 64, double_quant).to(dev)
    g = torch.Generator().manual_seed(N)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    bias = torch.randn(N, generator=g).to(dev, dtype)
    poisoned = torch.full((M, N), float("nan"), dtype=dtype, device=dev)
    out = nf4_ops._launch_fused_linear(x, q, bias, out=poisoned)
    ref = nf4_linear_reference(x.float(), q, bias.float()).to(dtype)
    atol, rtol = LINEAR_TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


# ---- nf4_linear: forward and input gradient on every path ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (2, 3), (40,)])  # M = 1 and 6 take the fused path, 40 the dequant path
def test_nf4_linear_output_and_input_gradient(lead, dtype):
    dev = "cuda" if CUDA else "cpu"
    N, K = 24, 72
    q = nf4_quantize(_weight((N, K), seed=2), 64, True).to(dev)
    g = torch.Generator().manual_seed(len(lead))
    x = torch.randn(*lead, K, generator=g).to(dev, dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(dev, dtype).requires_grad_()
    dy = torch.randn(*lead, N, generator=g).to(dev, dtype)
    y = nf4_linear(x, q, bias)
    y.backward(dy)

    x_ref = x.detach().float().requires_grad_()
    b_ref = bias.detach().float().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, nf4_dequantize_reference(q, torch.float32), b_ref)
    y_ref.backward(dy.float())
    atol, rtol = LINEAR_TOL[dtype]
    assert y.shape == (*lead, N) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref.to(dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, x_ref.grad.to(dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(bias.grad, b_ref.grad.to(dtype), atol=atol, rtol=rtol)


def test_nf4_linear_has_no_weight_gradient_path():
    q = nf4_quantize(_weight((8, 64), seed=4))
    x = torch.randn(3, 64, requires_grad=True)
    nf4_linear(x, q).sum().backward()
    assert x.grad is not None
    assert not q.packed.requires_grad and q.packed.grad is None


def test_dispatch_threshold_is_one_documented_number():
    assert isinstance(nf4_ops.FUSED_MAX_M, int) and nf4_ops.FUSED_MAX_M >= 1


@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 300])
def test_cuda_bf16_linear(M):
    N, K = 256, 512
    q = nf4_quantize(_weight((N, K), torch.bfloat16, seed=M)).to("cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = nf4_linear(x, q)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = nf4_dequantize_reference(q, torch.float32)
    x_ref = x.detach().float().requires_grad_()
    y_ref = x_ref @ w.T
    y_ref.backward(dy.float())
    atol, rtol = LINEAR_TOL[torch.bfloat16]
    # K=512 terms: |y| ~ 20, where one bf16 ulp is 0.125
    torch.testing.assert_close(y, y_ref.bfloat16(), atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(x.grad, x_ref.grad.bfloat16(), atol=atol * 4, rtol=rtol)
    assert torch.equal(nf4_dequantize(q, torch.bfloat16), nf4_dequantize_reference(q, torch.bfloat16))


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "w,blocksize,error,match",
    [
        (torch.randint(0, 9, (8, 64)), 64, TypeError, "float32/float16/bfloat16"),
        (torch.randn(64), 64, ValueError, "at least 2 dimensions"),
        (torch.randn(0, 64), 64, ValueError, "empty"),
        (torch.randn(8, 64), 48, ValueError, "blocksize 48"),
    ],
)
def test_bad_weights_are_rejected(w, blocksize, error, match):
    with pytest.raises(error, match=match):
        nf4_quantize(w, blocksize)
    with pytest.raises(error, match=match):
        nf4_quantize_reference(w, blocksize)


def test_inconsistent_weight_is_rejected():
    q = nf4_quantize(_weight((8, 64)))
    with pytest.raises(ValueError, match="packed codes hold"):
        NF4Weight(q.packed[:-3], q.absmax, q.shape, q.dtype, q.blocksize, q.nested_absmax, q.nested_offset)
    with pytest.raises(ValueError, match="absmax has"):
        NF4Weight(q.packed, q.absmax[:-1], q.shape, q.dtype, q.blocksize, q.nested_absmax, q.nested_offset)


def test_linear_shape_errors():
    q = nf4_quantize(_weight((8, 64)))
    with pytest.raises(ValueError, match="expects 64"):
        nf4_linear(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="floating-point"):
        nf4_linear(torch.ones(2, 64, dtype=torch.int32), q)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_linear(torch.randn(2, 64), torch.randn(8, 64))


# ---- the native CPU quantizer -------------------------------------------------------------------------
needs_native = pytest.mark.skipif(not _native.available(), reason=_native.describe())


@needs_native
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize",
                         [((113, 203), 64), ((3, 5), 64), ((300, 130), 64), ((70, 300), 256), ((1, 7), 32)])
def test_native_is_byte_identical_to_reference(shape, blocksize, dtype, double_quant):
    w = _weight(shape, dtype, seed=shape[0])
    ref = nf4_quantize_reference(w, blocksize, double_quant)
    nat = _native.quantize(w, blocksize, double_quant)
    assert torch.equal(nat.packed, ref.packed) and torch.equal(nat.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(nat.nested_absmax, ref.nested_absmax) and torch.equal(nat.nested_offset, ref.nested_offset)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(_native.dequantize(ref, out_dtype), nf4_dequantize_reference(ref, out_dtype))


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_backward_keeps_nothing_dense_and_dequantizes_again(monkeypatch, checkpointed, reentrant):
    # forward dequantizes, backward dequantizes again (and a checkpoint's recompute once more): only
    # the packed weight is held between them, checkpointed or not
    q = nf4_quantize(_weight((24, 64), seed=9))
    calls = []
    real = nf4_ops._dense
    monkeypatch.setattr(nf4_ops, "_dense", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(nf4_ops.FUSED_MAX_M + 8, 64, requires_grad=True)
    saved = []

    def layer(inp):
        return torch.tanh(nf4_linear(inp, q))

    if checkpointed:
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant)
    else:  # what a plain forward saves for backward (inside a checkpoint such hooks would replace its own)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(x)
    y.sum().backward()
    assert len(calls) == (3 if checkpointed else 2)
    assert (24, 64) not in saved  # no dense weight saved for backward
    expected = torch.autograd.grad(torch.tanh(x @ nf4_dequantize_reference(q).T).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


def test_native_library_can_be_turned_off():
    import os
    import subprocess
    import sys

    # The child imports this checkout's m2pt_kernels through the PYTHONPATH conftest.py sets.
    code = "from m2pt_kernels import _native; print(_native.available(), _native.describe())"
    env = dict(os.environ, M2PT_NATIVE="0", TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd="/")
    assert out.stdout.startswith("False NF4 CPU path: PyTorch reference (turned off by M2PT_NATIVE=0)")


COMPILE_FOR_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import m2pt_kernels
ops = sys.modules["m2pt_kernels.nf4"]
target = GPUTarget("cuda", 90, 32)
options = dict(num_warps=4, enable_fp_fusion=False)  # what the launchers pass
for double_quant in (False, True):
    absmax = "*u8" if double_quant else "*fp32"
    stats = dict(packed_ptr="*u8", absmax_ptr=absmax, nested_ptr="*fp32", offset_ptr="*fp32", dyn_ptr="*fp32",
                 code_ptr="*fp32")
    for out in ("bf16", "fp16", "fp32"):
        signature = dict(stats, out_ptr="*" + out, n="i64", nbytes="i64",
                         BLOCKSIZE="constexpr", DOUBLE_QUANT="constexpr", BLOCK="constexpr")
        constexprs = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, BLOCK=ops._DEQUANT_BLOCK)
        compiled = triton.compile(ASTSource(ops._nf4_dequant_kernel, signature, constexprs), target=target,
                                  options=options)
        # bitsandbytes rounds dyn[q] * nested and + offset separately; a fused multiply-add would not
        assert "fma" not in compiled.asm["ptx"], "FMA in the dequantize kernel: bytes would differ"
    for dtype in ("bf16", "fp16"):
        signature = dict(x_ptr="*" + dtype, **stats, bias_ptr="*" + dtype, out_ptr="*" + dtype,
                         stride_x_m="i32", stride_x_k="i32", stride_out_m="i32", stride_out_n="i32",
                         M="i32", N="i32", K="i32", BLOCKSIZE="constexpr", DOUBLE_QUANT="constexpr",
                         HAS_BIAS="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
        constexprs = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
        triton.compile(ASTSource(ops._nf4_fused_linear_kernel, signature, constexprs), target=target, options=options)
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="with a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter never type-checks a kernel; triton's real compiler (sm_90 PTX and cubin through
    its bundled ptxas) does, without a GPU. A subprocess: this process's kernels are interpreted."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))  # PYTHONPATH: conftest.py
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_bnb_quant_storage_in_another_dtype():
    # bitsandbytes can store the packed codes as e.g. bf16 (bnb_4bit_quant_storage); same bytes
    w = _weight((40, 64), seed=13)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                              quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    tensors = {f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    tensors["weight"] = packed
    q = NF4Weight.from_bnb_state_dict(tensors, "weight")
    assert torch.equal(q.packed, nf4_quantize_reference(w).packed)
    assert torch.equal(NF4Weight.from_bnb(packed, qs).packed, q.packed)
