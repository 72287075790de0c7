"""MEGA's chunked attention reference (ESPnet `MEGA.softmax_attention` and the attention part
of `MEGA.forward`, espnet2/asr_transducer/decoder/blocks/mega.py).

Single head. The queries are pre-scaled, the bias is additive, the softmax runs in float32 and
is cast back, dropout acts on the probabilities. With `chunk_size > 0` and a sequence longer
than one chunk, attention is block-diagonal: each chunk attends (causally) only to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunk_attention_ref(
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
    """Single-head (chunked) attention with an additive relative-position bias, the oracle.

    Args:
        q: (B, Lq, K) queries. k: (B, Lk, K) keys. v: (B, Lk, V) values.
        bias: additive bias for one block of (lq, lk) = (c, c) in chunked mode, else (Lq, Lk),
            shared by every block: either the (lq, lk) matrix or its per-offset form, a vector
            `rel` of length lq + lk - 1 with bias[i, j] = rel[j - i + lq - 1] (MEGA's "simple"
            relative-position bias).
        key_padding_mask: optional (B, Lk) bool, True = padding. Upstream's rule: within a
            block (a chunk, or the whole sequence) whose keys are all padding the mask is not
            applied.
        chunk_size: chunked (block-diagonal) mode when chunk_size > 0 and Lq == Lk > chunk_size;
            Lk must then be a multiple of chunk_size. Otherwise one block (all keys).
        causal: mask keys after the query; queries are aligned to the end of the keys
            (query i sits at key position Lk - Lq + i), so a step query (Lq = 1) sees all keys.
        scaling: multiplies q before the product; default K ** -0.5.
        dropout_p, training: dropout on the probabilities (only when training).
    Returns:
        (B, Lq, V) in q's dtype. A query row that sees no key (all masked, or every logit -inf
        by value: a -inf bias row, an infinite q or k) gives 0 and passes no gradient
        (upstream: NaN). A NaN logit, or +inf beside -inf, stays NaN.

    Example:
        >>> q, k = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
        >>> o = chunk_attention_ref(q, k, torch.randn(2, 10, 4), torch.randn(5, 5), chunk_size=5)
    """
    batch, lq, dk = q.shape
    lk, dv = k.shape[1], v.shape[2]
    if scaling is None:
        scaling = dk**-0.5
    chunked = 0 < chunk_size < lk and lq == lk
    if chunked:
        if lk % chunk_size:
            raise ValueError(
                f"chunk_attention_ref: length {lk} is not a multiple of chunk_size {chunk_size}"
            )
        nc = lk // chunk_size
        q4 = q.reshape(batch, nc, chunk_size, dk)
        k4 = k.reshape(batch, nc, chunk_size, dk)
        v4 = v.reshape(batch, nc, chunk_size, dv)
        pad = None if key_padding_mask is None else key_padding_mask.reshape(batch, nc, chunk_size)
        bq, bk = chunk_size, chunk_size
    else:
        q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        pad = None if key_padding_mask is None else key_padding_mask.unsqueeze(1)
        bq, bk = lq, lk

    if bias.dim() == 1:  # per-offset form: bias[i, j] = rel[j - i + bq - 1]
        i, j = torch.arange(bq, device=q.device), torch.arange(bk, device=q.device)
        bias = bias[j[None, :] - i[:, None] + bq - 1]
    logits = torch.matmul(q4 * scaling, k4.transpose(2, 3)) + bias  # (B, nc, bq, bk)
    masked = torch.zeros((1, 1, bq, bk), dtype=torch.bool, device=q.device)
    if causal:
        masked = torch.ones((bq, bk), dtype=torch.bool, device=q.device).triu(bk - bq + 1)
        masked = masked.view(1, 1, bq, bk)
    if pad is not None:
        pad = pad & ~pad.all(dim=-1, keepdim=True)  # upstream: an all-padding block is unmasked
        masked = masked | pad.unsqueeze(2)
    # a logit -inf by value (a -inf bias, an infinite q or k) is hidden as a masked one is: it
    # passes no gradient, and a row with no other key is a row with no visible key
    masked = masked | torch.isneginf(logits)
    logits = logits.masked_fill(masked, float("-inf"))
    dead = masked.all(dim=-1, keepdim=True)  # rows with no visible key: 0, not upstream's NaN
    logits = logits.masked_fill(dead, 0.0)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
    probs = probs.masked_fill(dead, 0.0)
    probs = F.dropout(probs, p=dropout_p, training=training)
    out = torch.matmul(probs, v4)  # (B, nc, bq, V)
    return out.reshape(batch, lq, dv)
