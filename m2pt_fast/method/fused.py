"""The fused M²PT path: the reference function, computed without prompt rows in the sequence.

Prompt rows are overwritten before every layer, so their outputs are never used: they act on the
other tokens only through that layer's keys and values (docs/method.md). Per layer, the prompt K/V

    Kp = rope(norm(P) Wk + bk, positions 0..n-1)      Vp = norm(P) Wv + bv

are computed once for the whole batch (n rows) by the layer itself, and the model's own layers then
run on the sequence with the K/V handed to their attention as a batch-shared prefix
(m2pt_fast/method/attention.py); sequence tokens keep positions n.. so the result equals the reference.
Nothing of the frozen model is re-implemented or copied here: its norms, projections (dense or NF4),
RoPE and checkpointing run as they are.

The loss never materialises full-vocabulary logits for the whole sequence: lm_head and
cross-entropy run only at positions that have a target, in checkpointed chunks, so the memory of
the loss grows with the number of answer tokens, not with sequence × vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from m2pt_fast.compat import Cache, new_cache
from m2pt_fast.errors import UserError
from m2pt_fast.labels import IGNORE_INDEX
from m2pt_fast.method.attention import PrefixContext, prefix_kv, run_layer

# The loss turns hidden states into logits a chunk of rows at a time, each chunk's fp32 logits about
# LOSS_CHUNK_BYTES (2,093 rows at LLaMA's 32k vocabulary, 441 at Qwen's 152k): what a chunk holds in
# forward and backward (bf16 and fp32 logits, log-softmax, their gradient) stays near 4 × that.
LOSS_CHUNK_BYTES = 256 * 2**20


def loss_chunk_rows(vocab_size: int) -> int:
    return max(16, LOSS_CHUNK_BYTES // (4 * vocab_size))


# ------------------------------------------------------------------------------------------ vision
def clip_states(vision, hidden: torch.Tensor, prompts: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Fused counterpart of reference.clip_states: hidden (B, N, d) never holds prompt rows.

    prompts: (>= depth, n, d). Returns states[k] (B, N, d) after k layers, for k = 0..depth.
    """
    states = [hidden]
    for i in range(depth):
        layer = vision.encoder.layers[i]
        context = PrefixContext()
        if prompts.shape[1]:
            module, kv = prefix_kv(layer, prompts[i].to(hidden.dtype), None)
            context.prefix[module] = kv
        hidden = run_layer(layer, hidden, context, None)
        context.check_used()
        states.append(hidden)
    return states


# -------------------------------------------------------------------------------------------- text
def _prompt_positions(lm, rows: torch.Tensor) -> dict:
    """The keyword arguments placing rows (n, d) at positions 0..n-1 in a decoder layer: (j, j, j)
    under M-RoPE (Qwen2.5-VL), whose layers, as in the model's own forward, get no 1-D positions."""
    positions = torch.arange(rows.shape[0], device=rows.device)[None]  # (1, n)
    if hasattr(lm.rotary_emb, "mrope_section"):
        return {"position_ids": None, "position_embeddings": lm.rotary_emb(rows[None], positions.expand(3, 1, -1))}
    return {"position_ids": positions, "position_embeddings": lm.rotary_emb(rows[None], positions)}


def text_prefix(lm, prompts: torch.Tensor) -> dict:
    """{attention module: (K, V)} of every decoder layer's prompts (L, n, d), each (Hkv, n, Dh)."""
    prefix = {}
    dtype = lm.embed_tokens.weight.dtype
    for layer, rows in zip(lm.layers, prompts.to(dtype)):
        module, kv = prefix_kv(layer, rows, attention_mask=None, **_prompt_positions(lm, rows))
        prefix[module] = kv
    return prefix


