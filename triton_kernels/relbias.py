"""BEATs relative-position-bias attention in Triton: flash-style forward and backward.

    logits[i, j] = scale * q_i . k_j + gate_i * bias(i, j) + attn_mask[i, j],  padded keys -> -inf
    out_i        = softmax_j(logits[i, :]) v

The bias comes in one of two forms:
    REL   rel_bias (H, T + S - 1): one value per head and relative distance j - i, at index
          j - i + T - 1. BEATs' bucketed bias is a function of j - i only, so this never
          materialises a T x S tensor: the kernels gather it per tile.
    DENSE bias broadcastable to (B, H, T, S) through strides (a position_bias handed over by a
          previous layer).

Shapes: q (B, H, T, hd), k and v (B, H, S, hd), any strides with a contiguous last dim (the
module passes views of time-major tensors); gate (B, H, T, 1); attn_mask (T, S) additive;
key_padding (B, S) bool, True = padding. Rows whose keys are all padding give 0.
Softmax statistics, accumulators and all gradients are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from seqkern._triton.attention import _logit_grad, exact_delta_for

BIAS_NONE, BIAS_REL, BIAS_DENSE = 0, 1, 2


@triton.jit
def _logits_tile(
    q,
    kb_ptr,
    offs_m,
    offs_n,
    offs_d,
    T,
    S,
    hd,
    scale,
    stride_kn,
    RB,
    rb_base,
    s_rb_i,
    s_rb_j,
    gate,
    AM,
    s_am_i,
    s_am_j,
    KPM,
    kpm_base,
    BIAS_MODE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_AM: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scaled logits of one (BLOCK_M, BLOCK_N) tile, masked; also returns the bias tile."""
    mask_n = offs_n < S
    k = tl.load(
        kb_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=mask_n[:, None] & (offs_d[None, :] < hd),
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    mask_mn = (offs_m[:, None] < T) & mask_n[None, :]
    bias = tl.zeros_like(s)
    if BIAS_MODE == 1:
        rel = offs_n[None, :] - offs_m[:, None] + T - 1
        bias = tl.load(RB + rb_base + rel * s_rb_j, mask=mask_mn, other=0.0).to(tl.float32)
    if BIAS_MODE == 2:
        bias = tl.load(
            RB + rb_base + offs_m[:, None] * s_rb_i + offs_n[None, :] * s_rb_j,
            mask=mask_mn,
            other=0.0,
        ).to(tl.float32)
    if BIAS_MODE != 0:
        if HAS_GATE:
            s += gate[:, None] * bias
        else:
            s += bias
    if HAS_AM:
        s += tl.load(
            AM + offs_m[:, None] * s_am_i + offs_n[None, :] * s_am_j, mask=mask_mn, other=0.0
        ).to(tl.float32)
    # rows past T are hidden too: their zero-filled q times an Inf key would be a NaN logit,
    # which the backward's products would carry into dK and dV
    valid = mask_mn
    if HAS_KPM:
        padded = tl.load(KPM + kpm_base + offs_n, mask=mask_n, other=1)  # int8, 1 = padding
        valid = valid & (padded[None, :] == 0)
    s = tl.where(valid, s, float("-inf"))
    return s, bias


@triton.jit
def _relbias_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    RB,
    G,
    AM,
    KPM,
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
    s_rb_b,
    s_rb_h,
    s_rb_i,
    s_rb_j,
    s_gb,
    s_gh,
    s_am_i,
    s_am_j,
    s_kpm_b,
    H,
    T,
    S,
    hd,
    scale,
    BIAS_MODE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_AM: tl.constexpr,
    HAS_KPM: tl.constexpr,
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
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
        mask=mask_m[:, None] & (offs_d[None, :] < hd),
        other=0.0,
    )
    gate = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(G + b * s_gb + h * s_gh + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kb_ptr = K + b * s_kb + h * s_kh
    vb_ptr = V + b * s_vb + h * s_vh
    rb_base = b * s_rb_b + h * s_rb_h
    key_end = S
    if HAS_KPM:
        key_end = tl.load(KEND + b)  # keys past the last unpadded one: skipped
    for n0 in range(0, key_end, BLOCK_N):
        offs_n = n0 + offs_n0
        s, _ = _logits_tile(
            q,
            kb_ptr,
            offs_m,
            offs_n,
            offs_d,
            T,
            S,
            hd,
            scale,
            s_kt,
            RB,
            rb_base,
            s_rb_i,
            s_rb_j,
            gate,
            AM,
            s_am_i,
            s_am_j,
            KPM,
            b * s_kpm_b,
            BIAS_MODE,
            HAS_GATE,
            HAS_AM,
            HAS_KPM,
            PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            vb_ptr + offs_n[:, None] * s_vt + offs_d[None, :],
            mask=(offs_n[:, None] < S) & (offs_d[None, :] < hd),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # every key padded: output 0, as the reference
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=mask_m[:, None] & (offs_d[None, :] < hd),
    )
    # lse = +inf on empty rows makes exp(s - lse) = 0 in the backward
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=mask_m)


