"""Attention over [trainable prefix K/V ; sequence K/V] without materialising the concatenation.

    out = softmax(scale · q [prefix_k ; k]ᵀ + mask) [prefix_v ; v]

The prefix (P rows per KV head) is either shared by the whole batch, as in prompt tuning where it
depends on the parameters only, or given per sample. The kernels read a shared prefix with a batch
stride of 0, so it is never copied, and the backward pass returns its gradient already summed over
the batch. The causal mask is aligned bottom-right on the concatenation: every query sees every
prefix key, and query i sees sequence keys j <= i.

Layers, top to bottom: Triton kernels → launchers (checks, tile sizes, grids) → a torch.library
custom op with its autograd formula (one opaque op to torch.compile) → `prefix_attention`.
The plain PyTorch statement of the same function is m2pt_kernels.reference.prefix_attention_reference;
it is also what runs on CPU tensors when the Triton interpreter is off.
"""
import math

import torch

from . import _dispatch
from ._dispatch import interpreter_enabled, launching_on, use_triton
from .reference.attention import prefix_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works; use_triton() is False without triton
    triton = None

__all__ = ["prefix_attention"]

# Softmax runs in base 2 (exp2 is the native instruction): scores are pre-multiplied by log2(e),
# and the saved log-sum-exp is in base-2 units too.
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256  # one (BLOCK, D) tile of q, k, v and the accumulator must fit in registers/SMEM
# The tiles below need Ampere or newer: on Turing (sm_75, 64 KB of shared memory per block) Triton's
# layouts for these dots take 96 KB at D = 128, so the launch would fail with OutOfResources, and
# bf16 tensor cores start at sm_80. Older GPUs take the reference path (SDPA over the concatenation),
# as flash-attn 2 also starts at sm_80. tests/test_prefix_attention.py compiles every tile for sm_86
# (99 KB, the smallest budget from Ampere on) and sm_90 and checks the shared memory it needs.
_MIN_CUDA_CAPABILITY = (8, 0)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_tile(ptr, offs_rows, offs_d, stride_row, stride_d, n_rows, head_dim):
        # (ROWS, BLOCK_D) tile; rows past n_rows and the head-dim padding read as 0, which adds
        # nothing to any dot product.
        mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
        return tl.load(ptr + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d, mask=mask, other=0.0)

    @triton.jit
    def _fwd_block(
        acc, m_i, l_i, q, k, v, offs_m, offs_n, key_limit,
        qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One step of the online softmax over a block of keys. acc: (BLOCK_M, BLOCK_D) fp32,
        # m_i / l_i: (BLOCK_M,) running max (base-2 scaled scores) and running sum.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = offs_n[None, :] < key_limit
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet has m_new = -inf; subtracting it would give
        # -inf - -inf = NaN. Shift by 0 instead: its p and alpha are then exactly 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the value dtype for the tensor-core dot, as every flash kernel does;
        # the error-ratio tests bound what that costs.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _prefix_attention_fwd_kernel(
        Q, K, V, PK, PV, KV_LENS, OUT, LSE,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_lb, stride_lh, stride_ln,
        heads_q, group_size, seq_len, prefix_len, head_dim, qk_scale,
        CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid: (cdiv(N, BLOCK_M), B * Hq); one program owns BLOCK_M queries of one (batch, q head).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # Batch offsets in int64: b · stride_b passes 2**31 elements for large batches.
        b = (pid_bh // heads_q).to(tl.int64)
        hq = pid_bh % heads_q
        hkv = hq // group_size
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)

        q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qn, stride_qd, seq_len, head_dim)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Prefix first. stride_pkb is 0 for a shared prefix: every batch reads the same rows, which
        # stay hot in L2 instead of being copied per sample.
        pk_base = PK + b * stride_pkb + hkv * stride_pkh
        pv_base = PV + b * stride_pvb + hkv * stride_pvh
        for start_p in range(0, prefix_len, BLOCK_P):
            k = _load_tile(pk_base, start_p + offs_p, offs_d, stride_pkn, stride_pkd, prefix_len, head_dim)
            v = _load_tile(pv_base, start_p + offs_p, offs_d, stride_pvn, stride_pvd, prefix_len, head_dim)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, offs_m, start_p + offs_p, prefix_len,
                                       qk_scale, False, True, DOT_PRECISION)

        # Then the sequence, up to kv_len and, when causal, up to this block's last query: blocks
        # past that are fully masked and never loaded.
        kv_len = seq_len
        if HAS_KV_LENS:
            kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), 0), seq_len)
        hi = kv_len
        # Blocks below full_hi are visible to every query of this program: no mask arithmetic there.
        full_hi = (kv_len // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M)
            full_hi = tl.minimum(full_hi, (start_m // BLOCK_N) * BLOCK_N)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        for start_n in range(0, full_hi, BLOCK_N):
            k = _load_tile(k_base, start_n + offs_n, offs_d, stride_kn, stride_kd, seq_len, head_dim)
            v = _load_tile(v_base, start_n + offs_n, offs_d, stride_vn, stride_vd, seq_len, head_dim)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, offs_m, start_n + offs_n, kv_len,
                                       qk_scale, CAUSAL, False, DOT_PRECISION)
        for start_n in range(full_hi, hi, BLOCK_N):
            k = _load_tile(k_base, start_n + offs_n, offs_d, stride_kn, stride_kd, seq_len, head_dim)
            v = _load_tile(v_base, start_n + offs_n, offs_d, stride_vn, stride_vd, seq_len, head_dim)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, offs_m, start_n + offs_n, kv_len,
                                       qk_scale, CAUSAL, True, DOT_PRECISION)

        # A query with no visible key (P = 0 and kv_len = 0) outputs 0; its LSE is +inf so that the
        # backward's exp2(s - lse) is 0 for it without a special case.
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        row_ok = offs_m < seq_len
        o_ptrs = OUT + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
        tl.store(LSE + b * stride_lb + hq * stride_lh + offs_m * stride_ln, lse, mask=row_ok)

    @triton.jit
    def _dq_block(
        dq, q, do, lse, delta, k, v, offs_m, offs_n, key_limit,
        qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # dq += dS · k for one block of keys, with dS = P ⊙ (dO vᵀ - delta) in units of the scaled
        # scores (the caller multiplies by softmax_scale once at the end).
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = offs_n[None, :] < key_limit
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    @triton.jit
    def _prefix_attention_bwd_dq_kernel(
        Q, K, V, PK, PV, KV_LENS, OUT, DO, LSE, DELTA, DQ,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_lb, stride_lh, stride_ln,
        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
        heads_q, group_size, seq_len, prefix_len, head_dim, qk_scale, softmax_scale,
        CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid: (cdiv(N, BLOCK_M), B * Hq); the same walk over keys as the forward. It also writes
        # delta = rowsum(dO ⊙ O) for the dk/dv kernel launched after it: dO is loaded here anyway,
        # and a separate pass (or torch's elementwise ops, with fp32 temporaries) would cost a
        # sizeable fraction of the whole backward at N ≈ 700.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads_q).to(tl.int64)
        hq = pid_bh % heads_q
        hkv = hq // group_size
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)

        q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qn, stride_qd, seq_len, head_dim)
        do = _load_tile(DO + b * stride_dob + hq * stride_doh, offs_m, offs_d, stride_don, stride_dod,
                        seq_len, head_dim)
        o = _load_tile(OUT + b * stride_ob + hq * stride_oh, offs_m, offs_d, stride_on, stride_od, seq_len, head_dim)
        row_ok = offs_m < seq_len
        # delta_i = Σ_j P_ij dP_ij = dO_i · O_i: the softmax-backward term shared by all keys of row i.
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
        tl.store(DELTA + b * stride_lb + hq * stride_lh + offs_m * stride_ln, delta, mask=row_ok)
        # Padding rows get lse = +inf, hence p = 0: they add nothing.
        lse = tl.load(LSE + b * stride_lb + hq * stride_lh + offs_m * stride_ln, mask=row_ok, other=float("inf"))
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        pk_base = PK + b * stride_pkb + hkv * stride_pkh
        pv_base = PV + b * stride_pvb + hkv * stride_pvh
        for start_p in range(0, prefix_len, BLOCK_P):
            k = _load_tile(pk_base, start_p + offs_p, offs_d, stride_pkn, stride_pkd, prefix_len, head_dim)
            v = _load_tile(pv_base, start_p + offs_p, offs_d, stride_pvn, stride_pvd, prefix_len, head_dim)
            dq = _dq_block(dq, q, do, lse, delta, k, v, offs_m, start_p + offs_p, prefix_len,
                           qk_scale, False, True, DOT_PRECISION)

        kv_len = seq_len
        if HAS_KV_LENS:
            kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), 0), seq_len)
        hi = kv_len
        full_hi = (kv_len // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M)
            full_hi = tl.minimum(full_hi, (start_m // BLOCK_N) * BLOCK_N)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        for start_n in range(0, full_hi, BLOCK_N):
            k = _load_tile(k_base, start_n + offs_n, offs_d, stride_kn, stride_kd, seq_len, head_dim)
            v = _load_tile(v_base, start_n + offs_n, offs_d, stride_vn, stride_vd, seq_len, head_dim)
            dq = _dq_block(dq, q, do, lse, delta, k, v, offs_m, start_n + offs_n, kv_len,
                           qk_scale, CAUSAL, False, DOT_PRECISION)
        for start_n in range(full_hi, hi, BLOCK_N):
            k = _load_tile(k_base, start_n + offs_n, offs_d, stride_kn, stride_kd, seq_len, head_dim)
            v = _load_tile(v_base, start_n + offs_n, offs_d, stride_vn, stride_vd, seq_len, head_dim)
            dq = _dq_block(dq, q, do, lse, delta, k, v, offs_m, start_n + offs_n, kv_len,
                           qk_scale, CAUSAL, True, DOT_PRECISION)

        dq_ptrs = DQ + b * stride_dqb + hq * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < head_dim))

    @triton.jit
    def _dkdv_block(
        dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, key_limit, start_m,
        stride_qn, stride_qd, stride_don, stride_dod, stride_ln,
        seq_len, head_dim, qk_scale,
        CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # dk, dv += contributions of BLOCK_M queries of one q head to one block of keys. Everything
        # is computed transposed, (BLOCK_N, BLOCK_M), so that pᵀ and dSᵀ feed the dots without a
        # transpose of the big tile.
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seq_len
        q = _load_tile(Q, offs_m, offs_d, stride_qn, stride_qd, seq_len, head_dim)
        do = _load_tile(DO, offs_m, offs_d, stride_don, stride_dod, seq_len, head_dim)
        lse = tl.load(LSE + offs_m * stride_ln, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m * stride_ln, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            visible = offs_n[:, None] < key_limit
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
            s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _prefix_attention_bwd_dkdv_kernel(
        Q, K, V, KV_LENS, DO, LSE, DELTA, DK, DV,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_lb, stride_lh, stride_ln,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        heads_kv, group_size, seq_len, key_len, head_dim, qk_scale, softmax_scale,
        CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid: (cdiv(key_len, BLOCK_N), B * Hkv). One program owns BLOCK_N keys of one
        # (batch, kv head) and loops over the Hq / Hkv query heads that share them, so GQA needs
        # no atomics. K, V are either the sequence (key_len = N) or the prefix (key_len = P,
        # stride_kb = 0 when shared, launched with CAUSAL and HAS_KV_LENS off: every query sees
        # every prefix key).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads_kv).to(tl.int64)
        hkv = pid_bh % heads_kv
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        key_limit = key_len
        if HAS_KV_LENS:
            key_limit = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), 0), key_len)
        k = _load_tile(K + b * stride_kb + hkv * stride_kh, offs_n, offs_d, stride_kn, stride_kd, key_len, head_dim)
        v = _load_tile(V + b * stride_vb + hkv * stride_vh, offs_n, offs_d, stride_vn, stride_vd, key_len, head_dim)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Queries [lo, mid) need the mask (the causal diagonal, or a block holding invisible keys);
        # queries from mid on see every key of this block. Queries below lo see none of them
        # (causal). A block of padding keys only (start_n >= kv_len) skips both loops: zeros.
        lo = 0
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.where(start_n + BLOCK_N > key_limit, seq_len, 0)
        if CAUSAL:
            mid = tl.maximum(mid, start_n + BLOCK_N)
        mid = tl.minimum(mid, seq_len)
        no_visible_key = start_n >= key_limit
        lo = tl.where(no_visible_key, seq_len, lo)
        mid = tl.where(no_visible_key, seq_len, mid)
        # lo is a multiple of BLOCK_M, mid need not be: the unmasked loop starts at the first block
        # boundary at or after mid, where the masked loop stopped.
        mid_aligned = lo + tl.cdiv(mid - lo, BLOCK_M) * BLOCK_M
        for g in range(0, group_size):
            hq = hkv * group_size + g
            q_base = Q + b * stride_qb + hq * stride_qh
            do_base = DO + b * stride_dob + hq * stride_doh
            lse_base = LSE + b * stride_lb + hq * stride_lh
            delta_base = DELTA + b * stride_lb + hq * stride_lh
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, key_limit,
                                     start_m, stride_qn, stride_qd, stride_don, stride_dod, stride_ln,
                                     seq_len, head_dim, qk_scale, CAUSAL, True,
                                     BLOCK_M, BLOCK_D, DOT_PRECISION)
            for start_m in range(mid_aligned, seq_len, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, key_limit,
                                     start_m, stride_qn, stride_qd, stride_don, stride_dod, stride_ln,
                                     seq_len, head_dim, qk_scale, CAUSAL, False,
                                     BLOCK_M, BLOCK_D, DOT_PRECISION)

        store_mask = (offs_n[:, None] < key_len) & (offs_d[None, :] < head_dim)
        dk_ptrs = DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=store_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _tile_sizes(block_d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes, warps and pipeline stages for the three kernels.

    The interpreter simulates every tile op in numpy at a cost that grows with the tile, so it gets
    the smallest tiles tl.dot accepts (16): tests stay fast and still cross block boundaries with
    tiny shapes. GPU sizes are untimed starting points, chosen so that ptxas (sm_80 and sm_90)
    reports no or only a few bytes of register spills for fp16/bf16 at D <= 128. fp32 (IEEE dots on
    CUDA cores, twice the bytes per tile) spills a little at any tile size worth having.
    """
    if device.type != "cuda" or interpreter_enabled():
        return dict(fwd=(16, 16, 1, 1), dq=(16, 16, 1, 1), dkdv=(16, 16, 1, 1))
    if dtype == torch.float32:
        if block_d <= 64:
            return dict(fwd=(64, 32, 8, 1), dq=(64, 32, 8, 1), dkdv=(32, 32, 8, 1))
        if block_d <= 128:
            return dict(fwd=(32, 32, 8, 1), dq=(32, 32, 8, 1), dkdv=(32, 32, 8, 1))
        return dict(fwd=(16, 16, 8, 1), dq=(16, 16, 8, 1), dkdv=(16, 16, 8, 1))
    if block_d <= 64:
        return dict(fwd=(128, 64, 4, 3), dq=(64, 64, 4, 2), dkdv=(64, 64, 4, 2))
    if block_d <= 128:
        return dict(fwd=(128, 64, 8, 2), dq=(64, 64, 8, 2), dkdv=(64, 64, 8, 2))
    return dict(fwd=(64, 32, 4, 2), dq=(32, 32, 4, 2), dkdv=(32, 32, 4, 2))


def _kernel_runs_on(device: torch.device) -> bool:
    """False on CUDA GPUs older than _MIN_CUDA_CAPABILITY, where the reference path runs instead."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= _MIN_CUDA_CAPABILITY


def _prefix_tile(prefix_len: int, block_n: int) -> int:
    # P is usually small (10 prompts): one block just large enough instead of a full BLOCK_N,
    # so the prefix costs a 16-wide dot, not a 64-wide one.
    return max(16, min(block_n, triton.next_power_of_2(max(prefix_len, 1))))


def _prefix_strides(prefix: torch.Tensor) -> tuple:
    # (Hkv, P, D) shared by the batch: a batch stride of 0 makes every sample read the same rows.
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (10-bit mantissa) inside tl.dot: the error-ratio
    # tests compare against fp32 PyTorch, which does not use tf32 by default.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Every buffer a kernel fills comes from here, so tests can poison them (fill with NaN) and
    # catch an element a kernel forgot to write.
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    kv_lens: torch.Tensor | None, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, Hq, N, D) in q's dtype and the base-2 log-sum-exp (B, Hq, N) fp32."""
    batch, heads_q, seq_len, head_dim = q.shape
    heads_kv = k.shape[1]
    prefix_len = prefix_k.shape[-2]
    out = _new_output(q.shape, q.dtype, q.device)  # (B, Hq, N, D)
    lse = _new_output((batch, heads_q, seq_len), torch.float32, q.device)  # (B, Hq, N)
    if out.numel() == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _tile_sizes(block_d, q.dtype, q.device)["fwd"]
    grid = (triton.cdiv(seq_len, block_m), batch * heads_q)
    _prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, kv_lens if kv_lens is not None else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *out.stride(), *lse.stride(),
        heads_q, heads_q // heads_kv, seq_len, prefix_len, head_dim, softmax_scale * _LOG2E,
        CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=_prefix_tile(prefix_len, block_n), BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, kv_lens: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, ...]:
    """Returns dq, dk, dv, dprefix_k, dprefix_v, each shaped and typed like its input."""
    batch, heads_q, seq_len, head_dim = q.shape
    heads_kv = k.shape[1]
    prefix_len = prefix_k.shape[-2]
    group_size = heads_q // heads_kv
    dq = _new_output(q.shape, q.dtype, q.device)  # (B, Hq, N, D)
    dk = _new_output(k.shape, k.dtype, k.device)  # (B, Hkv, N, D)
    dv = _new_output(v.shape, v.dtype, v.device)
    # The prefix gradient is written per sample, (B, Hkv, P, D) in fp32, by the same dk/dv kernel
    # that handles sequence keys, and a shared prefix's is then summed over the batch by one
    # torch .sum(0). Why not in the kernel: accumulating B samples in one program serialises the
    # batch on only cdiv(P, BLOCK) × Hkv programs (P is ~10: a handful of programs on a GPU with
    # 132 SMs), and fp32 atomics would make the result run-to-run nondeterministic. The partial
    # buffer is tiny (B·Hkv·P·D fp32, 1.3 MB at LLaMA-7B shapes) and the sum is exact up to fp32
    # rounding, deterministic, and in fp32 before the single rounding to the prefix's dtype.
    dprefix_k = _new_output((batch, heads_kv, prefix_len, head_dim), torch.float32, q.device)  # (B, Hkv, P, D)
    dprefix_v = _new_output((batch, heads_kv, prefix_len, head_dim), torch.float32, q.device)
    if q.numel() > 0:
        delta = _new_output(lse.shape, torch.float32, q.device)  # (B, Hq, N), written by the dq kernel
        block_d = max(16, triton.next_power_of_2(head_dim))
        tiles = _tile_sizes(block_d, q.dtype, q.device)
        precision = _dot_precision(q.dtype)
        qk_scale = softmax_scale * _LOG2E
        kv_lens_arg = kv_lens if kv_lens is not None else q

        block_m, block_n, num_warps, num_stages = tiles["dq"]
        _prefix_attention_bwd_dq_kernel[(triton.cdiv(seq_len, block_m), batch * heads_q)](
            q, k, v, prefix_k, prefix_v, kv_lens_arg, out, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *out.stride(), *grad_out.stride(), *lse.stride(), *dq.stride(),
            heads_q, group_size, seq_len, prefix_len, head_dim, qk_scale, softmax_scale,
            CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=_prefix_tile(prefix_len, block_n), BLOCK_D=block_d,
            DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
        )

        block_m, block_n, num_warps, num_stages = tiles["dkdv"]
        common = dict(BLOCK_M=block_m, BLOCK_D=block_d, DOT_PRECISION=precision,
                      num_warps=num_warps, num_stages=num_stages)
        _prefix_attention_bwd_dkdv_kernel[(triton.cdiv(seq_len, block_n), batch * heads_kv)](
            q, k, v, kv_lens_arg, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
            *dk.stride(), *dv.stride(),
            heads_kv, group_size, seq_len, seq_len, head_dim, qk_scale, softmax_scale,
            CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, BLOCK_N=block_n, **common,
        )
        if prefix_len > 0:
            block_p = _prefix_tile(prefix_len, block_n)
            _prefix_attention_bwd_dkdv_kernel[(triton.cdiv(prefix_len, block_p), batch * heads_kv)](
                q, prefix_k, prefix_v, q, grad_out, lse, delta, dprefix_k, dprefix_v,
                *q.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
                *grad_out.stride(), *lse.stride(), *dprefix_k.stride(), *dprefix_v.stride(),
                heads_kv, group_size, seq_len, prefix_len, head_dim, qk_scale, softmax_scale,
                CAUSAL=False, HAS_KV_LENS=False, BLOCK_N=block_p, **common,
            )
    elif prefix_len > 0:
        dprefix_k.zero_()  # no query at all (B = 0 or N = 0): nothing flows to the prefix
        dprefix_v.zero_()
    if prefix_k.dim() == 3:
        dprefix_k = dprefix_k.sum(0)  # (Hkv, P, D): shared prefix, batch reduced
        dprefix_v = dprefix_v.sum(0)
    return dq, dk, dv, dprefix_k.to(prefix_k.dtype), dprefix_v.to(prefix_v.dtype)


