"""The work of one headline training step, counted exactly on the `meta` device (bench/meta_work.py).

    pytest bench/test_bench_work.py --benchmark-only

The headline shape of docs/benchmarks.md at full size (LLaVA-1.5-7B, micro-batch 8, 576 image + 128 text
tokens, 32 answer tokens, n_v = n_t = 10, bf16, dense weights), ours (fused) and the baseline
(reference, transformers' checkpointing), checkpointing on and off: executed FLOPs of forward +
backward (recomputation included) beside the useful FLOPs, and the vocabulary-sized tensors each
side materialises. Hardware-independent: the same numbers on any machine, with or without a GPU.
The timed figure is only how long the count takes.

Asserted are facts of the method, never the counts themselves: the fused path executes less than
the reference; recomputation adds work; without it a side executes at least the useful work; the
fused path's logits grow with the answer tokens, not the sequence (the reference's do).
"""
import dataclasses

import meta_work
import pytest

PROVIDERS = ("baseline", "ours")
LONGER_TEXT = 2 * meta_work.headline_shape().text_tokens


def _record(benchmark, work: meta_work.StepWork) -> None:
    shape = meta_work.headline_shape(work.text_tokens)
    info = dataclasses.asdict(work)
    info.update(largest_vocab_tensor_shape=list(work.largest_vocab_tensor_shape),
                checkpointing="ckpt" if work.checkpointing else "no-ckpt")
    # peak memory means nothing on meta: keep conftest from recording the GPU's, where there is one
    benchmark.extra_info.update(shape=f"{shape.model}-b{shape.batch}-bf16-dense", device="meta",
                                peak_mem_bytes=None, **info)


# Each test times a fresh count; the comparisons reuse counts made earlier in the run (baseline
# before ours, no-ckpt before ckpt), or count what a selection of tests left out.
@pytest.mark.parametrize("checkpointing", ["no-ckpt", "ckpt"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_work(benchmark, provider, checkpointing):
    on = checkpointing == "ckpt"
    work = benchmark.pedantic(meta_work.count_step, args=(provider, on), rounds=1, iterations=1)
    _record(benchmark, work)

    assert work.linear_tflop > 0 and work.attention_tflop > 0
    if on:
        # Checkpointing re-runs forwards in backward: strictly more work than the same side without.
        assert work.executed_tflop > meta_work.counted(provider, False).executed_tflop
    else:
        # Without recomputation a side executes at least the useful work (attention is counted
        # dense here, masked half included, so strictly more).
        assert work.executed_tflop >= work.useful_tflop
    if provider == "ours":
        baseline = meta_work.counted("baseline", on)
        # Prompt rows skip Q, O, MLP and the per-sample copies; lm_head runs at answer tokens only.
        assert work.executed_tflop < baseline.executed_tflop
        assert work.lm_head_tflop < baseline.lm_head_tflop
        assert work.largest_vocab_tensor_bytes < baseline.largest_vocab_tensor_bytes


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vocab_tensors_against_sequence_length(benchmark, provider):
    # The same answer tokens in a sequence with twice the text tokens.
    longer = benchmark.pedantic(meta_work.count_step, args=(provider, False, LONGER_TEXT), rounds=1, iterations=1)
    _record(benchmark, longer)
    headline = meta_work.counted(provider, False)
    shape = meta_work.headline_shape()
    if provider == "ours":
        # Logits only at labelled positions: independent of the sequence length, never B × N × V.
        assert longer.largest_vocab_tensor_bytes == headline.largest_vocab_tensor_bytes
        assert longer.vocab_tensor_bytes_total == headline.vocab_tensor_bytes_total
        assert headline.largest_vocab_tensor_shape[:-1] == (shape.batch * shape.answer_tokens,)
    else:
        # The reference takes logits over the whole sequence: the check above can tell the difference.
        assert longer.largest_vocab_tensor_bytes > headline.largest_vocab_tensor_bytes
