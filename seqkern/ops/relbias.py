"""relbias_attention: BEATs' attention with a gated relative-position bias and fairseq masks.

Backends: `reference` (plain PyTorch forward and hand-written backward stages; need_weights and
dropout run `relbias_attention_ref` itself, under autograd) and `triton` (flash-style forward and
backward; the bias is gathered per tile from its per-distance form, so no T x S tensor is built
when `rel_bias` is given). Both stages are torch.library ops with fakes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends
from seqkern.ops._library import define_op, is_number
from seqkern.reference.relbias import (
    relbias_attention_bwd_ref,
    relbias_attention_fwd_ref,
    relbias_attention_ref,
)

OP = "relbias_attention"

# Tensor methods answered from the wrapper's own metadata, without materialising.
_METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.__len__,
    torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_floating_point,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
}


class RelativePositionBias(torch.Tensor):
    """A (B * H, T, S) position bias that stores only its (H, T + S - 1) per-distance form.

    BEATs' first attention layer returns its ungated bias for the next layers. seqkern's layers
    read `.rel_bias` from this handle and never build the T x S tensor; any other consumer sees
    an ordinary tensor: every torch function materialises it first (above autograd, so the
    gradient still reaches `rel_bias`). `materialize()` builds it explicitly.
    """

    rel_bias: Tensor
    batch: int

    @staticmethod
    def __new__(cls, rel_bias: Tensor, batch: int, query_length: int, key_length: int):
        heads = rel_bias.shape[0]
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            (batch * heads, query_length, key_length),
            dtype=rel_bias.dtype,
            device=rel_bias.device,
        )
        self.rel_bias, self.batch = rel_bias, batch
        return self

    def __init__(self, rel_bias, batch, query_length, key_length):
        super().__init__()

    def materialize(self) -> Tensor:
        from seqkern.reference.relbias import expand_rel_bias

        heads = self.rel_bias.shape[0]
        _, T, S = self.shape
        values = expand_rel_bias(self.rel_bias, T, S).unsqueeze(0)
        return values.expand(self.batch, heads, T, S).reshape(self.batch * heads, T, S)

    def __repr__(self) -> str:
        shape, compact = tuple(self.shape), tuple(self.rel_bias.shape)
        return f"RelativePositionBias(shape={shape}, rel_bias={compact})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)

        def unwrap(x):
            return x.materialize() if isinstance(x, RelativePositionBias) else x

        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only through paths that bypass __torch_function__: materialise, no autograd.
        def unwrap(x):
            return x.materialize() if isinstance(x, RelativePositionBias) else x

        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.library ops. Optional inputs are `Tensor?`; an absent gradient is an empty tensor.


def _grad_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_impl(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
    kernel = backends.select(OP, q, k, v, 0.0, False)
    return tuple(kernel.fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask))


def _fwd_fake(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
    out = q.new_empty(q.shape)
    return out, q.new_empty(q.shape[:3], dtype=_grad_dtype(q))


def _bwd_impl(dout, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad):
    kernel = backends.select(OP, q, k, v, 0.0, False)
    dq, dk, dv, dbias, dgate = kernel.bwd(
        dout, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad
    )

    def absent():  # a fresh empty tensor each: two outputs may not alias
        return q.new_empty(0, dtype=_grad_dtype(q))

    return dq, dk, dv, absent() if dbias is None else dbias, absent() if dgate is None else dgate


def _bwd_fake(dout, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad):
    dt = _grad_dtype(q)
    B, H, T, _ = q.shape
    S = k.shape[2]
    dbias = q.new_empty(0, dtype=dt)
    if bias_grad and rel_bias is not None:
        dbias = q.new_empty((H, T + S - 1), dtype=dt)
    elif bias_grad and bias is not None:
        dbias = q.new_empty((B, H, T, S), dtype=dt)
    dgate = (
        q.new_empty((B, H, T, 1), dtype=dt)
        if gate is not None and (rel_bias is not None or bias is not None)
        else q.new_empty(0, dtype=dt)
    )
    return (
        q.new_empty(q.shape, dtype=dt),
        k.new_empty(k.shape, dtype=dt),
        v.new_empty(v.shape, dtype=dt),
        dbias,
        dgate,
    )


define_op(
    "relbias_attention",
    "(Tensor q, Tensor k, Tensor v, float scale, Tensor? rel_bias, Tensor? bias, Tensor? gate,"
    " Tensor? attn_mask, Tensor? key_padding_mask) -> (Tensor out, Tensor lse)",
    _fwd_impl,
    _fwd_fake,
)
define_op(
    "relbias_attention_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale,"
    " Tensor? rel_bias, Tensor? bias, Tensor? gate, Tensor? attn_mask, Tensor? key_padding_mask,"
    " bool bias_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias, Tensor dgate)",
    _bwd_impl,
    _bwd_fake,
)


class RelbiasAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
        out, lse = torch.ops.seqkern.relbias_attention(
            q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask
        )
        ctx.save_for_backward(q, k, v, out, lse, rel_bias, bias, gate, attn_mask, key_padding_mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rel_bias, bias, gate, attn_mask, kpm = ctx.saved_tensors
        need = ctx.needs_input_grad
        bias_grad = (rel_bias is not None and need[4]) or (bias is not None and need[5])
        dq, dk, dv, dbias, dgate = torch.ops.seqkern.relbias_attention_bwd(
            dout, q, k, v, out, lse, ctx.scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad
        )
        d_rel = dbias.to(rel_bias.dtype) if rel_bias is not None and need[4] else None
        d_bias = None
        if bias is not None and need[5]:
            d_bias = dbias.sum_to_size(bias.shape).to(bias.dtype)
        d_gate = dgate.to(gate.dtype) if gate is not None and need[6] and dgate.numel() else None
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            None,
            d_rel,
            d_bias,
            d_gate,
            None,
            None,
        )


def _check_tensors(q, k, v, bias, gate, attn_mask, key_padding_mask, rel_bias) -> None:
    """Types, dtypes and devices; the shapes are checked by the caller."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"relbias_attention: {name} must be a torch.Tensor, got {type(t)}")
        if t.dim() != 4:
            raise ValueError(
                f"relbias_attention: {name} must be (B, H, L, hd), got {tuple(t.shape)}"
            )
        if not t.is_floating_point() or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"relbias_attention: {name} must be floating point, with q's dtype and device "
                f"({q.dtype}, {q.device}), got ({t.dtype}, {t.device})"
            )
    optional = (
        ("bias", bias, "float"),
        ("rel_bias", rel_bias, "float"),
        ("gate", gate, "float"),
        ("attn_mask", attn_mask, "float"),
        ("key_padding_mask", key_padding_mask, "bool"),
    )
    for name, t, kind in optional:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"relbias_attention: {name} must be a tensor or None, got {type(t)}")
        if t.device != q.device:
            raise ValueError(
                f"relbias_attention: {name} must be on q's device {q.device}, got {t.device}"
            )
        if kind == "float" and not t.is_floating_point():
            raise ValueError(
                f"relbias_attention: {name} must be floating point (it is added to the "
                f"logits), got {t.dtype}"
            )
        if kind == "bool" and (t.is_floating_point() or t.is_complex()):
            raise ValueError(
                f"relbias_attention: {name} must be bool (True = padding) or an integer 0/1 "
                f"tensor, got {t.dtype}"
            )


