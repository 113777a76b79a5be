"""The fused M²PT path: the reference function, computed without prompt rows in the sequence.

Prompt rows are overwritten before every layer, so their outputs are never used: they act on the
other tokens only through that layer's keys and values (docs/method.md). Per layer, the prompt K/V

    Kp = rope(norm(P) Wk + bk, positions 0..n-1)      Vp = norm(P) Wv + bv

are computed once for the whole batch (n rows) and handed to `m2pt_kernels.prefix_attention` as a
batch-shared prefix; sequence tokens keep positions n.. so the result equals the reference. The
layer forwards below reuse the transformers modules' own weights (nn.Linear or NF4 linear modules
alike), so nothing is copied.

The loss never materialises full-vocabulary logits for the whole sequence: lm_head and
cross-entropy run only at positions that have a target, in checkpointed chunks, so the memory of
the loss grows with the number of answer tokens, not with sequence × vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from m2pt_kernels import prefix_attention

from .compat import Cache, new_cache, rotate_half

IGNORE_INDEX = -100
# Rows of hidden state turned into logits at once in the loss: peak extra memory is about
# LOSS_CHUNK_ROWS × vocab × 4 bytes (fp32 logits), 256 MB at a 32k vocabulary.
LOSS_CHUNK_ROWS = 2048


def _maybe_checkpoint(layer, training: bool, fn, *args):
    """Run fn(*args), recomputing it in backward when the layer's checkpointing flag is on."""
    if training and getattr(layer, "gradient_checkpointing", False):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ------------------------------------------------------------------------------------------ vision
def _clip_prefix_kv(layer, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts (n, d) -> K, V of the prompt rows, each (H, n, Dh)."""
    attn = layer.self_attn
    n = prompts.shape[0]
    x = layer.layer_norm1(prompts)
    k = attn.k_proj(x).view(n, attn.num_heads, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(n, attn.num_heads, attn.head_dim).transpose(0, 1)
    return k, v


def _clip_layer(layer, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """One CLIP encoder layer over hidden (B, N, d) with its prompt rows as an attention prefix."""
    attn = layer.self_attn
    batch, seq, width = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(hidden)
    q = attn.q_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)  # (B, H, N, Dh)
    k = attn.k_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)
    pk, pv = _clip_prefix_kv(layer, prompts.to(hidden.dtype)) if prompts is not None else (None, None)
    out = prefix_attention(q, k, v, pk, pv, causal=False, softmax_scale=attn.scale)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, seq, width))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def clip_states(vision, hidden: torch.Tensor, prompts: torch.Tensor, depth: int, training: bool) -> list[torch.Tensor]:
    """Fused counterpart of reference.clip_states: hidden (B, N, d) never holds prompt rows.

    prompts: (>= depth, n, d). Returns states[k] (B, N, d) after k layers, for k = 0..depth.
    """
    states = [hidden]
    for i in range(depth):
        layer = vision.encoder.layers[i]
        layer_prompts = prompts[i] if prompts.shape[1] else None
        hidden = _maybe_checkpoint(layer, training, _clip_layer, layer, hidden, layer_prompts)
        states.append(hidden)
    return states


# -------------------------------------------------------------------------------------------- text
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _llama_prefix_kv(layer, rotary, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts (n, d) -> K (RoPE at positions 0..n-1), V of the prompt rows, each (Hkv, n, Dh)."""
    attn = layer.self_attn
    n = prompts.shape[0]
    x = layer.input_layernorm(prompts)
    k = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    cos, sin = rotary(x[None], torch.arange(n, device=x.device)[None])  # (1, n, Dh)
    return _rope(k, cos, sin), v


def _llama_layer(layer, rotary, hidden, cos, sin, prompts, kv_lens) -> torch.Tensor:
    """One decoder layer over hidden (B, T, d) at RoPE angles cos/sin (B, T, Dh), prompts as prefix."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
    k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
    v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    pk, pv = _llama_prefix_kv(layer, rotary, prompts.to(hidden.dtype)) if prompts is not None else (None, None)
    out = prefix_attention(q, k, v, pk, pv, causal=True, softmax_scale=attn.scaling, kv_lens=kv_lens)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) mask of the form 1...1 0...0 -> lengths (B,) int32, or None when nothing is padded."""
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError(
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
    for start in range(0, count, LOSS_CHUNK_ROWS):
        chunk = slice(start, start + LOSS_CHUNK_ROWS)
        # Checkpointed: backward recomputes this chunk's logits instead of keeping them all alive.
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, lm_head, rows[chunk], row_targets[chunk], use_reentrant=False)
        else:
            total = total + _chunk_loss(lm_head, rows[chunk], row_targets[chunk])
    return total / count  # no targets: 0/0 = nan, as the reference gives


def _last_prompt_row(lm, prompts: torch.Tensor) -> torch.Tensor:
    """Final-normed state of the last prompt row: the only prompt-row output the loss can use.

    In the last decoder layer the prompt rows hold that layer's prompts and attend only to each
    other (causally, positions 0..n-1), so the row depends on the prompts alone, not on the batch.
    """
    rows = prompts[-1][None].to(lm.embed_tokens.weight.dtype)  # (1, n, d)
    n = rows.shape[1]
    cos, sin = lm.rotary_emb(rows, torch.arange(n, device=rows.device)[None])
    out = _llama_layer(lm.layers[-1], lm.rotary_emb, rows, cos, sin, None, None)
    return lm.norm(out)[0, -1]


def text_forward(lm, lm_head, prompts, embeds, attention_mask, labels, position_ids, return_logits, training):
    """Fused counterpart of reference.text_forward for training and scoring (no cache).

    lm: a transformers LlamaModel; prompts: (L, n, d); embeds: (B, T, d); attention_mask: (B, T),
    right-padded; labels: (B, T) or None. Returns (loss or None, logits (B, T, V) or None).
    """
    batch, seq_len, _ = embeds.shape
    n = prompts.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=embeds.device)
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(f"attention_mask must have shape {(batch, seq_len)}, got {tuple(attention_mask.shape)}")
    if labels is not None and tuple(labels.shape) != (batch, seq_len):
        raise ValueError(f"labels must have the shape of input_ids {(batch, seq_len)}, got {tuple(labels.shape)}")
    kv_lens = _right_padded_lengths(attention_mask)
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=embeds.device).expand(batch, seq_len)

    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, position_ids + n)  # text positions start after the prompts
    for j, layer in enumerate(lm.layers):
        layer_prompts = prompts[j] if n else None
        hidden = _maybe_checkpoint(layer, training, _llama_layer, layer, lm.rotary_emb, hidden, cos, sin,
                                   layer_prompts, kv_lens)
    hidden = lm.norm(hidden)
    loss = _loss(lm, lm_head, prompts, hidden, labels) if labels is not None else None
    logits = lm_head(hidden) if return_logits else None
    return loss, logits


def prompt_cache(lm, prompts: torch.Tensor, batch: int, cache: Cache | None = None) -> Cache:
    """Fill an empty (or new) KV cache with every decoder layer's prompt K/V, computed once and
    expanded over the batch."""
    cache = new_cache(lm.config) if cache is None else cache
    if prompts.shape[1] == 0:
        return cache
    dtype = lm.embed_tokens.weight.dtype
    for j, layer in enumerate(lm.layers):
        k, v = _llama_prefix_kv(layer, lm.rotary_emb, prompts[j].to(dtype))  # (Hkv, n, Dh)
        cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), j)
    return cache
