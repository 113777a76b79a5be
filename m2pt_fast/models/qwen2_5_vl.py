"""Qwen2.5-VL, as transformers 5.17 to 5.25 lay it out: where M²PT finds its parts.

    Qwen2_5_VLForConditionalGeneration
      .model.visual             the vision tower: packed patches (N, d_v) with grid_thw (images, 3)
        .patch_embed            patches -> rows
        .rotary_pos_emb         2-D rotary of each row (cos, sin), (N, head_dim)
        .blocks[i]              block(hidden, cu_seqlens=, max_seqlen=, position_embeddings=(cos, sin))
        .fullatt_block_indexes  the blocks that attend within each image; the others within windows
        .merger                 the interaction layer: 2x2 rows merged, normed, MLP -> (N / 4, d_t)
      .model.language_model     a Qwen2 decoder with M-RoPE: positions (3, B, T), temporal/height/width
      .lm_head

The tower permutes its rows into window order before the first block and back after the merger; each
block attends within the segments its cu_seqlens mark (windows, or whole images in full-attention
blocks). The decoder's positions come from `get_rope_index` (text tokens on all three axes alike,
image tokens on the image's grid), given the processor's mm_token_type_ids; without them, the model
itself falls back to 1-D positions on all three axes, and so does `text_positions` here.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from m2pt_fast.errors import UserError


def is_qwen2_5_vl(model) -> bool:
    return isinstance(model, Qwen2_5_VLForConditionalGeneration)


def tiny_config(**text_overrides) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL small enough for tests on a CPU: a 3-block tower (block 2 full-attention, the others
    in 8x8-patch windows) and a 2-layer decoder; image tokens 100-103."""
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                  fullatt_block_indexes=[2], in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=100, video_token_id=101,
                            vision_start_token_id=102, vision_end_token_id=103)


class VisionSchedule:
    """How the tower runs a batch of images (grid_thw (images, 3)), as its own forward computes it: the
    window order of the rows, and for each block the segments it attends within (cu_seqlens) with
    their longest length (for flash attention; None otherwise)."""

    def __init__(self, visual, grid_thw: torch.Tensor):
        self.position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size, kwargs={})
        full_cu, full_max = get_vision_attention_seqlens(grid_thw, visual.config, kwargs={})
        self.window_index, window_cu = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size, kwargs={})
        window_max = get_max_seqlen(window_cu, visual.config, kwargs={}, kwarg_name="max_window_seqlen")
        self.blocks = [(full_cu, full_max) if i in visual.fullatt_block_indexes else (window_cu, window_max)
                       for i in range(len(visual.blocks))]


def image_token_id(model: Qwen2_5_VLForConditionalGeneration) -> int:
    return model.config.image_token_id


def text_positions(model: Qwen2_5_VLForConditionalGeneration, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                   mm_token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """The decoder's positions (3, B, T) for a fresh sequence, as the model's own forward makes them:
    M-RoPE from get_rope_index where the images' grids and the processor's mm_token_type_ids are given,
    else 0.. on all three axes."""
    if image_grid_thw is not None and mm_token_type_ids is not None:
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                                  image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return positions
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)


def check_image_tokens(model: Qwen2_5_VLForConditionalGeneration, input_ids: torch.Tensor, features: int) -> None:
    """Refuse a batch whose image tokens do not number the merged image rows (the processor's rule)."""
    tokens = int((input_ids == image_token_id(model)).sum())
    if tokens != features:
        raise UserError(f"the batch holds {tokens} image tokens but its images give {features} features: expand "
                        "each image's placeholder as the model's processor does")


# The Qwen-VL chat layout (Qwen2.5-VL's and Qwen3-VL's templates): a default system turn, each turn
# "<|im_start|>{role}\n{content}<|im_end|>\n", each image part "<|vision_start|><|image_pad|><|vision_end|>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# tiny_config's ids: the image and vision tokens at 100-103, the turn markers after them
SPECIAL_IDS = {"<|image_pad|>": 100, "<|video_pad|>": 101, "<|vision_start|>": 102, "<|vision_end|>": 103,
               "<|im_start|>": 104, "<|im_end|>": 105}


def tiny_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Qwen-VL's special tokens at tiny_config's ids and its chat layout:
    <unk> <s> </s> <pad> are 0-3, `words` (at most 96, with the template's own: system, user, assistant,
    You, are, a, helpful, .) 4 on, built locally (nothing downloaded)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in sorted({*words, "system", "user", "assistant", "You", "are", "a", "helpful", "."}):
        vocab.setdefault(word, len(vocab))
    if len(vocab) > min(SPECIAL_IDS.values()):
        raise ValueError(f"{len(vocab) - 4} words do not fit below the special tokens (at most 96)")
    vocab.update(SPECIAL_IDS)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_IDS), chat_template=CHAT_TEMPLATE, padding_side="right")

