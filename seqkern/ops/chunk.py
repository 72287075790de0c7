"""chunk_attention: MEGA's single-head (chunked) attention with an additive relative bias.

Backends: `reference` (the forward of `seqkern.reference.chunk.chunk_attention_ref`, plain
PyTorch, and a hand-written backward that reproduces autograd through it) and `triton`
(flash-style forward and backward over blocks of the inputs, V tiled; a per-offset bias is
gathered per tile, so nothing lq x lk is built). Both stages are torch.library ops with fakes:

    seqkern::chunk_attention(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor? key_padding_mask,
        int chunk_size, bool causal, float scaling) -> (Tensor out, Tensor lse)
    seqkern::chunk_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
        Tensor lse, Tensor bias, Tensor? key_padding_mask, int chunk_size, bool causal,
        float scaling, bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)

out is (B, Lq, V) in q's dtype, lse (B, Lq) float32 (float64 for float64 inputs; +inf on rows
that see no key); the gradients come in their inputs' dtypes, dbias empty when not asked for.
Attention dropout in training needs the probabilities: it runs `chunk_attention_ref` itself
under autograd (the Triton backend declines it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern import backends
from seqkern.ops._library import define_op, is_number
from seqkern.reference.chunk import chunk_attention_ref

OP = "chunk_attention"


def _block_shape(lq: int, lk: int, chunk_size: int) -> tuple[int, int, bool]:
    """(lq, lk, chunked) of one attention block."""
    chunked = 0 < chunk_size < lk and lq == lk
    return (chunk_size, chunk_size, True) if chunked else (lq, lk, False)


def _stats_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The reference backend's stages, with the contract of every backend: the forward returns
# (out, lse), the backward the gradients. An op's implementation runs below autograd (and inside
# any dispatch mode), so the backward cannot call autograd through the oracle: it is written out
# step by step as autograd would differentiate `chunk_attention_ref` (the same float32 softmax
# and its backward kernel, the same casts), which keeps upstream's numerics to the last bit that
# matters (the MEGA compat tests compare gradients with upstream in float64 to 1e-9). The tests
# check the stages against autograd through the oracle.


def _oracle_logits(q, k, bias, key_padding_mask, chunk_size, causal, scaling):
    """The oracle's logits (B, blocks, lq, lk) in q's dtype, -inf where hidden, and the mask of
    rows that see no key (B or 1, blocks or 1, lq, 1)."""
    B, Lq, _ = q.shape
    lq, lk, _ = _block_shape(Lq, k.shape[1], chunk_size)
    q4 = q.reshape(B, -1, lq, q.shape[2])
    k4 = k.reshape(B, -1, lk, k.shape[2])
    i, j = torch.arange(lq, device=q.device), torch.arange(lk, device=q.device)
    full_bias = bias[j[None, :] - i[:, None] + lq - 1] if bias.dim() == 1 else bias
    logits = torch.matmul(q4 * scaling, k4.transpose(2, 3)) + full_bias
    hidden = torch.zeros((lq, lk), dtype=torch.bool, device=q.device)
    if causal:
        hidden = j[None, :] > i[:, None] + (lk - lq)
    hidden = hidden.view(1, 1, lq, lk)
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(B, -1, lk)
        pad = pad & ~pad.all(dim=-1, keepdim=True)  # upstream: an all-padding block is unmasked
        hidden = hidden | pad.unsqueeze(2)
    # a logit -inf by value (a -inf bias, an infinite q or k) is hidden too, as in the oracle
    logits = logits.masked_fill(hidden | torch.isneginf(logits), -math.inf)
    return logits, torch.isneginf(logits).all(dim=-1, keepdim=True)


def _reference_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    """-> (the oracle's out (B, Lq, V), lse (B, Lq) fp32 (fp64 for fp64 inputs), +inf on rows
    that see no key)."""
    out = chunk_attention_ref(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling)
    logits, _ = _oracle_logits(q, k, bias, key_padding_mask, chunk_size, causal, scaling)
    lse = torch.logsumexp(logits.to(_stats_dtype(q)), dim=-1)
    lse = torch.where(torch.isneginf(lse), math.inf, lse).reshape(q.shape[:2])
    return out.contiguous(), lse


def _reference_bwd(
    dout, q, k, v, out, lse, bias, key_padding_mask, chunk_size, causal, scaling, bias_grad
):
    """-> (dq, dk, dv, dbias or None) in the inputs' dtypes: the oracle's softmax recomputed
    (out and lse are not needed), then dV = P^T dO, dS = softmax_backward(dO V^T) in float32,
    dQ = scaling dS K, dK = dS^T (scaling Q), and dS summed over the blocks (and, per offset,
    along each diagonal j - i) for the bias."""
    logits, dead = _oracle_logits(q, k, bias, key_padding_mask, chunk_size, causal, scaling)
    B, nb, lq, lk = logits.shape
    p32 = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1, dtype=torch.float32)
    p = p32.type_as(logits).masked_fill(dead, 0.0)
    do = dout.reshape(B, nb, lq, -1)
    v4 = v.reshape(B, nb, lk, -1)
    dv = torch.matmul(p.transpose(2, 3), do)
    dp = torch.matmul(do, v4.transpose(2, 3)).masked_fill(dead, 0.0).float()
    ds = torch.ops.aten._softmax_backward_data(dp, p32, -1, torch.float32).type_as(logits)
    ds = ds.masked_fill(dead | torch.isneginf(logits), 0.0)
    dq = torch.matmul(ds, k.reshape(B, nb, lk, -1)) * scaling
    dk = torch.matmul(ds.transpose(2, 3), q.reshape(B, nb, lq, -1) * scaling)
    dbias = None
    if bias_grad:
        dbias = ds.sum(dim=(0, 1))
        if bias.dim() == 1:
            i, j = torch.arange(lq, device=q.device), torch.arange(lk, device=q.device)
            diagonal = (j[None, :] - i[:, None] + lq - 1).reshape(-1)
            rel = torch.zeros(bias.shape, dtype=dbias.dtype, device=q.device)
            dbias = rel.index_add_(0, diagonal, dbias.reshape(-1))
        dbias = dbias.to(bias.dtype)
    return (
        dq.reshape(q.shape).to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
        dbias,
    )


# ---------------------------------------------------------------------------------------------
# torch.library ops. An absent gradient is an empty tensor.


def _empty(q: Tensor, k: Tensor) -> bool:
    """No query, no key or no batch: nothing for a kernel to do. Every row sees no key: out 0,
    lse +inf, gradients 0."""
    return q.numel() == 0 or k.shape[1] == 0


def _fwd_impl(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    if _empty(q, k):
        out, lse = _fwd_fake(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling)
        return out.zero_(), lse.fill_(math.inf)
    kernel = backends.select(OP, q, k, v, bias, 0.0, False)
    return tuple(kernel.fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling))


def _fwd_fake(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    B, Lq, _ = q.shape
    out = q.new_empty((B, Lq, v.shape[2]))
    return out, q.new_empty((B, Lq), dtype=_stats_dtype(q))


def _bwd_impl(dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad):
    if _empty(q, k):
        fake = _bwd_fake(dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad)
        return tuple(g.zero_() for g in fake)
    kernel = backends.select(OP, q, k, v, bias, 0.0, False)
    dq, dk, dv, dbias = kernel.bwd(
        dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad
    )
    return dq, dk, dv, bias.new_empty(0) if dbias is None else dbias


def _bwd_fake(dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else bias.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


define_op(
    "chunk_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor? key_padding_mask, int chunk_size,"
    " bool causal, float scaling) -> (Tensor out, Tensor lse)",
    _fwd_impl,
    _fwd_fake,
)
define_op(
    "chunk_attention_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor bias,"
    " Tensor? key_padding_mask, int chunk_size, bool causal, float scaling, bool bias_grad)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
    _bwd_impl,
    _bwd_fake,
)


class ChunkAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
        out, lse = torch.ops.seqkern.chunk_attention(
            q, k, v, bias, key_padding_mask, chunk_size, causal, scaling
        )
        ctx.save_for_backward(q, k, v, bias, key_padding_mask, out, lse)
        ctx.args = (chunk_size, causal, scaling)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, kpm, out, lse = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = torch.ops.seqkern.chunk_attention_bwd(
            dout, q, k, v, out, lse, bias, kpm, *ctx.args, bias_grad
        )
        return dq, dk, dv, dbias if bias_grad else None, None, None, None, None


def _check(q, k, v, bias, key_padding_mask, chunk_size, dropout_p, scaling=None) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_attention: chunk_size must be an int (<= 0: one block), got {chunk_size!r}"
        )
    if not is_number(dropout_p):
        raise TypeError(f"chunk_attention: dropout_p must be a float, got {dropout_p!r}")
    if scaling is not None and not is_number(scaling):
        raise TypeError(f"chunk_attention: scaling must be a float or None, got {scaling!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise ValueError(f"chunk_attention: {name} must be a torch.Tensor")
        if not t.is_floating_point():
            raise ValueError(f"chunk_attention: {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"chunk_attention: {name} must be on q's device {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"chunk_attention: {name} must be 3-D (B, L, ·), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(
                f"chunk_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}"
            )
    if q.shape[2] == 0:
        raise ValueError("chunk_attention: the q/k size K must be at least 1, got 0")
    b, lq, dk = q.shape
    lk = k.shape[1]
    if k.shape[0] != b or k.shape[2] != dk:
        raise ValueError(
            f"chunk_attention: k must be (B, Lk, K) = ({b}, Lk, {dk}), got {tuple(k.shape)}"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"chunk_attention: v must be (B, Lk, V) with (B, Lk) = {tuple(k.shape[:2])}, "
            f"got {tuple(v.shape)}"
        )
    chunked = 0 < chunk_size < lk and lq == lk
    if chunked and lk % chunk_size:
        raise ValueError(
            f"chunk_attention: chunk_size {chunk_size} must divide the length {lk} (pad first)"
        )
    bq, bk = (chunk_size, chunk_size) if chunked else (lq, lk)
    if tuple(bias.shape) not in ((bq, bk), (bq + bk - 1,)):
        raise ValueError(
            f"chunk_attention: bias must be the ({bq}, {bk}) matrix or its per-offset vector "
            f"({bq + bk - 1},), got {tuple(bias.shape)}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("chunk_attention: key_padding_mask must be a bool tensor")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"chunk_attention: key_padding_mask must be (B, Lk) = {(b, lk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"chunk_attention: key_padding_mask must be on q's device {q.device}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"chunk_attention: dropout_p must be in [0, 1], got {dropout_p}")


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = -1,
    causal: bool = True,
    scaling: float | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Single-head attention with additive bias, optionally block-diagonal over chunks.

    Args:
        q: (B, Lq, K). k: (B, Lk, K). v: (B, Lk, V). Same dtype and device; any strides (e.g.
            transposes of time-major (L, B, ·) tensors).
        bias: for one block of (lq, lk) = (c, c) when chunked (chunk_size > 0 and
            Lq == Lk > chunk_size, Lk a multiple of chunk_size), else (Lq, Lk); shared by every
            block. Either the (lq, lk) matrix or its per-offset vector `rel` of length
            lq + lk - 1, bias[i, j] = rel[j - i + lq - 1] (MEGA's "simple" bias: rel =
            w[M - lk : M + lq - 1]); the vector form never builds an lq x lk tensor on the Triton
            backend, and its gradient is the diagonal sums of d logits.
        key_padding_mask: optional (B, Lk) bool, True = padding; a block whose keys are all
            padding is left unmasked (upstream's rule).
        causal: causal mask with queries aligned to the end of the keys (query i sits at key
            position lk - lq + i).
        scaling: multiplies q (default K ** -0.5). dropout_p/training: dropout on probabilities
            (reference backend only).
    Returns:
        (B, Lq, V) in q's dtype; rows with no visible key are 0. Softmax in float32.

    Example:
        >>> q = k = torch.randn(2, 12, 8); v = torch.randn(2, 12, 20)
        >>> o = seqkern.ops.chunk.chunk_attention(q, k, v, torch.zeros(4, 4), chunk_size=4)
        >>> o = seqkern.ops.chunk.chunk_attention(q, k, v, torch.zeros(7), chunk_size=4)
    """
    _check(q, k, v, bias, key_padding_mask, chunk_size, dropout_p, scaling)
    scaling = float(q.shape[2] ** -0.5 if scaling is None else scaling)
    if dropout_p > 0 and training:
        backends.select(OP, q, k, v, bias, dropout_p, training)  # BackendError if disallowed
        return chunk_attention_ref(
            q, k, v, bias, key_padding_mask, chunk_size, causal, scaling, dropout_p, training
        )
    if torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad
    ):
        return ChunkAttentionFunction.apply(
            q, k, v, bias, key_padding_mask, chunk_size, causal, scaling
        )
    # no graph to record (e.g. a decoding step): the forward op alone
    out, _ = torch.ops.seqkern.chunk_attention(
        q, k, v, bias, key_padding_mask, chunk_size, causal, scaling
    )
    return out


