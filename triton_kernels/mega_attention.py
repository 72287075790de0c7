"""MEGA's single-head (chunked) gated attention in Triton: flash-style forward and backward.

Per block (one chunk, or the whole sequence), with block lengths (lq, lk):

    logits[i, j] = scale * q_i . k_j + bias(i, j),   masked -> -inf
    out_i        = softmax_j(logits[i, :]) v          (rows with no visible key: 0)

    masked:  causal (query i sits at key position lk - lq + i, so j > lk - lq + i is hidden) and
             key padding (already adjusted: a block whose keys are all padding is unmasked).

Blocks are a free view of the inputs: block g = b * NBLK + c covers rows [c * lq, (c + 1) * lq)
of batch row b, so the chunked mode (B * nc blocks of c x c) and the full mode (B blocks of
Lq x Lk) share one kernel, reading q, k, v, dout through their strides (time-major views welcome,
nothing is copied).

The bias comes in one of two forms, shared by every block:
    REL   a vector of length lq + lk - 1 with bias(i, j) = rel[j - i + lq - 1] (MEGA's "simple"
          relative-position bias): gathered per tile, nothing lq x lk is built; its gradient is
          the sum of dlogits along each diagonal, reduced deterministically (below).
    DENSE an (lq, lk) matrix read through its strides; its gradient is the sum of dlogits over
          the blocks (a (blocks, lq, lk) fp32 workspace, summed in PyTorch: deterministic).

V is tiled. The values are wide (MEGA: K = 64..256, V = 1024 or more), so a program cannot hold a
row of the output: the forward and the dV kernel run one program per (query or key tile, V tile)
and recompute the logits for their V tile. The logits cost K per entry against BLOCK_V for the
P @ V product, so the recomputation adds K / BLOCK_V of the P @ V work (1x at K = BLOCK_V = 128)
and buys B * L / BLOCK_M * V / BLOCK_V independent programs, which the short label sequences of a
transducer decoder need to fill a GPU. dP = dO V^T contracts over all of V, so the dK and dQ
kernels loop over V tiles for it; no kernel ever holds more than a BLOCK_V slice of a value row.

Kernels (each grid is one flat axis, block-major, so neighbouring programs share their block's
q, k and v in L2), the backward's in launch order:
    _chunk_attention_fwd_kernel       (block, query tile, V tile): online softmax, out, lse
    _chunk_attention_bwd_dq_kernel    (block, query tile): a first sweep sums each row's p and
                                      p dp (delta and 1 / sum p, stored), a second dQ = scale dS K
                                      and the bias gradient
    _chunk_attention_bwd_dk_kernel    (block, key tile): dK = scale dS^T Q, dS = P (dP - delta)
    _chunk_attention_bwd_dv_kernel    (block, key tile, V tile): dV = P^T dO
P is exp(s - lse) / sum_j exp(s - lse) and delta = sum_j P dP, both from the kernels' own p and
dp rather than delta = dO . O: the output rounded to its dtype (and the rounding of lse) would
leave an error in every dS of a row that the oracle's softmax backward does not have (with one
visible key dS is exactly 0). A hidden logit (-inf) passes no gradient, also in a NaN row.
No atomics anywhere: every output element and workspace entry has exactly one writer, so the
backward is deterministic. Causal and key-padding limits skip whole tiles (loops stop at the last
visible key of the block).

Softmax statistics, accumulators and products of fp32 inputs are fp32 (`ieee`, no TF32). Gradients
are written in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BIAS_REL, BIAS_DENSE = 1, 2


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    LQ,
    LK,
    scale,
    BIAS,
    s_bi,
    s_bj,
    KPM,
    kpm_row,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr,
    TRANS: tl.constexpr,
):
    """Masked fp32 logits of one tile from loaded q (M, K) and k (N, K): (M, N), or with TRANS
    the keys-by-queries tile (N, M) for the dK and dV kernels, which then never transpose a
    register tile (with fp32 products that transpose sends ptxas into heavy spilling)."""
    if TRANS:
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale
        om = offs_m[None, :]
        on = offs_n[:, None]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        om = offs_m[:, None]
        on = offs_n[None, :]
    inside = (om < LQ) & (on < LK)
    if BIAS_MODE == 1:
        s += tl.load(BIAS + (on - om + LQ - 1) * s_bi, mask=inside, other=0.0).to(tl.float32)
    else:
        s += tl.load(BIAS + om * s_bi + on * s_bj, mask=inside, other=0.0).to(tl.float32)
    # rows and columns past the ends are hidden too: their zero-filled q or k times an Inf in
    # the other would be NaN, which dS = P (dP - delta) would carry into the dot products
    visible = inside
    if CAUSAL:
        visible = visible & (on <= om + (LK - LQ))
    if HAS_KPM:
        padded = tl.load(KPM + kpm_row + on, mask=on < LK, other=1)  # int8, 1 = padding
        visible = visible & (padded == 0)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _probs_t(
    q,
    k,
    offs_m,
    offs_n,
    LQ,
    LK,
    scale,
    BIAS,
    s_bi,
    s_bj,
    KPM,
    kpm_row,
    LSE,
    DELTA,
    row0,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The dK and dV kernels' keys-by-queries tile (N, M): the masked logits s and
    P^T = exp(s - lse) / sum(p), each query row normalised by the 1 / sum(p) that the dq
    kernel's first sweep stored (so every kernel differentiates the same P)."""
    s = _scores(
        q,
        k,
        offs_m,
        offs_n,
        LQ,
        LK,
        scale,
        BIAS,
        s_bi,
        s_bj,
        KPM,
        kpm_row,
        BIAS_MODE,
        CAUSAL,
        HAS_KPM,
        PRECISION,
        True,
    )
    mask_m = offs_m < LQ
    lse = tl.load(LSE + row0 + offs_m, mask=mask_m, other=float("inf"))
    norm = tl.load(DELTA + 2 * (row0 + offs_m) + 1, mask=mask_m, other=0.0)
    return s, tl.exp(s - lse[None, :]) * norm[None, :]


