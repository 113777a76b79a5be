"""HF "messages" records through the model's own chat template and image processor (Qwen-VL): tokens
equal the tokenizer's apply_chat_template with each image token expanded by the processor's rule
(t·h·w / merge² copies of the image processor's grid), labels on the assistant turns' content and
end-of-turn token only, batches the Qwen models take, and the refusals."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_qwen_vl import FAMILIES, build
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from m2pt_fast import apply_m2pt
from m2pt_fast.data.chat_template import ChatTemplateEncoder, collate_chats
from m2pt_fast.data.conversation import BadRecord
from m2pt_fast.labels import IGNORE_INDEX
from m2pt_fast.models.qwen2_5_vl import tiny_tokenizer

WORDS = ["what", "is", "this", "?", "red", "square", "A", "and", "now", "blue", "circle", "two"]


@pytest.fixture(scope="module")
def encoder():
    # the tiny towers' patch 2, merge 2, temporal patch 2; images resized to 8x8..32x32 pixels
    image_processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=2, merge_size=2,
                                               temporal_patch_size=2)
    return ChatTemplateEncoder(tiny_tokenizer(WORDS), image_processor)


def image(height, width, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


TWO_TURNS = [user("what is this ?", images=1), assistant("A red square ."), user("and now ?"), assistant("two")]


def test_tokens_are_the_template_s_with_each_image_token_expanded_by_the_processor_s_rule(encoder):
    tokenizer = encoder.tokenizer
    images = [image(20, 28), image(12, 12, seed=1)]
    messages = [user("what is this ?", images=2), assistant("A red square and blue circle .")]
    encoded = encoder(messages, images)
    grid = encoder.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 10, 14], [1, 6, 6]]  # 20x28 and 12x12 pixels stay, in 2x2 patches
    expected = []
    counts = iter([1 * 10 * 14 // 4, 1 * 6 * 6 // 4])  # 35 and 9 image tokens
    for token in tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False):
        expected += [token] * next(counts) if token == encoder.image_token_id else [token]
    assert encoded.input_ids.tolist() == expected
    assert encoded.image_grid_thw.tolist() == grid.tolist()
    assert int(encoded.mm_token_type_ids.sum()) == 35 + 9 == int((encoded.input_ids == 100).sum())


def test_labels_are_the_assistant_turns_and_their_end_of_turn_token_only(encoder):
    encoded = encoder(TWO_TURNS, [image(16, 16)])
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoded.input_ids.tolist())
    labelled = [t for t, label in zip(tokens, encoded.labels.tolist()) if label != IGNORE_INDEX]
    assert labelled == ["A", "red", "square", ".", "<|im_end|>", "two", "<|im_end|>"]
    kept = encoded.labels != IGNORE_INDEX
    assert torch.equal(encoded.labels[kept], encoded.input_ids[kept])


def test_string_contents_and_text_only_conversations_encode(encoder):
    encoded = encoder([{"role": "user", "content": "what is this ?"}, {"role": "assistant", "content": "two"}], [])
    assert encoded.image_grid_thw.shape == (0, 3) and not encoded.mm_token_type_ids.any()
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoded.input_ids[encoded.labels != IGNORE_INDEX].tolist())
    assert tokens == ["two", "<|im_end|>"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_collated_batch_trains_the_qwen_models(encoder, family):
    samples = [encoder(TWO_TURNS, [image(16, 16)]), encoder([user("what is this ?", 1), assistant("two")],
                                                           [image(20, 12, seed=2)])]
    batch = collate_chats(samples, encoder.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape == (2, 3)
    model = apply_m2pt(build(family, torch.float32), 2, 2)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.text_prompts.grad.abs().sum() > 0


@pytest.mark.parametrize("messages, images, says", [
    ([user("what is this ?", 1), assistant("two")], [], "1 image part"),
    ([user("what is this ?")], [], "no assistant turn"),
    ([{"role": "user", "content": [{"type": "audio"}]}, assistant("two")], [], "content part"),
    ([{"content": "hi"}], [], "role and a content"),
])
def test_bad_records_are_refused_with_the_reason(encoder, messages, images, says):
    with pytest.raises(BadRecord, match=says):
        encoder(messages, images)


def truncating(encoder, max_length):
    return ChatTemplateEncoder(encoder.tokenizer, encoder.image_processor, max_length=max_length)


def test_truncation_never_cuts_image_tokens_nor_leaves_nothing_to_learn(encoder):
    long = [user("what is this ?", 1), assistant("A red square .")]
    full = encoder(long, [image(16, 16)])
    cut = truncating(encoder, full.input_ids.numel() - 2)
    encoded = cut(long, [image(16, 16)])
    assert torch.equal(encoded.input_ids, full.input_ids[:-2])
    first_image = int((full.input_ids == 100).nonzero()[0])
    with pytest.raises(BadRecord, match="image tokens"):
        truncating(encoder, first_image + 1)(long, [image(16, 16)])
    last_image = int((full.input_ids == 100).nonzero()[-1])
    with pytest.raises(BadRecord, match="no assistant token"):
        truncating(encoder, last_image + 3)(long, [image(16, 16)])