def relbias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None = None,
    gate: Tensor | None = None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    rel_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """See `seqkern.reference.relbias.relbias_attention_ref` for the math and the shapes:
    q (B, H, T, hd), k and v (B, H, S, hd), bias broadcastable to (B, H, T, S) or rel_bias
    (H, T + S - 1), gate (B, H, T, 1), attn_mask (T, S) additive, key_padding_mask (B, S)
    True = padding. Returns (out (B, H, T, hd), probs (B, H, T, S) or None).

    need_weights=True and dropout need the probabilities, which only the reference keeps: they
    run it directly (an explicit use_backend without "reference" raises BackendError).
    """
    _check_tensors(q, k, v, bias, gate, attn_mask, key_padding_mask, rel_bias)
    B, H, T, _ = q.shape
    S = k.shape[-2]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"relbias_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit "
            f"q {tuple(q.shape)}"
        )
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"relbias_attention: q, k and v must share the head dim, got {q.shape[-1]}, "
            f"{k.shape[-1]}, {v.shape[-1]}"
        )
    if q.shape[-1] == 0:
        raise ValueError("relbias_attention: head dim must be at least 1, got 0")
    if not is_number(scale):
        raise TypeError(f"relbias_attention: scale must be a float, got {type(scale).__name__}")
    if not is_number(dropout_p) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(
            f"relbias_attention: dropout_p must be a number in [0, 1], got {dropout_p!r}"
        )
    if gate is not None and tuple(gate.shape) != (B, H, T, 1):
        raise ValueError(
            f"relbias_attention: gate must be (B, H, T, 1) = {(B, H, T, 1)}, "
            f"got {tuple(gate.shape)}"
        )
    if bias is not None:
        try:
            ok = torch.broadcast_shapes(bias.shape, (B, H, T, S)) == (B, H, T, S)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"relbias_attention: bias {tuple(bias.shape)} is not broadcastable to "
                f"(B, H, T, S) = {(B, H, T, S)}"
            )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(
            f"relbias_attention: key_padding_mask must be (B, S) = {(B, S)}, "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if attn_mask is not None and tuple(attn_mask.shape) != (T, S):
        raise ValueError(
            f"relbias_attention: attn_mask must be (T, S) = {(T, S)}, got {tuple(attn_mask.shape)}"
        )
    if rel_bias is not None and tuple(rel_bias.shape) != (H, T + S - 1):
        raise ValueError(
            f"relbias_attention: rel_bias must be (H, T + S - 1) = {(H, T + S - 1)}, "
            f"got {tuple(rel_bias.shape)}"
        )
    if rel_bias is not None and bias is not None:
        raise ValueError("relbias_attention: give bias or rel_bias, not both")
    if need_weights or dropout_p > 0:
        backends.select(OP, q, k, v, dropout_p, need_weights)  # BackendError if disallowed
        return relbias_attention_ref(
            q,
            k,
            v,
            scale,
            bias,
            gate,
            attn_mask,
            key_padding_mask,
            dropout_p,
            need_weights,
            rel_bias,
        )
    out = RelbiasAttentionFunction.apply(
        q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask
    )
    return out, None


def _supports_triton(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float, need_weights: bool
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
    if need_weights:
        return "need_weights=True returns the probabilities: only the reference keeps them"
    if dropout_p > 0:
        return "attention dropout is not implemented in the Triton kernel yet"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    return None


def _unit_last(*ts: Tensor) -> tuple[Tensor, ...]:
    """The kernels read rows with a unit stride: copy only a tensor whose last dim is strided."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _triton_fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
    from seqkern._triton.relbias import relbias_attention_fwd

    q, k, v = _unit_last(q, k, v)
    return relbias_attention_fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask)


def _triton_bwd(do, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad):
    from seqkern._triton.relbias import relbias_attention_bwd

    do, q, k, v, out = _unit_last(do, q, k, v, out)
    return relbias_attention_bwd(
        do, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad
    )


backends.register(
    backends.Kernel(
        OP,
        "reference",
        relbias_attention_fwd_ref,
        relbias_attention_bwd_ref,
        backends.always_supported,
    )
)
backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _supports_triton))
