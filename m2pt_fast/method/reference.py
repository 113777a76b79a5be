"""The reference form of deep prompts (docs/method.md), stated plainly on transformers' own layers.

Prompt rows live in the sequence: prepended before the first layer, overwritten with the next
layer's prompts before every later layer. Every fast path is checked against these functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2pt_fast.compat import cache_kwargs, causal_mask, layer_types, new_cache
from m2pt_fast.errors import UserError
from m2pt_fast.labels import IGNORE_INDEX


def _with_prompts(hidden: torch.Tensor, prompts: torch.Tensor, replace: bool) -> torch.Tensor:
    """hidden (B, [n +] N, d) -> (B, n + N, d) with prompts (n, d) as the first n rows."""
    n = prompts.shape[0]
    rows = prompts.expand(hidden.shape[0], n, -1).to(hidden.dtype)
    return torch.cat([rows, hidden[:, n:] if replace else hidden], dim=1)


def clip_states(vision, hidden: torch.Tensor, prompts: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Run CLIP encoder layers 0..depth-1 on hidden (B, N, d) (the pre-layernorm output).

    prompts: (>= depth, n, d). Returns states[k] = the state after k layers, for k = 0..depth, each
    (B, N, d) with the prompt rows removed.
    """
    n = prompts.shape[1]
    states = [hidden]
    if n:
        hidden = _with_prompts(hidden, prompts[0], replace=False)
    for i in range(depth):
        if n and i > 0:
            hidden = _with_prompts(hidden, prompts[i], replace=True)
        hidden = vision.encoder.layers[i](hidden, None)
        states.append(hidden[:, n:])
    return states


def text_forward(lm, lm_head, prompts, embeds, attention_mask, labels, position_ids, cache, use_cache,
                 deepstack=None):
    """Decoder forward with deep text prompts in the sequence.

    lm: a transformers decoder (LlamaModel, Qwen2Model, Qwen2.5-VL's text model...); prompts: (L, n, d);
    embeds: (B, T, d) input embeddings of the new tokens; attention_mask: (B, T_past + T) over text
    tokens; labels: (B, T) or None; position_ids: (B, T) text positions, (3, B, T) M-RoPE positions
    (temporal, height, width), or None (0.. for a fresh sequence); cache: a KV cache holding earlier
    tokens, the prompt rows first. The prompt rows sit at positions 0..n-1 (on every M-RoPE axis) and
    every other position moves up by n. deepstack: Qwen3-VL's (image-token mask (B, T), features
    [(images' tokens, d)]): feature k is added at the image tokens after layer k, as the model's own
    forward adds it. Returns (loss, logits (B, T, V), cache).
    """
    batch, seq_len, _ = embeds.shape
    n = prompts.shape[1]
    device = embeds.device
    past_len = cache.get_seq_length() if cache is not None else 0
    prefill = past_len == 0
    text_past = 0 if prefill else past_len - n
    if attention_mask is None:
        attention_mask = torch.ones(batch, text_past + seq_len, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != (batch, text_past + seq_len):
        raise UserError(
            f"attention_mask must have shape {(batch, text_past + seq_len)} (cached + new tokens), "
            f"got {tuple(attention_mask.shape)}"
        )
    if labels is not None and tuple(labels.shape) != (batch, seq_len):
        raise UserError(f"labels must have the shape of input_ids {(batch, seq_len)}, got {tuple(labels.shape)}")
    if position_ids is None:
        position_ids = torch.arange(text_past, text_past + seq_len, device=device).expand(batch, seq_len)

    hidden = embeds
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)  # (B, n + T_past + T)
    positions = position_ids + n  # text positions start after the prompts
    inserted = prefill and n > 0
    if inserted:
        hidden = _with_prompts(hidden, prompts[0], replace=False)
        prompt_positions = torch.arange(n, device=device).expand(*positions.shape[:-1], n)
        positions = torch.cat([prompt_positions, positions], dim=-1)
    # an M-RoPE model's own forward gives its masks and layers no 1-D positions (they would read the
    # temporal axis as packed sequences' positions)
    flat_positions = positions if positions.dim() == 2 else None

    if use_cache and cache is None:
        cache = new_cache(lm.config)
    # one mask per kind of layer, as the model's own forward builds them (a sliding window counts the
    # prompt rows as the tokens they are)
    types = layer_types(lm.config)
    masks = {kind: causal_mask(lm.config, hidden, mask, cache, flat_positions, sliding=kind == "sliding_attention")
             for kind in set(types)}
    rope = lm.rotary_emb(hidden, position_ids=positions)
    visual, features = deepstack if deepstack is not None else (None, [])
    if inserted and visual is not None:
        visual = torch.cat([visual.new_zeros(batch, n), visual], dim=1)  # the prompt rows are no image tokens
    for j, layer in enumerate(lm.layers):
        if inserted and j > 0:
            hidden = _with_prompts(hidden, prompts[j], replace=True)
        hidden = layer(hidden, attention_mask=masks[types[j]], position_embeddings=rope, position_ids=flat_positions,
                       use_cache=use_cache, **cache_kwargs(cache))
        if j < len(features):
            hidden = hidden.clone()
            hidden[visual] = hidden[visual] + features[j].to(hidden.dtype)
    logits = lm_head(lm.norm(hidden))  # (B, [n +] T, V)

    loss = None
    if labels is not None:
        if inserted:
            labels = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        # next-token loss over the whole extended sequence, in fp32 as transformers computes it:
        # position t predicts labels[t + 1], the last position predicts nothing.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    if inserted:
        logits = logits[:, n:]
    return loss, logits, cache if use_cache else None