# ---------------------------------------------------------------------------------------------
# Custom op and autograd: torch.compile sees one opaque op forward and one backward
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("m2pt_kernels::prefix_attention_forward", mutates_args=())
def _prefix_attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    kv_lens: torch.Tensor | None, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    with launching_on(q.device):
        return _forward(q, k, v, prefix_k, prefix_v, kv_lens, causal, softmax_scale)


# The fake (meta) implementations must promise the strides the real ones produce, or compiled code
# downstream would index the outputs wrongly: every output is a fresh contiguous tensor, whatever the
# layout of the inputs (empty_like would copy a transposed q's strides).
@_prefix_attention_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, kv_lens, causal, softmax_scale):
    batch, heads_q, seq_len, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seq_len), dtype=torch.float32)


@torch.library.custom_op("m2pt_kernels::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, kv_lens: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with launching_on(q.device):
        return _backward(grad_out, q, k, v, prefix_k, prefix_v, kv_lens, out, lse, causal, softmax_scale)


@_prefix_attention_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, kv_lens, out, lse, causal, softmax_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, kv_lens, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, kv_lens, out, lse)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale


def _backward_formula(ctx, grad_out, grad_lse):
    # The LSE is an internal output (saved for backward, never returned by prefix_attention), so
    # grad_lse is always None or zero.
    q, k, v, prefix_k, prefix_v, kv_lens, out, lse = ctx.saved_tensors
    dq, dk, dv, dprefix_k, dprefix_v = _prefix_attention_backward_op(
        grad_out, q, k, v, prefix_k, prefix_v, kv_lens, out, lse, ctx.causal, ctx.softmax_scale
    )
    return dq, dk, dv, dprefix_k, dprefix_v, None, None, None


