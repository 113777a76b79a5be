"""M²PT on Qwen2.5-VL and Qwen3-VL: deep prompts in every block of their packed vision towers and
every decoder layer, with the interaction layer trained (the merger; Qwen3-VL's deepstack mergers
too). The definitions are docs/method.md's "Qwen2.5-VL" and "Qwen3-VL" sections.

Vision (reference form): before block i, each segment the block attends within (a window or a whole
image in Qwen2.5-VL, a whole image in Qwen3-VL) gets the block's n_v prompt rows prepended, with the
identity rotation (cos 1, sin 0) and no learned position embedding; the block runs on the packed
result, and the prompt rows are dropped from its output. The mergers see patch rows only:
image-token counts and processors are unchanged.
Decoder: the prompt rows at M-RoPE positions (j, j, j), every position of the sequence shifted by n_t
on all three axes; Qwen3-VL's deepstack features land on the image tokens, as without prompts.

The fused backend computes the same function with no prompt rows in any sequence: block i's prompt
K/V (its norm and qkv on the prompt rows, unrotated) are computed once and every segment's attention
attends to them as a shared prefix (method/attention.py); the decoder is fused.text_forward, with its
prompt K/V at M-RoPE positions (j, j, j).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from m2pt_fast.compat import Cache
from m2pt_fast.errors import UserError
from m2pt_fast.method.attention import PrefixContext, prefix_kv, route_attention, run_layer
from m2pt_fast.method.prompted import (
    M2PTConfig,
    M2PTOutput,
    MultimodalPromptTuned,
    register_prompts,
    text_forward,
    xavier_uniform_per_layer,
)
from m2pt_fast.models import qwen2_5_vl, qwen3_vl


def with_segment_prompts(hidden: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         prompts: torch.Tensor):
    """Packed rows hidden (N, d) in segments cu_seqlens (S + 1,), with prompts (n, d) before each segment.

    Returns (rows (N + S n, d), cu_seqlens, cos, sin, keep): the prompt rows carry cos 1 and sin 0 (no
    rotation), and `keep` (N + S n,) marks the original rows, in their order."""
    n = prompts.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows, cos_rows, sin_rows, keep = [], [], [], []
    prompt_rows = prompts.to(hidden.dtype)
    ones, zeros = cos.new_ones(n, cos.shape[-1]), sin.new_zeros(n, sin.shape[-1])
    for part, part_cos, part_sin in zip(hidden.split(lengths), cos.split(lengths), sin.split(lengths)):
        rows += [prompt_rows, part]
        cos_rows += [ones, part_cos]
        sin_rows += [zeros, part_sin]
        keep += [torch.zeros(n, dtype=torch.bool), torch.ones(part.shape[0], dtype=torch.bool)]
    segments = torch.arange(len(lengths) + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.cat(rows), cu_seqlens + n * segments, torch.cat(cos_rows), torch.cat(sin_rows),
            torch.cat(keep).to(hidden.device))


def _block(block, hidden, cu_seqlens, max_seqlen, rotary, prompts: torch.Tensor, backend: str) -> torch.Tensor:
    """One tower block on packed rows (N, d) with its prompts (n, d) before every segment, by `backend`."""
    n = prompts.shape[0]
    if not n:
        return block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rotary)
    if backend == "fused":
        return _fused_block(block, hidden, cu_seqlens, max_seqlen, rotary, prompts)
    packed, packed_cu, packed_cos, packed_sin, keep = with_segment_prompts(hidden, cu_seqlens, *rotary, prompts)
    out = block(packed, cu_seqlens=packed_cu, max_seqlen=None if max_seqlen is None else max_seqlen + n,
                position_embeddings=(packed_cos, packed_sin))
    return out[keep]


def vision_features(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, prompts: torch.Tensor,
                    backend: str = "reference") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged image features (sum of t h w / merge², d_text), deepstack features (Qwen3-VL's, one per
    deepstack merger; [] for Qwen2.5-VL)) of the tower run with deep prompts (prompts (blocks, n,
    d_vision); n = 0: the tower's own forward, step for step), by `backend`."""
    pixel_values = pixel_values.to(visual.patch_embed.proj.weight.dtype)
    if hasattr(visual, "deepstack_merger_list"):
        return _qwen3_vision(visual, pixel_values, grid_thw, prompts, backend)
    schedule = qwen2_5_vl.VisionSchedule(visual, grid_thw)
    hidden = visual.patch_embed(pixel_values)
    rows = hidden.shape[0]
    hidden = visual.permute_input_for_window_attn(hidden, schedule.window_index, seq_len=rows)
    rotary = tuple(visual.permute_input_for_window_attn(part, schedule.window_index, seq_len=rows)
                   for part in visual.rotary_pos_emb(hidden, schedule.position_ids))
    for i, (block, (cu_seqlens, max_seqlen)) in enumerate(zip(visual.blocks, schedule.blocks)):
        hidden = _block(block, hidden, cu_seqlens, max_seqlen, rotary, prompts[i], backend)
    return visual.merger(hidden)[torch.argsort(schedule.window_index)], []