@triton.jit
def _logit_grad(p, dp, delta, s):
    """dS = P (dP - delta), 0 where the logit is hidden (-inf): no gradient passes there, also
    when the row's delta or a dP entry is NaN (autograd through the oracle's masked_fill)."""
    return tl.where(s == float("-inf"), 0.0, p * (dp - delta))


@triton.jit
def _load_2d(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c):
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _dp_tile(
    do_ptr,
    v_ptr,
    offs_m,
    offs_n,
    s_dol,
    s_dov,
    s_vl,
    s_vv,
    LQ,
    LK,
    VD,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
    TRANS: tl.constexpr,
):
    """dP = dO V^T for one tile (M, N), or dP^T = V dO^T (N, M) with TRANS, contracting over
    all of V in BLOCK_V slices."""
    offs_v0 = tl.arange(0, BLOCK_V)
    if TRANS:
        dp = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for v0 in range(0, VD, BLOCK_V):
        offs_v = v0 + offs_v0
        do = _load_2d(do_ptr, offs_m, offs_v, s_dol, s_dov, LQ, VD)
        v = _load_2d(v_ptr, offs_n, offs_v, s_vl, s_vv, LK, VD)
        if TRANS:
            dp += tl.dot(v, tl.trans(do), input_precision=PRECISION)
        else:
            dp += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return dp


@triton.jit
def _key_end(
    LQ, LK, m0, KEND, g, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr
):
    """One past the last key any query of the tile starting at m0 can see."""
    n_end = LK
    if CAUSAL:
        n_end = tl.minimum(n_end, LK - LQ + m0 + BLOCK_M)
    if HAS_KPM:
        n_end = tl.minimum(n_end, tl.load(KEND + g))  # everything after is padding
    return n_end