_prefix_attention_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, prefix_k, prefix_v, kv_lens) -> None:
    def fail(message: str):
        raise ValueError(f"prefix_attention: {message}")

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        fail(f"q, k, v must be (B, H, N, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads_q, seq_len, head_dim = q.shape
    if k.shape != v.shape:
        fail(f"k and v must have one shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads_kv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        fail(f"k must be (B, Hkv, N, D) = ({batch}, Hkv, {seq_len}, {head_dim}) to match q "
             f"{tuple(q.shape)}; got {tuple(k.shape)}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        fail(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv}) (GQA/MQA)")
    if (prefix_k is None) != (prefix_v is None):
        fail("pass both prefix_k and prefix_v, or neither")
    tensors = {"q": q, "k": k, "v": v}
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            fail(f"prefix_k and prefix_v must have one shape; got {tuple(prefix_k.shape)}, {tuple(prefix_v.shape)}")
        shared = prefix_k.dim() == 3 and prefix_k.shape[0] == heads_kv and prefix_k.shape[2] == head_dim
        per_sample = prefix_k.dim() == 4 and (prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[3]) == (
            batch, heads_kv, head_dim)
        if not (shared or per_sample):
            fail(f"prefix_k must be (Hkv, P, D) = ({heads_kv}, P, {head_dim}) shared by the batch or "
                 f"(B, Hkv, P, D) = ({batch}, {heads_kv}, P, {head_dim}) per sample; got {tuple(prefix_k.shape)}")
        tensors.update(prefix_k=prefix_k, prefix_v=prefix_v)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        fail(f"all inputs must share one dtype; got {dtypes} (cast them to q's dtype)")
    if not q.is_floating_point():
        fail(f"inputs must be floating point; got {q.dtype}")
    devices = {name: t.device for name, t in tensors.items()}
    if kv_lens is not None:
        if kv_lens.shape != (batch,) or kv_lens.dtype not in (torch.int32, torch.int64):
            fail(f"kv_lens must be an int32/int64 tensor of shape ({batch},); "
                 f"got {kv_lens.dtype} {tuple(kv_lens.shape)}")
        devices["kv_lens"] = kv_lens.device
    if len(set(devices.values())) != 1:
        fail(f"all tensors must be on one device; got {devices}")


# torch.amp.is_autocast_available, asked once per device type outside any trace: torch 2.11's dynamo
# cannot trace it (a fullgraph torch.compile of a caller fails), later releases can.
_AUTOCAST_AVAILABLE = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta", "xpu", "mps")}


def _autocast_available(device_type: str) -> bool:
    known = _AUTOCAST_AVAILABLE.get(device_type)
    return torch.amp.is_autocast_available(device_type) if known is None else known


def prefix_attention(
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
    """Softmax attention of q over the keys [prefix_k ; k] and values [prefix_v ; v].

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq a multiple of Hkv (GQA / MQA).
    prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or (B, Hkv, P, D) per sample; P may be 0,
    or both None for no prefix. All in one float dtype (fp16, bf16, fp32 on the kernel; fp64 runs
    the reference) on one device.
    causal: query i sees sequence keys j <= i; every query always sees all P prefix keys (the mask
    is aligned bottom-right on the concatenation, as in flash-attn, not top-left as SDPA's
    is_causal).
    softmax_scale: defaults to 1 / sqrt(D).
    kv_lens: (B,) int32/int64, optional; sequence keys at positions >= kv_lens[b] are padding
    (values are clamped to [0, N]). Queries are never masked; a query that sees no key at all
    (P = 0 and kv_lens[b] = 0) outputs 0 and passes no gradient.
    Returns (B, Hq, N, D) in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v; a shared
    prefix receives its gradient summed over the batch.

    Runs the Triton kernels on CUDA tensors of sm_80 (Ampere) or newer GPUs (and on fp16/fp32 CPU
    tensors under TRITON_INTERPRET=1), the pure-PyTorch reference otherwise. Under torch.autocast,
    all five tensors are cast to the autocast dtype first. To torch.compile the kernel path is a
    single custom op.
    """
    # is_autocast_enabled raises for a device type autocast does not know (meta, used to trace
    # shapes and count work): such a device has no autocast to honour.
    if _autocast_available(q.device.type) and torch.is_autocast_enabled(q.device.type):
        # Like SDPA under autocast: attention runs in the autocast dtype, whatever the inputs'
        # (typically bf16 activations meeting fp32 prefix parameters).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v, prefix_k, prefix_v = (None if t is None else t.to(dtype) for t in (q, k, v, prefix_k, prefix_v))
    _check_inputs(q, k, v, prefix_k, prefix_v, kv_lens)
    head_dim = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    on_kernel = (
        q.dtype in _KERNEL_DTYPES
        and head_dim <= _MAX_HEAD_DIM
        # The interpreter's bf16 tl.dot returns garbage: bf16 on CPU always takes the reference.
        and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
        and (_dispatch.meta_takes_kernels(q, k, v, prefix_k, prefix_v, kv_lens)
             or use_triton(q, k, v, prefix_k, prefix_v, kv_lens) and _kernel_runs_on(q.device))
    )
    if not on_kernel:
        return prefix_attention_reference(
            q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale, kv_lens=kv_lens
        )
    if prefix_k is None:
        heads_kv = k.shape[1]
        prefix_k = q.new_empty((heads_kv, 0, head_dim))  # (Hkv, 0, D): the kernels skip an empty prefix
        prefix_v = prefix_k
    out, _ = _prefix_attention_forward_op(q, k, v, prefix_k, prefix_v, kv_lens, causal, float(softmax_scale))
    return out
