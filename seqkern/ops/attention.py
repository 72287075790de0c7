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
import operator

import torch
from torch import Tensor

from seqkern import backends
from seqkern.ops._library import define_op, is_number
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


def _oracle_logits(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    rows: slice = slice(None),
    key_end: int | None = None,
) -> Tensor:
    """(logits (B, H, T, S) in the accumulation dtype, -inf where hidden); of the query rows
    `rows` and the keys [0, key_end) only, when given (causality counts in the whole T x S)."""
    acc = _stats_dtype(q)
    T, S = q.shape[-2], k.shape[-2]
    r0, r1, _ = rows.indices(T)
    ke = S if key_end is None else key_end
    logits = torch.matmul(q[..., r0:r1, :].to(acc), k[..., :ke, :].to(acc).transpose(-1, -2))
    logits.mul_(scale)
    hidden = None
    if causal:
        hidden = torch.ones((r1 - r0, ke), dtype=torch.bool, device=q.device)
        hidden = hidden.tril(diagonal=S - T + r0).logical_not()
    if mask is not None:
        if mask.dim() >= 2 and mask.shape[-2] != 1:
            mask = mask[..., r0:r1, :]
        if mask.shape[-1] != 1:
            mask = mask[..., :ke]
        if mask.dtype == torch.bool:
            hidden = ~mask if hidden is None else hidden | ~mask
        else:
            logits = logits + mask.to(acc)
    return logits if hidden is None else logits.masked_fill_(hidden, -math.inf)


def _reference_fwd(q, k, v, mask, causal, scale):
    B, H, T, hd = q.shape
    out = _time_major(B, H, T, hd, q)
    out.copy_(attention_ref(q, k, v, mask=mask, causal=causal, scale=scale))
    lse = torch.logsumexp(_oracle_logits(q, k, mask, causal, scale), dim=-1)
    return out, torch.where(torch.isneginf(lse), math.inf, lse)


def _reference_bwd(
    dout, q, k, v, out, lse, mask, causal, scale, dq=None, dk=None, dv=None, block_rows=None
):
    """Autograd's softmax backward, written out; `block_rows` query rows at a time (all by
    default), so the (rows, S) probabilities of one block are all it holds.

    p is recomputed as autograd's softmax saved it, normalised by its own row sum, and delta as
    sum_j p_ij dp_ij from those p and dp: exp(logits - lse) would scale each row by the
    rounding of lse, ulp(|lse|), and delta = do . out carries the rounding of out; in a
    saturated softmax (|logits| in the hundreds) either leaves sum_j ds_ij, which is 0, far
    above the true ds. lse is not read.
    """
    acc = _stats_dtype(q)
    T, S = q.shape[2], k.shape[2]
    dq, dk, dv = _grad_buffers(q, k, dq, dk, dv)
    ka, va = k.to(acc), v.to(acc)
    grad_k = ka.new_zeros(ka.shape)
    grad_v = va.new_zeros(va.shape)
    step = max(1, T if block_rows is None else block_rows)
    # logits can be -inf by the masks, causality, or an infinite q or k
    may_hide = mask is not None or causal or not bool(q.isfinite().all() & k.isfinite().all())
    for r0 in range(0, T, step):
        rows = slice(r0, min(T, r0 + step))
        ke = min(S, max(0, rows.stop + S - T)) if causal else S  # keys past ke are hidden
        logits = _oracle_logits(q, k, mask, causal, scale, rows, ke)
        p = torch.softmax(logits, dim=-1)
        if may_hide:  # rows that see no key give 0 (softmax gave NaN)
            p.masked_fill_(torch.isneginf(logits).all(dim=-1, keepdim=True), 0.0)
        do = dout[..., rows, :].to(acc)
        dp = torch.matmul(do, va[..., :ke, :].transpose(-1, -2))
        ds = torch._softmax_backward_data(dp, p, -1, acc)  # p * (dp - sum_j p dp), fused
        if may_hide:  # hidden logits pass no gradient, even from a NaN row
            ds.masked_fill_(torch.isneginf(logits), 0.0)
        dq[..., rows, :].copy_(torch.matmul(ds, ka[..., :ke, :]).mul_(scale))
        grad_k[..., :ke, :].add_(torch.matmul(ds.transpose(-1, -2), q[..., rows, :].to(acc)))
        grad_v[..., :ke, :].add_(torch.matmul(p.transpose(-1, -2), do))
    dk.copy_(grad_k.mul_(scale))
    dv.copy_(grad_v)
    return dq, dk, dv