@triton.jit
def _query_range(
    LQ, LK, n0, KEND, g, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr
):
    """[m_start, m_end): the query tiles that can see a key of the tile starting at n0."""
    m_start = 0
    if CAUSAL:
        m_start = tl.maximum(n0 - (LK - LQ), 0) // BLOCK_M * BLOCK_M
    m_end = LQ
    if HAS_KPM:
        m_end = tl.where(n0 < tl.load(KEND + g), LQ, 0)  # a key tile of padding only: no work
    return m_start, m_end


@triton.jit
def _chunk_attention_fwd_kernel(
    Q,
    K,
    V,
    BIAS,
    KPM,
    KEND,
    O,
    LSE,
    s_qb,
    s_ql,
    s_qk,
    s_kb,
    s_kl,
    s_kk,
    s_vb,
    s_vl,
    s_vv,
    s_ob,
    s_ol,
    s_ov,
    s_bi,
    s_bj,
    NBLK,
    LQ,
    LK,
    KD,
    VD,
    scale,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program per (block g, query tile, V tile); V tiles of one query tile are neighbours
    pid = tl.program_id(0)
    n_vt = tl.cdiv(VD, BLOCK_V)
    n_mt = tl.cdiv(LQ, BLOCK_M)
    pid_v = pid % n_vt
    pid_m = (pid // n_vt) % n_mt
    g = pid // (n_vt * n_mt)
    b = (g // NBLK).to(tl.int64)
    c = (g % NBLK).to(tl.int64)
    q_ptr = Q + b * s_qb + c * LQ * s_ql
    k_ptr = K + b * s_kb + c * LK * s_kl
    v_ptr = V + b * s_vb + c * LK * s_vl
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    q = _load_2d(q_ptr, offs_m, offs_k, s_ql, s_qk, LQ, KD)
    kpm_row = g.to(tl.int64) * LK
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    n_end = _key_end(LQ, LK, m0, KEND, g, CAUSAL, HAS_KPM, BLOCK_M)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        k = _load_2d(k_ptr, offs_n, offs_k, s_kl, s_kk, LK, KD)
        s = _scores(
            q,
            k,
            offs_m,
            offs_n,
            LQ,
            LK,
            scale,
            BIAS,
            s_bi,
            s_bj,
            KPM,
            kpm_row,
            BIAS_MODE,
            CAUSAL,
            HAS_KPM,
            PRECISION,
            False,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_2d(v_ptr, offs_n, offs_v, s_vl, s_vv, LK, VD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # no visible key: output 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = O + b * s_ob + c * LQ * s_ol
    mask_m = offs_m < LQ
    tl.store(
        o_ptr + offs_m[:, None] * s_ol + offs_v[None, :] * s_ov,
        out.to(O.dtype.element_ty),
        mask=mask_m[:, None] & (offs_v[None, :] < VD),
    )
    if pid_v == 0:
        # lse = +inf on empty rows makes every probability exp(s - lse) 0 in the backward
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + g.to(tl.int64) * LQ + offs_m, lse, mask=mask_m)


@triton.jit
def _chunk_attention_bwd_dk_kernel(
    Q,
    K,
    V,
    BIAS,
    KPM,
    KEND,
    DO,
    LSE,
    DELTA,
    DK,
    s_qb,
    s_ql,
    s_qk,
    s_kb,
    s_kl,
    s_kk,
    s_vb,
    s_vl,
    s_vv,
    s_dob,
    s_dol,
    s_dov,
    s_bi,
    s_bj,
    NBLK,
    LQ,
    LK,
    KD,
    VD,
    scale,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program per (block g, key tile): dK = scale * dS^T Q, dS = P * (dO V^T - delta)
    pid = tl.program_id(0)
    n_nt = tl.cdiv(LK, BLOCK_N)
    pid_n = pid % n_nt
    g = pid // n_nt
    b = (g // NBLK).to(tl.int64)
    c = (g % NBLK).to(tl.int64)
    q_ptr = Q + b * s_qb + c * LQ * s_ql
    k_ptr = K + b * s_kb + c * LK * s_kl
    v_ptr = V + b * s_vb + c * LK * s_vl
    do_ptr = DO + b * s_dob + c * LQ * s_dol
    row0 = g.to(tl.int64) * LQ  # lse / delta of the block
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k = _load_2d(k_ptr, offs_n, offs_k, s_kl, s_kk, LK, KD)
    dk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    m_start, m_end = _query_range(LQ, LK, n0, KEND, g, CAUSAL, HAS_KPM, BLOCK_M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_m0
        mask_m = offs_m < LQ
        q = _load_2d(q_ptr, offs_m, offs_k, s_ql, s_qk, LQ, KD)
        s, p = _probs_t(
            q,
            k,
            offs_m,
            offs_n,
            LQ,
            LK,
            scale,
            BIAS,
            s_bi,
            s_bj,
            KPM,
            g.to(tl.int64) * LK,
            LSE,
            DELTA,
            row0,
            BIAS_MODE,
            CAUSAL,
            HAS_KPM,
            PRECISION,
        )  # (N, M): logits and P^T
        dp = _dp_tile(
            do_ptr,
            v_ptr,
            offs_m,
            offs_n,
            s_dol,
            s_dov,
            s_vl,
            s_vv,
            LQ,
            LK,
            VD,
            BLOCK_M,
            BLOCK_N,
            BLOCK_V,
            PRECISION,
            True,
        )
        delta = tl.load(DELTA + 2 * (row0 + offs_m), mask=mask_m, other=0.0)
        ds = _logit_grad(p, dp, delta[None, :], s)  # dS^T
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    dk_ptr = DK + (b * NBLK + c) * LK * KD  # DK is (B, Lk, K) contiguous
    mask_nk = (offs_n[:, None] < LK) & (offs_k[None, :] < KD)
    tl.store(
        dk_ptr + offs_n[:, None] * KD + offs_k[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=mask_nk,
    )


@triton.jit
def _chunk_attention_bwd_dv_kernel(
    Q,
    K,
    BIAS,
    KPM,
    KEND,
    DO,
    LSE,
    DELTA,
    DV,
    s_qb,
    s_ql,
    s_qk,
    s_kb,
    s_kl,
    s_kk,
    s_dob,
    s_dol,
    s_dov,
    s_bi,
    s_bj,
    NBLK,
    LQ,
    LK,
    KD,
    VD,
    scale,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program per (block g, key tile, V tile): dV = P^T dO, P recomputed per V tile
    pid = tl.program_id(0)
    n_vt = tl.cdiv(VD, BLOCK_V)
    n_nt = tl.cdiv(LK, BLOCK_N)
    pid_v = pid % n_vt
    pid_n = (pid // n_vt) % n_nt
    g = pid // (n_vt * n_nt)
    b = (g // NBLK).to(tl.int64)
    c = (g % NBLK).to(tl.int64)
    q_ptr = Q + b * s_qb + c * LQ * s_ql
    k_ptr = K + b * s_kb + c * LK * s_kl
    do_ptr = DO + b * s_dob + c * LQ * s_dol
    row0 = g.to(tl.int64) * LQ
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k = _load_2d(k_ptr, offs_n, offs_k, s_kl, s_kk, LK, KD)
    dv = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    m_start, m_end = _query_range(LQ, LK, n0, KEND, g, CAUSAL, HAS_KPM, BLOCK_M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_m0
        q = _load_2d(q_ptr, offs_m, offs_k, s_ql, s_qk, LQ, KD)
        _, p = _probs_t(
            q,
            k,
            offs_m,
            offs_n,
            LQ,
            LK,
            scale,
            BIAS,
            s_bi,
            s_bj,
            KPM,
            g.to(tl.int64) * LK,
            LSE,
            DELTA,
            row0,
            BIAS_MODE,
            CAUSAL,
            HAS_KPM,
            PRECISION,
        )  # (N, M): P^T
        do = _load_2d(do_ptr, offs_m, offs_v, s_dol, s_dov, LQ, VD)
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    dv_ptr = DV + (b * NBLK + c) * LK * VD  # DV is (B, Lk, V) contiguous
    tl.store(
        dv_ptr + offs_n[:, None] * VD + offs_v[None, :],
        dv.to(DV.dtype.element_ty),
        mask=(offs_n[:, None] < LK) & (offs_v[None, :] < VD),
    )


@triton.jit
def _chunk_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    BIAS,
    KPM,
    KEND,
    DO,
    LSE,
    DELTA,
    DQ,
    WS,
    s_qb,
    s_ql,
    s_qk,
    s_kb,
    s_kl,
    s_kk,
    s_vb,
    s_vl,
    s_vv,
    s_dob,
    s_dol,
    s_dov,
    s_bi,
    s_bj,
    NBLK,
    LQ,
    LK,
    KD,
    VD,
    scale,
    ws_row,
    BIAS_MODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program per (block g, query tile): dQ = scale * dS K, and dS into the bias gradient
    pid = tl.program_id(0)
    n_mt = tl.cdiv(LQ, BLOCK_M)
    pid_m = pid % n_mt
    g = pid // n_mt
    b = (g // NBLK).to(tl.int64)
    c = (g % NBLK).to(tl.int64)
    q_ptr = Q + b * s_qb + c * LQ * s_ql
    k_ptr = K + b * s_kb + c * LK * s_kl
    v_ptr = V + b * s_vb + c * LK * s_vl
    do_ptr = DO + b * s_dob + c * LQ * s_dol
    row0 = g.to(tl.int64) * LQ
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < LQ
    q = _load_2d(q_ptr, offs_m, offs_k, s_ql, s_qk, LQ, KD)
    lse = tl.load(LSE + row0 + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    # REL: the tile's diagonal sums from one gather: row i of dS rolled left by i,
    # rolled[i, d] = dS[i, (i + d) mod BLOCK_N], holds offset j - i = d where i + d < BLOCK_N
    # (`hi`, offsets 0 .. BLOCK_N - 1) and d - BLOCK_N elsewhere (`lo`, offsets -BLOCK_N .. -1);
    # needs BLOCK_M <= BLOCK_N. hi of tile n0 and lo of tile n0 + BLOCK_N are the same
    # diagonals: `carry` holds hi until then, so each entry of this program's workspace row is
    # written exactly once (deterministic, no atomics).
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_end = _key_end(LQ, LK, m0, KEND, g, CAUSAL, HAS_KPM, BLOCK_M)
    # Two sweeps over the keys. The first sums p and p * dp from this kernel's own p and dp, and
    # the second accumulates dQ and the bias gradient from p / sum(p) and delta = sum(p dp) /
    # sum(p): a row's dS then sums to zero to fp32 rounding, as the oracle's softmax backward
    # does, which delta = do . out (out rounded to its dtype) and the rounding of lse break
    # (with one visible key dS is exactly 0). Both are stored for the dK and dV kernels,
    # launched after: DELTA is (rows, 2), (delta, 1 / sum(p)) per row.
    for stage in tl.static_range(2):
        for n0 in range(0, n_end, BLOCK_N):
            offs_n = n0 + offs_n0
            k = _load_2d(k_ptr, offs_n, offs_k, s_kl, s_kk, LK, KD)
            s = _scores(
                q,
                k,
                offs_m,
                offs_n,
                LQ,
                LK,
                scale,
                BIAS,
                s_bi,
                s_bj,
                KPM,
                g.to(tl.int64) * LK,
                BIAS_MODE,
                CAUSAL,
                HAS_KPM,
                PRECISION,
                False,
            )
            p = tl.exp(s - lse[:, None])
            dp = _dp_tile(
                do_ptr,
                v_ptr,
                offs_m,
                offs_n,
                s_dol,
                s_dov,
                s_vl,
                s_vv,
                LQ,
                LK,
                VD,
                BLOCK_M,
                BLOCK_N,
                BLOCK_V,
                PRECISION,
                False,
            )
            if stage == 0:
                norm += tl.sum(p, axis=1)
                delta += tl.sum(p * dp, axis=1)
            else:
                p = p * norm[:, None]
                ds = _logit_grad(p, dp, delta[:, None], s)  # d logits
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                if BIAS_GRAD:
                    if BIAS_MODE == 1:
                        shift = tl.arange(0, BLOCK_M)[:, None] + offs_n0[None, :]
                        rolled = tl.gather(ds, shift % BLOCK_N, 1)
                        hi = tl.sum(tl.where(shift < BLOCK_N, rolled, 0.0), axis=0)
                        lo = tl.sum(tl.where(shift >= BLOCK_N, rolled, 0.0), axis=0)
                        # row (g, query tile); entry r + BLOCK_N holds offset r = j - i + LQ - 1
                        ws_off = pid.to(tl.int64) * ws_row + (n0 - m0 + LQ - 1) + offs_n0
                        tl.store(WS + ws_off, lo + carry)
                        carry = hi
                    else:
                        # DENSE: WS is (blocks, LQ, LK) fp32, each entry written by one program
                        ptrs = WS + row0 * LK + offs_m[:, None] * LK + offs_n[None, :]
                        tl.store(ptrs, ds, mask=mask_m[:, None] & (offs_n[None, :] < LK))
        if stage == 0:
            empty = norm == 0.0  # rows that see no key: p = 0
            norm = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, norm))
            delta = delta * norm
            tl.store(DELTA + 2 * (row0 + offs_m), delta, mask=mask_m)
            tl.store(DELTA + 2 * (row0 + offs_m) + 1, norm, mask=mask_m)
    if BIAS_GRAD:
        if BIAS_MODE == 1:
            n_next = tl.cdiv(tl.maximum(n_end, 0), BLOCK_N) * BLOCK_N  # the first tile not run
            tl.store(WS + pid.to(tl.int64) * ws_row + (n_next - m0 + LQ - 1) + offs_n0, carry)
    dq_ptr = DQ + (b * NBLK + c) * LQ * KD  # DQ is (B, Lq, K) contiguous
    tl.store(
        dq_ptr + offs_m[:, None] * KD + offs_k[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=mask_m[:, None] & (offs_k[None, :] < KD),
    )


# ---------------------------------------------------------------------------------------------
# Launchers


# GPU tiles (BLOCK_M, BLOCK_N, BLOCK_V, num_warps) per kernel, by the bytes of one q/k row
# (next_pow2(K) x element size). Chosen without a GPU: each is the largest that ptxas compiles
# for sm_90 without spilling (or with a few dozen bytes of stack), checked kernel by kernel.
# BLOCK_V of the dK and dQ kernels is the slice of V per dP = dO V^T step.
_GPU_TILES = {
    256: dict(fwd=(64, 64, 128, 8), dk=(64, 64, 64, 8), dv=(64, 64, 128, 8), dq=(32, 64, 64, 8)),
    512: dict(fwd=(64, 32, 128, 8), dk=(32, 32, 64, 8), dv=(64, 32, 128, 8), dq=(32, 32, 64, 8)),
    1024: dict(fwd=(32, 32, 64, 8), dk=(32, 32, 32, 8), dv=(32, 32, 64, 8), dq=(32, 32, 32, 8)),
}


def blocks(
    lq: int, lk: int, qk_size: int, v_size: int, device_type: str, elem_size: int = 2
) -> dict[str, dict]:
    """Launch parameters of each kernel ("fwd", "dk", "dv", "dq") for blocks of (lq, lk)
    queries and keys of `elem_size`-byte elements: BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_V, num_warps.

    BLOCK_K covers all of K in one tile (K <= 256). The forward's V tiles of 128 recompute the
    logits V / 128 times, which costs K / 128 of the P @ V work. Tiles shrink to the block
    (16 rows for a decoding step or a short chunk, with 4 warps), and the dQ kernel keeps
    BLOCK_M <= BLOCK_N for its diagonal sums. The interpreter gets 16 x 16 tiles with V tiles
    of 64, so that the tests cross tile boundaries everywhere.
    """
    bk = max(16, triton.next_power_of_2(qk_size))
    pm = max(16, triton.next_power_of_2(lq))
    pn = max(16, triton.next_power_of_2(lk))
    pv = max(16, triton.next_power_of_2(v_size))
    if device_type == "cpu":
        one = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, BLOCK_V=min(64, pv), num_warps=1)
        return {name: dict(one) for name in ("fwd", "dk", "dv", "dq")}
    tiles = _GPU_TILES[max(256, bk * elem_size)]
    out = {}
    for name, (bm, bn, bv, warps) in tiles.items():
        bm, bn = min(bm, pm), min(bn, pn)
        if name == "dq":
            bm = min(bm, bn)
        warps = 4 if min(bm, bn) == 16 else warps
        out[name] = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_V=min(bv, pv), num_warps=warps)
    return out


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get full-precision products (no TF32); fp16/bf16 use the tensor cores as is
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _geometry(q: torch.Tensor, k: torch.Tensor, chunk_size: int) -> tuple[int, int, int]:
    """(blocks per batch row, lq, lk): chunked mode is B * nc blocks of c x c."""
    lq, lk = q.shape[1], k.shape[1]
    if 0 < chunk_size < lk and lq == lk:
        return lk // chunk_size, chunk_size, chunk_size
    return 1, lq, lk


def _bias_args(bias: torch.Tensor) -> tuple[int, int, int]:
    if bias.dim() == 1:
        return BIAS_REL, bias.stride(0), 0
    return BIAS_DENSE, bias.stride(0), bias.stride(1)


def _padding(key_padding_mask, batch: int, nblk: int, lk: int):
    """(int8 (blocks, lk) padding with upstream's rule applied, key_end (blocks,) int32).

    Upstream leaves a block whose keys are all padding unmasked. key_end[g] is one past the last
    visible key of block g: the kernels stop there (exact for any mask).
    """
    if key_padding_mask is None:
        return None, None
    pad = key_padding_mask.reshape(batch, nblk, lk)
    pad = pad & ~pad.all(dim=-1, keepdim=True)
    positions = torch.arange(1, lk + 1, device=pad.device, dtype=torch.int32)
    key_end = ((~pad) * positions).amax(dim=-1).to(torch.int32).reshape(batch * nblk)
    # the kernels read row g at KPM + g * lk: contiguous, whatever the mask's strides (a
    # transposed mask keeps its strides through the elementwise ops and `.to`)
    return pad.to(torch.int8).contiguous().reshape(batch * nblk, lk), key_end


def chunk_attention_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    """-> (out (B, Lq, V) contiguous in q's dtype, lse (B, Lq) fp32, +inf on rows with no key).

    q (B, Lq, K), k (B, Lk, K), v (B, Lk, V) with any strides; bias (lq, lk) or (lq + lk - 1,)
    for blocks of (lq, lk) (see the module docstring); key_padding_mask (B, Lk) bool or None.
    """
    B, Lq, KD = q.shape
    VD = v.shape[2]
    nblk, lq, lk = _geometry(q, k, chunk_size)
    out = torch.empty((B, Lq, VD), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Lq), dtype=torch.float32, device=q.device)
    mode, s_bi, s_bj = _bias_args(bias)
    kpm, key_end = _padding(key_padding_mask, B, nblk, lk)
    cfg = blocks(lq, lk, KD, VD, q.device.type, q.element_size())["fwd"]
    grid = (B * nblk * triton.cdiv(lq, cfg["BLOCK_M"]) * triton.cdiv(VD, cfg["BLOCK_V"]),)
    _chunk_attention_fwd_kernel[grid](
        q,
        k,
        v,
        bias,
        kpm,
        key_end,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        s_bi,
        s_bj,
        nblk,
        lq,
        lk,
        KD,
        VD,
        scaling,
        BIAS_MODE=mode,
        CAUSAL=causal,
        HAS_KPM=kpm is not None,
        PRECISION=_precision(q),
        **cfg,
    )
    return out, lse


def chunk_attention_bwd(
    do, q, k, v, out, lse, bias, key_padding_mask, chunk_size, causal, scaling, bias_grad
):
    """-> (dq, dk, dv in the inputs' dtypes (contiguous), dbias in bias's dtype or None).

    The REL bias gradient is summed deterministically: each (block, query tile) program writes
    its diagonal sums to its own workspace row, and the rows are summed here; DENSE likewise
    from a (blocks, lq, lk) fp32 workspace.
    """
    B, Lq, KD = q.shape
    Lk, VD = k.shape[1], v.shape[2]
    nblk, lq, lk = _geometry(q, k, chunk_size)
    G = B * nblk
    lse = lse.contiguous()  # (B, Lq) = blocks x lq
    # (delta_i = sum_j p_ij dp_ij / sum_j p_ij, 1 / sum_j p_ij) per row, written by the dq
    # kernel (launched first) for the dK and dV kernels
    delta = torch.empty((B * Lq, 2), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Lq, KD), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Lk, KD), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Lk, VD), dtype=v.dtype, device=q.device)
    mode, s_bi, s_bj = _bias_args(bias)
    kpm, key_end = _padding(key_padding_mask, B, nblk, lk)
    cfg = blocks(lq, lk, KD, VD, q.device.type, q.element_size())
    flags = dict(BIAS_MODE=mode, CAUSAL=causal, HAS_KPM=kpm is not None, PRECISION=_precision(q))
    strides = (*q.stride(), *k.stride())
    tail = (s_bi, s_bj, nblk, lq, lk, KD, VD, scaling)
    n_mt, bn = triton.cdiv(lq, cfg["dq"]["BLOCK_M"]), cfg["dq"]["BLOCK_N"]
    ws, ws_row = None, 0
    if bias_grad and mode == BIAS_REL:
        ws_row = lq + lk + 2 * bn
        ws = torch.zeros((G * n_mt, ws_row), dtype=torch.float32, device=q.device)
    elif bias_grad:
        ws = torch.zeros((G, lq, lk), dtype=torch.float32, device=q.device)
    _chunk_attention_bwd_dq_kernel[(G * n_mt,)](
        q,
        k,
        v,
        bias,
        kpm,
        key_end,
        do,
        lse,
        delta,
        dq,
        ws,
        *strides,
        *v.stride(),
        *do.stride(),
        *tail,
        ws_row,
        BIAS_GRAD=ws is not None,
        **flags,
        **cfg["dq"],
    )
    _chunk_attention_bwd_dk_kernel[(G * triton.cdiv(lk, cfg["dk"]["BLOCK_N"]),)](
        q,
        k,
        v,
        bias,
        kpm,
        key_end,
        do,
        lse,
        delta,
        dk,
        *strides,
        *v.stride(),
        *do.stride(),
        *tail,
        **flags,
        **cfg["dk"],
    )
    n_nt, n_vt = triton.cdiv(lk, cfg["dv"]["BLOCK_N"]), triton.cdiv(VD, cfg["dv"]["BLOCK_V"])
    _chunk_attention_bwd_dv_kernel[(G * n_nt * n_vt,)](
        q,
        k,
        bias,
        kpm,
        key_end,
        do,
        lse,
        delta,
        dv,
        *strides,
        *do.stride(),
        *tail,
        **flags,
        **cfg["dv"],
    )
    dbias = None
    if ws is not None:
        if mode == BIAS_REL:
            ws = ws[:, bn : bn + lq + lk - 1]  # entry r + BLOCK_N holds offset r
        dbias = ws.sum(dim=0).to(bias.dtype)
    return dq, dk, dv, dbias
