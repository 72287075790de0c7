"""Flash attention for VALL-E's transformer blocks, forward and backward, in Triton.

    logits[i, j] = scale * q_i . k_j + mask[i, j]         (hidden entries: -inf)
    out_i        = softmax_j(logits[i, :]) v

Shapes: q (B, H, T, hd), k and v (B, H, S, hd), out (B, H, T, hd), any strides with a unit
last stride: the module hands over head views of its packed QKV projection, (B, T, 3, H, hd),
and takes the output back time-major, (B, T, H, hd), so neither side copies.

Masks, combinable:
    causal     bottom-right aligned: query i sees keys j <= i + S - T. With S - T cached frames
               before T new ones, each new frame sees exactly its past (for S == T, the lower
               triangle).
    MASK_BOOL  bool (viewed as uint8, 1 = may attend), broadcastable to (B, H, T, S): passed as
               its expanded view (stride 0 on broadcast dims), never copied.
    MASK_ADD   float, added to the logits, broadcast the same way.
    MASK_ROW   the mask does not vary along T (a key padding mask, (B, 1, 1, S)): loaded once per
               key tile as a vector.
    KEND       (B * H,) int32: with a bool row mask, 1 + the last key any query may see. Key
               tiles past it (right padding) are skipped in every kernel.

Rows that see no key output 0 and get lse = +inf, so exp(logit - lse) = 0 in the backward.
The softmax runs on the logits in natural units, m and lse included, so that lse = m exactly
where one key dominates (log l below half an ulp of m) and the backward's exp(logit - lse) is 1
there, bit for bit (a base-2 lse stored in natural units cannot round-trip). Statistics,
accumulators and gradients are fp32 in registers; lse is stored in natural-log units, fp32.
For fp32 inputs (exact_delta_for) the backward also sums delta = sum_j p dp and sum_j p from
its own p and dp, in one more sweep of the dq kernel, and normalises p by that sum: its row
gradients then sum to zero as autograd's softmax backward's do, which delta = do . out and the
rounding of lse break when the softmax saturates (|logits| in the hundreds).
Tiles are split in two loops: those every query of the tile sees whole (no causal or boundary
test) and the edge tiles on the diagonal or past S.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _masked_logits(
    s,
    offs_m,
    offs_n,
    T,
    S,
    M,
    m_base,
    s_mt,
    s_ms,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
):
    """s (BLOCK_M, BLOCK_N), logits, with the mask applied: -inf where hidden."""
    in_s = offs_n < S
    if MASK_MODE != 0:
        if MASK_ROW:
            mv = tl.load(M + m_base + offs_n * s_ms, mask=in_s, other=0)[None, :]
        else:
            mv = tl.load(
                M + m_base + offs_m[:, None] * s_mt + offs_n[None, :] * s_ms,
                mask=(offs_m[:, None] < T) & in_s[None, :],
                other=0,
            )
        if MASK_MODE == 1:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32)
    if EDGE:
        valid = in_s[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (S - T))
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _key_range(
    pid_m, bh, T, S, KEND, HAS_KEND: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M, BLOCK_N
):
    """[0, full) key tiles every query of query tile pid_m sees whole, [full, hi) the edge."""
    hi = S
    if HAS_KEND:
        hi = tl.minimum(hi, tl.load(KEND + bh))
    full = hi
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + S - T)  # the tile's last query sees < this
        full = tl.minimum(hi, pid_m * BLOCK_M + S - T + 1)  # the tile's first query sees < this
    hi = tl.maximum(hi, 0)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_ptr,
    v_ptr,
    s_kt,
    s_vt,
    M,
    m_base,
    s_mt,
    s_ms,
    offs_m,
    offs_d,
    lo,
    hi,
    T,
    S,
    hd,
    scale,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_d = offs_d < hd
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_nd = (offs_n[:, None] < S) & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * s_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = _masked_logits(
            s, offs_m, offs_n, T, S, M, m_base, s_mt, s_ms, EDGE, CAUSAL, MASK_MODE, MASK_ROW
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    M,
    KEND,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_ob,
    s_oh,
    s_ot,
    s_mb,
    s_mh,
    s_mt,
    s_ms,
    H,
    T,
    S,
    hd,
    scale,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = (offs_m[:, None] < T) & (offs_d[None, :] < hd)
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=mask_md, other=0.0
    )
    k_ptr = K + b * s_kb + h * s_kh
    v_ptr = V + b * s_vb + h * s_vh
    m_base = b * s_mb + h * s_mh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _key_range(pid_m, bh, T, S, KEND, HAS_KEND, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_ptr,
        v_ptr,
        s_kt,
        s_vt,
        M,
        m_base,
        s_mt,
        s_ms,
        offs_m,
        offs_d,
        0,
        full,
        T,
        S,
        hd,
        scale,
        False,
        CAUSAL,
        MASK_MODE,
        MASK_ROW,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_ptr,
        v_ptr,
        s_kt,
        s_vt,
        M,
        m_base,
        s_mt,
        s_ms,
        offs_m,
        offs_d,
        full,
        hi,
        T,
        S,
        hd,
        scale,
        True,
        CAUSAL,
        MASK_MODE,
        MASK_ROW,
        BLOCK_N,
        PRECISION,
    )
    empty = l_i == 0.0  # no visible key: output 0, as the reference
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=mask_md,
    )
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _attn_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    s_ob,
    s_oh,
    s_ot,
    s_dob,
    s_doh,
    s_dot,
    H,
    T,
    hd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = do_i . out_i, (B * H, T) fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < hd)
    o = tl.load(
        O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _logit_grad(p, dp, delta, s):
    """dS = P (dP - delta); 0 where the logit is hidden (-inf), also in a NaN row, as autograd
    through the oracle's masked_fill gives."""
    return tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None]))


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_ptr,
    do_ptr,
    s_qt,
    s_dot,
    LSE,
    DELTA,
    NORM,
    row_base,
    M,
    m_base,
    s_mt,
    s_ms,
    offs_n,
    offs_d,
    lo,
    hi,
    T,
    S,
    hd,
    scale,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
):
    # Queries past T load as 0 with lse = +inf and are hidden (their 0 times an Inf key would
    # be a NaN logit, and a NaN p or dS reaches dK and dV through the products); keys past S
    # are never stored.
    offs_m0 = tl.arange(0, BLOCK_M)
    mask_d = offs_d < hd
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + offs_m0
        mask_m = offs_m < T
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + offs_m[:, None] * s_qt + offs_d[None, :], mask=mask_md, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = _masked_logits(
            s, offs_m, offs_n, T, S, M, m_base, s_mt, s_ms, EDGE, CAUSAL, MASK_MODE, MASK_ROW
        )
        s = tl.where(mask_m[:, None], s, float("-inf"))
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf"))
        p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if EXACT_DELTA:  # 1 / sum(p) of each row, from the dq kernel's sweep
            p = p * tl.load(NORM + row_base + offs_m, mask=mask_m, other=0.0)[:, None]
        do = tl.load(do_ptr + offs_m[:, None] * s_dot + offs_d[None, :], mask=mask_md, other=0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        ds = _logit_grad(p, dp, delta, s)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    NORM,
    DK,
    DV,
    M,
    KEND,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_dob,
    s_doh,
    s_dot,
    s_dkb,
    s_dkh,
    s_dkt,
    s_dvb,
    s_dvh,
    s_dvt,
    s_mb,
    s_mh,
    s_mt,
    s_ms,
    H,
    T,
    S,
    hd,
    scale,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (offs_n[:, None] < S) & (offs_d[None, :] < hd)
    k = tl.load(
        K + b * s_kb + h * s_kh + offs_n[:, None] * s_kt + offs_d[None, :], mask=mask_nd, other=0.0
    )
    v = tl.load(
        V + b * s_vb + h * s_vh + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_nd, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # query tiles [lo, full) straddle the causal diagonal; [full, T) see the whole key tile
    lo = 0
    full = 0
    hi = T
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum((pid_n + 1) * BLOCK_N - 1 - (S - T), 0), T)
        full = tl.maximum(lo, (full + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    if HAS_KEND:  # a tile of keys nobody sees: no query tiles, its gradients are 0
        seen = pid_n * BLOCK_N < tl.load(KEND + bh)
        lo = tl.where(seen, lo, 0)
        full = tl.where(seen, full, 0)
        hi = tl.where(seen, hi, 0)
    q_ptr = Q + b * s_qb + h * s_qh
    do_ptr = DO + b * s_dob + h * s_doh
    row_base = bh.to(tl.int64) * T
    m_base = b * s_mb + h * s_mh
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        q_ptr,
        do_ptr,
        s_qt,
        s_dot,
        LSE,
        DELTA,
        NORM,
        row_base,
        M,
        m_base,
        s_mt,
        s_ms,
        offs_n,
        offs_d,
        lo,
        tl.minimum(full, hi),
        T,
        S,
        hd,
        scale,
        True,
        CAUSAL,
        MASK_MODE,
        MASK_ROW,
        BLOCK_M,
        PRECISION,
        EXACT_DELTA,
    )
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        q_ptr,
        do_ptr,
        s_qt,
        s_dot,
        LSE,
        DELTA,
        NORM,
        row_base,
        M,
        m_base,
        s_mt,
        s_ms,
        offs_n,
        offs_d,
        full,
        hi,
        T,
        S,
        hd,
        scale,
        False,
        CAUSAL,
        MASK_MODE,
        MASK_ROW,
        BLOCK_M,
        PRECISION,
        EXACT_DELTA,
    )
    tl.store(
        DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=mask_nd,
    )
    tl.store(
        DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask_nd,
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    norm,
    k_ptr,
    v_ptr,
    s_kt,
    s_vt,
    M,
    m_base,
    s_mt,
    s_ms,
    offs_m,
    offs_d,
    lo,
    hi,
    T,
    S,
    hd,
    scale,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
    DELTA_PASS: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_d = offs_d < hd
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_nd = (offs_n[:, None] < S) & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * s_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = _masked_logits(
            s, offs_m, offs_n, T, S, M, m_base, s_mt, s_ms, EDGE, CAUSAL, MASK_MODE, MASK_ROW
        )
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DELTA_PASS:  # the sums of p and of p * dp, from the very p and dp the gradients use
            norm += tl.sum(p, axis=1)
            delta += tl.sum(p * dp, axis=1)
        else:
            if EXACT_DELTA:
                p = p * norm[:, None]
            ds = _logit_grad(p, dp, delta, s)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq, delta, norm


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    NORM,
    DQ,
    M,
    KEND,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_dob,
    s_doh,
    s_dot,
    s_dqb,
    s_dqh,
    s_dqt,
    s_mb,
    s_mh,
    s_mt,
    s_ms,
    H,
    T,
    S,
    hd,
    scale,
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_md = mask_m[:, None] & (offs_d[None, :] < hd)
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=mask_md, other=0.0
    )
    do = tl.load(
        DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    row_base = bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf"))
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if EXACT_DELTA:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_ptr = K + b * s_kb + h * s_kh
    v_ptr = V + b * s_vb + h * s_vh
    m_base = b * s_mb + h * s_mh
    full, hi = _key_range(pid_m, bh, T, S, KEND, HAS_KEND, CAUSAL, BLOCK_M, BLOCK_N)
    # With EXACT_DELTA, a first sweep over the keys sums p and p * dp from this kernel's own p
    # and dp; the second sweep accumulates dq from p / sum(p) and delta = sum(p dp) / sum(p).
    # Then the gradient of a row sums to zero to fp32 rounding, as autograd's softmax backward
    # does, even where |lse| is large (a saturated softmax) and the lse's own rounding, ulp(lse),
    # would otherwise scale every p of the row and leave a sum(ds) far above the true ds.
    for stage in tl.static_range(0 if EXACT_DELTA else 1, 2):
        dq, delta, norm = _dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            norm,
            k_ptr,
            v_ptr,
            s_kt,
            s_vt,
            M,
            m_base,
            s_mt,
            s_ms,
            offs_m,
            offs_d,
            0,
            full,
            T,
            S,
            hd,
            scale,
            False,
            CAUSAL,
            MASK_MODE,
            MASK_ROW,
            BLOCK_N,
            PRECISION,
            EXACT_DELTA,
            stage == 0,  # the delta sweep
        )
        dq, delta, norm = _dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            norm,
            k_ptr,
            v_ptr,
            s_kt,
            s_vt,
            M,
            m_base,
            s_mt,
            s_ms,
            offs_m,
            offs_d,
            full,
            hi,
            T,
            S,
            hd,
            scale,
            True,
            CAUSAL,
            MASK_MODE,
            MASK_ROW,
            BLOCK_N,
            PRECISION,
            EXACT_DELTA,
            stage == 0,  # the delta sweep
        )
        if stage == 0:
            empty = norm == 0.0  # rows that see no key: p = 0
            norm = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, norm))
            delta = delta * norm
            tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)
            tl.store(NORM + row_base + offs_m, norm, mask=mask_m)
    tl.store(
        DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=mask_md,
    )


