"""m2pt_kernels.prefix_attention against its float64 reference: output and all five gradients.

Error-ratio rule: the kernel's error against the float64 reference may be at most twice
the error of the plain PyTorch reference run in the kernel's dtype, plus a small absolute floor
(where the low-precision reference happens to be almost exact, a ratio of tiny numbers means
nothing). Without a GPU the kernels run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: shapes are tiny, and the kernels pick 16-wide tiles there so
that N = 17, 33, 37 and P = 20 still cross block boundaries.
"""
import importlib
import os
import sys
from dataclasses import dataclass

import pytest
import torch

import m2pt_kernels
from m2pt_kernels import prefix_attention
from m2pt_kernels.reference import prefix_attention_mask, prefix_attention_reference

# The module itself: on the package, the name `prefix_attention` is the function.
kernel_module = importlib.import_module("m2pt_kernels.prefix_attention")

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernel = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETED), reason="the Triton kernels need CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Floor of the error-ratio rule, per dtype, relative to the largest reference value (a shared
# prefix's gradient sums B·N·Hq/Hkv terms, so it is not O(1)). fp16/bf16: a tenth of a unit in the
# last place at 1.0; PyTorch's own error there is already at least the final rounding. fp32: ~8 ulps,
# because at these tiny sizes both sides err by a few ulps (summation order, exp2 with a log2(e)
# scale vs exp), and a ratio of two few-ulp numbers is noise, not a kernel bug.
ATOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 8e-4}


@dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    prefix_len: int | None  # None: no prefix tensors at all
    head_dim: int
    causal: bool = False
    per_sample_prefix: bool = False
    kv_lens: tuple | None = None
    layout: str = "bhnd"  # "bnhd": q/k/v are transposed views of (B, N, H, D), as in HF models
    softmax_scale: float | None = None

    def __str__(self):
        prefix = "none" if self.prefix_len is None else f"{self.prefix_len}{'ps' if self.per_sample_prefix else ''}"
        return (f"B{self.batch}-H{self.heads_q}:{self.heads_kv}-N{self.seq_len}-P{prefix}-D{self.head_dim}"
                f"{'-causal' if self.causal else ''}{'-kvlens' if self.kv_lens else ''}"
                f"{'-' + self.layout if self.layout != 'bhnd' else ''}")


# P ∈ {0, 1, 7, 20 > block}, N ∈ {1, odd, > block}, D ∈ {32, 40, 64, 96, 128}, GQA/MQA, B ∈ {1, 3}, causal on
# and off, shared and per-sample prefix, padded kv_lens (including rows that see no key at all).
INTERPRETER_CASES = [
    Case(1, 2, 2, 17, 7, 32),
    Case(1, 2, 2, 17, 7, 32, causal=True),
    Case(3, 2, 1, 9, 0, 32, causal=True),
    Case(1, 1, 1, 20, None, 64),
    Case(3, 2, 2, 5, 1, 40, causal=True, per_sample_prefix=True),
    Case(1, 2, 1, 7, 20, 32),
    Case(3, 2, 2, 1, 7, 64, causal=True),
    Case(1, 2, 1, 37, 7, 40, causal=True),
    Case(1, 4, 1, 19, 3, 32, causal=True, per_sample_prefix=True),
    Case(3, 2, 1, 21, 7, 32, kv_lens=(21, 5, 16)),
    Case(3, 2, 2, 18, 0, 32, causal=True, kv_lens=(0, 18, 17)),
    Case(3, 1, 1, 33, 7, 64, causal=True, per_sample_prefix=True, kv_lens=(33, 0, 10)),
    Case(1, 2, 2, 33, 10, 64, layout="bnhd"),
    Case(1, 2, 1, 13, 5, 40, causal=True, softmax_scale=0.3),
    # The other head dims the model families use (80, 96 pad to a 128-wide tile).
    Case(1, 1, 1, 9, 3, 96, causal=True),
    Case(1, 1, 1, 17, 10, 128, causal=True, kv_lens=(12,)),
]


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Fresh random q, k, v, prefix_k, prefix_v (leaf tensors in `dtype`) and kv_lens."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    b, hq, hkv, n, d = case.batch, case.heads_q, case.heads_kv, case.seq_len, case.head_dim
    if case.layout == "bnhd":
        q = randn(b, n, hq, d).transpose(1, 2)  # (B, Hq, N, D) view with N-stride H·D
        k = randn(b, n, hkv, d).transpose(1, 2)
        v = randn(b, n, hkv, d).transpose(1, 2)
    else:
        q, k, v = randn(b, hq, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    tensors = [q, k, v]
    if case.prefix_len is not None:
        prefix_shape = (b, hkv, case.prefix_len, d) if case.per_sample_prefix else (hkv, case.prefix_len, d)
        tensors += [randn(*prefix_shape), randn(*prefix_shape)]
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    if case.prefix_len is None:
        leaves += [None, None]
    # int64, what `attention_mask.sum(-1)` gives; the CPU fallback test passes int32.
    kv_lens = None if case.kv_lens is None else torch.tensor(case.kv_lens, dtype=torch.int64, device=device)
    grad_out = randn(b, hq, n, d).to(device)
    return leaves, kv_lens, grad_out


def run(fn, case: Case, leaves, kv_lens, grad_out, dtype=None):
    """Output and the gradients of every given tensor, optionally after casting the inputs."""
    inputs = [None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_() for t in leaves]
    out = fn(*inputs, causal=case.causal, softmax_scale=case.softmax_scale, kv_lens=kv_lens)
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in inputs if t is not None]


