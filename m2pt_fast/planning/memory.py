"""Peak memory of training steps, counted tensor by tensor: at full size on `meta`, or for real.

`count_steps(model, optimizer, batch)` runs forward, backward and the optimizer step under
`MemoryCount`, a dispatch mode that sees every tensor each op creates and, through weak references to
storages, the moment each is freed. It keeps the live bytes as the CUDA caching allocator counts
them (`torch.cuda.max_memory_allocated`: every block rounded up to 512 bytes) and, at the peak, which
kind of tensor holds them (`CATEGORIES`). On the meta device nothing is allocated, so LLaVA-13B
"trains" on a laptop in seconds; there the kernels behave as on a GPU (docs/memory.md):

- our kernels allocate what they allocate on CUDA (`m2pt_kernels._dispatch.meta_as_kernels`);
- `F.scaled_dot_product_attention` is the CUDA flash (no mask) or memory-efficient (a mask) kernel,
  not the math form meta would take;
- `KERNEL_WORKSPACE` adds what a kernel allocates and frees inside one call (bitsandbytes'
  dequantized weight, flash-attention backward's fp32 dq accumulator, our backward's partial sums).

What it cannot see: the CUDA context and cuBLAS/cuDNN workspaces outside PyTorch's allocator, and
fragmentation (reserved minus allocated). The planner (m2pt_fast.plan) adds a margin for those.
"""
from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from m2pt_fast.planning.meta_values import MetaValues
from m2pt_kernels import _dispatch

aten = torch.ops.aten
BLOCK_BYTES = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this

FROZEN = "frozen weights"
TRAINABLE = "trainable parameters"
GRADIENTS = "gradients"
OPTIMIZER = "optimizer states"
INPUTS = "inputs"
ACTIVATIONS = "activations"  # made in forward: saved for backward, or not yet freed
LOGITS = "logits"  # any tensor with a vocabulary-sized dimension, and their gradients
DEQUANTIZED = "dequantized weights"
ATTENTION = "attention workspace"  # softmax statistics, kernels' scratch
BACKWARD = "backward temporaries"  # recomputed activations, activation gradients
CATEGORIES = (FROZEN, TRAINABLE, GRADIENTS, OPTIMIZER, INPUTS, ACTIVATIONS, LOGITS, DEQUANTIZED, ATTENTION,
              BACKWARD)