@triton.jit
def _relbias_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    NORM,
    DK,
    DV,
    RB,
    G,
    AM,
    KPM,
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
    s_rb_b,
    s_rb_h,
    s_rb_i,
    s_rb_j,
    s_gb,
    s_gh,
    s_am_i,
    s_am_j,
    s_kpm_b,
    H,
    T,
    S,
    hd,
    scale,
    BIAS_MODE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_AM: tl.constexpr,
    HAS_KPM: tl.constexpr,
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
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (offs_n[:, None] < S) & (offs_d[None, :] < hd)
    kb_ptr = K + b * s_kb + h * s_kh
    v = tl.load(
        V + b * s_vb + h * s_vh + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_nd, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    rb_base = b * s_rb_b + h * s_rb_h
    q_end = T
    if HAS_KPM:
        if pid_n * BLOCK_N >= tl.load(KEND + b):
            q_end = 0  # an all-padding key block: its gradients are 0
    for m0 in range(0, q_end, BLOCK_M):
        offs_m = m0 + offs_m0
        mask_m = offs_m < T
        mask_md = mask_m[:, None] & (offs_d[None, :] < hd)
        q = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
            mask=mask_md,
            other=0.0,
        )
        gate = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_GATE:
            gate = tl.load(G + b * s_gb + h * s_gh + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        s, _ = _logits_tile(
            q,
            kb_ptr,
            offs_m,
            offs_n,
            offs_d,
            T,
            S,
            hd,
            scale,
            s_kt,
            RB,
            rb_base,
            s_rb_i,
            s_rb_j,
            gate,
            AM,
            s_am_i,
            s_am_j,
            KPM,
            b * s_kpm_b,
            BIAS_MODE,
            HAS_GATE,
            HAS_AM,
            HAS_KPM,
            PRECISION,
        )
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=float("inf"))
        p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if EXACT_DELTA:  # 1 / sum(p) of each row, from the dq kernel's first sweep
            p = p * tl.load(NORM + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)[:, None]
        p = tl.where(s == float("-inf"), 0.0, p)  # hidden keys: no gradient, even in a NaN row
        do = tl.load(
            DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot + offs_d[None, :],
            mask=mask_md,
            other=0.0,
        )
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
        ds = _logit_grad(p, dp, delta, s)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk_ptr = DK + bh.to(tl.int64) * S * hd + offs_n[:, None] * hd + offs_d[None, :]
    tl.store(dk_ptr, dk * scale, mask=mask_nd)
    dv_ptr = DV + bh.to(tl.int64) * S * hd + offs_n[:, None] * hd + offs_d[None, :]
    tl.store(dv_ptr, dv, mask=mask_nd)