def assert_error_ratio(case: Case, dtype: torch.dtype, leaves, kv_lens, grad_out):
    kernel = run(prefix_attention, case, leaves, kv_lens, grad_out)
    exact = run(prefix_attention_reference, case, leaves, kv_lens, grad_out, dtype=torch.float64)
    plain = run(prefix_attention_reference, case, leaves, kv_lens, grad_out, dtype=dtype)
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, got, want, baseline in zip(names, kernel, exact, plain):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten poisoned element?)"
        err, bound, baseline_err = error_and_bound(got, want, baseline, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > 2 × PyTorch {dtype} error {baseline_err:.3g} + floor"


def error_and_bound(got, want, baseline, dtype):
    """Max abs error of `got` and of `baseline` against `want`, and the bound `got` must meet."""
    if want.numel() == 0:  # the gradient of a P = 0 prefix
        return 0.0, 0.0, 0.0
    err = (got.double() - want.double()).abs().max().item()
    baseline_err = (baseline.double() - want.double()).abs().max().item()
    return err, 2 * baseline_err + ATOL_FLOOR[dtype] * max(1.0, want.abs().max().item()), baseline_err


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an element it forgets shows up."""
    def new_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_module, "_new_output", new_output)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=str)
def test_matches_float64_reference(case, dtype, poisoned_outputs):
    device = "cuda" if HAS_CUDA else "cpu"
    leaves, kv_lens, grad_out = make_inputs(case, dtype, device)
    assert_error_ratio(case, dtype, leaves, kv_lens, grad_out)


@needs_kernel
@pytest.mark.parametrize("case", [
    Case(3, 2, 1, 37, 20, 32, causal=True, kv_lens=(37, 0, 23)),
    Case(1, 2, 2, 50, 7, 40, kv_lens=(41,)),
], ids=str)
def test_unequal_query_and_key_tiles(case, monkeypatch, poisoned_outputs):
    # On a GPU the query and key tiles differ in size (e.g. 128 × 64 in forward); the interpreter
    # uses 16 × 16. Block-skipping and mask-boundary arithmetic must hold for either ratio.
    # Causal with 32-query × 16-key dk/dv tiles: the diagonal ends mid-way through a query tile.
    tiles = dict(fwd=(32, 16, 1, 1), dq=(16, 32, 1, 1), dkdv=(32, 16, 1, 1) if case.causal else (16, 32, 1, 1))
    monkeypatch.setattr(kernel_module, "_tile_sizes", lambda *args: tiles)
    leaves, kv_lens, grad_out = make_inputs(case, torch.float32, "cuda" if HAS_CUDA else "cpu")
    kv_lens = kv_lens.to(torch.int32)
    assert_error_ratio(case, torch.float32, leaves, kv_lens, grad_out)


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    # Guard for the comparisons in this file: they must exercise the kernels, not the fallback.
    calls = []
    forward = kernel_module._forward
    monkeypatch.setattr(kernel_module, "_forward", lambda *a: calls.append(1) or forward(*a))
    case = Case(1, 1, 1, 3, 2, 32)
    leaves, kv_lens, _ = make_inputs(case, torch.float32, "cuda" if HAS_CUDA else "cpu")
    prefix_attention(*leaves)
    assert calls == [1]


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernel_module, "_forward", lambda *a: pytest.fail("kernel called on CPU"))
    case = Case(3, 4, 2, 11, 5, 40, causal=True, kv_lens=(11, 0, 4))
    leaves, kv_lens, grad_out = make_inputs(case, torch.float32)
    kv_lens = kv_lens.to(torch.int32)
    got = run(prefix_attention, case, leaves, kv_lens, grad_out)
    want = run(prefix_attention_reference, case, leaves, kv_lens, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernel
def test_gradient_with_stride_zero(poisoned_outputs):
    # out.sum().backward() hands the backward an expanded scalar: every stride of grad_out is 0.
    case = Case(1, 2, 1, 17, 3, 32, causal=True)
    leaves, kv_lens, _ = make_inputs(case, torch.float32, "cuda" if HAS_CUDA else "cpu")
    got = [t.detach().requires_grad_() for t in leaves]
    want = [t.detach().double().requires_grad_() for t in leaves]
    prefix_attention(*got, causal=True).sum().backward()
    prefix_attention_reference(*want, causal=True).sum().backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_the_autocast_dtype(monkeypatch):
    # fp32 prefix parameters meet bf16 activations under autocast, as in a mixed-precision model;
    # on CPU bf16 always takes the reference (the interpreter's bf16 dot is unusable).
    monkeypatch.setattr(kernel_module, "_forward", lambda *a: pytest.fail("bf16 kernel in the interpreter"))
    case = Case(2, 2, 2, 6, 3, 32, causal=True)
    (q, k, v, pk, pv), kv_lens, grad_out = make_inputs(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefix_attention(q, k, v, pk, pv, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().backward(grad_out)
    assert pk.grad.dtype == torch.float32 and torch.isfinite(pk.grad).all()


def test_meta_tensors_run_the_reference(monkeypatch):
    # Meta tensors (shape tracing, counting a step's work at full size without memory) have no
    # autocast and no kernel: the reference gives the output's shape and dtype, and a backward.
    monkeypatch.setattr(kernel_module, "_forward", lambda *a: pytest.fail("kernel called on meta tensors"))
    q = torch.empty(2, 4, 7, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(2, 2, 7, 16, device="meta", dtype=torch.bfloat16) for _ in range(2))
    pk, pv = (torch.empty(2, 3, 16, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = prefix_attention(q, k, v, pk, pv, causal=True)
    assert (out.shape, out.dtype, out.device.type) == ((2, 4, 7, 16), torch.bfloat16, "meta")
    out.sum().backward()
    assert pk.grad.shape == pk.shape and q.grad.shape == q.shape


def test_float64_runs_the_reference():
    case = Case(1, 2, 1, 6, 3, 32, causal=True)
    leaves, kv_lens, grad_out = make_inputs(case, torch.float64)
    got = run(prefix_attention, case, leaves, kv_lens, grad_out)
    want = run(prefix_attention_reference, case, leaves, kv_lens, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def naive_prefix_attention(q, k, v, prefix_k, prefix_v, causal, kv_lens):
    """Query by query, in float64: the definition the reference's mask and SDPA call must match.

    This checks the oracle itself; kernels are only ever compared with prefix_attention_reference.
    """
    batch, heads_q, seq_len, head_dim = q.shape
    group = heads_q // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads_q):
            pk = prefix_k[h // group] if prefix_k.dim() == 3 else prefix_k[b, h // group]
            pv = prefix_v[h // group] if prefix_v.dim() == 3 else prefix_v[b, h // group]
            for i in range(seq_len):
                last = seq_len if not causal else i + 1
                if kv_lens is not None:
                    last = min(last, int(kv_lens[b]))
                keys = torch.cat([pk, k[b, h // group, :last]])  # (P + visible, D)
                values = torch.cat([pv, v[b, h // group, :last]])
                if len(keys) == 0:
                    continue
                weights = torch.softmax(keys @ q[b, h, i] / head_dim**0.5, dim=0)
                out[b, h, i] = weights @ values
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix_len", [0, 4])
def test_reference_matches_the_definition(causal, prefix_len):
    case = Case(2, 4, 2, 6, prefix_len, 8, causal=causal, per_sample_prefix=causal, kv_lens=(6, 3))
    (q, k, v, pk, pv), kv_lens, _ = make_inputs(case, torch.float64)
    want = naive_prefix_attention(q, k, v, pk, pv, causal, kv_lens)
    got = prefix_attention_reference(q, k, v, pk, pv, causal=causal, kv_lens=kv_lens)
    torch.testing.assert_close(got, want)
    # Bottom-right alignment: with a prefix the first query still sees every prefix key.
    mask = prefix_attention_mask(2, 6, prefix_len, causal=causal, kv_lens=kv_lens)  # (B, 1, N, P + N)
    assert mask[:, :, 0, :prefix_len].all()


def test_reference_rows_without_keys_are_zero_and_pass_no_gradient():
    case = Case(2, 2, 2, 5, 0, 8, causal=True, kv_lens=(0, 5))
    (q, k, v, pk, pv), kv_lens, grad_out = make_inputs(case, torch.float64)
    out = prefix_attention_reference(q, k, v, pk, pv, causal=True, kv_lens=kv_lens)
    out.backward(grad_out.double())
    assert (out[0] == 0).all() and (q.grad[0] == 0).all() and (k.grad[0] == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@needs_kernel
def test_shared_prefix_gradient_is_the_batch_sum(poisoned_outputs):
    # The same prefix given shared and expanded per sample: the shared gradient is the batch sum.
    case = Case(3, 2, 1, 9, 5, 32, causal=True)
    (q, k, v, pk, pv), _, grad_out = make_inputs(case, torch.float32, "cuda" if HAS_CUDA else "cpu")
    shared = run(prefix_attention, case, [q, k, v, pk, pv], None, grad_out)
    expanded = [t.detach().expand(3, *t.shape).contiguous() for t in (pk, pv)]
    per_sample = run(prefix_attention, case, [q, k, v, *expanded], None, grad_out)
    torch.testing.assert_close(shared[0], per_sample[0])
    torch.testing.assert_close(shared[4], per_sample[4].sum(0))
    torch.testing.assert_close(shared[5], per_sample[5].sum(0))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_torch_compile_fullgraph(path, monkeypatch):
    """One op to torch.compile: fullgraph=True fails on any graph break.

    The aot_eager backend traces forward and backward through the custom op's autograd formula like
    inductor does, without compiling C++ (seconds instead of a minute on CPU).
    """
    if path == "kernel" and not (HAS_CUDA or INTERPRETED):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    if path == "reference" and not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    device = "cuda" if (HAS_CUDA and path == "kernel") else "cpu"
    case = Case(2, 2, 1, 5, 3, 32, causal=True, kv_lens=(5, 2))
    leaves, kv_lens, grad_out = make_inputs(case, torch.float32, device)
    graphs = []
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def boxed(graph_module, _):
        return make_boxed_func(graph_module.forward)

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)

    def step(q, k, v, pk, pv, kv_lens):
        return prefix_attention(q, k, v, pk, pv, causal=True, kv_lens=kv_lens)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    inputs = [t.detach().requires_grad_() for t in leaves]
    out = compiled(*inputs, kv_lens)
    out.backward(grad_out)
    want = run(prefix_attention, case, leaves, kv_lens, grad_out)
    torch.testing.assert_close(out, want[0])
    for t, g in zip(inputs, want[1:]):
        torch.testing.assert_close(t.grad, g)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    if path == "kernel":
        assert any("m2pt_kernels.prefix_attention_forward" in op for op in ops), ops


@needs_kernel
@pytest.mark.parametrize("case", [
    Case(2, 2, 1, 5, 3, 32, causal=True, kv_lens=(5, 2), layout="bnhd"),
    Case(2, 2, 2, 4, 2, 32, per_sample_prefix=True),
], ids=str)
def test_custom_op_registration(case):
    # torch.library.opcheck: schema, fake (meta) implementation against the real one (shapes,
    # dtypes and strides), the autograd registration, and AOT dispatch.
    leaves, kv_lens, grad_out = make_inputs(case, torch.float32, "cuda" if HAS_CUDA else "cpu")
    q, k, v, pk, pv = leaves
    torch.library.opcheck(kernel_module._prefix_attention_forward_op, (q, k, v, pk, pv, kv_lens, case.causal, 0.2))
    # The backward op is never differentiated: check it on plain tensors. grad_out transposed, as
    # autograd may hand it over in any layout.
    q, k, v, pk, pv = (t.detach() for t in leaves)
    out, lse = kernel_module._prefix_attention_forward_op(q, k, v, pk, pv, kv_lens, case.causal, 0.2)
    grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(kernel_module._prefix_attention_backward_op,
                          (grad_out, q, k, v, pk, pv, kv_lens, out, lse, case.causal, 0.2))


def _bad(**changes):
    case = Case(2, 4, 2, 5, 3, 32)
    (q, k, v, pk, pv), _, _ = make_inputs(case, torch.float32)
    args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: _bad(q=torch.randn(2, 4, 5)), "must be \\(B, H, N, D\\)"),
        (lambda: _bad(k=torch.randn(2, 3, 5, 32), v=torch.randn(2, 3, 5, 32)), "multiple of k/v heads"),
        (lambda: _bad(v=torch.randn(2, 2, 6, 32)), "k and v must have one shape"),
        (lambda: _bad(k=torch.randn(2, 2, 6, 32), v=torch.randn(2, 2, 6, 32)), "to match q"),
        (lambda: _bad(prefix_v=None), "both prefix_k and prefix_v"),
        (lambda: _bad(prefix_k=torch.randn(3, 3, 32), prefix_v=torch.randn(3, 3, 32)), "prefix_k must be"),
        (lambda: _bad(prefix_k=torch.randn(2, 3, 16), prefix_v=torch.randn(2, 3, 16)), "prefix_k must be"),
        (lambda: _bad(prefix_k=torch.randn(1, 2, 3, 32), prefix_v=torch.randn(1, 2, 3, 32)), "per sample"),
        (lambda: _bad(v=torch.randn(2, 2, 5, 32, dtype=torch.float16)), "one dtype"),
        (lambda: _bad(kv_lens=torch.tensor([1.0, 2.0])), "kv_lens must be"),
        (lambda: _bad(kv_lens=torch.tensor([1, 2, 3])), "kv_lens must be"),
    ],
    ids=["q-3d", "gqa-ratio", "k-v-shape", "k-q-shape", "half-prefix", "prefix-heads", "prefix-dim",
         "prefix-batch", "dtype", "kv-lens-dtype", "kv-lens-shape"],
)
def test_bad_inputs_raise_value_error(make_args, match):
    with pytest.raises(ValueError, match=match):
        prefix_attention(**make_args())


COMPILE_FOR_GPUS = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import m2pt_kernels
kernels = sys.modules["m2pt_kernels.prefix_attention"]
# Shared memory per block (opt-in maximum, bytes): sm_86 stands for the 99 KB of sm_86, sm_89 and
# sm_120 (one tensor-core path in Triton); sm_80 has 163 KB and sm_86's layouts; sm_90 (wgmma) 227 KB.
# Head dims are the largest of each tile bucket (33-64, 65-128, 129-256 share tiles); fp16 takes the
# tiles and layouts of bf16, so it is compiled once, for sm_90.
budgets = {86: 99 * 1024, 90: 227 * 1024}
budgets = {c: b for c, b in budgets.items() if str(c) in sys.argv[1:]}  # the targets this process compiles for
assert budgets, f"no target among {sys.argv[1:]}"
cases = {86: [("bf16", 64), ("bf16", 128), ("bf16", 256), ("fp32", 128), ("fp32", 256)],
         90: [("bf16", 128), ("bf16", 256), ("fp16", 64), ("fp32", 128)]}
dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
too_big = []
for capability, budget in budgets.items():
    for triton_dtype, block_d in cases[capability]:
        dtype = dtypes[triton_dtype]
        tiles = kernels._tile_sizes(block_d, dtype, torch.device("cuda"))
        for fn, tile in [(kernels._prefix_attention_fwd_kernel, tiles["fwd"]),
                         (kernels._prefix_attention_bwd_dq_kernel, tiles["dq"]),
                         (kernels._prefix_attention_bwd_dkdv_kernel, tiles["dkdv"])]:
            constexprs = dict(CAUSAL=True, HAS_KV_LENS=True, BLOCK_M=tile[0], BLOCK_N=tile[1],
                              BLOCK_D=block_d, DOT_PRECISION=kernels._dot_precision(dtype))
            if "BLOCK_P" in fn.arg_names:
                constexprs["BLOCK_P"] = tile[1]  # the largest prefix tile a launcher picks
            signature = {}
            for name in fn.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name in ("LSE", "DELTA"):
                    signature[name] = "*fp32"
                elif name == "KV_LENS":
                    signature[name] = "*i64"
                elif name.isupper():
                    signature[name] = "*" + triton_dtype
                else:
                    signature[name] = "fp32" if name.endswith("scale") else "i32"
            compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                      target=GPUTarget("cuda", capability, 32),
                                      options=dict(num_warps=tile[2], num_stages=tile[3]))
            if compiled.metadata.shared > budget:
                too_big.append(f"sm_{capability} {triton_dtype} D<={block_d} {fn.__name__} {tile}: "
                               f"{compiled.metadata.shared} B of shared memory > {budget}")
print("\n".join(too_big) if too_big else "compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the other tests compile and run the kernels")
def test_kernels_compile_and_fit_shared_memory_from_sm80():
    """The interpreter never type-checks a kernel, nor says whether a tile fits a GPU's shared memory
    (a launch that does not fails with OutOfResources). Triton's real compiler (to PTX and cubin
    through its bundled ptxas) does both without a GPU: every tile the launchers pick, in every dtype,
    for sm_86 (the smallest budget the kernel path runs on) and sm_90. A subprocess, because the
    kernels in this process were built for the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    # One process per target, side by side: compiling is single-threaded, and this is the suite's
    # longest test on two cores.
    for result in _run_compiler(COMPILE_FOR_GPUS, [["86"], ["90"]]):
        assert result.returncode == 0 and result.stdout.strip().endswith("compiled"), (
            result.stdout[-3000:] + result.stderr[-3000:])