def _grad_buffers(q, k, dq, dk, dv):
    """The destinations of dq, dk, dv: the given views, else new time-major tensors."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    return (
        _time_major(B, H, T, hd, q) if dq is None else dq,
        _time_major(B, H, S, hd, k) if dk is None else dk,
        _time_major(B, H, S, hd, k) if dv is None else dv,
    )


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


def _triton_bwd(dout, q, k, v, out, lse, mask, causal, scale, dq=None, dk=None, dv=None):
    from seqkern._triton.attention import attention_bwd

    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq, dk, dv = _grad_buffers(q, k, dq, dk, dv)
    attention_bwd(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The cpu backend: PyTorch's fused CPU flash-attention kernels (ATen), under seqkern's contract:
# bottom-right causal for T != S, a bool mask made additive, and the rows that see no key
# marked with lse = +inf (ATen leaves them at 0 output and lse 0).

_CPU_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    if q.device.type != "cpu":
        return f"needs CPU tensors, got {q.device}"
    if q.dtype not in _CPU_TYPES:
        return f"dtype {q.dtype} not supported"
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        return f"an additive mask must have q's dtype {q.dtype}, got {mask.dtype}"
    return None


def _cpu_mask(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool):
    """(additive mask or None, is_causal for ATen, rows that see no key (B|1, H|1, T) or None)."""
    T, S = q.shape[2], k.shape[2]
    keep = None
    if causal and T != S:  # ATen's causal is top-left aligned: spell out bottom-right
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        causal = False
    if mask is not None and mask.dim() < 4:  # ATen takes 2-D or 4-D masks; broadcasting
        mask = mask[(None,) * (4 - mask.dim())]  # aligns the dims on the right
    additive = None
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else keep & mask
    elif mask is not None:
        additive = mask
    if keep is not None:
        if additive is None:
            additive = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        # where, not +: a NaN of the additive mask on a hidden key stays hidden, as in the oracle
        additive = torch.where(keep, additive, -math.inf)
    dead = None if additive is None else torch.isneginf(additive).all(dim=-1)
    return additive, causal, dead


def _finite(q: Tensor, k: Tensor, additive: Tensor | None) -> bool:
    """q and k finite, the additive mask finite or -inf."""
    ok = q.isfinite().all() & k.isfinite().all()
    if additive is not None:
        ok &= ~(additive.isnan() | additive.isposinf()).any()
    return bool(ok)


def _cpu_fwd(q, k, v, mask, causal, scale):
    # ATen's CPU kernel reads a non-unit last stride wrongly for float64: give it unit strides
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    additive, is_causal, dead = _cpu_mask(q, k, mask, causal)
    # ATen's running max skips NaN (a NaN query row comes back as a row that sees no key) and
    # adds the mask's -inf to an infinite logit (NaN where the oracle hides it): non-finite
    # logits take the reference, whose NaN and Inf are the contract's. A pass over q, k and
    # the mask; the reference runs only on such inputs.
    if not _finite(q, k, additive):
        return _reference_fwd(q, k, v, mask, causal, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=additive, scale=scale
    )
    B, H, T, hd = q.shape
    result = _time_major(B, H, T, hd, q)
    result.copy_(out)
    lse = lse.to(_stats_dtype(q)).contiguous()  # ATen's is a (B, T, H) transpose; the fake's is not
    if dead is not None:  # broadcastable to (B, H, T)
        lse.masked_fill_(dead.expand(B, H, T), math.inf)
    return result, lse


def _cpu_bwd(dout, q, k, v, out, lse, mask, causal, scale, dq=None, dk=None, dv=None):
    # Not ATen's flash backward: its delta = do . out and p = exp(logits - lse) leave gradients
    # of a saturated softmax several times less accurate than autograd's (measured in
    # tests/ops/test_attention.py::test_saturated_softmax_matches_oracle). The reference's
    # exact softmax backward, in blocks of query rows that hold about 4M probabilities at a time.
    B, H, _, _ = q.shape
    block = max(1, (1 << 22) // max(1, B * H * k.shape[2]))
    return _reference_bwd(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv, block)


backends.register(
    backends.Kernel(OP, "reference", _reference_fwd, _reference_bwd, _reference_supports)
)
backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _triton_supports))
backends.register(backends.Kernel(OP, "cpu", _cpu_fwd, _cpu_bwd, _cpu_supports))


# ---------------------------------------------------------------------------------------------
# torch.library ops and autograd


def _empty(q: Tensor, k: Tensor) -> bool:
    """No query or no key (or no batch / head): nothing for a kernel to do (ATen's CPU kernel
    dies of SIGFPE on T == 0 or S == 0). Every row sees no key: out 0, lse +inf, grads 0."""
    return q.numel() == 0 or k.shape[2] == 0


def _fwd_impl(q, k, v, mask, causal, scale):
    if _empty(q, k):
        out, lse = _fwd_fake(q, k, v, mask, causal, scale)
        return out.zero_(), lse.fill_(math.inf)
    return tuple(backends.select(OP, q, k, v, mask).fwd(q, k, v, mask, causal, scale))


def _fwd_fake(q, k, v, mask, causal, scale):
    B, H, T, hd = q.shape
    return _time_major(B, H, T, hd, q), q.new_empty((B, H, T), dtype=_stats_dtype(q))


def _bwd_impl(dout, q, k, v, out, lse, mask, causal, scale):
    if _empty(q, k):
        return tuple(g.zero_() for g in _bwd_fake(dout, q, k, v, out, lse, mask, causal, scale))
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


def _split_packed(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, 3 * D) laid out [q | k | v] -> three (B, H, T, hd) views."""
    B, T, D3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, D3 // (3 * n_head)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _bwd_packed_impl(dout, qkv, out, lse, mask, causal, scale, n_head):
    q, k, v = _split_packed(qkv, n_head)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    if _empty(q, k):
        return dqkv.zero_()
    dq, dk, dv = _split_packed(dqkv, n_head)
    kernel = backends.select(OP, q, k, v, mask)
    kernel.bwd(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
    return dqkv


def _bwd_packed_fake(dout, qkv, out, lse, mask, causal, scale, n_head):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


define_op(
    "attention_bwd_packed",
    "(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? mask, bool causal, float scale,"
    " int n_head) -> Tensor dqkv",
    _bwd_packed_impl,
    _bwd_packed_fake,
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


class PackedAttentionFunction(torch.autograd.Function):
    """Attention over the packed output of one QKV projection; the backward writes dq, dk and
    dv into one (B, T, 3 * D) gradient, which the projection's backward takes as is."""

    @staticmethod
    def forward(ctx, qkv, n_head, mask, causal, scale):
        out, lse = torch.ops.seqkern.attention(*_split_packed(qkv, n_head), mask, causal, scale)
        ctx.save_for_backward(qkv, out, lse, mask)
        ctx.n_head, ctx.causal, ctx.scale = n_head, causal, scale
        B, H, T, hd = out.shape
        return out.transpose(1, 2).reshape(B, T, H * hd)  # time-major: a view

    @staticmethod
    def backward(ctx, dy):
        qkv, out, lse, mask = ctx.saved_tensors
        B, H, T, hd = out.shape
        dout = dy.reshape(B, T, H, hd).transpose(1, 2)
        dqkv = torch.ops.seqkern.attention_bwd_packed(
            dout, qkv, out, lse, mask, ctx.causal, ctx.scale, ctx.n_head
        )
        return dqkv, None, None, None, None


def _check_scale(op: str, scale) -> None:
    if scale is not None and not is_number(scale):
        raise TypeError(f"{op}: scale must be a float or None, got {scale!r:.40}")


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
    if q.shape[-1] == 0:
        raise ValueError("attention: head dim must be at least 1, got 0")
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
    _check_scale("attention", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionFunction.apply(q, k, v, mask, bool(causal), scale)


def attention_packed(
    qkv: Tensor,
    n_head: int,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Self-attention over the output of one fused QKV projection: no split, no copies.

    Args:
        qkv: (B, T, 3 * D) laid out [q | k | v] along the last dim, each D = n_head * hd (the
            output of `F.linear(x, cat([Wq, Wk, Wv]), ...)`), unit last stride.
        n_head: number of heads.
        mask, causal, scale: as `attention` (here S == T).
    Returns:
        (B, T, D) in qkv's dtype, heads merged: the out projection's input. The backward
        returns the gradient of qkv as one (B, T, 3 * D) tensor.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        raise ValueError(f"attention_packed: qkv must be a (B, T, 3 * D) tensor, got {qkv!r:.60}")
    if not qkv.is_floating_point():
        raise ValueError(f"attention_packed: qkv must be floating point, got {qkv.dtype}")
    _check_scale("attention_packed", scale)
    try:
        heads = operator.index(n_head)  # an int or a numpy int, not a float
    except TypeError:
        heads = 0
    if heads < 1 or isinstance(n_head, bool):
        raise ValueError(f"attention_packed: n_head must be a positive int, got {n_head!r}")
    n_head = heads
    if qkv.shape[-1] % (3 * n_head):
        raise ValueError(
            f"attention_packed: qkv's last dim {qkv.shape[-1]} is not 3 * n_head * hd for "
            f"n_head = {n_head}"
        )
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = _split_packed(qkv, n_head)
    _check(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return PackedAttentionFunction.apply(qkv, int(n_head), mask, bool(causal), scale)