_TRITON_MAX_QK_SIZE = 256  # the kernels hold all of K in one tile


def _supports_triton(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, training: bool
) -> str | None:
    if q.device.type == "cpu":
        if not backends.triton_interpret():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if q.dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16"
    elif q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} not supported (float32, float16, bfloat16)"
    if not k.dtype == v.dtype == bias.dtype == q.dtype:
        return "q, k, v and bias must share one dtype"
    if dropout_p > 0 and training:
        return "attention dropout is not implemented in the Triton kernel"
    if q.shape[2] > _TRITON_MAX_QK_SIZE:
        return f"qk size {q.shape[2]} > {_TRITON_MAX_QK_SIZE} (one K tile per program)"
    if q.numel() == 0 or v.numel() == 0:
        return "empty inputs"
    return None


def _triton_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    from seqkern._triton.mega_attention import chunk_attention_fwd

    return chunk_attention_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling)


def _triton_bwd(dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad):
    from seqkern._triton.mega_attention import chunk_attention_bwd

    return chunk_attention_bwd(
        dout, q, k, v, out, lse, bias, kpm, chunk_size, causal, scaling, bias_grad
    )


# ---------------------------------------------------------------------------------------------
# The cpu backend: the forward in one pass (logits once, lse and probabilities from them) and,
# for long causal blocks, query tiles that skip the keys after them (about half the work).
# Its backward is the reference's stages, which need only (out, lse).