def _right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) mask of the form 1...1 0...0 -> lengths (B,) int32, or None when nothing is padded."""
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise UserError(
            "the fused backend trains on right-padded batches (tokens first, padding after); this "
            "attention_mask has padding before tokens. Pad on the right, or use backend='reference'."
        )
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    return None if bool((lengths == attention_mask.shape[1]).all()) else lengths


def _chunk_loss(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def _loss(lm, lm_head, prompts: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over targets != -100, taking lm_head only where a target exists.

    hidden: (B, T, d) final-normed text states; labels: (B, T) text labels. A label on the first
    text token is predicted by the last prompt row, as in the reference; that row is computed only
    when such a label exists.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[t + 1]
    keep = targets != IGNORE_INDEX
    rows, row_targets = hidden[keep], targets[keep]  # (M, d), (M,)
    first = labels[:, 0] != IGNORE_INDEX
    if first.any() and prompts.shape[1]:
        last_prompt = _last_prompt_row(lm, prompts).to(hidden.dtype)  # (d,)
        rows = torch.cat([rows, last_prompt.expand(int(first.sum()), -1)])
        row_targets = torch.cat([row_targets, labels[:, 0][first]])
    count = row_targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    step = loss_chunk_rows(getattr(lm_head, "out_features", None) or lm_head.weight.shape[0])
    for start in range(0, count, step):
        chunk = slice(start, start + step)
        # Checkpointed: backward recomputes this chunk's logits instead of keeping them all alive.
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, lm_head, rows[chunk], row_targets[chunk], use_reentrant=False)
        else:
            total = total + _chunk_loss(lm_head, rows[chunk], row_targets[chunk])
    return total / count  # no targets: 0/0 = nan, as the reference gives


def _last_prompt_row(lm, prompts: torch.Tensor) -> torch.Tensor:
    """Final-normed state of the last prompt row: the only prompt-row output the loss can use.

    In the last decoder layer the prompt rows hold that layer's prompts and attend only to each
    other (causally, positions 0..n-1), so the row depends on the prompts alone, not on the batch:
    the last layer runs on them with its ordinary attention.
    """
    rows = prompts[-1].to(lm.embed_tokens.weight.dtype)  # (n, d)
    out = lm.layers[-1](rows[None], attention_mask=None, **_prompt_positions(lm, rows))
    return lm.norm(out)[0, -1]


def text_forward(lm, lm_head, prompts, embeds, attention_mask, labels, position_ids, return_logits, deepstack=None):
    """Fused counterpart of reference.text_forward for training and scoring (no cache).

    lm: a transformers decoder (LlamaModel, Qwen2.5-VL's text model...); prompts: (L, n, d); embeds:
    (B, T, d); attention_mask: (B, T), right-padded; labels: (B, T) or None; position_ids: (B, T), or
    (3, B, T) under M-RoPE, or None; deepstack: Qwen3-VL's (image-token mask, features), handed to the
    decoder's own forward. Returns (loss or None, logits (B, T, V) or None).
    """
    batch, seq_len, _ = embeds.shape
    n = prompts.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=embeds.device)
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise UserError(f"attention_mask must have shape {(batch, seq_len)}, got {tuple(attention_mask.shape)}")
    if labels is not None and tuple(labels.shape) != (batch, seq_len):
        raise UserError(f"labels must have the shape of input_ids {(batch, seq_len)}, got {tuple(labels.shape)}")
    context = PrefixContext(text_prefix(lm, prompts) if n else {}, _right_padded_lengths(attention_mask))
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=embeds.device).expand(batch, seq_len)
    # The decoder's own forward; its mask is not built (padding is kv_lens), and text positions start
    # after the prompts.
    extra = {} if deepstack is None else {"visual_pos_masks": deepstack[0], "deepstack_visual_embeds": deepstack[1]}
    hidden = lm(inputs_embeds=embeds, position_ids=position_ids + n, use_cache=False, m2pt=context,
                **extra).last_hidden_state
    context.check_used()
    loss = _loss(lm, lm_head, prompts, hidden, labels) if labels is not None else None
    logits = lm_head(hidden) if return_logits else None
    return loss, logits


def prompt_cache(lm, prompts: torch.Tensor, batch: int, cache: Cache | None = None) -> Cache:
    """Fill an empty (or new) KV cache with every decoder layer's prompt K/V, computed once and
    expanded over the batch."""
    cache = new_cache(lm.config) if cache is None else cache
    if prompts.shape[1] == 0:
        return cache
    for j, (k, v) in enumerate(text_prefix(lm, prompts).values()):  # (Hkv, n, Dh), in layer order
        cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), j)
    return cache