@triton.jit
def _relbias_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    NORM,
    DQ,
    DG,
    DRB,
    RB,
    G,
    AM,
    KPM,
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
    s_rb_b,
    s_rb_h,
    s_rb_i,
    s_rb_j,
    s_drb_h,
    s_gb,
    s_gh,
    s_am_i,
    s_am_j,
    s_kpm_b,
    H,
    T,
    S,
    hd,
    scale,
    BIAS_MODE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_AM: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
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
    offs_n0 = tl.arange(0, BLOCK_N)
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
    gate = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(G + b * s_gb + h * s_gh + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=float("inf"))
    row_base = bh.to(tl.int64) * T
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if EXACT_DELTA:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_M], dtype=tl.float32)
    kb_ptr = K + b * s_kb + h * s_kh
    vb_ptr = V + b * s_vb + h * s_vh
    rb_base = b * s_rb_b + h * s_rb_h
    key_end = S
    if HAS_KPM:
        key_end = tl.load(KEND + b)
    # With EXACT_DELTA (fp32), a first sweep over the keys sums p and p * dp from this kernel's
    # own p and dp, and the second accumulates the gradients from p / sum(p) and delta =
    # sum(p dp) / sum(p) (as seqkern._triton.attention does): a row's dS then sums to zero to
    # fp32 rounding, which delta = do . out and the rounding of lse break when the softmax
    # saturates (with one key dS is exactly 0). The dK/dV kernel, launched after, reads both.
    for stage in tl.static_range(0 if EXACT_DELTA else 1, 2):
        for n0 in range(0, key_end, BLOCK_N):
            offs_n = n0 + offs_n0
            mask_n = offs_n < S
            s, bias = _logits_tile(
                q,
                kb_ptr,
                offs_m,
                offs_n,
                offs_d,
                T,
                S,
                hd,
                scale,
                s_kt,
                RB,
                rb_base,
                s_rb_i,
                s_rb_j,
                gate,
                AM,
                s_am_i,
                s_am_j,
                KPM,
                b * s_kpm_b,
                BIAS_MODE,
                HAS_GATE,
                HAS_AM,
                HAS_KPM,
                PRECISION,
            )
            p = tl.exp(s - lse[:, None])
            mask_nd = mask_n[:, None] & (offs_d[None, :] < hd)
            v = tl.load(vb_ptr + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_nd, other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
            if stage == 0:  # the sums of p and of p * dp, from the very p and dp used below
                norm += tl.sum(p, axis=1)
                delta += tl.sum(p * dp, axis=1)
            else:
                if EXACT_DELTA:
                    p = p * norm[:, None]
                k = tl.load(
                    kb_ptr + offs_n[:, None] * s_kt + offs_d[None, :], mask=mask_nd, other=0.0
                )
                ds = _logit_grad(p, dp, delta, s)  # d logits
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                if HAS_GATE:
                    dgate += tl.sum(ds * bias, axis=1)
                    dbias = ds * gate[:, None]
                else:
                    dbias = ds
                if BIAS_GRAD:
                    mask_mn = mask_m[:, None] & mask_n[None, :]
                    if BIAS_MODE == 1:
                        # every (i, j) with the same j - i shares one entry: sum by atomics
                        rel = offs_n[None, :] - offs_m[:, None] + T - 1
                        tl.atomic_add(DRB + h * s_drb_h + rel, dbias, mask=mask_mn)
                    if BIAS_MODE == 2:
                        # dense: DRB is (B, H, T, S) fp32, written once per element up to key_end
                        off = ((b * H + h) * T + offs_m[:, None]) * S + offs_n[None, :]
                        tl.store(DRB + off, dbias, mask=mask_mn)
        if stage == 0:
            empty = norm == 0.0  # rows that see no key: p = 0
            norm = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, norm))
            delta = delta * norm
            tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)
            tl.store(NORM + row_base + offs_m, norm, mask=mask_m)
    tl.store(
        DQ + bh.to(tl.int64) * T * hd + offs_m[:, None] * hd + offs_d[None, :],
        dq * scale,
        mask=mask_md,
    )
    if HAS_GATE:
        tl.store(DG + bh.to(tl.int64) * T + offs_m, dgate, mask=mask_m)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(hd: int, device: torch.device) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(hd))
    if device.type == "cpu":  # the interpreter: small tiles keep it quick
        return 16, 16, block_d, 1
    block = 64 if block_d <= 64 else 32
    return block, block, block_d, 4


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get full-precision products (no TF32); fp16/bf16 use the tensor cores as is
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _bias_args(rel_bias, bias, B, H, T, S):
    """(mode, tensor, strides b, h, i, j) for the kernels."""
    if rel_bias is not None:
        return BIAS_REL, rel_bias, 0, rel_bias.stride(0), 0, rel_bias.stride(1)
    if bias is not None:
        full = bias.expand(B, H, T, S)
        return BIAS_DENSE, full, *full.stride()
    return BIAS_NONE, None, 0, 0, 0, 0


def _gate_args(gate):
    if gate is None:
        return None, 0, 0
    if gate.stride(2) != 1:
        gate = gate.contiguous()
    return gate, gate.stride(0), gate.stride(1)


def _mask_args(attn_mask, key_padding_mask):
    """(attn_mask, its strides, key padding as int8, its batch stride, key_end (B,) int32).

    key_end[b] = 1 + the last unpadded key of row b (0 if none): the kernels stop there, which
    is exact for any mask (everything after it is padding) and saves the work of right padding.
    """
    am = attn_mask
    kpm = key_end = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8).contiguous()
        positions = torch.arange(1, kpm.shape[1] + 1, device=kpm.device, dtype=torch.int32)
        visible = (kpm == 0) * positions
        key_end = (visible.amax(dim=1) if kpm.shape[1] else visible.sum(dim=1)).to(torch.int32)
    return (
        am,
        (am.stride(0), am.stride(1)) if am is not None else (0, 0),
        kpm,
        kpm.stride(0) if kpm is not None else 0,
        key_end,
    )


