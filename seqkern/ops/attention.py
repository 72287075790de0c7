"""attention: scaled dot-product attention with a bool/additive mask and bottom-right causal.

The hot path of VALL-E's transformer blocks. Reference backend only so far (a kernel issue
plugs in fused backends behind the same function).
"""

from __future__ import annotations

from torch import Tensor

from seqkern import backends
from seqkern.reference.attention import attention_ref

OP = "attention"
backends.register_reference(OP, attention_ref)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v.

    Args:
        q: (B, H, T, hd); k, v: (B, H, S, hd); one dtype and device.
        mask: broadcastable to (B, H, T, S): bool (True = may attend) or additive float.
        causal: bottom-right aligned (query t sees keys s <= t + S - T).
        scale: default hd ** -0.5.
    Returns:
        (B, H, T, hd). Rows that may attend nothing are 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, L, hd), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"attention: {name} must match q's dtype/device ({q.dtype}, {q.device})"
            )
    if k.shape != v.shape[:-1] + k.shape[-1:] or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError("attention: q and k must have the same head dim")
    return backends.select(OP, q).fwd(q, k, v, mask, causal, scale)