def _qwen3_vision(visual, pixel_values, grid_thw, prompts, backend):
    schedule = qwen3_vl.VisionSchedule(visual, grid_thw)
    hidden = visual.patch_embed(pixel_values)
    positions = (visual.pos_embed(schedule.interp_indices) * schedule.interp_weights[:, :, None]).sum(1)
    hidden = hidden + positions.to(hidden.dtype)  # the patch rows' learned positions; prompt rows get none
    rotary = visual.rotary_pos_emb(hidden, schedule.position_ids)
    deepstack = []
    for i, block in enumerate(visual.blocks):
        hidden = _block(block, hidden, schedule.cu_seqlens, schedule.max_seqlen, rotary, prompts[i], backend)
        if i in visual.deepstack_visual_indexes:
            deepstack.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(i)](hidden))
    return visual.merger(hidden), deepstack


def _fused_block(block, hidden, cu_seqlens, max_seqlen, rotary, prompts: torch.Tensor) -> torch.Tensor:
    """One block with its prompts (n, d) as the prefix K/V of every segment's attention."""
    n, head_dim = prompts.shape[0], rotary[0].shape[-1]
    identity = (rotary[0].new_ones(n, head_dim), rotary[1].new_zeros(n, head_dim))
    alone = torch.tensor([0, n], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    module, kv = prefix_kv(block, prompts.to(hidden.dtype), packed=True, cu_seqlens=alone, max_seqlen=None,
                           position_embeddings=identity)
    context = PrefixContext({module: kv})
    hidden = run_layer(block, hidden, context, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                       position_embeddings=rotary)
    context.check_used()
    return hidden


class M2PTQwenVL(MultimodalPromptTuned, nn.Module):
    """A frozen Qwen2.5-VL or Qwen3-VL with deep visual prompts (blocks, n_v, d_vision), deep textual
    prompts (layers, n_t, d_text) and a trainable interaction layer (the merger, and Qwen3-VL's deepstack
    mergers)."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration,
                 config: M2PTConfig, backend: str = "reference"):
        super().__init__()
        if config.official_vision_features:
            raise UserError("official_vision_features is the released M²PT code's LLaVA feature selection; "
                            f"{type(model).__name__} has no such choice")
        self.qwen = model
        route_attention(model)  # the fused backend's prefix K/V go through transformers' attention interface
        self.frozen_model = model
        self.m2pt_config = config
        self.peft_model = None
        self.backend = backend
        visual, text = model.model.visual, model.model.language_model
        vision_ref, text_ref = visual.patch_embed.proj.weight, text.embed_tokens.weight
        register_prompts(self, "vision_prompts", torch.empty(
            len(visual.blocks), config.num_vision_prompts, visual.config.hidden_size,
            dtype=vision_ref.dtype, device=vision_ref.device))
        register_prompts(self, "text_prompts", torch.empty(
            len(text.layers), config.num_text_prompts, text.config.hidden_size,
            dtype=text_ref.dtype, device=text_ref.device))
        xavier_uniform_per_layer(self.vision_prompts)
        xavier_uniform_per_layer(self.text_prompts)
        model.requires_grad_(False)  # the prompts are trainable Parameters (or empty buffers)
        self.projector.requires_grad_(config.tune_projector)
        model.lm_head.requires_grad_(config.tune_lm_head)

    @property
    def family(self) -> str:
        return "qwen3_vl" if qwen3_vl.is_qwen3_vl(self.qwen) else "qwen2_5_vl"

    @property
    def projector(self) -> nn.Module:
        """The interaction layer, which trains with the prompts: Qwen2.5-VL's merger; Qwen3-VL's merger and
        deepstack mergers, as one module whose state_dict names them merger.* and deepstack_merger_list.*."""
        visual = self.qwen.model.visual
        if not hasattr(visual, "deepstack_merger_list"):
            return visual.merger
        return nn.ModuleDict({"merger": visual.merger, "deepstack_merger_list": visual.deepstack_merger_list})

    @property
    def language_model(self) -> nn.Module:
        return self.qwen.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.qwen.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool = False,
                return_logits: bool | None = None) -> M2PTOutput:
        """input_ids (B, T) with each image's tokens expanded as the processor expands them; pixel_values
        (patches, d) and image_grid_thw (images, 3) from the processor; mm_token_type_ids (B, T) for
        M-RoPE (without it, 1-D positions, as the model's own forward). Returns the mean next-token loss
        over labelled positions and the text positions' logits (B, T, V); return_logits: default True
        for the reference backend, and for the fused one only where no labels are given.

        Decoding: with use_cache the output's cache holds the prompt rows and the tokens; a later call
        gives the new tokens, attention_mask over cached + new tokens, the cache, and position_ids
        (3, B, T_new) without the prompts' shift (the positions the plain model would give them)."""
        model = self.qwen
        text = model.model.language_model
        cached = cache is not None and cache.get_seq_length() > 0
        if cached and position_ids is None:
            raise UserError("a call after the first of a decode gives position_ids (3, batch, new tokens): M-RoPE "
                            "positions cannot be inferred from the new tokens alone")
        embeds = text.embed_tokens(input_ids)
        deepstack = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise UserError("pixel_values without image_grid_thw: pass both, as the processor returns them")
            if mm_token_type_ids is None and position_ids is None and qwen3_vl.is_qwen3_vl(model):
                raise UserError("Qwen3-VL takes images with mm_token_type_ids (the processor returns them) for its "
                                "M-RoPE positions; its own forward refuses them without")
            features, deepstack_features = vision_features(model.model.visual, pixel_values, image_grid_thw,
                                                           self.vision_prompts, self.backend)
            qwen2_5_vl.check_image_tokens(model, input_ids, features.shape[0])
            is_image = input_ids == qwen2_5_vl.image_token_id(model)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
            if deepstack_features:
                deepstack = (is_image, deepstack_features)
        if position_ids is None:
            position_ids = qwen2_5_vl.text_positions(model, input_ids, attention_mask, image_grid_thw,
                                                     mm_token_type_ids)
        return text_forward(self, embeds, attention_mask, labels, position_ids, cache, use_cache, return_logits,
                            deepstack=deepstack)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 output_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with a KV cache that starts with the prompts: (B, T + new) token ids.

        input_ids left-padded (B, T), as the processor gives them; every new token sits one past its
        row's largest M-RoPE position on all three axes, as the model's own generate places it (its
        rope_deltas). A row that produced eos_token_id (default: the generation config's) continues
        with pad_token_id. output_logits: also return each step's logits (B, new, V), as transformers'
        generate does with output_logits=True."""
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise UserError("generate needs left-padded batches (padding before the tokens); tokenize with "
                            "padding_side='left'")
        config = self.qwen.generation_config
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else config.pad_token_id if config.pad_token_id is not None \
            else (int(eos[0]) if eos.numel() else 0)
        was_training = self.training
        self.eval()
        try:
            positions = qwen2_5_vl.text_positions(self.qwen, input_ids, attention_mask, image_grid_thw,
                                                  mm_token_type_ids)
            out = self(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=positions,
                       use_cache=True, return_logits=True)
            next_position = positions.amax(dim=(0, 2)) + 1  # (B,)
            tokens, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            step_logits = []
            for step in range(max_new_tokens):
                step_logits.append(out.logits[:, -1])
                token = step_logits[-1].argmax(-1)
                token = torch.where(done, torch.full_like(token, pad), token)
                tokens.append(token[:, None])
                done |= torch.isin(token, eos)
                if step + 1 == max_new_tokens or bool(done.all()):
                    break
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
                step_positions = (next_position + step).view(1, -1, 1).expand(3, -1, 1)
                out = self(token[:, None], attention_mask, position_ids=step_positions, cache=out.cache,
                           use_cache=True, return_logits=True)
        finally:
            self.train(was_training)
        if output_logits:
            return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)
        return torch.cat(tokens, dim=1)
