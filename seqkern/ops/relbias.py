"""relbias_attention: BEATs' attention with a gated relative-position bias and fairseq masks.

Reference backend only so far; a fused kernel (bias gathered on the fly from the bucket table,
gate in the prologue) plugs in behind the same function.
"""

from __future__ import annotations

from torch import Tensor

from seqkern import backends
from seqkern.reference.relbias import relbias_attention_ref

OP = "relbias_attention"
backends.register_reference(OP, relbias_attention_ref)


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
) -> tuple[Tensor, Tensor | None]:
    """See `seqkern.reference.relbias.relbias_attention_ref` for the math and the shapes:
    q (B, H, T, hd), k and v (B, H, S, hd), bias broadcastable to (B, H, T, S), gate
    (B, H, T, 1), attn_mask (T, S) additive, key_padding_mask (B, S) True = padding.
    Returns (out (B, H, T, hd), probs (B, H, T, S) or None)."""
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
    return backends.select(OP, q).fwd(
        q, k, v, scale, bias, gate, attn_mask, key_padding_mask, dropout_p, need_weights
    )
