"""ConvEmformer's depthwise causal convolution in Triton, forward and backward, by index math.

The convolution block's pre-conv output z stays where the module produced it: time-major
(n*R + U, B, D), rows [rc blocks (n blocks of R rows) | utterance (U rows)], any strides with a
unit last one. With a depthwise kernel of width k (weight (D, 1, k), P = k - 1), bias (D,) and
a cache (B, D, P) (None: zeros, as in training), the module computes

    padded = [cache | z_utt]                       (B, D, P + U), frames -P .. U-1
    y_utt[u]   = bias + sum_j w[j] * padded[u + j]  (frame u - P + j)
    y_rc[i, r] = bias + sum_j w[j] * window_i[r + j],
                 window_i = [padded[e_i - P : e_i] | rc block i],  e_i = P + min((i+1)*s, U)

and returns y = [y_rc (n*R rows) ; y_utt (U rows)] time-major. Nothing is concatenated here:
output row o, tap j reads, in frame coordinates (frame f < 0 is cache column f + P),

    utterance row o = n*R + u:       frame u - P + j
    rc row o = i*R + r, r + j < P:    frame E_i - P + r + j,  E_i = min((i+1)*s, U)
    rc row o = i*R + r, r + j >= P:   z row o + j - P (rc block i itself)

Forward: one program per (row tile, channel tile, batch element) computes y tiles of
[BLOCK_T rows x BLOCK_D channels]: for each tap it gathers the rows above from z or the cache
and accumulates in fp32; y is written contiguous (n*R + U, B, D) in z's dtype.

Backward (`_segment_conv_bwd_kernel`), no atomics, every element has one writer: one program
per (input tile, channel tile, batch element) over the virtual input rows
[rc rows (n*R) | cache frames -P..-1 (only with a cache) | utterance frames 0..U-1]. For each
tap j it gathers g_j = the dy rows of the outputs that read the input at tap j:

    rc row i*R + m:   the rc output i*R + m + P - j of the same block (when m + P - j < R)
    frame f:          the utterance output u = f + P - j (when 0 <= u < U), and the rc output
                      i*R + r, r = f - E_i + P - j, of every block i with E_i - P <= f < E_i
                      (several blocks when s < P; the loop visits the blocks whose windows
                      can hold the tile's frames)

then dx += w[j] * g_j (dz, dcache), and the tile's partial dweight[:, j] = sum over its rows
of x * g_j (only over inputs actually read at tap j, so a NaN input poisons only the taps that
read it; each reading output's term w[j] * dy and x * dy is formed on its own, as in the
reference's convolutions, so Inf inputs give the same Inf/NaN), written to a (tiles * B, k, D)
fp32 workspace; dbias's partial is sum g_{k-1}
(tap k-1 reads each output's own row exactly once). torch sums the workspaces afterwards
(fixed shapes: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _segment_conv_fwd_kernel(
    Z,
    CACHE,
    W,
    BIAS,
    Y,
    s_zt,
    s_zb,
    s_cb,
    s_cd,
    s_cp,
    s_wd,
    s_wk,
    s_yt,
    s_yb,
    T,
    U,
    D,
    N_RC,
    R,
    SEG,
    K: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y rows [pid_t * BLOCK_T, ...) x channels [pid_d * BLOCK_D, ...) of batch element
    program_id(2). R here is max(R, 1) (only rows < N_RC are rc rows)."""
    P: tl.constexpr = K - 1
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_ok = offs_t < T
    is_rc = offs_t < N_RC
    blk = tl.where(is_rc, offs_t // R, 0)
    r = offs_t - blk * R
    end = tl.minimum((blk + 1) * SEG, U)  # E_i: where segment i's frames end
    # tap j reads frame frame0 + j while j < lim, else z row offs_t + j - P (rc rows only)
    frame0 = tl.where(is_rc, end - P + r, offs_t - N_RC - P)
    lim = tl.where(is_rc, P - r, K)

    z_base = Z + b * s_zb + offs_d[None, :]
    c_offs = offs_d.to(tl.int64)[None, :] * s_cd
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # a rolled loop: unrolled, the compiler hoists every tap's gather and runs out of
    # registers (sm_90, k = 8: 255 registers and spills; rolled: 72-96, none)
    for j in tl.range(0, K, loop_unroll_factor=1):
        from_frame = lim > j
        f = frame0 + j
        zrow = tl.where(from_frame, N_RC + f, offs_t + (j - P))
        in_cache = from_frame & (f < 0)
        in_z = row_ok & ((f >= 0) | (lim <= j))
        x = tl.load(
            z_base + zrow.to(tl.int64)[:, None] * s_zt,
            mask=in_z[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_CACHE:
            c = tl.load(
                CACHE + b * s_cb + c_offs + (f + P).to(tl.int64)[:, None] * s_cp,
                mask=(row_ok & in_cache)[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            x = tl.where(in_cache[:, None], c, x)
        w = tl.load(W + offs_d * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(
        Y + b * s_yb + offs_t.to(tl.int64)[:, None] * s_yt + offs_d[None, :],
        acc.to(Y.dtype.element_ty),
        mask=row_ok[:, None] & mask_d[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _segment_conv_bwd_kernel(
    DY,
    Z,
    CACHE,
    W,
    DZ,
    DC,
    WS_W,
    WS_B,
    s_dyt,
    s_dyb,
    s_zt,
    s_zb,
    s_cb,
    s_cd,
    s_cp,
    s_wd,
    s_wk,
    s_dzt,
    s_dzb,
    s_dcb,
    s_dcd,
    U,
    D,
    N_RC,
    R,
    SEG,
    N_BLK,
    PC,
    ROWS,
    K: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz/dcache for virtual input rows [pid_v * BLOCK_T, ...) (rows [rc (N_RC) | cache frames
    (PC = P with a cache, else 0) | utterance frames (U)]) and their partial dweight/dbias.
    R here is max(R, 1); N_BLK = n (0 without rc rows)."""
    P: tl.constexpr = K - 1
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    v0 = pid_v * BLOCK_T
    offs_v = v0 + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    v_ok = offs_v < ROWS
    is_rc = offs_v < N_RC
    is_fr = v_ok & (offs_v >= N_RC)
    f = offs_v - N_RC - PC  # the frame of a frame row (< 0: cache column f + P)
    blk = tl.where(is_rc, offs_v // R, 0)
    m_in = offs_v - blk * R  # an rc row's place in its block

    # the inputs themselves (for dweight)
    in_z = is_rc | (is_fr & (f >= 0))
    zrow = tl.where(is_rc, offs_v, N_RC + f)
    x = tl.load(
        Z + b * s_zb + zrow.to(tl.int64)[:, None] * s_zt + offs_d[None, :],
        mask=in_z[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    in_cache = is_fr & (f < 0)
    c_ptrs = offs_d.to(tl.int64)[None, :] * s_cd + (f + P).to(tl.int64)[:, None] * s_cp
    if HAS_CACHE:
        c = tl.load(
            CACHE + b * s_cb + c_ptrs,
            mask=in_cache[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        x = tl.where(in_cache[:, None], c, x)

    has_rc = v0 < N_RC
    has_fr = v0 + BLOCK_T > N_RC
    # the rc blocks whose prefix windows [E_i - P, E_i) can hold the tile's frames:
    # E_i > f_first and E_i <= f_last + P
    f_first = tl.maximum(v0, N_RC) - N_RC - PC
    f_last = tl.minimum(v0 + BLOCK_T, ROWS) - 1 - N_RC - PC
    i_lo = tl.maximum(f_first, 0) // SEG
    i_hi = tl.minimum(N_BLK, (f_last + P) // SEG)
    i_hi = tl.where(U <= f_last + P, N_BLK, i_hi)

    dy_base = DY + b * s_dyb + offs_d[None, :]
    mask_d2 = mask_d[None, :]
    tile_row = pid_v * tl.num_programs(2) + b  # this tile's row of the workspaces
    dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.range(0, K, loop_unroll_factor=1):  # rolled, as in the forward (128 registers)
        g = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # the dy rows read at tap j
        w = tl.load(W + offs_d * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        # each reading output's dy is multiplied on its own (w[j] * dy, x * dy) before the sum,
        # as the reference's convolutions do: with an Inf weight or input, +Inf and -Inf
        # products then give NaN where the reference has NaN; rows a tap does not read add 0
        dw_rows = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if has_rc:
            # rc row i*R + m is read by rc output i*R + m + P - j of its own block
            ok = is_rc & (m_in + (P - j) < R)
            t = tl.load(
                dy_base + (offs_v + (P - j)).to(tl.int64)[:, None] * s_dyt,
                mask=ok[:, None] & mask_d2,
                other=0.0,
            ).to(tl.float32)
            g += t
            dx += tl.where(ok[:, None], w[None, :] * t, 0.0)
            dw_rows += tl.where(ok[:, None], x * t, 0.0)
        if has_fr:
            # frame f is read by utterance output f + P - j
            u = f + (P - j)
            ok = is_fr & (u >= 0) & (u < U)
            t = tl.load(
                dy_base + (N_RC + u).to(tl.int64)[:, None] * s_dyt,
                mask=ok[:, None] & mask_d2,
                other=0.0,
            ).to(tl.float32)
            g += t
            dx += tl.where(ok[:, None], w[None, :] * t, 0.0)
            dw_rows += tl.where(ok[:, None], x * t, 0.0)
            # ... and by rc output i*R + r of every block whose prefix window holds it
            for i in range(i_lo, i_hi):
                e = tl.minimum((i + 1) * SEG, U)
                r = f - e + (P - j)
                ok = is_fr & (f < e) & (r >= 0) & (r < R)
                t = tl.load(
                    dy_base + (i * R + r).to(tl.int64)[:, None] * s_dyt,
                    mask=ok[:, None] & mask_d2,
                    other=0.0,
                ).to(tl.float32)
                g += t
                dx += tl.where(ok[:, None], w[None, :] * t, 0.0)
                dw_rows += tl.where(ok[:, None], x * t, 0.0)
        dw = tl.sum(dw_rows, axis=0)
        tl.store(WS_W + (tile_row * K + j) * D + offs_d, dw, mask=mask_d)
        if j == P:  # tap k-1 reads every output's own row once: its g sums to dbias
            tl.store(WS_B + tile_row * D + offs_d, tl.sum(g, axis=0), mask=mask_d)

    dx = dx.to(DZ.dtype.element_ty)
    tl.store(
        DZ + b * s_dzb + zrow.to(tl.int64)[:, None] * s_dzt + offs_d[None, :],
        dx,
        mask=in_z[:, None] & mask_d[None, :],
    )
    if HAS_CACHE:
        dc_ptrs = offs_d.to(tl.int64)[None, :] * s_dcd + (f + P).to(tl.int64)[:, None]
        tl.store(DC + b * s_dcb + dc_ptrs, dx, mask=in_cache[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def conv_config(dim: int, device: torch.device) -> dict:
    """Tiles and warps. On a GPU, tiles of 32 rows x 64 channels (a 128-byte bf16 row segment
    per row), 4 warps: ConvEmformer base (D 512, B 4, T 266) gets 9 x 8 x 4 = 288 programs.
    In the interpreter, 16 x 32 tiles keep it quick."""
    if device.type == "cpu":
        return dict(BLOCK_T=16, BLOCK_D=min(32, max(16, triton.next_power_of_2(dim))), num_warps=1)
    return dict(BLOCK_T=32, BLOCK_D=min(64, max(16, triton.next_power_of_2(dim))), num_warps=4)


class _Plan:
    """Checked arguments and derived sizes shared by the launchers."""

    def __init__(self, op, z, weight, bias, cache, utterance_length, segment_length, right_context):
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or not z.is_floating_point():
            raise ValueError(
                f"{op}: z must be a floating-point (n*R + U, B, D) tensor, got {z!r:.60}"
            )
        T, B, D = z.shape
        if z.numel() and z.size(2) > 1 and z.stride(2) != 1:  # (D = 1: any stride)
            raise ValueError(f"{op}: z must have a unit last stride, got strides {z.stride()}")
        for name, val, low in (
            ("utterance_length", utterance_length, 1),
            ("segment_length", segment_length, 1),
            ("right_context", right_context, 0),
        ):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"{op}: {name} must be an int >= {low}, got {val!r}")
        U, R = utterance_length, right_context
        n_rc = T - U
        if n_rc < 0 or (R == 0 and n_rc != 0) or (R > 0 and n_rc % R):
            raise ValueError(
                f"{op}: z must have n * R + U rows (U = {U}, R = {R}, n >= 0), got {T}"
            )
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[:2] != (D, 1):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight
            raise ValueError(f"{op}: weight must be (D, 1, k) = ({D}, 1, k), got {shape}")
        k = weight.shape[2]
        if k < 1:
            raise ValueError(f"{op}: weight must have a kernel size k >= 1, got {k}")
        tensors = [("weight", weight)]
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (D,):
                raise ValueError(f"{op}: bias must be (D,) = ({D},) or None, got {bias!r:.60}")
            tensors.append(("bias", bias))
        if cache is not None:
            if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != (B, D, k - 1):
                shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else cache
                raise ValueError(
                    f"{op}: cache must be (B, D, k - 1) = ({B}, {D}, {k - 1}) or None, got {shape}"
                )
            tensors.append(("cache", cache))
        for name, t in tensors:
            if t.dtype != z.dtype:
                raise ValueError(f"{op}: {name} must have z's dtype {z.dtype}, got {t.dtype}")
            if t.device != z.device:
                raise ValueError(f"{op}: {name} must be on z's device {z.device}, got {t.device}")
        if B > 65535:
            raise ValueError(f"{op}: batch size {B} > 65535 (the grid's third axis)")
        self.z, self.weight, self.bias = z, weight, bias
        self.cache = cache if cache is not None and k > 1 else None
        self.T, self.B, self.D, self.K, self.U, self.SEG = T, B, D, k, U, segment_length
        self.n_rc = n_rc
        self.R = max(R, 1)  # the kernels divide by it; only rows < n_rc are rc rows
        self.n_blk = n_rc // R if R > 0 else 0
        self.cfg = conv_config(D, z.device)

    def cache_strides(self) -> list[int]:
        return list(self.cache.stride()) if self.cache is not None else [0, 0, 0]


def segment_conv_fwd(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: torch.Tensor | None,
    utterance_length: int,
    segment_length: int,
    right_context: int,
) -> torch.Tensor:
    """ConvEmformer's depthwise conv over [rc blocks ; utterance], forward.

    Args:
        z: (n*R + U, B, D) pre-conv rows [rc | utterance], any strides with a unit last one.
        weight: (D, 1, k) depthwise kernel (any strides); bias: (D,) (any stride) or None.
        cache: (B, D, k - 1) frames before the utterance (any strides), or None (zeros).
        utterance_length (U >= 1), segment_length (s >= 1), right_context (R >= 0).
    Returns:
        y (n*R + U, B, D) contiguous in z's dtype, rows [rc outputs | utterance outputs].
    """
    plan = _Plan(
        "segment_conv_fwd", z, weight, bias, cache, utterance_length, segment_length, right_context
    )
    if bias is not None and bias.stride(0) != 1:  # the kernel reads D contiguous values
        bias = bias.contiguous()
    y = torch.empty((plan.T, plan.B, plan.D), dtype=z.dtype, device=z.device)
    cfg = plan.cfg
    grid = (triton.cdiv(plan.T, cfg["BLOCK_T"]), triton.cdiv(plan.D, cfg["BLOCK_D"]), plan.B)
    _segment_conv_fwd_kernel[grid](
        z,
        plan.cache,
        weight,
        bias,
        y,
        z.stride(0),
        z.stride(1),
        *plan.cache_strides(),
        weight.stride(0),
        weight.stride(2),
        y.stride(0),
        y.stride(1),
        plan.T,
        plan.U,
        plan.D,
        plan.n_rc,
        plan.R,
        plan.SEG,
        K=plan.K,
        HAS_CACHE=plan.cache is not None,
        HAS_BIAS=bias is not None,
        **cfg,
    )
    return y


def segment_conv_bwd(
    dy: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    cache: torch.Tensor | None,
    utterance_length: int,
    segment_length: int,
    right_context: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of `segment_conv_fwd`, from dy (n*R + U, B, D) (any strides, unit last one);
    the other arguments as given to the forward.

    Returns (dz (n*R + U, B, D) contiguous, dcache (B, D, k - 1) contiguous or None when no
    cache was given, dweight (D, 1, k), dbias (D,)), each in z's dtype (reduced in fp32).
    """
    plan = _Plan(
        "segment_conv_bwd", z, weight, None, cache, utterance_length, segment_length, right_context
    )
    T, B, D, K = plan.T, plan.B, plan.D, plan.K
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != (T, B, D) or dy.dtype != z.dtype:
        raise ValueError(
            f"segment_conv_bwd: dy must be {z.dtype} of shape {(T, B, D)}, got {dy!r:.80}"
        )
    if dy.device != z.device:
        raise ValueError(f"segment_conv_bwd: dy must be on {z.device}, got {dy.device}")
    if dy.numel() and dy.size(2) > 1 and dy.stride(2) != 1:
        raise ValueError(f"segment_conv_bwd: dy must have a unit last stride, got {dy.stride()}")
    dev = z.device
    dz = torch.empty((T, B, D), dtype=z.dtype, device=dev)
    dcache = None
    if cache is not None:
        dcache = torch.empty((B, D, K - 1), dtype=z.dtype, device=dev)
    pc = K - 1 if plan.cache is not None else 0
    rows = plan.n_rc + pc + plan.U
    cfg = plan.cfg
    tiles = triton.cdiv(rows, cfg["BLOCK_T"])
    ws_w = torch.empty((tiles * B, K, D), dtype=torch.float32, device=dev)
    ws_b = torch.empty((tiles * B, D), dtype=torch.float32, device=dev)
    dc = dcache if plan.cache is not None else None
    _segment_conv_bwd_kernel[(tiles, triton.cdiv(D, cfg["BLOCK_D"]), B)](
        dy,
        z,
        plan.cache,
        weight,
        dz,
        dc,
        ws_w,
        ws_b,
        dy.stride(0),
        dy.stride(1),
        z.stride(0),
        z.stride(1),
        *plan.cache_strides(),
        weight.stride(0),
        weight.stride(2),
        dz.stride(0),
        dz.stride(1),
        *(dc.stride()[:2] if dc is not None else (0, 0)),
        plan.U,
        D,
        plan.n_rc,
        plan.R,
        plan.SEG,
        plan.n_blk,
        pc,
        rows,
        K=K,
        HAS_CACHE=plan.cache is not None,
        **cfg,
    )
    dweight = ws_w.sum(0).t().unsqueeze(1).to(weight.dtype)  # (D, 1, k)
    dbias = ws_b.sum(0).to(weight.dtype)
    return dz, dcache, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (tests/build/triton_aot.py)


def variants():
    """(name, kernel, signature types, constexprs) to compile for a GPU without one: each dtype
    at ConvEmformer's k = 8 with a cache (infer) and without (training), k = 1 and k = 32; tiles
    as the launchers pick them for D = 512."""
    cfg = conv_config(512, torch.device("cuda"))
    const = {k: v for k, v in cfg.items() if k != "num_warps"}
    for dt, k, cache, bias in (
        ("bf16", 8, False, True),
        ("bf16", 8, True, True),
        ("fp16", 8, True, True),
        ("fp32", 8, False, True),
        ("fp32", 8, True, False),
        ("bf16", 1, False, True),
        ("bf16", 32, True, True),
    ):
        types = {n: f"*{dt}" for n in ("Z", "CACHE", "W", "BIAS", "Y", "DY", "DZ", "DC")}
        types.update(WS_W="*fp32", WS_B="*fp32")
        flags = dict(K=k, HAS_CACHE=cache, **const)
        nones = {} if cache else dict(CACHE=None, DC=None)
        tag = f"{dt}-k{k}-cache{cache}"
        fwd = dict(flags, HAS_BIAS=bias, **{n: v for n, v in nones.items() if n != "DC"})
        if not bias:
            fwd["BIAS"] = None
        yield (f"emformer_conv_fwd-{tag}-bias{bias}", _segment_conv_fwd_kernel, types, fwd)
        yield (f"emformer_conv_bwd-{tag}", _segment_conv_bwd_kernel, types, dict(flags, **nones))