# ---------------------------------------------------------------------------------------------
# Launchers


def fwd_config(hd: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles and launch settings of the forward (also used by the ahead-of-time compile test)."""
    block_d = max(16, triton.next_power_of_2(hd))
    if device.type == "cpu":  # the interpreter: small tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    warps = 4 if block_d <= 64 else 8
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=warps, num_stages=3)


def bwd_config(hd: int, dtype: torch.dtype, device: torch.device) -> dict:
    block_d = max(16, triton.next_power_of_2(hd))
    if device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    warps = 4 if block_d <= 64 else 8
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=warps, num_stages=2)


def exact_delta_for(dtype: torch.dtype) -> bool:
    """Whether the backward sums delta_i = sum_j p_ij dp_ij from its own p and dp (one more
    sweep over the keys, two more dots per tile) instead of delta_i = do_i . out_i."""
    return dtype == torch.float32


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get full-precision products (no TF32); fp16/bf16 use the tensor cores as is
    return "ieee" if q.dtype == torch.float32 else "tf32"


def mask_args(mask: torch.Tensor | None, B: int, H: int, T: int, S: int) -> tuple:
    """(mode, row, tensor, strides (b, h, t, s), key_end (B * H,) int32 or None), no copies of
    the mask (key_end is computed from it: (B, H, S) work, on the device, no sync)."""
    if mask is None:
        return MASK_NONE, False, None, (0, 0, 0, 0), None
    full = mask.expand(B, H, T, S)
    row = T == 1 or full.stride(2) == 0
    if mask.dtype != torch.bool:
        return MASK_ADD, row, full, full.stride(), None
    full = full.view(torch.uint8)
    key_end = None
    if row:
        # 1 + the last visible key of each (b, h); 0 when none
        positions = torch.arange(1, S + 1, device=mask.device, dtype=torch.int32)
        visible = full[:, :, 0, :] * positions
        key_end = (visible.amax(dim=-1) if S else visible.sum(dim=-1)).to(torch.int32)
        key_end = key_end.reshape(B * H).contiguous()
    return MASK_BOOL, row, full, full.stride(), key_end


def _grid_check(B: int, H: int) -> None:
    if B * H > 65535:
        raise ValueError(f"attention: B * H = {B * H} > 65535 (the launch grid's second axis)")


def attention_fwd(q, k, v, out, mask, causal: bool, scale: float) -> torch.Tensor:
    """Writes out (B, H, T, hd) (any strides, unit last); returns lse (B, H, T) fp32."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    _grid_check(B, H)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    mode, row, m, m_strides, key_end = mask_args(mask, B, H, T, S)
    cfg = fwd_config(hd, q.dtype, q.device)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        m,
        key_end,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *m_strides,
        H,
        T,
        S,
        hd,
        scale,
        CAUSAL=causal,
        MASK_MODE=mode,
        MASK_ROW=row,
        HAS_KEND=key_end is not None,
        PRECISION=_precision(q),
        **cfg,
    )
    return lse


