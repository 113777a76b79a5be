"""Attention over [prefix K/V ; sequence K/V], stated plainly: the oracle for m2pt_kernels.prefix_attention.

It materialises the concatenation and a boolean mask and calls SDPA, exactly what the fused kernel
avoids; it is the CPU fallback and the reference the tests and benchmarks compare against.
"""

import torch
import torch.nn.functional as F


def prefix_attention_mask(
    batch: int,
    seq_len: int,
    prefix_len: int,
    *,
    causal: bool = False,
    kv_lens: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which keys each query sees: bool (B, 1, N, P + N), True = visible.

    Every prefix key is visible. With `causal`, query i sees sequence keys j <= i: the mask is aligned
    bottom-right on the concatenation, so the prefix stays visible (SDPA's `is_causal=True` aligns it
    top-left, which would hide most of the sequence from the first queries: wrong here). With
    `kv_lens`, sequence keys at positions >= kv_lens[b] are hidden.
    """
    rows = torch.arange(seq_len, device=device)
    cols = torch.arange(seq_len, device=device)
    seq_visible = torch.ones(batch, seq_len, seq_len, dtype=torch.bool, device=device)  # (B, N, N)
    if causal:
        seq_visible = seq_visible & (cols[None, None, :] <= rows[None, :, None])
    if kv_lens is not None:
        seq_visible = seq_visible & (cols[None, None, :] < kv_lens.to(device).view(batch, 1, 1))
    prefix_visible = torch.ones(batch, seq_len, prefix_len, dtype=torch.bool, device=device)  # (B, N, P)
    return torch.cat([prefix_visible, seq_visible], dim=-1)[:, None]  # (B, 1, N, P + N)


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of q over [prefix_k ; k] with values [prefix_v ; v]; same contract as
    m2pt_kernels.prefix_attention.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq a multiple of Hkv; prefix_k, prefix_v: (Hkv, P, D)
    shared by the batch or (B, Hkv, P, D) per sample, or None. kv_lens: (B,) integer or None.
    Returns (B, Hq, N, D) in q's dtype. A query that sees no key at all (P = 0 and kv_lens[b] = 0,
    say) gets an output of 0 and passes no gradient.
    """
    batch, heads_q, seq_len, head_dim = q.shape
    heads_kv = k.shape[1]
    if prefix_k is None:
        keys, values = k, v  # (B, Hkv, N, D)
        prefix_len = 0
    else:
        prefix_len = prefix_k.shape[-2]
        # expand() of a shared prefix is a view: autograd sums its gradient over the batch.
        pk = prefix_k.expand(batch, heads_kv, prefix_len, head_dim)  # (B, Hkv, P, D)
        pv = prefix_v.expand(batch, heads_kv, prefix_len, head_dim)
        keys = torch.cat([pk, k], dim=2)  # (B, Hkv, P + N, D)
        values = torch.cat([pv, v], dim=2)
    if heads_q != heads_kv:
        keys = keys.repeat_interleave(heads_q // heads_kv, dim=1)  # (B, Hq, P + N, D)
        values = values.repeat_interleave(heads_q // heads_kv, dim=1)

    visible = prefix_attention_mask(
        batch, seq_len, prefix_len, causal=causal, kv_lens=kv_lens, device=q.device
    )  # (B, 1, N, P + N)
    # A row with no visible key would make softmax 0/0 = NaN, in the output and in every gradient.
    # Let such rows see everything, then zero their output: the masked_fill also stops their
    # gradient, so they contribute nothing (the kernel's convention).
    empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1, N, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible | empty, scale=softmax_scale)
    return out.masked_fill(empty, 0.0)  # (B, Hq, N, D)
