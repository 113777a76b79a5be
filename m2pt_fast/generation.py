"""Autoregressive decoding with a KV cache, for M2PTLlava and DeepTextPrompts.

The prompt rows enter the cache once, at prefill, so decode steps cost the same as without prompts.
Batches must be left-padded (as transformers generation expects): new tokens are appended at the
right end of every row.
"""
from __future__ import annotations

import torch


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Left padding means each row is 0...0 1...1: never a 1 followed by a 0.
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError(
            "generate needs left-padded batches (padding before the tokens); this attention_mask has padding "
            "after tokens. Tokenize with padding_side='left'."
        )


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (B, V) -> the same with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns (B, T + new) token ids: the input followed by up to `max_new_tokens` new tokens.

    Greedy by default; `do_sample=True` samples from softmax(logits / temperature) restricted to the
    top_k tokens and the top_p nucleus. Rows that emitted `eos_token_id` are continued with
    `pad_token_id` (default: eos) until every row has finished or the budget is spent.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch, _ = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_left_padded(attention_mask)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0

    # Positions count real tokens only, so left padding does not shift them.
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **images)
    tokens = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if do_sample:
            logits = _filter_logits(logits / temperature, top_k, top_p)
            next_token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if finished.all():
                break
        if step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = model(next_token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    cache=out.cache, use_cache=True)
        next_position = next_position + 1
    return tokens
