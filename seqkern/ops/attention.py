"""attention: scaled dot-product attention with a bool/additive mask and bottom-right causal.

The hot path of VALL-E's transformer blocks. Backends: `reference` (the forward of
`seqkern.reference.attention.attention_ref`, plain PyTorch, and a hand-written backward that
reproduces autograd through it) and `triton` (flash attention, forward and backward; reads q, k
and v through their strides, so head views of a packed QKV projection need no copy). Both
stages are torch.library ops with fakes:

    seqkern::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale)
        -> (Tensor out, Tensor lse)
    seqkern::attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
        Tensor? mask, bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)

out, dq, dk and dv are (B, H, L, hd) views of time-major (B, L, H, hd) memory in the inputs'
dtype, so `out.transpose(1, 2).reshape(B, T, H * hd)` is free; lse is (B, H, T) float32
(float64 for float64 inputs), +inf on rows that see no key.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern import backends
from seqkern.ops._library import define_op
from seqkern.reference.attention import attention_ref

OP = "attention"


def _stats_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _time_major(B: int, H: int, L: int, hd: int, like: Tensor, dtype=None) -> Tensor:
    """An uninitialised (B, H, L, hd) tensor over (B, L, H, hd) memory."""
    return like.new_empty((B, L, H, hd), dtype=dtype or like.dtype).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# The reference backend's stages. An op's implementation runs below autograd, so the backward
# is written out as autograd differentiates `attention_ref` (softmax in fp32, fp64 for fp64);
# the tests check both stages against autograd through the oracle.


def _oracle_logits(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float):
    """(logits (B, H, T, S) in the accumulation dtype, -inf where hidden)."""
    acc = _stats_dtype(q)
    logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    T, S = q.shape[-2], k.shape[-2]
    hidden = torch.zeros((T, S), dtype=torch.bool, device=q.device)
    if causal:
        hidden = torch.ones_like(hidden).tril(diagonal=S - T).logical_not()
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = hidden | ~mask
        else:
            logits = logits + mask.to(acc)
    return logits.masked_fill(hidden, -math.inf)


def _reference_fwd(q, k, v, mask, causal, scale):
    B, H, T, hd = q.shape
    out = _time_major(B, H, T, hd, q)
    out.copy_(attention_ref(q, k, v, mask=mask, causal=causal, scale=scale))
    lse = torch.logsumexp(_oracle_logits(q, k, mask, causal, scale), dim=-1)
    return out, torch.where(torch.isneginf(lse), math.inf, lse)


def _reference_bwd(dout, q, k, v, out, lse, mask, causal, scale):
    acc = _stats_dtype(q)
    p = torch.exp(_oracle_logits(q, k, mask, causal, scale) - lse.unsqueeze(-1))
    do = dout.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.to(acc).transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    B, H, T, hd = q.shape
    S = k.shape[2]
    grads = (_time_major(B, H, T, hd, q), _time_major(B, H, S, hd, k), _time_major(B, H, S, hd, v))
    for g, value in zip(grads, (dq, dk, dv)):
        g.copy_(value)
    return grads


def _reference_supports(*args) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------
# The Triton backend


def _triton_supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    if q.device.type == "cpu":
        if not backends.triton_interpret():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if q.dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16"
    elif q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} not supported (float32, float16, bfloat16)"
    hd = q.shape[-1]
    if not 16 <= hd <= 128:
        return f"head dim {hd} outside 16..128"
    if q.shape[0] * q.shape[1] > 65535:
        return f"B * H = {q.shape[0] * q.shape[1]} > 65535"
    if mask is not None and mask.dtype not in (
        torch.bool,
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        return f"mask dtype {mask.dtype} not supported"
    return None


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_fwd(q, k, v, mask, causal, scale):
    from seqkern._triton.attention import attention_fwd

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, hd = q.shape
    out = _time_major(B, H, T, hd, q)
    lse = attention_fwd(q, k, v, out, mask, causal, scale)
    return out, lse


def _triton_bwd(dout, q, k, v, out, lse, mask, causal, scale):
    from seqkern._triton.attention import attention_bwd

    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, hd = q.shape
    S = k.shape[2]
    dq, dk, dv = (
        _time_major(B, H, T, hd, q),
        _time_major(B, H, S, hd, k),
        _time_major(B, H, S, hd, v),
    )
    attention_bwd(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
    return dq, dk, dv


backends.register(
    backends.Kernel(OP, "reference", _reference_fwd, _reference_bwd, _reference_supports)
)
backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _triton_supports))


# ---------------------------------------------------------------------------------------------
# torch.library ops and autograd


def _fwd_impl(q, k, v, mask, causal, scale):
    return tuple(backends.select(OP, q, k, v, mask).fwd(q, k, v, mask, causal, scale))


def _fwd_fake(q, k, v, mask, causal, scale):
    B, H, T, hd = q.shape
    return _time_major(B, H, T, hd, q), q.new_empty((B, H, T), dtype=_stats_dtype(q))


def _bwd_impl(dout, q, k, v, out, lse, mask, causal, scale):
    kernel = backends.select(OP, q, k, v, mask)
    return tuple(kernel.bwd(dout, q, k, v, out, lse, mask, causal, scale))


def _bwd_fake(dout, q, k, v, out, lse, mask, causal, scale):
    B, H, T, hd = q.shape
    S = k.shape[2]
    return (
        _time_major(B, H, T, hd, q),
        _time_major(B, H, S, hd, k),
        _time_major(B, H, S, hd, v),
    )


define_op(
    "attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale)"
    " -> (Tensor out, Tensor lse)",
    _fwd_impl,
    _fwd_fake,
)
define_op(
    "attention_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask,"
    " bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)",
    _bwd_impl,
    _bwd_fake,
)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = torch.ops.seqkern.attention(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.seqkern.attention_bwd(
            dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale
        )
        return dq, dk, dv, None, None, None


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, L, hd), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"attention: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"attention: {name} must match q's dtype/device ({q.dtype}, {q.device}), "
                f"got ({t.dtype}, {t.device})"
            )
    if k.shape != v.shape[:-1] + k.shape[-1:] or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError("attention: q and k must have the same head dim")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("attention: v must have q's head dim")
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention: mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attention: mask must be bool or floating point, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attention: mask must be on q's device {q.device}, got {mask.device}")
    if mask.requires_grad:
        raise ValueError(
            "attention: no gradient flows to the mask; pass mask.detach() (or call "
            "seqkern.reference.attention.attention_ref to differentiate through it)"
        )
    B, H, T, _ = q.shape
    full = (B, H, T, k.shape[2])
    try:
        if torch.broadcast_shapes(mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attention: mask {tuple(mask.shape)} is not broadcastable to (B, H, T, S) = {full}"
        ) from None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, differentiable in q, k and v.

    Args:
        q: (B, H, T, hd); k, v: (B, H, S, hd); one dtype and device; any strides (the Triton
            backend reads a unit last stride in place, others are copied).
        mask: broadcastable to (B, H, T, S): bool (True = may attend, as SDPA) or an additive
            float; no gradient flows to it. A bool (B, 1, 1, S) key padding mask lets the Triton
            kernels skip the padded key tiles.
        causal: bottom-right aligned: query t sees keys s <= t + S - T (a chunk of T new frames
            after S - T cached ones sees exactly its past; for S == T, the lower triangle).
        scale: default hd ** -0.5.
    Returns:
        (B, H, T, hd) in q's dtype, a view of time-major (B, T, H, hd) memory (the reference
        backend's too). Rows that may attend no key are 0 (SDPA gives NaN); NaN inputs give NaN.

    Example:
        >>> q = k = v = torch.randn(2, 4, 50, 64)
        >>> out = attention(q, k, v, causal=True)  # (2, 4, 50, 64)
    """
    _check(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionFunction.apply(q, k, v, mask, bool(causal), scale)