_CPU_QUERY_TILE = 128


def _supports_cpu(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, training: bool
) -> str | None:
    if q.device.type != "cpu":
        return f"needs CPU tensors, got {q.device}"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return f"dtype {q.dtype} not supported (float32, float64, bfloat16)"
    if not k.dtype == v.dtype == bias.dtype == q.dtype:
        return "q, k, v and bias must share one dtype"
    if dropout_p > 0 and training:
        return "attention dropout runs on the reference"
    return None


def _cpu_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling):
    if q.dtype == torch.float64:
        # The op's softmax runs in float32 (upstream's, the oracle's): the one-pass path below
        # would compute it in float64 and differ from the oracle by the float32 rounding.
        # float64 is a checking dtype, so it runs the oracle's forward itself, bit for bit.
        return _reference_fwd(q, k, v, bias, key_padding_mask, chunk_size, causal, scaling)
    B, Lq, K = q.shape
    lq, lk, _ = _block_shape(Lq, k.shape[1], chunk_size)
    q4 = q.reshape(B, -1, lq, K)
    k4 = k.reshape(B, -1, lk, K)
    v4 = v.reshape(B, -1, lk, v.shape[2])
    i = j = None
    if bias.dim() == 2:
        full_bias = bias
    elif lq == 1:  # a decoding step: the vector is the row
        full_bias = bias.unsqueeze(0)
    else:
        i, j = torch.arange(lq, device=q.device), torch.arange(lk, device=q.device)
        full_bias = bias[j[None, :] - i[:, None] + lq - 1]
    if causal and i is None:
        i, j = torch.arange(lq, device=q.device), torch.arange(lk, device=q.device)
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(B, -1, 1, lk)
        pad = pad & ~pad.all(dim=-1, keepdim=True)  # upstream: an all-padding block is unmasked
    stats = _stats_dtype(q)
    tile = _CPU_QUERY_TILE if causal and lq > _CPU_QUERY_TILE else lq
    outs, lses = [], []
    for r0 in range(0, lq, tile):
        r1 = min(lq, r0 + tile)
        end = lk - lq + r1 if causal else lk  # the keys any row of this tile sees
        logits = torch.matmul(q4[:, :, r0:r1] * scaling, k4[:, :, :end].transpose(2, 3))
        logits = logits + full_bias[r0:r1, :end]
        hidden = None
        if causal:
            hidden = (j[None, :end] > i[r0:r1, None] + (lk - lq)).view(1, 1, r1 - r0, end)
        if pad is not None:
            hidden = pad[..., :end] if hidden is None else hidden | pad[..., :end]
        if hidden is not None:
            logits = logits.masked_fill(hidden, -math.inf)
        logits = logits.to(stats)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        # a row that sees no key (hidden, or -inf by value everywhere): lse +inf, output 0
        lse = lse.masked_fill(torch.isneginf(lse), math.inf)
        probs = torch.exp(logits - lse).to(q.dtype)
        outs.append(torch.matmul(probs, v4[:, :, :end]))
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out.reshape(B, Lq, v.shape[2]), lse.reshape(B, Lq)


backends.register(
    backends.Kernel(OP, "reference", _reference_fwd, _reference_bwd, backends.always_supported)
)
backends.register(backends.Kernel(OP, "cpu", _cpu_fwd, _reference_bwd, _supports_cpu))
backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _supports_triton))
