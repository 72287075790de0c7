"""Emformer attention core reference (torchaudio 2.8.0, torchaudio/models/emformer.py).

The module (seqkern.modules.emformer) does the projections and builds the masks; this op takes
over from the projected query/key/value to the attention output before `out_proj`. That is the
part a fused kernel replaces: head split (a view of the time-major tensors), scaled logits, the
fp32 upcast, masking with a finite `negative_inf`, softmax, dropout and the weighted sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def emformer_attention_ref(
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
    """The oracle: upstream's arithmetic, step for step, in the dtype of the inputs.

    Shapes (time-major, as inside upstream's Emformer; D = num_heads * head_dim):
        query: (Tq, B, D): projected rows, unscaled.
        key, value: (Tk, B, D): projected rows.
        attention_mask: (Tq, Tk) bool, True = masked (shared by every batch element and head).
        key_padding_mask: (B, Tk) bool, True = masked key, or None.
    Returns:
        (Tq, B, D): the attention output, heads concatenated, before the output projection.

    Computation: per batch element b and head h (row b * num_heads + h of the (B*H, T, hd)
    view), logits = (q * hd^-1/2) k^T in the input dtype, then cast to fp32 (as upstream: a
    downcast for float64 inputs, so float64 runs carry fp32 softmax rounding); masked entries are
    set to `negative_inf` (a finite value, so a fully masked row gives a uniform distribution
    rather than NaN); softmax in fp32, cast back to the input dtype; dropout with `dropout_p`
    when `training`; then probs @ v.

    TorchScript-compilable (a scripted Emformer calls it).

    Example:
        >>> q = torch.randn(7, 2, 8); k = v = torch.randn(9, 2, 8)
        >>> mask = torch.zeros(7, 9, dtype=torch.bool)
        >>> out = emformer_attention_ref(q, k, v, mask, None, num_heads=2)  # (7, 2, 8)
    """
    tq, batch, dim = query.shape
    head_dim = dim // num_heads
    scaling = head_dim**-0.5

    # (T, B, D) -> (B*H, T, hd), batch-major over (b, h).
    q = query.contiguous().view(tq, batch * num_heads, head_dim).transpose(0, 1)
    k = key.contiguous().view(key.size(0), batch * num_heads, head_dim).transpose(0, 1)
    v = value.contiguous().view(value.size(0), batch * num_heads, head_dim).transpose(0, 1)
    logits = torch.bmm(q * scaling, k.transpose(1, 2))

    scores = logits.float()
    scores = scores.masked_fill(attention_mask.unsqueeze(0), negative_inf)
    if key_padding_mask is not None:
        scores = scores.view(batch, num_heads, tq, key.size(0))
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], negative_inf)
        scores = scores.view(batch * num_heads, tq, key.size(0))
    probs = torch.softmax(scores, dim=-1).type_as(logits)
    probs = F.dropout(probs, p=float(dropout_p), training=training)

    out = torch.bmm(probs, v)  # (B*H, Tq, hd)
    return out.transpose(0, 1).contiguous().view(tq, batch, dim)
