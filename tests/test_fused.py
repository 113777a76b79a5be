"""The fused backend computes the reference function: loss, gradients, logits and decoding."""
import importlib

import pytest
import torch
from model_inputs import IMAGE_TOKEN, make_batch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from m2pt_fast import apply_m2pt, build_llava

kernel_module = importlib.import_module("m2pt_kernels.prefix_attention")


def odd_heads_config():
    # head dims 12 (vision) and 40 (text), GQA 3:1
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=36, intermediate_size=72, num_hidden_layers=3,
                                       num_attention_heads=3, image_size=28, patch_size=7),
        text_config=LlamaConfig(hidden_size=120, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                                num_key_value_heads=1, vocab_size=128, pad_token_id=0),
        image_token_id=IMAGE_TOKEN,
    )


SHAPES = {"tiny": "tiny", "tiny-gqa": "tiny-gqa", "odd-heads": odd_heads_config,
          "tiny-siglip-qwen2": "tiny-siglip-qwen2"}


@pytest.fixture
def pytorch_kernels(monkeypatch):
    """The PyTorch paths of the kernels: what a CPU runs without the (slow) Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def padded_batch(model, seed):
    ids, pixels, labels = make_batch(model, batch=3, text_after=7, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 5)):
        mask[row, -pad:] = 0
        labels[row, -pad:] = -100
        ids[row, -pad:] = 0
    return ids, pixels, mask, labels


def run(model, backend, ids, pixels, mask, labels):
    model.backend = backend
    model.zero_grad()
    out = model(ids, pixels, mask, labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Every shape and prompt count through the PyTorch paths; two representative cases through the
# Triton kernels, which run in the (slow) interpreter on a CPU.
CASES = [("pytorch", shape, nv, nt) for shape in SHAPES for nv, nt in [(1, 1), (7, 7), (1, 7)]]
CASES += [("triton", "tiny-gqa", 7, 7), ("triton", "odd-heads", 1, 7), ("triton", "tiny-siglip-qwen2", 7, 7)]


@pytest.mark.parametrize("kernels,shape,nv,nt", CASES)
def test_fused_loss_and_gradients_equal_reference(kernels, shape, nv, nt, monkeypatch):
    device = "cpu"
    if kernels == "pytorch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        if torch.cuda.is_available():
            device = "cuda"  # the kernels run on CUDA tensors; CPU tensors there take the reference
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        launches = []  # guard: the Triton path must really run, not fall back to the reference
        kernel_forward = kernel_module._forward
        monkeypatch.setattr(kernel_module, "_forward", lambda *a: launches.append(1) or kernel_forward(*a))
    spec = SHAPES[shape]
    model = apply_m2pt(build_llava(spec if isinstance(spec, str) else spec(), seed=7, device=device), nv, nt)
    ids, pixels, mask, labels = (t.to(device) for t in padded_batch(model, seed=nv * 10 + nt))
    ref_loss, ref_grads = run(model, "reference", ids, pixels, mask, labels)
    loss, grads = run(model, "fused", ids, pixels, mask, labels)
    # the same function in fp32; only the order of the sums differs
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert set(grads) == set(ref_grads) and len(grads) >= 3
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
    if kernels == "triton":
        assert launches


def test_a_label_on_the_first_text_token_is_predicted_by_the_last_prompt_row(pytorch_kernels):
    model = apply_m2pt(build_llava("tiny", seed=3), 2, 3)
    ids, pixels, mask, labels = padded_batch(model, seed=1)
    labels[0, 0] = ids[0, 0]
    ref_loss, ref_grads = run(model, "reference", ids, pixels, mask, labels)
    loss, grads = run(model, "fused", ids, pixels, mask, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert rel_err(grads["text_prompts"], ref_grads["text_prompts"]) < 1e-5


def test_fused_logits_equal_reference_on_valid_positions(pytorch_kernels):
    model = apply_m2pt(build_llava("tiny-gqa", seed=4), 3, 4)
    ids, pixels, mask, _ = padded_batch(model, seed=2)
    reference = model(ids, pixels, mask).logits
    model.backend = "fused"
    fused = model(ids, pixels, mask).logits
    valid = mask.bool()
    torch.testing.assert_close(fused[valid], reference[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("shape", ["tiny-gqa", "tiny-siglip-qwen2"])
def test_fused_gradient_checkpointing(every, shape, pytorch_kernels):
    model = apply_m2pt(build_llava(shape, seed=5), 2, 2).train()
    ids, pixels, mask, labels = padded_batch(model, seed=3)
    _, plain = run(model, "fused", ids, pixels, mask, labels)
    model.gradient_checkpointing_enable(every_n_layers=every)
    _, recomputed = run(model, "fused", ids, pixels, mask, labels)
    for name in plain:
        assert rel_err(recomputed[name], plain[name]) < 1e-6, name


@pytest.mark.parametrize("shape", ["tiny-gqa", "tiny-siglip-qwen2"])
def test_fused_generation_equals_reference(pytorch_kernels, shape):
    model = apply_m2pt(build_llava(shape, seed=6), 3, 5)
    ids, pixels, _ = make_batch(model, batch=2, seed=21)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    reference = model.generate(ids, pixels, max_new_tokens=6, attention_mask=mask)
    model.backend = "fused"
    assert torch.equal(model.generate(ids, pixels, max_new_tokens=6, attention_mask=mask), reference)


def test_fused_refuses_left_padded_training_batches(pytorch_kernels):
    model = apply_m2pt(build_llava("tiny", seed=0), 1, 1, backend="fused")
    ids, pixels, labels = make_batch(model)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, pixels, mask, labels)


class LargestVocabTensor(TorchDispatchMode):
    """Records the element count of the largest new tensor with a vocabulary-sized dimension."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        aliased = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # an output sharing an input's storage (a transpose of a weight, say) allocates nothing
            if (isinstance(t, torch.Tensor) and self.vocab in t.shape
                    and t.untyped_storage().data_ptr() not in aliased):
                self.largest = max(self.largest, t.numel())
        return out


