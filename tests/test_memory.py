"""The memory count of training steps (m2pt_fast.planning.memory): against the CPU allocator's own record, a
case worked by hand, and the shortcuts the planner takes (a warmed optimizer, extrapolation)."""
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from m2pt_fast.planning import memory
from m2pt_fast.planning.meta_values import MetaValues

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def workloads():
    name = "bench_workloads_for_memory"
    spec = importlib.util.spec_from_file_location(name, BENCH / "workloads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def _batch(workloads, model, shape, batch=None):
    ids, pixels, mask, labels = workloads.make_batch(model, shape, batch=batch)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)


# ---- a case worked by hand -------------------------------------------------------------------------
class _FrozenStack(nn.Module):
    """P trainable prompt rows before the input, then L frozen bias-free linear layers, each + ReLU."""

    def __init__(self, layers: int, width: int, prompts: int, device):
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(1, prompts, width, device=device))
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False, device=device) for _ in range(layers))
        self.layers.requires_grad_(False)

    def forward(self, x):
        h = torch.cat([self.prompt.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return dataclasses.make_dataclass("Out", ["loss"])(h.sum())


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_a_frozen_stack_with_one_prompt_saves_exactly_the_relu_outputs(device):
    # Sizes are multiples of 512 bytes, so the allocator's rounding changes nothing. By the rules of
    # autograd: a linear layer whose weight is frozen saves only its weight (dX = dY·W), ReLU saves its
    # output, cat saves nothing. So forward ends holding the L ReLU outputs, and its peak is reached at
    # the last ReLU, whose input (the last linear output) is still alive: L + 1 activations, while the
    # concatenated input was freed after the first layer (nothing saved it).
    layers, width, prompts, tokens, batch = 4, 64, 4, 12, 2
    model = _FrozenStack(layers, width, prompts, device)
    optimizer = torch.optim.SGD([model.prompt], lr=0.1)
    x = torch.empty(batch, tokens, width, device=device)
    act = batch * (tokens + prompts) * width * 4
    weights, prompt, inputs = layers * width * width * 4, prompts * width * 4, batch * tokens * width * 4
    report = memory.count_steps(model, optimizer, lambda: {"x": x}, steps=1, block=512)
    assert report.by_phase["forward"] == weights + prompt + inputs + (layers + 1) * act
    # backward frees each ReLU output as its node runs; the prompt's gradient is its own size
    assert report.peak_bytes <= report.by_phase["forward"] + act + 2 * 512


def test_gradients_and_optimizer_states_are_named():
    model = _FrozenStack(2, 64, 4, "meta")
    optimizer = torch.optim.AdamW([model.prompt], lr=0.1)
    memory.warm_optimizer(optimizer)
    report = memory.count_steps(model, optimizer, lambda: {"x": torch.empty(2, 12, 64, device="meta")}, steps=1)
    prompt = 4 * 64 * 4
    assert report.breakdown[memory.OPTIMIZER] >= 2 * prompt  # Adam's two moments (and its step counter)
    assert report.breakdown[memory.TRAINABLE] == prompt
    assert report.breakdown[memory.FROZEN] == 2 * 64 * 64 * 4


# ---- against the CPU allocator ---------------------------------------------------------------------
def _profiled_peak(model, optimizer, batch, steps: int) -> int:
    """The peak of `steps` training steps as the CPU allocator reports it to the profiler, plus what
    was alive before (the model, the optimizer's state, the batch): measured, not counted."""
    from torch.profiler import ProfilerActivity, profile

    alive = {}
    for tensor, _ in memory._module_state(model):
        alive[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
    for tensor in batch.values():
        alive[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    changes = sorted((e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                     key=lambda a: a["Ev Idx"])
    assert changes, "the profiler recorded no CPU allocation"
    # the running total carries what earlier profiles saw allocated and never saw freed: start from
    # the total before the first change of this one
    start = changes[0]["Total Allocated"] - changes[0]["Bytes"]
    return sum(alive.values()) + max(0, max(a["Total Allocated"] for a in changes) - start)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("provider", ["ours", "baseline"])
def test_the_count_equals_the_peak_the_cpu_allocator_reports(workloads, provider, checkpointing, monkeypatch):
    if provider == "baseline" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.fail("the baseline needs bitsandbytes (bash setup.sh installs it)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths; the interpreter allocates numpy memory
    shape = dataclasses.replace(workloads.CPU_SHAPE, batch=8)

    def build():
        torch.manual_seed(0)
        model, optimizer = workloads.build(provider, shape, "cpu", checkpointing=checkpointing)
        return model, optimizer, _batch(workloads, model, shape)

    measured = _profiled_peak(*build(), steps=2)
    counted = memory.count_steps(*build(), steps=2).peak_bytes
    # Within 5% (the count sees tensors; a kernel's internal scratch it does not see on the CPU).
    assert abs(counted - measured) <= 0.05 * measured, (counted, measured)


# ---- the shortcuts -------------------------------------------------------------------------------
def _meta_model(workloads, checkpointing=True):
    shape = dataclasses.replace(workloads.CPU_SHAPE, dtype=torch.bfloat16)
    model, _ = workloads.build("ours", shape, "meta", checkpointing=checkpointing)
    return model, shape


def _count(workloads, model, shape, batch, *, warm, steps, block=512, timeline=False):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if warm:
        memory.warm_optimizer(optimizer)
    return memory.count_steps(model, optimizer, lambda: _batch(workloads, model, shape, batch), steps=steps,
                              block=block, timeline=timeline)


def test_one_step_after_a_warmed_optimizer_is_the_second_step(workloads):
    model, shape = _meta_model(workloads)
    two = _count(workloads, model, shape, 4, warm=False, steps=2)
    one = _count(workloads, model, shape, 4, warm=True, steps=1)
    assert one.peak_bytes == two.peak_bytes
    assert one.breakdown == two.breakdown
    # checkpointed NF4 layers keep their recompute's dense weight for the backward: named as such
    assert one.breakdown.get(memory.DEQUANTIZED, 0) > 0


def test_extrapolation_gives_the_counted_peak_at_other_micro_batches(workloads):
    model, shape = _meta_model(workloads)
    # exact bytes: with the allocator's 512-byte rounding a tiny model's small tensors are not affine
    counts = {b: _count(workloads, model, shape, b, warm=True, steps=1, block=1, timeline=True) for b in (2, 3, 8, 9)}
    line = memory.Extrapolation(2, counts[2], 3, counts[3])
    assert line.peak(8) == counts[8].peak_bytes
    # the largest micro-batch within a limit between the peaks at 8 and 9 is 8
    limit = (counts[8].peak_bytes + counts[9].peak_bytes) / 2
    assert line.largest_within(limit) == 8
    assert line.largest_within(counts[8].peak_bytes) == 8
    assert line.largest_within(counts[8].peak_bytes - 1) == 7


def test_extrapolation_refuses_counts_that_allocated_differently(workloads):
    model, shape = _meta_model(workloads)
    a = _count(workloads, model, shape, 2, warm=True, steps=1, timeline=True)
    model.gradient_checkpointing_disable()
    b = _count(workloads, model, shape, 3, warm=True, steps=1, timeline=True)
    with pytest.raises(ValueError, match="allocated differently"):
        memory.Extrapolation(2, a, 3, b)


def test_the_search_finds_the_largest_micro_batch_by_direct_counts(workloads):
    model, shape = _meta_model(workloads)
    direct = {}

    def count(b):
        direct[b] = _count(workloads, model, shape, b, warm=True, steps=1, timeline=True)
        return direct[b]

    search = memory.PeaksByMicroBatch(count)
    for b in (1, 2, 4):
        search[b]
    limit = (_count(workloads, model, shape, 11, warm=True, steps=1).peak_bytes
             + _count(workloads, model, shape, 12, warm=True, steps=1).peak_bytes) / 2
    found = search.largest_within(limit)
    assert found == 11
    assert _count(workloads, model, shape, found, warm=True, steps=1).peak_bytes <= limit


def test_meta_kernels_allocate_only_their_outputs():
    # On meta inside the count, NF4 dequantization allocates the dense weight alone (the reference
    # would add its unpacking temporaries) and prefix attention takes the kernels' custom op.
    from m2pt_kernels import _dispatch, nf4_linear, nf4_quantize, prefix_attention

    q = nf4_quantize(torch.randn(64, 32)).to("meta")
    seen = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.empty(40, 32, device="meta")
    with _dispatch.meta_as_kernels(), Ops():
        nf4_linear(x, q)
        qkv = torch.empty(2, 4, 8, 16, device="meta")
        prefix_attention(qkv, qkv, qkv, torch.empty(4, 3, 16, device="meta"), torch.empty(4, 3, 16, device="meta"))
    assert "m2pt_kernels.prefix_attention_forward.default" in seen
    assert not any("bitwise" in op or "index" in op for op in seen), seen  # no unpacking on the way
    with Ops():
        seen.clear()
        prefix_attention(qkv, qkv, qkv, torch.empty(4, 3, 16, device="meta"), torch.empty(4, 3, 16, device="meta"))
    assert "m2pt_kernels.prefix_attention_forward.default" not in seen  # outside: the reference's matmuls


def test_cuda_attention_on_meta_takes_the_flash_kernel_and_its_backward():
    q = torch.empty(2, 4, 100, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with memory.cuda_attention_on_meta():
        with MetaValues():
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.shape == q.shape
    assert "Flash" in type(out.grad_fn).__name__
