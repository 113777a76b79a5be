"""Decoding with transformers' own `generate`, the prompt K/V as the prefix of its KV cache.

The text prompts act on the decoded tokens only through every decoder layer's keys and values
(docs/method.md), so decoding starts from a cache that already holds them: each layer's prompt K/V,
computed once by that layer itself (m2pt_fast/method/fused.py: prompt_cache) and expanded over the batch.
transformers' generate then runs on the input embeddings (image features included, computed with
the vision prompts), with the attention mask extended by the n prompt positions; it derives the
positions from that mask, so text positions start at n and left padding is skipped, as in the
reference form. Greedy decoding, sampling, beam search, stopping criteria and logits processors are
the library's.
"""
from __future__ import annotations

import torch

from m2pt_fast.compat import cache_kwargs
from m2pt_fast.errors import UserError
from m2pt_fast.method import fused


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Left padding means each row is 0...0 1...1: never a 1 followed by a 0.
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise UserError(
            "generate needs left-padded batches (padding before the tokens); this attention_mask has padding "
            "after tokens. Tokenize with padding_side='left'."
        )


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32,
             *, attention_mask: torch.Tensor | None = None, do_sample: bool = False, **generate_kwargs) -> torch.Tensor:
    """Returns (B, T + new) token ids: the input followed by up to `max_new_tokens` new tokens.

    `model` is an M2PTLlava or a DeepTextPrompts; input_ids (B, T) left-padded, with its image tokens
    for `pixel_values`. Greedy unless `do_sample=True`; every other keyword (temperature, top_k,
    top_p, num_beams, eos_token_id, pad_token_id, stopping_criteria, ...) is transformers' generate's,
    with the model's generation_config filling what is not given. Sampling draws from torch's global
    generator (torch.manual_seed), as transformers does.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.dim() != 2:
        raise UserError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise UserError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                        f"got {tuple(attention_mask.shape)}")
    _check_left_padded(attention_mask)
    if max_new_tokens == 0:
        return input_ids

    was_training = model.training
    model.eval()  # some releases turn the cache off for layers in training mode with checkpointing on
    try:
        embeds = model.embed_inputs(input_ids, pixel_values)  # (B, T, d)
        batch, n = input_ids.shape[0], model.num_text_prompts
        # transformers repeats every row num_beams times for beam search (num_return_sequences times
        # otherwise) but takes a cache as given: it gets that many rows, all equal (the prompts are
        # shared by the batch).
        defaults = model.frozen_model.generation_config
        beams = generate_kwargs.get("num_beams") or defaults.num_beams or 1
        returned = generate_kwargs.get("num_return_sequences") or defaults.num_return_sequences or 1
        cache = fused.prompt_cache(model.language_model, model.text_prompts, batch * (beams if beams > 1 else returned))
        # transformers feeds only the positions the cache does not hold yet: n placeholder rows stand
        # for the prompt positions, which the cache holds.
        embeds = torch.cat([embeds.new_zeros(batch, n, embeds.shape[-1]), embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        new_tokens = model.frozen_model.generate(inputs_embeds=embeds, attention_mask=mask, **cache_kwargs(cache),
                                                 max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                 **generate_kwargs)
    finally:
        model.train(was_training)
    return torch.cat([input_ids.repeat_interleave(returned, dim=0), new_tokens.to(input_ids.device)], dim=1)
