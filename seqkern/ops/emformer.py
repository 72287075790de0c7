"""Emformer attention core: masked multi-head attention from projected, time-major q/k/v.

Layers, top to bottom:
    emformer_attention()                  public function: checks the inputs, names what is wrong
    backends.select("emformer_attention") picks the kernel (only the reference so far)

The reference is plain differentiable PyTorch (registered with bwd=None): autograd
differentiates through it. A fused kernel takes the same arguments and returns the same tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends
from seqkern.reference.emformer import emformer_attention_ref

OP = "emformer_attention"


def _check(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    key_padding_mask: Tensor | None,
    num_heads: int,
    dropout_p: float,
) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be (T, B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be a floating-point tensor, got {t.dtype}")
    tq, batch, dim = query.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads != 0:
        raise ValueError(
            f"{OP}: num_heads must be a positive divisor of D = {dim}, got {num_heads}"
        )
    if key.shape[1:] != (batch, dim):
        raise ValueError(
            f"{OP}: key must be (Tk, B, D) with B = {batch}, D = {dim}, got {tuple(key.shape)}"
        )
    tk = key.shape[0]
    if value.shape != key.shape:
        raise ValueError(
            f"{OP}: value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{OP}: {name} must have query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(
                f"{OP}: {name} must be on query's device {query.device}, got {t.device}"
            )
    masks = [("attention_mask", attention_mask, (tq, tk))]
    if key_padding_mask is not None:
        masks.append(("key_padding_mask", key_padding_mask, (batch, tk)))
    for name, m, shape in masks:
        if not isinstance(m, Tensor):
            raise ValueError(f"{OP}: {name} must be a bool tensor, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise ValueError(f"{OP}: {name} must be bool (True = masked), got {m.dtype}")
        if tuple(m.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {shape}, got {tuple(m.shape)}")
        if m.device != query.device:
            raise ValueError(
                f"{OP}: {name} must be on query's device {query.device}, got {m.device}"
            )
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1], got {dropout_p}")


def emformer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    key_padding_mask: Tensor | None,
    num_heads: int,
    negative_inf: float = -1e8,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Emformer's masked multi-head attention core (torchaudio `_EmformerAttention`).

    Args:
        query: (Tq, B, D) projected query rows, unscaled (the op scales by (D/H)^-1/2).
        key, value: (Tk, B, D) projected key/value rows; same dtype and device as query.
        attention_mask: (Tq, Tk) bool, True = masked.
        key_padding_mask: (B, Tk) bool, True = masked key; or None.
        num_heads: H, a divisor of D.
        negative_inf: the finite fill value for masked logits (upstream: -1e8).
        dropout_p, training: dropout on the attention probabilities (only when training).
    Returns:
        (Tq, B, D) in query's dtype: heads concatenated, before the output projection.
        Logits and softmax are computed in fp32 (as upstream) and cast back.

    Example:
        >>> q = torch.randn(7, 2, 24); k = v = torch.randn(9, 2, 24)
        >>> mask = torch.zeros(7, 9, dtype=torch.bool)
        >>> out = emformer_attention(q, k, v, mask, None, num_heads=3)  # (7, 2, 24)
    """
    _check(query, key, value, attention_mask, key_padding_mask, num_heads, dropout_p)
    kernel = backends.select(OP, query, key, value, attention_mask, key_padding_mask)
    return kernel.fwd(
        query,
        key,
        value,
        attention_mask,
        key_padding_mask,
        num_heads,
        negative_inf,
        dropout_p,
        training,
    )


backends.register_reference(OP, emformer_attention_ref)
