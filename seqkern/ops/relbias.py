"""relbias_attention: BEATs' attention with a gated relative-position bias and fairseq masks.

Backends: `reference` (plain PyTorch, autograd through it) and `triton` (flash-style forward
and backward; the bias is gathered per tile from its per-distance form, so no T x S tensor is
built when `rel_bias` is given).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends
from seqkern.reference.relbias import relbias_attention_ref

OP = "relbias_attention"
backends.register_reference(OP, relbias_attention_ref)


class RelbiasAttentionFunction(torch.autograd.Function):
    """Runs a backend's fused forward and backward (the reference needs no Function)."""

    @staticmethod
    def forward(ctx, kernel, q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
        out, lse = kernel.fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask)
        ctx.save_for_backward(q, k, v, out, lse, rel_bias, bias, gate, attn_mask, key_padding_mask)
        ctx.kernel, ctx.scale = kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rel_bias, bias, gate, attn_mask, kpm = ctx.saved_tensors
        need = ctx.needs_input_grad
        bias_grad = (rel_bias is not None and need[5]) or (bias is not None and need[6])
        dq, dk, dv, dbias, dgate = ctx.kernel.bwd(
            dout, q, k, v, out, lse, ctx.scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad
        )
        d_rel = dbias.to(rel_bias.dtype) if rel_bias is not None and need[5] else None
        d_bias = None
        if bias is not None and need[6]:
            d_bias = dbias.sum_to_size(bias.shape).to(bias.dtype)
        d_gate = dgate.to(gate.dtype) if gate is not None and need[7] else None
        return (
            None,
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
    True = padding. Returns (out (B, H, T, hd), probs (B, H, T, S) or None)."""
    B, H, T, _ = q.shape
    S = k.shape[-2]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"relbias_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit "
            f"q {tuple(q.shape)}"
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
    kernel = backends.select(OP, q, k, v, dropout_p, need_weights)
    if kernel.bwd is None:  # the reference: differentiated by autograd
        return kernel.fwd(
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
        kernel, q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask
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
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "the last dim of q, k and v must be contiguous"
    return None


def _triton_fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask):
    from seqkern._triton.relbias import relbias_attention_fwd

    return relbias_attention_fwd(q, k, v, scale, rel_bias, bias, gate, attn_mask, key_padding_mask)


def _triton_bwd(do, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad):
    from seqkern._triton.relbias import relbias_attention_bwd

    return relbias_attention_bwd(
        do, q, k, v, out, lse, scale, rel_bias, bias, gate, attn_mask, kpm, bias_grad
    )


backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _supports_triton))
