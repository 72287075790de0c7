"""AdaLN in Triton: y = gamma * LayerNorm(x) + beta, forward and backward.

x (B, T, D); gamma, beta (B, D) or (B, T, D). Statistics and gradients accumulate in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The whole row is held by one program; past this the register tile would spill.
MAX_DIM = 16384


@triton.jit
def _adaln_fwd_kernel(
    X,
    G,
    Bt,
    Y,
    Mean,
    Rstd,
    seqlen,
    dim,
    eps,
    PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * seqlen + t
    if PER_TOKEN:
        mod_row = row
    else:
        mod_row = row // seqlen
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(X + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / dim + eps)
    g = tl.load(G + mod_row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bt + mod_row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * (centered * rstd) + b
    tl.store(Y + row * dim + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _adaln_bwd_kernel(
    DY,
    X,
    G,
    Mean,
    Rstd,
    DX,
    DG,
    DB,
    WS,
    seqlen,
    dim,
    rows_per_program,
    PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (s, b) walks rows t in [s * rows_per_program, (s + 1) * rows_per_program).
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    t_begin = split * rows_per_program
    t_end = tl.minimum(t_begin + rows_per_program, seqlen)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(t_begin, t_end):
        row = b * seqlen + t
        if PER_TOKEN:
            mod_row = row
        else:
            mod_row = b
        x = tl.load(X + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(G + mod_row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        # centred once more on its own mean: the saved fp32 mean is rounded, and where
        # |mean| >> the spread that shift of every xhat is amplified by rstd in dx
        centered = tl.where(mask, x - tl.load(Mean + row), 0.0)
        centered = tl.where(mask, centered - tl.sum(centered, axis=0) / dim, 0.0)
        xhat = centered * tl.load(Rstd + row)
        g = dy * gamma
        mean_g = tl.sum(g, axis=0) / dim
        mean_gx = tl.sum(g * xhat, axis=0) / dim
        dx = tl.load(Rstd + row) * (g - mean_g - xhat * mean_gx)
        tl.store(DX + row * dim + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(DG + row * dim + cols, (dy * xhat).to(DG.dtype.element_ty), mask=mask)
            tl.store(DB + row * dim + cols, dy.to(DB.dtype.element_ty), mask=mask)
        else:
            acc_g += dy * xhat
            acc_b += dy
    if not PER_TOKEN:
        ws = WS + ((b * num_splits + split) * 2) * dim
        tl.store(ws + cols, acc_g, mask=mask)
        tl.store(ws + dim + cols, acc_b, mask=mask)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def adaln_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Forward launcher -> (y (B,T,D), mean (B,T) fp32, rstd (B,T) fp32)."""
    x, gamma, beta = x.contiguous(), gamma.contiguous(), beta.contiguous()
    batch, seqlen, dim = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((batch, seqlen), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if batch * seqlen == 0:
        return y, mean, rstd
    if dim == 0:  # empty rows (no 0-wide tile): no y; the statistics of nothing are NaN, as
        return y, mean.fill_(math.nan), rstd.fill_(math.nan)  # the reference and cpu give
    block_d = triton.next_power_of_2(dim)
    _adaln_fwd_kernel[(batch * seqlen,)](
        x,
        gamma,
        beta,
        y,
        mean,
        rstd,
        seqlen,
        dim,
        eps,
        PER_TOKEN=gamma.dim() == 3,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
    return y, mean, rstd


def _num_splits(batch: int, seqlen: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: few programs, it runs them one by one
        target = 4
    splits = max(1, -(-target // max(batch, 1)))
    return max(1, min(splits, -(-seqlen // 8)))


def adaln_bwd(dy, x, gamma, mean, rstd):
    """Backward launcher -> (dx like x, dgamma like gamma, dbeta like gamma)."""
    dy, x, gamma = dy.contiguous(), x.contiguous(), gamma.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    batch, seqlen, dim = x.shape
    per_token = gamma.dim() == 3
    dx = torch.empty_like(x)
    if per_token:
        dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)
        if batch * seqlen == 0:
            return dx, dgamma, dbeta
        splits, ws = max(1, -(-seqlen // 8)), dx  # ws unused on this path
    else:
        splits = _num_splits(batch, seqlen, x.device)
        ws = torch.empty((batch, splits, 2, dim), dtype=torch.float32, device=x.device)
        if batch * seqlen == 0 or dim == 0:
            ws.zero_()
        dgamma = dbeta = dx  # placeholders; written from the workspace below
    if batch * seqlen > 0 and dim > 0:  # no elements at D = 0: dx, dgamma, dbeta are empty
        block_d = triton.next_power_of_2(dim)
        _adaln_bwd_kernel[(splits, batch)](
            dy,
            x,
            gamma,
            mean,
            rstd,
            dx,
            dgamma,
            dbeta,
            ws,
            seqlen,
            dim,
            -(-seqlen // splits),
            PER_TOKEN=per_token,
            BLOCK_D=block_d,
            num_warps=_num_warps(block_d),
        )
    if not per_token:
        # Two separate reductions: the op's outputs may not be views of one buffer.
        dgamma = ws[:, :, 0].sum(dim=1).to(gamma.dtype)
        dbeta = ws[:, :, 1].sum(dim=1).to(gamma.dtype)
    return dx, dgamma, dbeta
