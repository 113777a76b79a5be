"""Count the work of one training step at full size without running it: the `meta` device.

    python bench/meta_work.py                 # count the headline step, print a Markdown table (~30 s)
    python bench/meta_work.py RESULTS.json    # the same table from a saved run of bench/test_bench_work.py

Meta tensors carry shapes and dtypes but no memory and no values, so the headline step (docs/benchmarks.md)
(LLaVA-1.5-7B, micro-batch 8, 576 image + 128 text tokens, 32 answer tokens, n_v = n_t = 10, bf16)
"runs" on a CPU in seconds, forward and backward, checkpoint recomputation included. Counted:
- executed FLOPs, by `torch.utils.flop_counter.FlopCounterMode`: every matmul, convolution and
  attention matmul that ATen runs, split into linear (mm/addmm/convolution) and attention (bmm:
  on meta, SDPA takes its math form, so QKᵀ and PV are dense, masked half included, on both sides);
- the largest vocabulary-sized tensor (a dimension equal to the vocabulary, logits and their
  gradients) any op materialises, and the bytes of all of them together.
Weights are dense bf16 on meta for both sides: NF4 dequantization is not a matmul, and bitsandbytes
cannot run on meta, so the frozen backbone's format does not change these counts.

Plain meta tensors cannot answer the host's questions (`.item()` of a count, boolean-mask indexing):
`m2pt_fast.planning.meta_values.MetaValues` answers them from CPU copies of the small integer tensors.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from m2pt_fast.planning.meta_values import MetaValues

ATTENTION_OPS = {"aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention",
                 "aten._scaled_dot_product_efficient_attention_backward",
                 "aten._scaled_dot_product_flash_attention_backward",
                 "aten._scaled_dot_product_cudnn_attention_backward"}


class VocabTensors(TorchDispatchMode):
    """Records every tensor an op creates with a dimension equal to the vocabulary size (logits,
    their fp32 copies, softmax outputs and gradients); views of existing tensors are not counted."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()
        self.total_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, tensor in enumerate(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view or an in-place result: no new memory
            if self.vocab_size in tensor.shape:
                size = tensor.numel() * tensor.element_size()
                self.total_bytes += size
                if size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape = size, tuple(tensor.shape)
        return out


@dataclasses.dataclass(frozen=True)
class StepWork:
    """One training step's counted work (forward + backward, no optimizer)."""

    provider: str
    checkpointing: bool
    text_tokens: int
    executed_tflop: float
    linear_tflop: float  # mm, addmm, convolution
    attention_tflop: float  # QKᵀ and PV and their gradients, dense
    lm_head_tflop: float
    useful_tflop: float  # workloads.useful_flops_per_sample × batch
    largest_vocab_tensor_bytes: int
    largest_vocab_tensor_shape: tuple[int, ...]
    vocab_tensor_bytes_total: int
    count_seconds: float


def headline_shape(text_tokens: int | None = None):
    """The headline step (docs/benchmarks.md) with dense bf16 weights (the only form meta can hold)."""
    import workloads

    shape = dataclasses.replace(workloads.HEADLINE, quant="none")
    return shape if text_tokens is None else dataclasses.replace(shape, text_tokens=text_tokens)


_COUNTED: dict[tuple, StepWork] = {}


def counted(provider: str, checkpointing: bool, text_tokens: int | None = None) -> StepWork:
    """count_step's result, counted once per process."""
    key = (provider, checkpointing, headline_shape(text_tokens).text_tokens)
    return _COUNTED[key] if key in _COUNTED else count_step(*key)


def count_step(provider: str, checkpointing: bool, text_tokens: int | None = None) -> StepWork:
    """Build `provider`'s model ("ours": fused; "baseline": reference + transformers' checkpointing)
    on meta exactly as the step bench does, and count one forward + backward (kept for `counted`)."""
    import workloads

    shape = headline_shape(text_tokens)
    start = time.perf_counter()
    model, _ = workloads.build(provider, shape, "meta", checkpointing=checkpointing)
    vocab = model.llava.config.text_config.vocab_size
    with MetaValues():
        batch = workloads.make_batch(model, shape)
        with VocabTensors(vocab) as vocab_tensors, FlopCounterMode(display=False) as flops:
            ids, pixels, mask, labels = batch
            model(ids, pixels, mask, labels).loss.backward()
    by_op = {str(op): n for op, n in flops.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if op in ATTENTION_OPS)
    lm_head = sum(sum(ops.values()) for module, ops in flops.get_flop_counts().items() if module.endswith(".lm_head"))
    total = flops.get_total_flops()
    work = _COUNTED[provider, checkpointing, shape.text_tokens] = StepWork(
        provider=provider, checkpointing=checkpointing, text_tokens=shape.text_tokens,
        executed_tflop=total / 1e12, linear_tflop=(total - attention) / 1e12, attention_tflop=attention / 1e12,
        lm_head_tflop=lm_head / 1e12,
        useful_tflop=workloads.useful_flops_per_sample(model, shape) * shape.batch / 1e12,
        largest_vocab_tensor_bytes=vocab_tensors.largest_bytes,
        largest_vocab_tensor_shape=vocab_tensors.largest_shape,
        vocab_tensor_bytes_total=vocab_tensors.total_bytes,
        count_seconds=time.perf_counter() - start,
    )
    return work


def markdown_table(counts: list[StepWork]) -> str:
    rows = ["| side | checkpointing | executed TFLOP | linear | attention (dense) | lm_head | "
            "executed ÷ useful | largest vocab tensor | all vocab tensors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = {"ours": "ours (fused)", "baseline": "baseline (reference)"}
    for c in counts:
        shape = "×".join(map(str, c.largest_vocab_tensor_shape))
        rows.append(f"| {names[c.provider]} | {'on' if c.checkpointing else 'off'} | {c.executed_tflop:.1f} | "
                    f"{c.linear_tflop:.1f} | {c.attention_tflop:.2f} | {c.lm_head_tflop:.2f} | "
                    f"{c.executed_tflop / c.useful_tflop:.3f} | {c.largest_vocab_tensor_bytes / 2**20:,.0f} MiB "
                    f"({shape}) | {c.vocab_tensor_bytes_total / 2**30:.2f} GiB |")
    useful = counts[0].useful_tflop
    rows.append(f"\nUseful (docs/benchmarks.md, `workloads.useful_flops_per_sample` × 8): {useful:.1f} TFLOP per step.")
    return "\n".join(rows)


def _add_bench_to_path() -> None:
    """bench/workloads, as bench/conftest.py makes it importable (m2pt_fast and m2pt_kernels come
    from the install, or from PYTHONPATH=kernels:. in a checkout: kernels/README.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def saved_counts(path: str | Path) -> list[StepWork]:
    """The headline counts (text tokens as in the headline) saved by bench/test_bench_work.py."""
    import json

    fields = {f.name for f in dataclasses.fields(StepWork)}
    counts = []
    for bench in json.loads(Path(path).read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if "test_step_work" not in bench["name"] or not fields <= info.keys():
            continue
        values = {k: info[k] for k in fields}
        values.update(checkpointing=info["checkpointing"] == "ckpt",
                      largest_vocab_tensor_shape=tuple(info["largest_vocab_tensor_shape"]))
        counts.append(StepWork(**values))
    if not counts:
        raise SystemExit(f"{path}: no test_step_work results with counts (run pytest bench/test_bench_work.py)")
    return sorted(counts, key=lambda c: (c.provider != "ours", not c.checkpointing))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(markdown_table(saved_counts(sys.argv[1])))
    else:
        _add_bench_to_path()
        print(markdown_table([count_step(p, c) for p in ("ours", "baseline") for c in (True, False)]))
