"""Qwen3-VL, as transformers 5.17 to 5.25 lay it out: where M²PT finds its parts.

    Qwen3VLForConditionalGeneration
      .model.visual                 the vision tower: packed patches (N, d_v) with grid_thw (images, 3)
        .patch_embed, .pos_embed    rows, plus learned position embeddings interpolated to each grid
        .rotary_pos_emb             2-D rotary of each row (cos, sin)
        .blocks[i]                  block(hidden, cu_seqlens=, max_seqlen=, position_embeddings=), each
                                    attending within whole images (no windows, no reordering)
        .merger                     the interaction layer: 2x2 rows merged -> (N / 4, d_t)
        .deepstack_merger_list[k]   mergers of the states after blocks deepstack_visual_indexes[k]
      .model.language_model         a Qwen3 decoder with interleaved M-RoPE (3, B, T) and q/k norms; after
                                    its layer k it adds deepstack feature k at the image tokens
      .lm_head

Positions and image tokens follow Qwen2.5-VL's rules (models/qwen2_5_vl.py: text_positions,
check_image_tokens serve both families).
"""
from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)


def is_qwen3_vl(model) -> bool:
    return isinstance(model, Qwen3VLForConditionalGeneration)


def tiny_config() -> Qwen3VLConfig:
    """A Qwen3-VL small enough for tests on a CPU: a 3-block tower whose blocks 0 and 1 feed deepstack
    mergers (both reach a later decoder layer), a 3-layer decoder with q/k norms and interleaved
    M-RoPE; image tokens 100-103."""
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=100, video_token_id=101,
                         vision_start_token_id=102, vision_end_token_id=103)


class VisionSchedule:
    """How the tower runs a batch of images (grid_thw (images, 3)), as its own forward computes it: the
    learned position embeddings' interpolation, the rotary positions, and the segments (one per image)
    every block attends within."""

    def __init__(self, visual, grid_thw: torch.Tensor):
        self.interp_indices, self.interp_weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
            kwargs={})
        self.position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size, kwargs={})
        self.cu_seqlens, self.max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config, kwargs={})
