"""BEATs relative-position-bias attention reference (ESPnet's fairseq-style MultiheadAttention).

espnet2/asr/encoder/beats_encoder.py: T5-style bucketed relative position bias, optionally
gated per query by a GRU-like gate, added to the logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Upstream scales q by 1/32 before q k^T and the logits back by 32 after subtracting the row
# max: the same softmax, with more fp16 headroom. The reference keeps the trick.
ALPHA = 32.0


def relative_position_bucket(
    relative_position: Tensor, num_buckets: int, max_distance: int
) -> Tensor:
    """Bidirectional T5 buckets for `relative_position` = key index - query index (long)."""
    half = num_buckets // 2
    bucket = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    # log computed in float32 and truncated toward zero, as upstream
    large = max_exact + (
        torch.log(distance.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (half - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


def expand_rel_bias(rel_bias: Tensor, T: int, S: int) -> Tensor:
    """(H, T + S - 1) bias per relative distance -> (H, T, S), entry [h, i, j] at j - i + T - 1."""
    device = rel_bias.device
    idx = torch.arange(S, device=device)[None, :] - torch.arange(T, device=device)[:, None]
    return rel_bias[:, idx + T - 1]


def relbias_attention_ref(
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
    """Attention with an additive, optionally gated, relative-position bias.

        logits = (q * scale) k^T + attn_mask + gate * bias,   key_padding -> -inf
        out    = dropout(softmax(logits)) v

    computed as upstream does: the logits and softmax in the inputs' dtype, the row max taken
    before masking (the ALPHA trick above).

    Args:
        q: (B, H, T, hd); k, v: (B, H, S, hd).
        scale: usually hd ** -0.5.
        bias: the ungated bias, broadcastable to (B, H, T, S) (e.g. (1, H, T, S)).
        rel_bias: instead of `bias`, the bias per relative distance, (H, T + S - 1), with
            bias[h, i, j] = rel_bias[h, j - i + T - 1] (BEATs' buckets depend on j - i only).
        gate: (B, H, T, 1) multiplies `bias` (BEATs' gru_rel_pos); None for no gate.
        attn_mask: (T, S) additive float mask.
        key_padding_mask: (B, S), True (or 1) = padding.
        dropout_p: dropout on the attention probabilities (0 in eval).
        need_weights: also return the probabilities (before dropout).
    Returns:
        out (B, H, T, hd), and probs (B, H, T, S) or None. A query row whose keys are all
        padding gives 0 and zero probabilities, and a NaN in a padded key counts for nothing
        (upstream gives NaN for both).
    """
    if rel_bias is not None:
        if bias is not None:
            raise ValueError("give bias or rel_bias, not both")
        bias = expand_rel_bias(rel_bias, q.shape[-2], k.shape[-2])
    logits = torch.matmul(q * (scale / ALPHA), k.transpose(-1, -2))
    padded = None
    if key_padding_mask is not None:
        padded = key_padding_mask.to(torch.bool)[:, None, None, :]
    # the softmax does not depend on the shift, so no gradient flows through the max (detached:
    # amax's backward would spread 0 / 0 = NaN over a NaN row that sees no key). Upstream takes
    # it over padded keys too, so a NaN in a padded frame turns the whole row NaN; seqkern takes
    # it over the keys a row sees (0 where it sees none): padding's values never count.
    shift = logits if padded is None else logits.masked_fill(padded, float("-inf"))
    shift = shift.amax(dim=-1, keepdim=True).detach()
    shift = shift.masked_fill(torch.isneginf(shift), 0.0)
    logits = (logits - shift) * ALPHA
    if attn_mask is not None:
        logits = logits + attn_mask
    if padded is not None:
        logits = logits.masked_fill(padded, float("-inf"))
    if bias is not None:
        logits = logits + (bias if gate is None else gate * bias)
    # rows that see no key (all keys padding, or attn_mask -inf on all of them) give 0, with
    # zero gradients (upstream gives NaN); NaN logits stay NaN
    # hidden logits get probability 0 even in a NaN row, so padding passes no gradient
    hidden = torch.isneginf(logits)
    dead = hidden.all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(hidden, 0.0)
    dropped = torch.nn.functional.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    out = torch.matmul(dropped, v)
    return out, (probs if need_weights else None)


# ---------------------------------------------------------------------------------------------
# The reference backend's stages, with the same contract as every fused backend: the forward
# returns (out, lse), the backward the gradients from them. Written out by hand; the tests check
# them against autograd through `relbias_attention_ref` in float64.


def _stage_logits(q, k, scale, rel_bias, bias, gate, attn_mask, key_padding_mask, acc):
    logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if rel_bias is not None:
        bias = expand_rel_bias(rel_bias, q.shape[-2], k.shape[-2]).unsqueeze(0)
    full_bias = None
    if bias is not None:
        full_bias = bias.to(acc)
        logits = logits + (full_bias if gate is None else gate.to(acc) * full_bias)
    if attn_mask is not None:
        logits = logits + attn_mask.to(acc)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask.to(torch.bool)[:, None, None, :], -math.inf)
    return logits, full_bias


def _stats_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def relbias_attention_fwd_ref(
    q, k, v, scale, rel_bias=None, bias=None, gate=None, attn_mask=None, key_padding_mask=None
):
    """-> (out (B, H, T, hd) in q's dtype, lse (B, H, T) fp32 (fp64 for fp64 inputs), +inf on
    rows that see no key)."""
    acc = _stats_dtype(q)
    logits, _ = _stage_logits(q, k, scale, rel_bias, bias, gate, attn_mask, key_padding_mask, acc)
    # softmax as exp(logits - max) / sum, not exp(logits - lse): lse's rounding (ulp(lse), large
    # when the softmax saturates) would scale the whole row
    m = logits.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # rows that see no key: p = 0, l = 0
    p = torch.exp(logits - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)) / l.masked_fill(l == 0, 1.0)
    lse = torch.where(l == 0, math.inf, m + torch.log(l)).squeeze(-1)  # empty rows: +inf
    return out.to(q.dtype), lse


def relbias_attention_bwd_ref(
    dout,
    q,
    k,
    v,
    out,
    lse,
    scale,
    rel_bias=None,
    bias=None,
    gate=None,
    attn_mask=None,
    key_padding_mask=None,
    bias_grad=False,
):
    """-> (dq, dk, dv, dbias or None, dgate or None), all fp32 (fp64 for fp64 inputs).

    With P = softmax(logits): dV = P^T dO, dS = P * (dP - rowsum(P * dP)) with dP = dO V^T,
    dQ = scale dS K, dK = scale dS^T Q; the bias sees gate * dS (summed over the batch and, for
    rel_bias, along each diagonal j - i), the gate sees sum_j dS * bias.

    P is recomputed as autograd's softmax saves it and the row sum taken from that P and dP,
    as in seqkern.ops.attention's backward: exp(logits - lse) and rowsum(dO * O) carry the
    rounding of lse and of out, far above the true dS when the softmax saturates (with one key
    dS is exactly 0). lse and out are not read. Hidden logits (-inf) pass no gradient.
    """
    acc = _stats_dtype(q)
    logits, full_bias = _stage_logits(
        q, k, scale, rel_bias, bias, gate, attn_mask, key_padding_mask, acc
    )
    hidden = torch.isneginf(logits)
    dead = hidden.all(dim=-1, keepdim=True)  # rows that see no key: P = 0
    p = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill_(hidden, 0.0)
    do = dout.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.to(acc).transpose(-1, -2))
    ds = torch._softmax_backward_data(dp, p, -1, acc).masked_fill_(hidden, 0.0)
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    dgate = None
    if gate is not None and full_bias is not None:
        dgate = (ds * full_bias).sum(dim=-1, keepdim=True)
    dbias = None
    if bias_grad and full_bias is not None:
        d_eff = ds if gate is None else ds * gate.to(acc)
        if rel_bias is not None:
            T, S = q.shape[-2], k.shape[-2]
            idx = (
                torch.arange(S, device=q.device)[None, :]
                - torch.arange(T, device=q.device)[:, None]
            )
            idx = (idx + T - 1).reshape(-1)
            per_head = d_eff.sum(dim=0).reshape(d_eff.shape[1], -1)  # (H, T * S)
            dbias = torch.zeros(rel_bias.shape, dtype=acc, device=q.device)
            dbias.index_add_(1, idx, per_head)
        else:
            dbias = d_eff
    return dq, dk, dv, dbias, dgate
