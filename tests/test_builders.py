"""Model construction: named shapes, the meta device, local directories, the trainable report."""
import pytest
import torch
from model_inputs import make_batch

from m2pt_fast import apply_m2pt, build_llava, load_llava, trainable_report


def test_llava15_7b_on_meta_allocates_nothing_and_counts_exactly():
    model = apply_m2pt(build_llava("llava-1.5-7b", device="meta"), 10, 10)
    assert all(p.device.type == "meta" for p in model.parameters())
    report = trainable_report(model)
    # projector: 1024 -> 4096 -> 4096 with biases; 23 vision layers reach feature layer -2 of 24
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert report.groups["projector"].trainable == projector
    assert report.trainable == projector + 23 * 10 * 1024 + 32 * 10 * 4096
    assert report.groups["lm_head"].trainable == 0
    assert 6.9e9 < report.total < 7.2e9
    assert "trainable" in str(report)


def test_paper_llava_v1_shape_has_a_linear_projector():
    model = apply_m2pt(build_llava("llava-v1-7b", device="meta"), 10, 10)
    report = trainable_report(model)
    assert report.trainable == (1024 * 4096 + 4096) + 23 * 10 * 1024 + 32 * 10 * 4096
    assert model.image_seq_length == 256  # 224 px / 14 px patches, squared


def test_the_siglip_qwen2_shape_is_llava_interleave_qwen_7b():
    model = apply_m2pt(build_llava("llava-interleave-qwen-7b", device="meta"), 10, 10)
    report = trainable_report(model)
    # SigLIP keeps every patch of the last layer: (384 / 14)² = 729 image tokens, all 26 layers prompted
    assert model.image_seq_length == 729
    projector = 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert report.trainable == projector + 26 * 10 * 1152 + 32 * 10 * 4096
    # Qwen1.5-7B (7.7e9 with its 152000-row embeddings and lm_head) + SigLIP so400m (0.4e9)
    assert 8.0e9 < report.total < 8.3e9
    attention = model.llava.model.language_model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None  # Qwen2's biases


def test_build_dtype_and_overrides():
    llava = build_llava("tiny", dtype=torch.bfloat16, vocab_size=300, image_token_id=299, pad_token_id=3)
    assert llava.lm_head.weight.shape == (300, 64) and llava.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="inside the vocabulary"):
        build_llava("tiny", image_token_id=500)
    with pytest.raises(ValueError, match="unknown model shape"):
        build_llava("llava-99b")


def test_load_from_local_directory(tmp_path):
    llava = build_llava("tiny", seed=4)
    llava.save_pretrained(tmp_path / "tiny-llava")
    loaded = load_llava(tmp_path / "tiny-llava")
    a, b = apply_m2pt(llava, 0, 0), apply_m2pt(loaded, 0, 0)
    ids, pixels, _ = make_batch(a)
    assert torch.equal(a(ids, pixels).logits, b(ids, pixels).logits)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llava(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llava(tmp_path / "empty")
    build_llava("tiny").config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_llava(tmp_path / "config-only")


def test_report_counts_quantized_weights_as_the_parameters_they_replace():
    from m2pt_fast import quantize_model

    dense = trainable_report(apply_m2pt(build_llava("tiny-gqa"), 2, 3))
    llava = build_llava("tiny-gqa")
    quantize_model(llava)
    quantized = trainable_report(apply_m2pt(llava, 2, 3))
    assert quantized.total == dense.total and quantized.trainable == dense.trainable
