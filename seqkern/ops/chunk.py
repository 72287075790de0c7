"""MEGA's single-head chunked attention: the public function, run on the selected backend.

Only the reference backend exists so far (plain differentiable PyTorch in
`seqkern.reference.chunk`); a flash-style kernel over chunks registers under the same op name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends
from seqkern.reference.chunk import chunk_attention_ref

OP = "chunk_attention"


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
        q: (B, Lq, K). k: (B, Lk, K). v: (B, Lk, V). Same dtype and device.
        bias: (c, c) when chunked (chunk_size > 0 and Lq == Lk > chunk_size, Lk a multiple of
            chunk_size), else (Lq, Lk).
        key_padding_mask: optional (B, Lk) bool, True = padding; a block whose keys are all
            padding is left unmasked (upstream's rule).
        causal: causal mask with queries aligned to the end of the keys.
        scaling: multiplies q (default K ** -0.5). dropout_p/training: dropout on probabilities.
    Returns:
        (B, Lq, V); rows with no visible key are 0. Softmax in float32, cast back.

    Example:
        >>> q = k = torch.randn(2, 12, 8); v = torch.randn(2, 12, 20)
        >>> o = seqkern.ops.chunk.chunk_attention(q, k, v, torch.zeros(4, 4), chunk_size=4)
    """
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
    want = (chunk_size, chunk_size) if chunked else (lq, lk)
    if tuple(bias.shape) != want:
        raise ValueError(f"chunk_attention: bias must be {want}, got {tuple(bias.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("chunk_attention: key_padding_mask must be a bool tensor")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"chunk_attention: key_padding_mask must be (B, Lk) = {(b, lk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"chunk_attention: dropout_p must be in [0, 1], got {dropout_p}")
    kernel = backends.select(OP, q, k)
    return kernel.fwd(
        q, k, v, bias, key_padding_mask, chunk_size, causal, scaling, dropout_p, training
    )


backends.register_reference(OP, chunk_attention_ref)
