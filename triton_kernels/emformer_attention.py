"""Emformer's segment attention in Triton, forward and backward, masks from integer arithmetic.

The streams stay where the module produced them (time-major, already projected, D = H * hd, any
strides with a unit last stride, e.g. column slices of a packed (T, B, 3D) projection; a stream
may have 0 rows, or be None where noted). Nothing is concatenated and no (Tq, Tk) mask exists:

    queries  q_rc (n*R, B, D) | q_utt (U, B, D) | q_sum (n or 0, B, D; None = 0 rows)
    keys     k_mem (Mr, B, D; None = 0) | k_rc (n*R) | k_lc (LCr; infer only) | k_utt (U)
    values   v_mem | v_rc | v_lc | v_utt, shaped as their keys

The result equals `seqkern.reference.emformer.emformer_attention_ref` on the concatenations
q = [q_rc; q_utt; q_sum], k = [k_mem; k_rc; k_lc; k_utt], v likewise, with this mask:

    training (no lc stream; n = ceil(U / s), Mr = n - 1 with memory, else 0): segment i owns rc
        block i (R rows), utterance rows [i*s, min((i+1)*s, U)) and summary row i (if q_sum has
        rows). Its rc and utterance rows see memory [max(i - M, 0), i), rc block i and utterance
        [max(i*s - LC, 0), min((i+1)*s, U)); its summary row sees the same except the memory.
    infer (the lc stream present, possibly with 0 rows; one segment, n = 1): every query sees
        every key except that the summary row does not see the memory. The state buffers are
        right-aligned: with `past_length` (a device int32 tensor, element [0] read in the
        kernel) only the last min(Mr, ceil(past / s)) memory rows and the last min(LCr, past) lc
        rows exist as keys (the others are not part of Tk at all); without it, all rows do.
    key padding (optional `key_lengths` (B,) int32): key number j of the valid keys in the
        order [mem | rc | lc | utt] is hidden from batch element b when j >= key_lengths[b] (as
        upstream's `_gen_padding_mask`, on top of the segment mask).

Logits are scale * q.k in fp32 and the softmax runs in base 2 (scale pre-multiplied by log2 e).
Masked entries take upstream's finite `negative_inf`; the kernel skips them (-inf), which is the
same thing for a row that sees at least one key (exp(-1e8 - max) is 0 in fp32). A row that sees
no key gets upstream's uniform distribution over all Tk (valid) keys: its output is the mean of
the valid value rows of its (b, h), its gradient goes to v only (dO / Tk to every valid key) and
none to q or k. Such rows exist only under key padding; the launchers then compute the value
means (forward) and the summed dO of those rows (backward) with cheap device ops, no sync.

Program mapping: one program per (segment, query tile, b * H + h). A segment's query rows are a
virtual list [rc block i (R) | its utterance rows | summary row i], tile t covers rows
[t * BLOCK_M, (t + 1) * BLOCK_M), each row's pointer picked from its stream; the program loops
over the visible rows of each key stream separately (each a contiguous range per segment), so
only visible tiles are visited. The output is ONE tensor (Tq, B, D), rows [rc | utt | sum], in
the query dtype; lse (B, H, Tq) fp32 is in natural-log units, +inf for rows that see no key.

Backward, no atomics (every output element has one writer; deterministic):
    _delta_kernel   (row tile, bh): delta = dO . out, and the fallback rows' dO sums per tile
    _dkdv_kernel    (key tile, bh), one launch per key stream: loops over the segments that see
                    the tile (memory row r: segments r+1..r+M; rc block i: segment i;
                    utterance frame u: segments u//s .. (u+LC)//s) and their query tiles
    _dq_kernel      (segment, query tile, bh): like the forward
Statistics, accumulators and products of fp32 inputs are fp32 ("ieee", no TF32); gradients are
written in the streams' dtype, into fresh contiguous tensors or caller-provided views.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

STREAM_MEM, STREAM_RC, STREAM_LC, STREAM_UTT = 0, 1, 2, 3
Q_STREAMS = ("q_rc", "q_utt", "q_sum")
KV_STREAMS = ("k_mem", "k_rc", "k_lc", "k_utt", "v_mem", "v_rc", "v_lc", "v_utt")
STREAMS = Q_STREAMS + KV_STREAMS


# ---------------------------------------------------------------------------------------------
# Index arithmetic shared by the kernels


@triton.jit
def _segment_rows(seg, offs_r, R, U, SEG, n_rc, has_sum):
    """Virtual rows offs_r of segment seg -> (is_rc, is_utt, is_sum, rc row, utterance row,
    output row). Rows past the segment's last row are none of the three."""
    seg_lo = seg * SEG
    seg_len = tl.minimum(SEG, U - seg_lo)
    is_rc = offs_r < R
    is_utt = (offs_r >= R) & (offs_r < R + seg_len)
    is_sum = (offs_r >= R + seg_len) & (offs_r < R + seg_len + has_sum)
    rc_row = seg * R + offs_r
    utt_row = seg_lo + offs_r - R
    out_row = tl.where(is_rc, rc_row, tl.where(is_utt, n_rc + utt_row, n_rc + U + seg))
    return is_rc, is_utt, is_sum, rc_row, utt_row, out_row


@triton.jit
def _row_ptrs(p_rc, p_utt, p_sum, s_rc, s_utt, s_sum, seg, is_rc, is_utt, rc_row, utt_row):
    """Per-row pointers into the three query-side streams (rows neither rc nor utterance point
    at summary row seg; the caller masks rows that are none of the three)."""
    return tl.where(
        is_rc,
        p_rc + rc_row.to(tl.int64) * s_rc,
        tl.where(is_utt, p_utt + utt_row.to(tl.int64) * s_utt, p_sum + seg * s_sum),
    )