# a step's phases, by the category of what each makes
PHASES = {ACTIVATIONS: "forward", BACKWARD: "backward", OPTIMIZER: "optimizer step"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---- what kernels allocate and free inside one call ------------------------------------------------
def _bnb_gemm_4bit(args, kwargs) -> list[tuple[int, str]]:
    # bitsandbytes' gemm_4bit past its fused kernel's range (M > 1536 on CUDA, and the dequant path
    # H200's heuristic picks below it): the nested absmax dequantized to fp32, plus the offset (two
    # fp32 vectors, both alive), then the whole weight dequantized to A's dtype, then F.linear.
    a, shape_b, blocksize = args[0], args[2], int(args[4])
    if a.numel() // a.shape[-1] <= 4:  # the fused kernel for tiny M: nothing dense
        return []
    nested = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None) is not None
    stats = 2 * -(-_numel(shape_b) // blocksize) * 4 if nested else 0
    return [(stats, DEQUANTIZED), (_numel(shape_b) * a.element_size(), DEQUANTIZED)]


def _flash_backward(args, kwargs) -> list[tuple[int, str]]:
    # FlashAttention-2's backward (PyTorch's flash kernel): dq accumulated in fp32 over (B, H, N
    # rounded to 128, D rounded to 32), and the softmax row sums (B, H, N rounded to 128) in fp32.
    q = args[1]
    batch, heads, seq, head_dim = q.shape
    rounded = _round_up(seq, 128)
    return [(batch * heads * rounded * (_round_up(head_dim, 32) + 1) * 4, ATTENTION)]


def _efficient_backward(args, kwargs) -> list[tuple[int, str]]:
    # memory-efficient attention backward: the softmax row sums (B, H, N rounded to 32) in fp32;
    # its other scratch is not modelled
    q = args[1]
    batch, heads, seq, _ = q.shape
    return [(batch * heads * _round_up(seq, 32) * 4, ATTENTION)]


def _prefix_backward(args, kwargs) -> list[tuple[int, str]]:
    # m2pt_kernels' backward: delta (B, Hq, N) fp32, the prefix gradients per sample (B, Hkv, P, D)
    # fp32 and, for a shared prefix, their batch sums (Hkv, P, D) fp32, alive until the final cast
    _, q, k, _, prefix_k = args[:5]
    batch, heads_q, seq, head_dim = q.shape
    heads_kv, prefix = k.shape[1], prefix_k.shape[-2]
    partial = 2 * batch * heads_kv * prefix * head_dim * 4
    summed = 2 * heads_kv * prefix * head_dim * 4 if prefix_k.dim() == 3 else 0
    return [(batch * heads_q * seq * 4 + partial + summed, ATTENTION)]


KERNEL_WORKSPACE: dict[str, Callable] = {
    "bitsandbytes.gemm_4bit.default": _bnb_gemm_4bit,
    "aten._scaled_dot_product_flash_attention_backward.default": _flash_backward,
    "aten._scaled_dot_product_efficient_attention_backward.default": _efficient_backward,
    "m2pt_kernels.prefix_attention_backward.default": _prefix_backward,
}
ATTENTION_STATISTICS = {  # attention ops whose outputs past the first are softmax statistics / RNG state
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
    "m2pt_kernels.prefix_attention_forward.default",
}


# ---- the count ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Block:
    nbytes: int
    category: str


class MemoryCount(TorchDispatchMode):
    """Live and peak bytes of every storage created while active, plus those registered with `add`.

    `phase` names the category new tensors get (ACTIVATIONS in forward, BACKWARD, OPTIMIZER);
    tensors with a vocabulary-sized dimension are LOGITS, float outputs shaped like a registered
    frozen weight (`weight_shapes`) are DEQUANTIZED, attention kernels' extra outputs ATTENTION.
    `block` is the allocator's rounding (1 for exact bytes, as the CPU allocator reports them).
    """

    def __init__(self, *, block: int = BLOCK_BYTES, vocab_size: int | None = None,
                 weight_shapes: Iterable[tuple[int, ...]] = (), workspace: bool = True, timeline: bool = False):
        super().__init__()
        # live bytes after every change (with a kernel's workspace at its height): what
        # Extrapolation reads
        self.timeline = array.array("q") if timeline else None
        self.block = block
        self.vocab_size = vocab_size
        self.weight_shapes = frozenset(tuple(s) for s in weight_shapes)
        self.workspace = workspace
        self.phase = ACTIVATIONS
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = ""
        self.by_category: collections.Counter = collections.Counter()
        self.peak_by_category: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self._blocks: dict[int, tuple[weakref.ref, _Block]] = {}

    # -- storages --
    def _size(self, nbytes: int) -> int:
        return _round_up(nbytes, self.block) if nbytes else 0

    def _block_of(self, tensor: torch.Tensor) -> _Block | None:
        storage = tensor.untyped_storage()
        entry = self._blocks.get(id(storage))
        return entry[1] if entry is not None and entry[0]() is storage else None

    def add(self, tensor: torch.Tensor | None, category: str) -> None:
        """Count `tensor`'s storage (once, however many tensors view it) until it is freed."""
        if tensor is None or not isinstance(tensor, torch.Tensor) or self._block_of(tensor) is not None:
            return
        storage = tensor.untyped_storage()
        block = _Block(self._size(storage.nbytes()), category)
        key = id(storage)
        self._blocks[key] = (weakref.ref(storage, functools.partial(self._freed, key)), block)
        self._change(block.nbytes, category)

    def recategorize(self, tensor: torch.Tensor | None, category: str) -> None:
        block = self._block_of(tensor) if tensor is not None else None
        if block is not None and block.category != category:
            self.by_category[block.category] -= block.nbytes
            self.by_category[category] += block.nbytes
            block.category = category

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._blocks.get(key)
        if entry is not None and entry[0] is ref:
            del self._blocks[key]
            self._change(-entry[1].nbytes, entry[1].category)

    def _change(self, nbytes: int, category: str, transient: Iterable[tuple[int, str]] = ()) -> None:
        self.live_bytes += nbytes
        self.by_category[category] += nbytes
        extra = list(transient)
        total = self.live_bytes + sum(n for n, _ in extra)
        if self.timeline is not None:
            self.timeline.append(total)
        if total > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = total
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_phase = total, self.phase
            self.peak_by_category = {k: v for k, v in self.by_category.items() if v}
            for n, cat in extra:
                self.peak_by_category[cat] = self.peak_by_category.get(cat, 0) + n

    # -- ops --
    def _category(self, name: str, index: int, tensor: torch.Tensor) -> str:
        if self.phase == OPTIMIZER:
            return OPTIMIZER
        if self.vocab_size is not None and self.vocab_size in tensor.shape:
            return LOGITS
        if tensor.is_floating_point() and tuple(tensor.shape) in self.weight_shapes:
            return DEQUANTIZED
        if index > 0 and name in ATTENTION_STATISTICS:
            return ATTENTION
        return self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        for index, tensor in enumerate(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self.add(tensor, self._category(name, index, tensor))
        workspace = KERNEL_WORKSPACE.get(name) if self.workspace else None
        if workspace is not None:
            transient = [(self._size(n), cat) for n, cat in workspace(args, kwargs) if n]
            if transient:
                self._change(0, self.phase, transient)
        return out


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """The peak of the counted steps (as `torch.cuda.max_memory_allocated` after them), the phase it
    came in (forward, backward, optimizer step) and what held it, by category; `by_phase` is the
    peak reached within each phase."""

    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    by_phase: dict[str, int]
    steps: int
    timeline: array.array | None = dataclasses.field(default=None, repr=False, compare=False)

    def table(self) -> str:
        rows = [f"peak {self.peak_bytes / 2**30:.2f} GiB (in {self.peak_phase})"]
        for category in CATEGORIES:
            if self.breakdown.get(category):
                rows.append(f"  {category:<22} {self.breakdown[category] / 2**30:8.3f} GiB")
        return "\n".join(rows)


def _module_state(model: torch.nn.Module) -> Iterable[tuple[torch.Tensor, str]]:
    for p in model.parameters():
        yield p, TRAINABLE if p.requires_grad else FROZEN
    for b in model.buffers():
        yield b, FROZEN
    for module in model.modules():  # bitsandbytes keeps its statistics outside parameters and buffers
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value, FROZEN
            state = getattr(state, "state2", None)


def frozen_weight_shapes(model: torch.nn.Module) -> set[tuple[int, int]]:
    """(out, in) of every quantized linear layer (ours and bitsandbytes'): their dense copies'."""
    shapes = set()
    for module in model.modules():
        if hasattr(module, "weight_packed") or hasattr(getattr(module, "weight", None), "quant_state"):
            shapes.add((module.out_features, module.in_features))
    return shapes


@contextlib.contextmanager
def cuda_attention_on_meta():
    """F.scaled_dot_product_attention on meta as CUDA runs it: the flash kernel without a mask, the
    memory-efficient one with a mask (both with their own backward), not the math form."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        if attn_mask is None:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2]),
            True, dropout_p, is_causal, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def count_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict | Callable[[], dict],
                *, steps: int = 2, block: int | None = None, workspace: bool | None = None,
                timeline: bool = False) -> MemoryReport:
    """Run `steps` training steps (forward, backward, optimizer step, zero_grad(set_to_none)) of
    `model(**batch).loss` and count their memory from the model's state onward.

    On meta (the model and batch built there): the peak a CUDA GPU's allocator would report, kernels
    as on a GPU. On another device: that device's ops as they run (`block` 1 by default, for
    comparison with the CPU allocator). Two steps by default: the second starts with the optimizer
    states the first created, as every later step does (one step after `warm_optimizer` is the
    same). On meta, `batch` is a function that makes it (inside the count, where integer meta
    tensors keep their values: token ids, masks, labels).
    """
    device = next(model.parameters()).device
    on_meta = device.type == "meta"
    block = (BLOCK_BYTES if on_meta else 1) if block is None else block
    vocab = getattr(getattr(getattr(model, "config", None), "text_config", None), "vocab_size", None)
    if vocab is None and hasattr(model, "llava"):
        vocab = model.llava.config.text_config.vocab_size
    counter = MemoryCount(block=block, vocab_size=vocab, weight_shapes=frozen_weight_shapes(model),
                          workspace=on_meta if workspace is None else workspace, timeline=timeline)
    for tensor, category in _module_state(model):
        counter.add(tensor, category)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for value in state.values():
            counter.add(value if isinstance(value, torch.Tensor) else None, OPTIMIZER)
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.recategorize(p.grad, GRADIENTS))
             for p in trainable]
    with contextlib.ExitStack() as stack:
        if on_meta:
            stack.enter_context(MetaValues())
            stack.enter_context(_dispatch.meta_as_kernels())
            stack.enter_context(cuda_attention_on_meta())
        if callable(batch):
            batch = batch()
        elif on_meta:
            raise TypeError("count_steps on meta takes a function that makes the batch, not the batch")
        for value in batch.values():
            counter.add(value, INPUTS)
        stack.enter_context(counter)
        try:
            for _ in range(steps):
                counter.phase = ACTIVATIONS
                loss = model(**batch).loss
                counter.phase = BACKWARD
                loss.backward()
                del loss
                counter.phase = OPTIMIZER
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    model.zero_grad(set_to_none=True)
        finally:
            for hook in hooks:
                hook.remove()
    return MemoryReport(counter.peak_bytes, PHASES.get(counter.peak_phase, counter.peak_phase),
                        dict(counter.peak_by_category),
                        {PHASES.get(k, k): v for k, v in counter.phase_peaks.items()}, steps, counter.timeline)


def warm_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Give `optimizer` the states a first step creates, without a forward or backward: a step on
    zero gradients. Counting one step after this counts a later step, at half the cost."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- any micro-batch from two counts ------------------------------------------------------------
class Extrapolation:
    """Live bytes at every moment of a step as an affine function of the micro-batch, from two
    counts at micro-batches b0 < b1 whose steps made the same allocations in the same order (the
    same code path: sizes differ, the sequence does not). Every tensor's size is affine in the
    micro-batch (a weight's is constant, an activation's proportional), so the live bytes at each
    moment are too, up to the allocator's rounding; the peak at any b is the largest of them."""

    def __init__(self, b0: int, low: MemoryReport, b1: int, high: MemoryReport):
        if low.timeline is None or high.timeline is None:
            raise ValueError("Extrapolation needs counts made with timeline=True")
        if len(low.timeline) != len(high.timeline):
            raise ValueError(f"the steps at micro-batch {b0} and {b1} allocated differently "
                             f"({len(low.timeline)} and {len(high.timeline)} changes): count each size instead")
        self.b0 = b0
        self.base = np.frombuffer(low.timeline, dtype=np.int64).astype(np.float64)
        self.slope = (np.frombuffer(high.timeline, dtype=np.int64) - self.base) / (b1 - b0)

    def peak(self, micro_batch: int) -> int:
        return int(round(float((self.base + (micro_batch - self.b0) * self.slope).max())))

    def largest_within(self, limit_bytes: float, cap: int = 1 << 16) -> int:
        """The largest micro-batch (at most `cap`) whose peak is at most `limit_bytes`; 0 if none."""
        at_one = self.base + (1 - self.b0) * self.slope
        if at_one.max() > limit_bytes:
            return 0
        growing = self.slope > 0
        if not growing.any():
            return cap
        # each moment t allows b <= 1 + (limit - live_t(1)) / slope_t; the step allows the least of them
        allowed = 1 + (limit_bytes - at_one[growing]) / self.slope[growing]
        return int(min(cap, np.floor(allowed.min() + 1e-9)))


class PeaksByMicroBatch:
    """Counted peaks by micro-batch, each counted once by `count(micro_batch)` (a MemoryReport with
    a timeline), and the largest micro-batch within a limit."""

    def __init__(self, count: Callable[[int], MemoryReport], *, progress: Callable[[str], None] | None = None,
                 label: str = ""):
        self.count, self.progress, self.label = count, progress, label
        self.reports: dict[int, MemoryReport] = {}

    def __getitem__(self, micro_batch: int) -> MemoryReport:
        if micro_batch not in self.reports:
            if self.progress:
                self.progress(f"counting micro-batch {micro_batch}" + (f", {self.label}" if self.label else ""))
            self.reports[micro_batch] = self.count(micro_batch)
        return self.reports[micro_batch]

    def _guess(self, limit: float, cap: int) -> int | None:
        """Extrapolation from the counts at 2 and 3 (micro-batch 1 can take other code paths)."""
        low, high = self[2], self[3]
        if low.timeline is None or high.timeline is None or len(low.timeline) != len(high.timeline):
            return None
        return max(1, min(cap, Extrapolation(2, low, 3, high).largest_within(limit, cap)))

    def largest_within(self, limit: float, cap: int = 1024) -> int:
        """The largest micro-batch (at most `cap`) whose counted peak is at most `limit`, 0 if even 1
        is not. The line through the counts at 2 and 3 guesses it, and counts on either side confirm
        the guess; failing that, the sizes counted so far bracket it, Extrapolation gives it between
        two counts that allocated alike, and further counts bisect where they did not (the fused
        loss's chunk count can differ)."""
        if self[1].peak_bytes > limit:
            return 0
        guess = self._guess(limit, cap)
        if guess is not None and guess < cap and self[guess].peak_bytes <= limit < self[guess + 1].peak_bytes:
            return guess  # the straight line through two counts, confirmed by counting either side
        sizes = sorted(self.reports)
        low = max(b for b in sizes if self[b].peak_bytes <= limit)
        high = next((b for b in sizes if b > low), None)
        while high is None:  # every counted size fits: double until one does not
            if low >= cap:
                return cap
            candidate = min(cap, 2 * low)
            if self[candidate].peak_bytes <= limit:
                low = candidate
            else:
                high = candidate
        while high - low > 1:
            a, b = self[low], self[high]
            if a.timeline is not None and b.timeline is not None and len(a.timeline) == len(b.timeline):
                return max(low, min(high - 1, Extrapolation(low, a, high, b).largest_within(limit)))
            middle = (low + high) // 2
            if self[middle].peak_bytes <= limit:
                low = middle
            else:
                high = middle
        return low