def relbias_attention_fwd(
    q, k, v, scale, rel_bias=None, bias=None, gate=None, attn_mask=None, key_padding_mask=None
):
    """-> (out (B, H, T, hd) contiguous, lse (B, H, T) fp32)."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    out = torch.empty((B, H, T, hd), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    mode, rb, *rb_strides = _bias_args(rel_bias, bias, B, H, T, S)
    g, s_gb, s_gh = _gate_args(gate)
    am, am_strides, kpm, s_kpm, kend = _mask_args(attn_mask, key_padding_mask)
    bm, bn, bd, warps = _blocks(hd, q.device)
    grid = (triton.cdiv(T, bm), B * H)
    _relbias_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        rb,
        g,
        am,
        kpm,
        kend,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *rb_strides,
        s_gb,
        s_gh,
        *am_strides,
        s_kpm,
        H,
        T,
        S,
        hd,
        scale,
        BIAS_MODE=mode,
        HAS_GATE=g is not None,
        HAS_AM=am is not None,
        HAS_KPM=kpm is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        PRECISION=_precision(q),
        num_warps=warps,
    )
    return out, lse


def relbias_attention_bwd(
    do,
    q,
    k,
    v,
    out,
    lse,
    scale,
    rel_bias=None,
    bias=None,
    gate=None,
    attn_mask=None,
    key_padding_mask=None,
    bias_grad=False,
):
    """-> (dq, dk, dv, d_rel_bias or d_bias (fp32) or None, dgate (B, H, T, 1) fp32 or None)."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    exact_delta = exact_delta_for(q.dtype)
    if exact_delta:  # the dq kernel (launched first) writes both from its own p and dp
        delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        norm = torch.empty_like(delta)  # 1 / sum_j p_ij per row
    else:
        delta = norm = (do.float() * out.float()).sum(-1).contiguous()  # (B, H, T)
    dq = torch.empty((B, H, T, hd), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, H, S, hd), dtype=torch.float32, device=q.device)
    dv = torch.empty((B, H, S, hd), dtype=torch.float32, device=q.device)
    mode, rb, *rb_strides = _bias_args(rel_bias, bias, B, H, T, S)
    g, s_gb, s_gh = _gate_args(gate)
    am, am_strides, kpm, s_kpm, kend = _mask_args(attn_mask, key_padding_mask)
    dgate = torch.empty((B, H, T), dtype=torch.float32, device=q.device) if g is not None else None
    drb = None
    if bias_grad and mode == BIAS_REL:
        drb = torch.zeros((H, T + S - 1), dtype=torch.float32, device=q.device)
    elif bias_grad and mode == BIAS_DENSE:
        # zeros: the kernel stops at each row's last unpadded key, past which the gradient is 0
        drb = torch.zeros((B, H, T, S), dtype=torch.float32, device=q.device)
    bm, bn, bd, warps = _blocks(hd, q.device)
    common = (*rb_strides,)
    _relbias_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        norm,
        dq,
        dgate,
        drb,
        rb,
        g,
        am,
        kpm,
        kend,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *common,
        drb.stride(0) if drb is not None and mode == BIAS_REL else 0,
        s_gb,
        s_gh,
        *am_strides,
        s_kpm,
        H,
        T,
        S,
        hd,
        scale,
        BIAS_MODE=mode,
        HAS_GATE=g is not None,
        HAS_AM=am is not None,
        HAS_KPM=kpm is not None,
        BIAS_GRAD=drb is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        PRECISION=_precision(q),
        EXACT_DELTA=exact_delta,
        num_warps=warps,
    )
    _relbias_bwd_dkdv_kernel[(triton.cdiv(S, bn), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        norm,
        dk,
        dv,
        rb,
        g,
        am,
        kpm,
        kend,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *common,
        s_gb,
        s_gh,
        *am_strides,
        s_kpm,
        H,
        T,
        S,
        hd,
        scale,
        BIAS_MODE=mode,
        HAS_GATE=g is not None,
        HAS_AM=am is not None,
        HAS_KPM=kpm is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        PRECISION=_precision(q),
        EXACT_DELTA=exact_delta,
        num_warps=warps,
    )
    if dgate is not None:
        dgate = dgate.unsqueeze(-1)
    return dq, dk, dv, drb, dgate