@triton.jit
def _valid_counts(PAST, Mr, LCr, seg_len, HAS_PAST: tl.constexpr):
    """(valid memory rows, valid lc rows): the right-aligned state's last rows."""
    mv = Mr
    lcv = LCr
    if HAS_PAST:
        past = tl.maximum(tl.load(PAST), 0)
        mv = tl.minimum(Mr, (past + seg_len - 1) // seg_len)
        lcv = tl.minimum(LCr, past)
    return mv, lcv


@triton.jit
def _windows(seg, R, U, SEG, LC, MAXMEM, Mr, mv, LCr, lcv, INFER: tl.constexpr):
    """The visible row range [lo, hi) of each key stream for segment seg (the summary row
    additionally skips the memory)."""
    if INFER:
        mem_lo = Mr - mv
        mem_hi = Mr
        lc_lo = LCr - lcv
        lc_hi = LCr
        utt_lo = 0
        utt_hi = U
    else:
        mem_lo = tl.maximum(seg - MAXMEM, 0)
        mem_hi = tl.minimum(seg, Mr)
        lc_lo = 0
        lc_hi = 0
        utt_lo = tl.maximum(seg * SEG - LC, 0)
        utt_hi = tl.minimum((seg + 1) * SEG, U)
    rc_lo = seg * R
    rc_hi = rc_lo + R
    return mem_lo, mem_hi, rc_lo, rc_hi, lc_lo, lc_hi, utt_lo, utt_hi


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_keys(
    acc,
    l_i,
    m_i,
    q,
    row_ok,
    k_ptr,
    v_ptr,
    s_kt,
    s_vt,
    lo,
    hi,
    offs_d,
    hd,
    qk_scale,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over key rows [lo, hi) of one stream (hi already cut at the padding)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_d = offs_d < hd
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        key_ok = offs_n < hi
        mask_nd = key_ok[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + rows * s_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(row_ok[:, None] & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + rows * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q_RC,
    Q_UTT,
    Q_SUM,
    K_MEM,
    K_RC,
    K_LC,
    K_UTT,
    V_MEM,
    V_RC,
    V_LC,
    V_UTT,
    O,
    LSE,
    KLEN,
    PAST,
    MEANV,
    s_qrc_t,
    s_qrc_b,
    s_qu_t,
    s_qu_b,
    s_qs_t,
    s_qs_b,
    s_kmem_t,
    s_kmem_b,
    s_krc_t,
    s_krc_b,
    s_klc_t,
    s_klc_b,
    s_ku_t,
    s_ku_b,
    s_vmem_t,
    s_vmem_b,
    s_vrc_t,
    s_vrc_b,
    s_vlc_t,
    s_vlc_b,
    s_vu_t,
    s_vu_b,
    s_ot,
    s_ob,
    H,
    hd,
    N_SEG,
    TILES,
    R,
    U,
    SEG,
    LC,
    MAXMEM,
    Mr,
    LCr,
    has_sum,
    seg_len,
    Tq,
    qk_scale,
    INFER: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    seg = pid // TILES
    tile = pid % TILES
    b = (bh // H).to(tl.int64)
    hoff = (bh % H).to(tl.int64) * hd
    n_rc = N_SEG * R
    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < hd
    is_rc, is_utt, is_sum, rc_row, utt_row, out_row = _segment_rows(
        seg, offs_r, R, U, SEG, n_rc, has_sum
    )
    row_ok = is_rc | is_utt | is_sum
    mask_rd = row_ok[:, None] & mask_d[None, :]
    q_ptrs = _row_ptrs(
        Q_RC + b * s_qrc_b + hoff,
        Q_UTT + b * s_qu_b + hoff,
        Q_SUM + b * s_qs_b + hoff,
        s_qrc_t,
        s_qu_t,
        s_qs_t,
        seg,
        is_rc,
        is_utt,
        rc_row,
        utt_row,
    )
    q = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=mask_rd, other=0.0)

    mv, lcv = _valid_counts(PAST, Mr, LCr, seg_len, HAS_PAST)
    klen = 1073741824  # no key padding
    if HAS_KPM:
        klen = tl.load(KLEN + b)
    mem_lo, mem_hi, rc_lo, rc_hi, lc_lo, lc_hi, utt_lo, utt_hi = _windows(
        seg, R, U, SEG, LC, MAXMEM, Mr, mv, LCr, lcv, INFER
    )
    # key j of a stream is key number j + pos of the valid keys [mem | rc | lc | utt]: the
    # padding cuts each stream's range at key_lengths[b] - pos
    pos_mem = mv - Mr
    pos_rc = mv
    pos_lc = mv + n_rc - (LCr - lcv)
    pos_utt = mv + n_rc + lcv

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        is_rc | is_utt,  # the summary row does not see the memory
        K_MEM + b * s_kmem_b + hoff,
        V_MEM + b * s_vmem_b + hoff,
        s_kmem_t,
        s_vmem_t,
        mem_lo,
        tl.minimum(mem_hi, klen - pos_mem),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        row_ok,
        K_RC + b * s_krc_b + hoff,
        V_RC + b * s_vrc_b + hoff,
        s_krc_t,
        s_vrc_t,
        rc_lo,
        tl.minimum(rc_hi, klen - pos_rc),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        row_ok,
        K_LC + b * s_klc_b + hoff,
        V_LC + b * s_vlc_b + hoff,
        s_klc_t,
        s_vlc_t,
        lc_lo,
        tl.minimum(lc_hi, klen - pos_lc),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        row_ok,
        K_UTT + b * s_ku_b + hoff,
        V_UTT + b * s_vu_b + hoff,
        s_ku_t,
        s_vu_t,
        utt_lo,
        tl.minimum(utt_hi, klen - pos_utt),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    empty = l_i == 0.0  # saw no key
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_KPM:  # upstream's uniform distribution: the mean of the valid values
        mean_v = tl.load(MEANV + bh.to(tl.int64) * hd + offs_d, mask=mask_d, other=0.0)
        out = tl.where(empty[:, None], mean_v[None, :], out)
    tl.store(
        O + b * s_ob + hoff + out_row.to(tl.int64)[:, None] * s_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=mask_rd,
    )
    lse = tl.where(
        empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    tl.store(LSE + bh.to(tl.int64) * Tq + out_row, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _delta_kernel(
    O,
    DO,
    LSE,
    DELTA,
    WS,
    s_ot,
    s_ob,
    s_dot,
    s_dob,
    H,
    hd,
    Tq,
    HAS_FALLBACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = dO . out per row, (B, H, Tq) fp32; with the fallback, WS[tile, bh] = the sum of
    dO over the tile's rows that saw no key (lse = +inf)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hoff = (bh % H).to(tl.int64) * hd
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask = mask_m[:, None] & (offs_d[None, :] < hd)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * s_ob + hoff + rows * s_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + hoff + rows * s_dot + offs_d[None, :], mask=mask, other=0.0)
    do = do.to(tl.float32)
    delta = tl.sum(o.to(tl.float32) * do, axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=mask_m)
    if HAS_FALLBACK:
        lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=mask_m, other=0.0)
        empty = (lse == float("inf")) & mask_m
        g = tl.sum(tl.where(empty[:, None], do, 0.0), axis=0)
        ws_row = (pid.to(tl.int64) * tl.num_programs(1) + bh) * hd
        tl.store(WS + ws_row + offs_d, g, mask=offs_d < hd)


@triton.jit
def _dkdv_kernel(
    Q_RC,
    Q_UTT,
    Q_SUM,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KLEN,
    PAST,
    GSUM,
    s_qrc_t,
    s_qrc_b,
    s_qu_t,
    s_qu_b,
    s_qs_t,
    s_qs_b,
    s_kt,
    s_kb,
    s_vt,
    s_vb,
    s_dot,
    s_dob,
    s_dkt,
    s_dkb,
    s_dvt,
    s_dvb,
    H,
    hd,
    N_SEG,
    R,
    U,
    SEG,
    LC,
    MAXMEM,
    Mr,
    LCr,
    has_sum,
    seg_len,
    Tq,
    ROWS,
    scale,
    STREAM: tl.constexpr,
    INFER: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK = scale dS^T Q and dV = P^T dO for key rows [pid * BLOCK_N, ...) of one stream."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hoff = (bh % H).to(tl.int64) * hd
    n_rc = N_SEG * R
    first = pid_n * BLOCK_N
    last = tl.minimum(first + BLOCK_N, ROWS) - 1
    offs_n = first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < hd
    in_rows = offs_n < ROWS
    mask_nd = in_rows[:, None] & mask_d[None, :]
    rows_n = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * s_kb + hoff + rows_n * s_kt + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + b * s_vb + hoff + rows_n * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)

    mv, lcv = _valid_counts(PAST, Mr, LCr, seg_len, HAS_PAST)
    klen = 1073741824  # no key padding
    if HAS_KPM:
        klen = tl.load(KLEN + b)
    # this stream's place among the valid keys, its first valid row, and the segments that may
    # see rows [first, last]
    if STREAM == 0:
        pos = mv - Mr
        valid_lo = Mr - mv
        if INFER:
            seg_lo = 0
            seg_hi = 1
        else:
            seg_lo = first + 1
            seg_hi = tl.minimum(last + MAXMEM, N_SEG - 1) + 1
    elif STREAM == 1:
        pos = mv
        valid_lo = 0
        seg_lo = first // R
        seg_hi = tl.minimum(last // R, N_SEG - 1) + 1
    elif STREAM == 2:
        pos = mv + n_rc - (LCr - lcv)
        valid_lo = LCr - lcv
        seg_lo = 0
        seg_hi = 1
    else:
        pos = mv + n_rc + lcv
        valid_lo = 0
        seg_lo = first // SEG
        seg_hi = tl.minimum((last + LC) // SEG, N_SEG - 1) + 1
    key_valid = in_rows & (offs_n >= valid_lo)
    key_seen = key_valid & (offs_n + pos < klen)

    q_rc = Q_RC + b * s_qrc_b + hoff
    q_utt = Q_UTT + b * s_qu_b + hoff
    q_sum = Q_SUM + b * s_qs_b + hoff
    do_ptr = DO + b * s_dob + hoff
    row_base = bh.to(tl.int64) * Tq
    qk_scale = scale * 1.4426950408889634
    offs_r0 = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for seg in range(seg_lo, seg_hi):
        mem_lo, mem_hi, rc_lo, rc_hi, lc_lo, lc_hi, utt_lo, utt_hi = _windows(
            seg, R, U, SEG, LC, MAXMEM, Mr, mv, LCr, lcv, INFER
        )
        if STREAM == 0:
            lo = mem_lo
            hi = mem_hi
        elif STREAM == 1:
            lo = rc_lo
            hi = rc_hi
        elif STREAM == 2:
            lo = lc_lo
            hi = lc_hi
        else:
            lo = utt_lo
            hi = utt_hi
        key_ok = key_seen & (offs_n >= lo) & (offs_n < hi)
        n_rows = R + tl.minimum(SEG, U - seg * SEG) + has_sum
        for r0 in range(0, n_rows, BLOCK_M):
            offs_r = r0 + offs_r0
            is_rc, is_utt, is_sum, rc_row, utt_row, out_row = _segment_rows(
                seg, offs_r, R, U, SEG, n_rc, has_sum
            )
            row_ok = is_rc | is_utt | is_sum
            mask_rd = row_ok[:, None] & mask_d[None, :]
            q_ptrs = _row_ptrs(
                q_rc, q_utt, q_sum, s_qrc_t, s_qu_t, s_qs_t, seg, is_rc, is_utt, rc_row, utt_row
            )
            q = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=mask_rd, other=0.0)
            orow = out_row.to(tl.int64)
            do = tl.load(do_ptr + orow[:, None] * s_dot + offs_d[None, :], mask=mask_rd, other=0.0)
            lse = tl.load(LSE + row_base + orow, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + orow, mask=row_ok, other=0.0)
            if STREAM == 0:
                row_ok = is_rc | is_utt  # the summary row does not see the memory
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(row_ok[:, None] & key_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - lse[:, None] * 1.4426950408889634)  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            # a hidden logit passes no gradient (upstream's masked_fill), also where its row's
            # delta is NaN (p = 0 there, and 0 * NaN would spread the NaN to keys it cannot see)
            ds = tl.where(row_ok[:, None] & key_ok[None, :], p * (dp - delta[:, None]), 0.0)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    if HAS_KPM:  # rows that saw no key: dO / Tk to every valid key
        tk = (mv + n_rc + lcv + U).to(tl.float32)
        g = tl.load(GSUM + bh.to(tl.int64) * hd + offs_d, mask=mask_d, other=0.0) / tk
        dv += tl.where(key_valid[:, None], g[None, :], 0.0)
    # state rows that are no keys get exactly 0 (not 0 * a NaN query or probability)
    dk = tl.where(key_valid[:, None], dk, 0.0)
    dv = tl.where(key_valid[:, None], dv, 0.0)
    tl.store(
        DK + b * s_dkb + hoff + rows_n * s_dkt + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=mask_nd,
    )
    tl.store(
        DV + b * s_dvb + hoff + rows_n * s_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask_nd,
    )


@triton.jit
def _dq_keys(
    dq,
    q,
    do,
    lse,
    delta,
    row_ok,
    k_ptr,
    v_ptr,
    s_kt,
    s_vt,
    lo,
    hi,
    offs_d,
    hd,
    qk_scale,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_d = offs_d < hd
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        key_ok = offs_n < hi
        mask_nd = key_ok[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + rows * s_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(v_ptr + rows * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        seen = row_ok[:, None] & key_ok[None, :]
        s = tl.where(seen, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(seen, p * (dp - delta[:, None]), 0.0)  # hidden logits: no gradient
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q_RC,
    Q_UTT,
    Q_SUM,
    K_MEM,
    K_RC,
    K_LC,
    K_UTT,
    V_MEM,
    V_RC,
    V_LC,
    V_UTT,
    DO,
    LSE,
    DELTA,
    DQ_RC,
    DQ_UTT,
    DQ_SUM,
    KLEN,
    PAST,
    s_qrc_t,
    s_qrc_b,
    s_qu_t,
    s_qu_b,
    s_qs_t,
    s_qs_b,
    s_kmem_t,
    s_kmem_b,
    s_krc_t,
    s_krc_b,
    s_klc_t,
    s_klc_b,
    s_ku_t,
    s_ku_b,
    s_vmem_t,
    s_vmem_b,
    s_vrc_t,
    s_vrc_b,
    s_vlc_t,
    s_vlc_b,
    s_vu_t,
    s_vu_b,
    s_dot,
    s_dob,
    s_dqrc_t,
    s_dqrc_b,
    s_dqu_t,
    s_dqu_b,
    s_dqs_t,
    s_dqs_b,
    H,
    hd,
    N_SEG,
    TILES,
    R,
    U,
    SEG,
    LC,
    MAXMEM,
    Mr,
    LCr,
    has_sum,
    seg_len,
    Tq,
    scale,
    INFER: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ = scale dS K for one query tile of one segment, written to its three streams."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    seg = pid // TILES
    tile = pid % TILES
    b = (bh // H).to(tl.int64)
    hoff = (bh % H).to(tl.int64) * hd
    n_rc = N_SEG * R
    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < hd
    is_rc, is_utt, is_sum, rc_row, utt_row, out_row = _segment_rows(
        seg, offs_r, R, U, SEG, n_rc, has_sum
    )
    row_ok = is_rc | is_utt | is_sum
    mask_rd = row_ok[:, None] & mask_d[None, :]
    q_ptrs = _row_ptrs(
        Q_RC + b * s_qrc_b + hoff,
        Q_UTT + b * s_qu_b + hoff,
        Q_SUM + b * s_qs_b + hoff,
        s_qrc_t,
        s_qu_t,
        s_qs_t,
        seg,
        is_rc,
        is_utt,
        rc_row,
        utt_row,
    )
    q = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=mask_rd, other=0.0)
    orow = out_row.to(tl.int64)
    do = tl.load(
        DO + b * s_dob + hoff + orow[:, None] * s_dot + offs_d[None, :], mask=mask_rd, other=0.0
    )
    row_base = bh.to(tl.int64) * Tq
    lse = tl.load(LSE + row_base + orow, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + orow, mask=row_ok, other=0.0)

    mv, lcv = _valid_counts(PAST, Mr, LCr, seg_len, HAS_PAST)
    klen = 1073741824  # no key padding
    if HAS_KPM:
        klen = tl.load(KLEN + b)
    mem_lo, mem_hi, rc_lo, rc_hi, lc_lo, lc_hi, utt_lo, utt_hi = _windows(
        seg, R, U, SEG, LC, MAXMEM, Mr, mv, LCr, lcv, INFER
    )
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_keys(
        dq,
        q,
        do,
        lse,
        delta,
        is_rc | is_utt,
        K_MEM + b * s_kmem_b + hoff,
        V_MEM + b * s_vmem_b + hoff,
        s_kmem_t,
        s_vmem_t,
        mem_lo,
        tl.minimum(mem_hi, klen - (mv - Mr)),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    dq = _dq_keys(
        dq,
        q,
        do,
        lse,
        delta,
        row_ok,
        K_RC + b * s_krc_b + hoff,
        V_RC + b * s_vrc_b + hoff,
        s_krc_t,
        s_vrc_t,
        rc_lo,
        tl.minimum(rc_hi, klen - mv),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    dq = _dq_keys(
        dq,
        q,
        do,
        lse,
        delta,
        row_ok,
        K_LC + b * s_klc_b + hoff,
        V_LC + b * s_vlc_b + hoff,
        s_klc_t,
        s_vlc_t,
        lc_lo,
        tl.minimum(lc_hi, klen - (mv + n_rc - (LCr - lcv))),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    dq = _dq_keys(
        dq,
        q,
        do,
        lse,
        delta,
        row_ok,
        K_UTT + b * s_ku_b + hoff,
        V_UTT + b * s_vu_b + hoff,
        s_ku_t,
        s_vu_t,
        utt_lo,
        tl.minimum(utt_hi, klen - (mv + n_rc + lcv)),
        offs_d,
        hd,
        qk_scale,
        BLOCK_N,
        PRECISION,
    )
    dq_ptrs = _row_ptrs(
        DQ_RC + b * s_dqrc_b + hoff,
        DQ_UTT + b * s_dqu_b + hoff,
        DQ_SUM + b * s_dqs_b + hoff,
        s_dqrc_t,
        s_dqu_t,
        s_dqs_t,
        seg,
        is_rc,
        is_utt,
        rc_row,
        utt_row,
    )
    tl.store(
        dq_ptrs[:, None] + offs_d[None, :], (dq * scale).to(DQ_UTT.dtype.element_ty), mask=mask_rd
    )


# ---------------------------------------------------------------------------------------------
# Launchers


def fwd_config(rows: int, hd: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles and launch settings of every kernel but the delta one (forward, dK/dV, dQ).

    rows: a segment's query rows (R + s + 1 with summaries; R + U + 1 in infer); a segment with
    more rows than BLOCK_M gets several query tiles. On a GPU the query tile is
    next_pow2(rows) clamped to 16..32, the key tile 32 (fp32: 16), 4 warps (8 for head dims
    over 64), no software pipelining (the key loops are a few tiles long, and stages make the
    nested dK/dV loops spill). At these settings ptxas (sm_80, sm_90) reports no spills for
    bf16/fp16 at head dims 32, 64, 128 and fp32 at 128; fp32 at 32 and 64 spills at most 20
    bytes in a few kernels.
    """
    block_d = max(16, triton.next_power_of_2(hd))
    if device.type == "cpu":  # the interpreter: small tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    block_m = min(max(16, triton.next_power_of_2(rows)), 32)
    block_n = 16 if dtype == torch.float32 else 32
    warps = 8 if block_d > 64 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=1)


bwd_config = fwd_config


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (no TF32); fp16/bf16 use the tensor cores as is
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.shape[0]


class _Plan:
    """Checked arguments and derived sizes shared by the forward and backward launchers."""

    def __init__(
        self,
        streams: dict,
        num_heads,
        segment_length,
        right_context,
        left_context,
        max_memory,
        scale,
        negative_inf,
        key_lengths,
        past_length,
    ):
        op = "segment_attention"
        for name in ("q_rc", "q_utt", "k_rc", "k_utt", "v_rc", "v_utt"):
            if streams[name] is None:
                raise ValueError(f"{op}: {name} is required (pass a (0, B, D) tensor for none)")
        if (streams["k_lc"] is None) != (streams["v_lc"] is None):
            raise ValueError(f"{op}: k_lc and v_lc must both be given (infer) or both be None")
        if (streams["k_mem"] is None) != (streams["v_mem"] is None):
            raise ValueError(f"{op}: k_mem and v_mem must both be given or both be None")
        ref = streams["q_utt"]
        if not isinstance(ref, torch.Tensor) or ref.dim() != 3:
            raise ValueError(f"{op}: q_utt must be a (U, B, D) tensor, got {ref!r:.60}")
        _, B, D = ref.shape
        if ref.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{op}: streams must be float16, bfloat16 or float32, got {ref.dtype}")
        if ref.dtype == torch.bfloat16 and ref.device.type == "cpu":
            raise ValueError(f"{op}: bfloat16 needs a GPU (the Triton interpreter has no bf16)")
        for name, t in streams.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1:] != (B, D):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{op}: {name} must be (T, B={B}, D={D}), got {shape}")
            if t.dtype != ref.dtype:
                raise ValueError(f"{op}: {name} must have q_utt's dtype {ref.dtype}, got {t.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{op}: {name} must be on {ref.device}, got {t.device}")
            if t.numel() and t.stride(2) != 1:
                raise ValueError(f"{op}: {name} must have a unit last stride, got {t.stride()}")
        for kind in ("mem", "rc", "lc", "utt"):
            k, v = streams["k_" + kind], streams["v_" + kind]
            if k is not None and k.shape != v.shape:
                raise ValueError(
                    f"{op}: v_{kind} must have k_{kind}'s shape {tuple(k.shape)}, "
                    f"got {tuple(v.shape)}"
                )
        if not isinstance(num_heads, int) or num_heads <= 0 or D % num_heads:
            raise ValueError(f"{op}: num_heads must be a positive divisor of D = {D}")
        hd = D // num_heads
        if not 16 <= hd <= 128:
            raise ValueError(f"{op}: head dim {hd} outside 16..128")
        for name, val, low in (
            ("segment_length", segment_length, 1),
            ("right_context", right_context, 0),
            ("left_context", left_context, 0),
            ("max_memory", max_memory, 0),
        ):
            if not isinstance(val, int) or val < low:
                raise ValueError(f"{op}: {name} must be an int >= {low}, got {val!r}")
        if not (math.isfinite(negative_inf) and negative_inf <= -1e4):
            # the kernel skips masked entries: exact only while exp(negative_inf - max) == 0
            raise ValueError(f"{op}: negative_inf must be finite and <= -1e4, got {negative_inf}")
        if B * num_heads > 65535:
            raise ValueError(f"{op}: B * H = {B * num_heads} > 65535 (the grid's second axis)")

        U = ref.shape[0]
        if U < 1 or streams["k_utt"].shape[0] != U:
            raise ValueError(
                f"{op}: q_utt and k_utt must have the same U >= 1 rows, got {U} and "
                f"{streams['k_utt'].shape[0]}"
            )
        infer = streams["k_lc"] is not None
        R = right_context
        n = 1 if infer else math.ceil(U / segment_length)
        mode = "infer" if infer else "training"
        for name in ("q_rc", "k_rc"):
            if streams[name].shape[0] != n * R:
                raise ValueError(
                    f"{op}: {name} must have n * R = {n} * {R} rows ({mode}), "
                    f"got {streams[name].shape[0]}"
                )
        n_sum = _rows(streams["q_sum"])
        if n_sum not in (0, n):
            raise ValueError(f"{op}: q_sum must have 0 or n = {n} rows ({mode}), got {n_sum}")
        Mr = _rows(streams["k_mem"])
        if not infer:
            want = n - 1 if max_memory > 0 else 0
            if Mr != want:
                raise ValueError(
                    f"{op}: k_mem must have {want} rows (training, n = {n}, "
                    f"max_memory = {max_memory}), got {Mr}"
                )
            if past_length is not None:
                raise ValueError(f"{op}: past_length is for infer (with k_lc/v_lc) only")
        if key_lengths is not None:
            if (
                not isinstance(key_lengths, torch.Tensor)
                or key_lengths.shape != (B,)
                or key_lengths.dtype not in (torch.int32, torch.int64)
                or key_lengths.device != ref.device
            ):
                raise ValueError(
                    f"{op}: key_lengths must be a (B,) = ({B},) int32 tensor on {ref.device}, "
                    f"got {key_lengths!r:.80}"
                )
            key_lengths = key_lengths.to(torch.int32).contiguous()
        if past_length is not None:
            if (
                not isinstance(past_length, torch.Tensor)
                or past_length.numel() < 1
                or past_length.dtype not in (torch.int32, torch.int64)
                or past_length.device != ref.device
            ):
                raise ValueError(
                    f"{op}: past_length must be an int32 tensor on {ref.device} (element [0] "
                    f"is read), got {past_length!r:.80}"
                )
            past_length = past_length.reshape(-1)[:1].to(torch.int32)

        self.streams = streams
        self.B, self.D, self.H, self.hd, self.U, self.R, self.n = B, D, num_heads, hd, U, R, n
        self.infer, self.n_sum, self.Mr, self.LCr = infer, n_sum, Mr, _rows(streams["k_lc"])
        self.seg_len, self.LC, self.M = segment_length, left_context, max_memory
        self.seg = U if infer else segment_length  # the query-row layout's segment length
        self.Tq = n * R + U + n_sum
        self.rows = R + self.seg + (1 if n_sum else 0)  # a segment's query rows, at most
        self.scale = float(scale)
        self.key_lengths, self.past_length = key_lengths, past_length
        self.dtype, self.device = ref.dtype, ref.device

    def ptr(self, name: str) -> torch.Tensor:
        """The stream, or a stand-in of the same dtype for an empty one (never dereferenced)."""
        t = self.streams[name]
        if t is None or t.shape[0] == 0:
            return self.streams[name[0] + "_utt"]
        return t

    def strides(self, *names: str) -> list[int]:
        out = []
        for name in names:
            t = self.ptr(name)
            out += [t.stride(0), t.stride(1)]
        return out

    def sizes(self) -> dict:
        return dict(
            R=self.R,
            U=self.U,
            SEG=self.seg,
            LC=self.LC,
            MAXMEM=self.M,
            Mr=self.Mr,
            LCr=self.LCr,
            has_sum=1 if self.n_sum else 0,
            seg_len=self.seg_len,
            Tq=self.Tq,
        )

    def flags(self) -> dict:
        return dict(
            INFER=self.infer,
            HAS_KPM=self.key_lengths is not None,
            HAS_PAST=self.past_length is not None,
            PRECISION=_precision(self.dtype),
        )

    def valid_counts(self):
        """(valid memory rows, valid lc rows): ints, or 0-dim device tensors with past_length."""
        if self.past_length is None:
            return self.Mr, self.LCr
        past = self.past_length[0].clamp(min=0)
        mv = torch.clamp(
            torch.div(past + self.seg_len - 1, self.seg_len, rounding_mode="floor"), max=self.Mr
        )
        return mv, torch.clamp(past, max=self.LCr)

    def num_keys(self):
        mv, lcv = self.valid_counts()
        return mv + self.n * self.R + lcv + self.U

    def value_mean(self) -> torch.Tensor:
        """(B * H, hd) fp32: the mean over the valid value rows (a fully masked row's output)."""
        s = self.streams
        total = s["v_rc"].sum(0, dtype=torch.float32) + s["v_utt"].sum(0, dtype=torch.float32)
        mv, lcv = self.valid_counts()
        for name, rows, valid in (("v_mem", self.Mr, mv), ("v_lc", self.LCr, lcv)):
            if rows == 0:
                continue
            if isinstance(valid, int):
                total = total + s[name][rows - valid :].sum(0, dtype=torch.float32)
            else:
                keep = torch.arange(rows, device=self.device) >= rows - valid
                total = total + (s[name] * keep[:, None, None]).sum(0, dtype=torch.float32)
        mean = total / self.num_keys()
        return mean.reshape(self.B * self.H, self.hd).contiguous()


def segment_attention_fwd(
    q_rc: torch.Tensor,
    q_utt: torch.Tensor,
    q_sum: torch.Tensor | None,
    k_mem: torch.Tensor | None,
    k_rc: torch.Tensor,
    k_lc: torch.Tensor | None,
    k_utt: torch.Tensor,
    v_mem: torch.Tensor | None,
    v_rc: torch.Tensor,
    v_lc: torch.Tensor | None,
    v_utt: torch.Tensor,
    *,
    num_heads: int,
    segment_length: int,
    right_context: int,
    left_context: int,
    max_memory: int,
    scale: float,
    negative_inf: float = -1e8,
    key_lengths: torch.Tensor | None = None,
    past_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emformer's segment attention, forward (see the module docstring for the streams).

    k_lc/v_lc given (possibly with 0 rows) selects infer mode; None selects training mode.
    Returns (out (Tq, B, D) in the streams' dtype, rows [rc | utt | sum], contiguous;
    lse (B, H, Tq) fp32, natural log, +inf for rows that saw no key), Tq = n*R + U + n_sum.
    """
    plan = _Plan(
        dict(
            q_rc=q_rc,
            q_utt=q_utt,
            q_sum=q_sum,
            k_mem=k_mem,
            k_rc=k_rc,
            k_lc=k_lc,
            k_utt=k_utt,
            v_mem=v_mem,
            v_rc=v_rc,
            v_lc=v_lc,
            v_utt=v_utt,
        ),
        num_heads,
        segment_length,
        right_context,
        left_context,
        max_memory,
        scale,
        negative_inf,
        key_lengths,
        past_length,
    )
    B, D, H = plan.B, plan.D, plan.H
    out = torch.empty((plan.Tq, B, D), dtype=plan.dtype, device=plan.device)
    lse = torch.empty((B, H, plan.Tq), dtype=torch.float32, device=plan.device)
    mean_v = plan.value_mean() if plan.key_lengths is not None else None
    cfg = fwd_config(plan.rows, plan.hd, plan.dtype, plan.device)
    tiles = triton.cdiv(plan.rows, cfg["BLOCK_M"])
    _fwd_kernel[(plan.n * tiles, B * H)](
        *(plan.ptr(name) for name in STREAMS),
        out,
        lse,
        plan.key_lengths,
        plan.past_length,
        mean_v,
        *plan.strides(*STREAMS),
        out.stride(0),
        out.stride(1),
        H,
        plan.hd,
        plan.n,
        tiles,
        qk_scale=plan.scale * LOG2E,
        **plan.sizes(),
        **plan.flags(),
        **cfg,
    )
    return out, lse


def segment_attention_bwd(
    dout: torch.Tensor,
    q_rc: torch.Tensor,
    q_utt: torch.Tensor,
    q_sum: torch.Tensor | None,
    k_mem: torch.Tensor | None,
    k_rc: torch.Tensor,
    k_lc: torch.Tensor | None,
    k_utt: torch.Tensor,
    v_mem: torch.Tensor | None,
    v_rc: torch.Tensor,
    v_lc: torch.Tensor | None,
    v_utt: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    num_heads: int,
    segment_length: int,
    right_context: int,
    left_context: int,
    max_memory: int,
    scale: float,
    negative_inf: float = -1e8,
    key_lengths: torch.Tensor | None = None,
    past_length: torch.Tensor | None = None,
    grads: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of every stream, from dout (Tq, B, D) (any strides, unit last) and the
    forward's (out, lse); the other arguments exactly as given to the forward.

    Returns {name: gradient} for the names in STREAMS ("q_rc", ..., "v_utt"): a tensor of the
    stream's shape and dtype (None for a stream passed as None). `grads` may hold tensors to
    write into (the stream's shape and dtype, any strides with a unit last one, e.g. column
    slices of a packed (T, B, 3D) buffer); the others are allocated contiguous. Rows of the
    memory and lc states that are not valid get 0.
    """
    streams = dict(
        q_rc=q_rc,
        q_utt=q_utt,
        q_sum=q_sum,
        k_mem=k_mem,
        k_rc=k_rc,
        k_lc=k_lc,
        k_utt=k_utt,
        v_mem=v_mem,
        v_rc=v_rc,
        v_lc=v_lc,
        v_utt=v_utt,
    )
    plan = _Plan(
        streams,
        num_heads,
        segment_length,
        right_context,
        left_context,
        max_memory,
        scale,
        negative_inf,
        key_lengths,
        past_length,
    )
    B, D, H, hd, Tq = plan.B, plan.D, plan.H, plan.hd, plan.Tq
    op = "segment_attention_bwd"
    for name, t, shape, dtype in (
        ("dout", dout, (Tq, B, D), plan.dtype),
        ("out", out, (Tq, B, D), plan.dtype),
        ("lse", lse, (B, H, Tq), torch.float32),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{op}: {name} must be {dtype} of shape {shape}, got {t!r:.80}")
        if t.device != plan.device:
            raise ValueError(f"{op}: {name} must be on {plan.device}, got {t.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit last stride, got {t.stride()}")
    lse = lse.contiguous()

    result: dict[str, torch.Tensor | None] = {}
    for name, t in streams.items():
        g = None if grads is None else grads.get(name)
        if t is None:
            result[name] = None
            continue
        if g is None:
            g = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        elif g.shape != t.shape or g.dtype != t.dtype or (g.numel() and g.stride(2) != 1):
            raise ValueError(
                f"{op}: grads[{name!r}] must be {t.dtype} {tuple(t.shape)} with a unit last "
                f"stride, got {g.dtype} {tuple(g.shape)} strides {g.stride()}"
            )
        result[name] = g

    def gptr(name):
        g = result[name]
        return result[name[0] + "_utt"] if g is None or g.shape[0] == 0 else g

    def gstrides(*names):
        return [s for name in names for s in gptr(name).stride()[:2]]

    fallback = plan.key_lengths is not None
    cfg = bwd_config(plan.rows, hd, plan.dtype, plan.device)
    block_d = cfg["BLOCK_D"]
    rows_delta = 16 if plan.device.type == "cpu" else 64
    n_delta = triton.cdiv(Tq, rows_delta)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=plan.device)
    ws = (
        torch.empty((n_delta, B * H, hd), dtype=torch.float32, device=plan.device)
        if fallback
        else None
    )
    _delta_kernel[(n_delta, B * H)](
        out,
        dout,
        lse,
        delta,
        ws,
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        H,
        hd,
        Tq,
        HAS_FALLBACK=fallback,
        BLOCK_M=rows_delta,
        BLOCK_D=block_d,
    )
    gsum = ws.sum(0) if fallback else None

    for stream, kind in enumerate(("mem", "rc", "lc", "utt")):
        rows = _rows(streams["k_" + kind])
        if rows == 0:
            continue
        _dkdv_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]), B * H)](
            *(plan.ptr(name) for name in Q_STREAMS),
            streams["k_" + kind],
            streams["v_" + kind],
            dout,
            lse,
            delta,
            result["k_" + kind],
            result["v_" + kind],
            plan.key_lengths,
            plan.past_length,
            gsum,
            *plan.strides(*Q_STREAMS, "k_" + kind, "v_" + kind),
            dout.stride(0),
            dout.stride(1),
            *gstrides("k_" + kind, "v_" + kind),
            H,
            hd,
            plan.n,
            ROWS=rows,
            scale=plan.scale,
            STREAM=stream,
            **plan.sizes(),
            **plan.flags(),
            **cfg,
        )

    tiles = triton.cdiv(plan.rows, cfg["BLOCK_M"])
    _dq_kernel[(plan.n * tiles, B * H)](
        *(plan.ptr(name) for name in STREAMS),
        dout,
        lse,
        delta,
        *(gptr(name) for name in Q_STREAMS),
        plan.key_lengths,
        plan.past_length,
        *plan.strides(*STREAMS),
        dout.stride(0),
        dout.stride(1),
        *gstrides(*Q_STREAMS),
        H,
        hd,
        plan.n,
        tiles,
        scale=plan.scale,
        **plan.sizes(),
        **plan.flags(),
        **cfg,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (tests/build/triton_aot.py)


def variants():
    """(name, kernel, signature types, constexprs) to compile for a GPU without one: training
    (bf16 hd 64 with padding; fp32 hd 128) and infer (bf16 hd 64, past_length, padding), tiles as
    the launchers pick them for Emformer-base-like shapes (s 16, R 4, summary row)."""
    device = torch.device("cuda")
    delta_done = set()
    for dt, dtype, hd, infer, kpm, past in (
        ("bf16", torch.bfloat16, 64, False, True, False),
        ("bf16", torch.bfloat16, 64, False, False, False),
        ("fp32", torch.float32, 128, False, True, False),
        ("bf16", torch.bfloat16, 64, True, True, True),
        ("fp16", torch.float16, 128, True, False, True),
    ):
        ptrs = (
            "Q_RC Q_UTT Q_SUM K_MEM K_RC K_LC K_UTT V_MEM V_RC V_LC V_UTT O DO K V DK DV "
            "DQ_RC DQ_UTT DQ_SUM"
        ).split()
        types = {name: f"*{dt}" for name in ptrs}
        types.update(
            LSE="*fp32",
            DELTA="*fp32",
            WS="*fp32",
            MEANV="*fp32",
            GSUM="*fp32",
            KLEN="*i32",
            PAST="*i32",
            qk_scale="fp32",
            scale="fp32",
        )
        flags = dict(INFER=infer, HAS_KPM=kpm, HAS_PAST=past, PRECISION=_precision(dtype))
        nones = {}
        if not kpm:
            nones.update(KLEN=None, MEANV=None, GSUM=None)
        if not past:
            nones["PAST"] = None
        rows = 4 + 16 + 1
        tag = f"{dt}-hd{hd}-infer{infer}-kpm{kpm}-past{past}"
        for name, kernel, cfg in (
            ("fwd", _fwd_kernel, fwd_config(rows, hd, dtype, device)),
            ("bwd_dq", _dq_kernel, fwd_config(rows, hd, dtype, device)),
        ):
            const = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            const = dict(
                const, **flags, **{k: v for k, v in nones.items() if k in kernel.arg_names}
            )
            yield (f"emformer_attention_{name}-{tag}", kernel, types, const)
        cfg = bwd_config(rows, hd, dtype, device)
        const = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        for stream in (STREAM_MEM, STREAM_RC, STREAM_LC, STREAM_UTT):
            if stream == STREAM_LC and not infer:
                continue
            sconst = dict(const, **flags, STREAM=stream)
            sconst.update({k: v for k, v in nones.items() if k in _dkdv_kernel.arg_names})
            yield (f"emformer_attention_bwd_dkdv{stream}-{tag}", _dkdv_kernel, types, sconst)
        if (dt, hd, kpm) in delta_done:
            continue
        delta_done.add((dt, hd, kpm))
        yield (
            f"emformer_attention_bwd_delta-{dt}-hd{hd}-kpm{kpm}",
            _delta_kernel,
            types,
            dict(
                HAS_FALLBACK=kpm,
                BLOCK_M=64,
                BLOCK_D=cfg["BLOCK_D"],
                **({} if kpm else {"WS": None}),
            ),
        )