def largest_vocab_tensor_of_a_step(model, ids, pixels, labels):
    model.zero_grad()
    with LargestVocabTensor(model.llava.config.text_config.vocab_size) as mode:
        model(ids, pixels, labels=labels).loss.backward()
    return mode.largest


def test_fused_loss_memory_does_not_scale_with_sequence_times_vocabulary(pytorch_kernels):
    config = build_llava("tiny").config
    config.text_config.vocab_size = 4096  # a vocabulary that dominates every other tensor
    model = apply_m2pt(build_llava(config, seed=1), 1, 1)
    vocab = 4096
    sizes = {}
    for extra in (0, 96):  # label-free tokens appended to every row
        ids, pixels, labels = make_batch(model, batch=2, text_after=8 + extra, seed=0)
        if extra:
            labels[:, -extra:] = -100
        model.backend = "fused"
        sizes[("fused", extra)] = largest_vocab_tensor_of_a_step(model, ids, pixels, labels)
        model.backend = "reference"
        sizes[("reference", extra)] = largest_vocab_tensor_of_a_step(model, ids, pixels, labels)
    # the reference holds logits for every position: batch × sequence × vocabulary
    assert sizes[("reference", 96)] >= 2 * (model.image_seq_length + 3 + 8 + 96) * vocab
    # the fused loss holds logits for the answer tokens only, however many label-free tokens come along
    assert sizes[("fused", 96)] == sizes[("fused", 0)]
    assert sizes[("fused", 96)] < 2 * 8 * vocab + 1


@pytest.mark.parametrize("shape", ["tiny-gqa", "tiny-siglip-qwen2"])
def test_fused_equals_reference_on_an_nf4_backbone(shape, pytorch_kernels):
    from m2pt_fast import quantize_model

    llava = build_llava(shape, seed=8)
    quantize_model(llava)
    model = apply_m2pt(llava, 2, 3)
    ids, pixels, mask, labels = padded_batch(model, seed=4)
    ref_loss, ref_grads = run(model, "reference", ids, pixels, mask, labels)
    loss, grads = run(model, "fused", ids, pixels, mask, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name in ("vision_prompts", "text_prompts"):
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_the_loss_in_several_chunks_equals_the_reference(pytorch_kernels, monkeypatch):
    # chunks of 16 rows (the least): the labelled positions of this batch span several
    fused_module = importlib.import_module("m2pt_fast.method.fused")
    monkeypatch.setattr(fused_module, "LOSS_CHUNK_BYTES", 1)
    model = apply_m2pt(build_llava("tiny", seed=5), 2, 3)
    ids, pixels, mask, labels = padded_batch(model, seed=4)
    labels[:, 1:] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)  # every real token after the first
    assert (labels != -100).sum() > 2 * fused_module.loss_chunk_rows(model.llava.lm_head.out_features)
    ref_loss, ref_grads = run(model, "reference", ids, pixels, mask, labels)
    loss, grads = run(model, "fused", ids, pixels, mask, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