def _run_compiler(script: str, argvs: list[list[str]]):
    """script run once per argument list, all at the same time; their finished processes, in order."""
    import subprocess
    import sys
    import tempfile

    # The children import this checkout's m2pt_kernels through the PYTHONPATH conftest.py sets.
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache)
        children = [subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cache) for argv in argvs]
        results = []
        for child, argv in zip(children, argvs):
            stdout, stderr = child.communicate()
            results.append(subprocess.CompletedProcess([script, *argv], child.returncode, stdout, stderr))
        return results


@pytest.mark.parametrize("capability, runs_kernel", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_pre_ampere_gpus_take_the_reference(monkeypatch, capability, runs_kernel):
    """Turing cannot fit the tiles (see _MIN_CUDA_CAPABILITY): it must get the reference, not a failed launch."""
    kernels = sys.modules["m2pt_kernels.prefix_attention"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kernels._kernel_runs_on(torch.device("cuda", 0)) is runs_kernel
    assert kernels._kernel_runs_on(torch.device("cpu")) is True


def test_public_api():
    assert m2pt_kernels.prefix_attention is prefix_attention


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter is off")
def test_interpreter_runs_loops_to_runtime_bounds():
    # Every kernel loops to a runtime bound; triton < 3.7's interpreter cannot with numpy >= 2.4
    # (triton-lang/triton#9171) unless m2pt_kernels._interpreter works around it.
    pytest.importorskip("triton")
    from m2pt_kernels import _interpreter

    _interpreter.prepare()
    assert _interpreter._probe()


# Real shapes on a GPU (docs/benchmarks.md): ViT-L/14-336 and LLaMA-7B layers with a 10-row prompt, plus
# the other supported head dims, GQA and padding. Reference in fp32 (fp64 would take minutes).
CUDA_CASES = [
    Case(8, 16, 16, 577, 10, 64),
    Case(8, 32, 32, 704, 10, 128, causal=True),
    Case(2, 32, 8, 704, 10, 128, causal=True, per_sample_prefix=True, kv_lens=(704, 301)),
    Case(2, 8, 8, 333, 10, 80, causal=True, kv_lens=(0, 200)),
    Case(2, 8, 2, 257, 70, 96),
    Case(2, 4, 4, 129, 3, 40, causal=True, layout="bnhd"),
    Case(3, 4, 1, 1, 10, 32, causal=True),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_real_shapes(case, dtype, poisoned_outputs):
    leaves, kv_lens, grad_out = make_inputs(case, dtype, "cuda")
    kernel = run(prefix_attention, case, leaves, kv_lens, grad_out)
    exact = run(prefix_attention_reference, case, leaves, kv_lens, grad_out, dtype=torch.float32)
    plain = run(prefix_attention_reference, case, leaves, kv_lens, grad_out, dtype=dtype)
    for name, got, want, baseline in zip(["out", "dq", "dk", "dv", "dpk", "dpv"], kernel, exact, plain):
        assert torch.isfinite(got).all(), name
        err, bound, baseline_err = error_and_bound(got, want, baseline, dtype)
        assert err <= bound, f"{name}: {err:.3g} vs PyTorch {baseline_err:.3g}"
