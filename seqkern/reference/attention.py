"""Scaled dot-product attention reference (VALL-E's MultiHeadAttention core).

Upstream (espnet2/speechlm/module/transformer.py) calls F.scaled_dot_product_attention with a
bool mask (True = may attend) or an additive float mask, and `is_causal`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, with logits and softmax in fp32 (fp64 for fp64).

    Args:
        q: (B, H, T, hd). k, v: (B, H, S, hd).
        mask: broadcastable to (B, H, T, S); bool (True = may attend, as SDPA) or additive float.
        causal: query t attends keys s <= t + (S - T), i.e. causal aligned at the bottom-right,
            so a chunk of T new frames after S - T cached ones sees exactly its past (for S == T
            this is the usual lower triangle).
        scale: default hd ** -0.5.
    Returns:
        (B, H, T, hd) in q's dtype. A query row that may attend no key (bool mask, causality, or
        an additive mask that is -inf on all its keys) gives 0 where SDPA gives NaN.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    T, S = q.shape[-2], k.shape[-2]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask.to(acc)
    # a hidden logit (-inf by the masks or causality) passes no gradient, also where its row's
    # softmax is NaN: a NaN query row leaves the keys it cannot see untouched
    logits = logits.masked_fill(~allowed | torch.isneginf(logits), float("-inf"))
    # rows that see no key (hidden by the bool mask or causality, or -inf everywhere in the
    # additive mask) give 0, with zero gradients; NaN logits stay NaN
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)