def attention_bwd(do, q, k, v, out, lse, mask, causal: bool, scale: float, dq, dk, dv) -> None:
    """Writes dq (B, H, T, hd), dk and dv (B, H, S, hd) (any strides, unit last)."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    _grid_check(B, H)
    mode, row, m, m_strides, key_end = mask_args(mask, B, H, T, S)
    cfg = bwd_config(hd, q.dtype, q.device)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    exact_delta = exact_delta_for(q.dtype)
    norm = torch.empty_like(delta) if exact_delta else delta  # 1 / sum_j p_ij per row
    if not exact_delta:
        _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](
            out,
            do,
            delta,
            *out.stride()[:3],
            *do.stride()[:3],
            H,
            T,
            hd,
            BLOCK_M=64,
            BLOCK_D=cfg["BLOCK_D"],
        )
    flags = dict(CAUSAL=causal, MASK_MODE=mode, MASK_ROW=row, HAS_KEND=key_end is not None)
    # the dq kernel first: with exact_delta it writes the delta the dK/dV kernel reads
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        norm,
        dq,
        m,
        key_end,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *dq.stride()[:3],
        *m_strides,
        H,
        T,
        S,
        hd,
        scale,
        PRECISION=_precision(q),
        EXACT_DELTA=exact_delta,
        **flags,
        **cfg,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        norm,
        dk,
        dv,
        m,
        key_end,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        *m_strides,
        H,
        T,
        S,
        hd,
        scale,
        PRECISION=_precision(q),
        EXACT_DELTA=exact_delta,
        **flags,
        **cfg,
    )
