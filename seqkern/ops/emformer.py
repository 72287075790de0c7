"""Emformer attention core: masked multi-head attention from projected, time-major q/k/v.

Two ops:
    emformer_attention()          concatenated q/k/v and dense (Tq, Tk) masks; reference only
    emformer_segment_attention()  the projected streams where they lie ([rc | utt | sum]
                                  queries, [mem | rc | lc | utt] keys/values), the mask given by
                                  the segment layout (training) or by `past_length` (infer) and
                                  `key_lengths`. Backends: `triton` (an autograd.Function over
                                  the torch.library ops seqkern::emformer_segment_attention and
                                  seqkern::emformer_segment_attention_bwd, which run
                                  seqkern._triton.emformer_attention) and `reference` (builds the
                                  concatenations and dense masks the module builds, then
                                  `emformer_attention_ref`).

Each public function checks its inputs and dispatches through `backends.select`, so
`use_backend("triton", "cpu")` raises BackendError rather than fall back to the reference. The
references are plain differentiable PyTorch (registered with bwd=None): autograd differentiates
through them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern import backends
from seqkern.ops._library import define_op, is_number
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
    negative_inf: float,
) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be (T, B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be a floating-point tensor, got {t.dtype}")
    tq, batch, dim = query.shape
    if dim < 1:
        raise ValueError(f"{OP}: query must have D >= 1 features, got shape {tuple(query.shape)}")
    if not _is_int(num_heads) or num_heads <= 0 or dim % num_heads != 0:
        raise ValueError(
            f"{OP}: num_heads must be a positive divisor of D = {dim}, got {num_heads!r}"
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
    _check_scalars(OP, dropout_p, negative_inf)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_scalars(op: str, dropout_p, negative_inf) -> None:
    if not is_number(dropout_p) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not is_number(negative_inf) or not math.isfinite(negative_inf):
        raise ValueError(
            f"{op}: negative_inf must be a finite number (upstream: -1e8), got {negative_inf!r}"
        )


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
        query: (Tq, B, D), D >= 1: projected query rows, unscaled (scaled by (D/H)^-1/2).
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
    _check(query, key, value, attention_mask, key_padding_mask, num_heads, dropout_p, negative_inf)
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


# ---------------------------------------------------------------------------------------------
# emformer_segment_attention: the same core on the streams as the module produces them

SEGMENT_OP = "emformer_segment_attention"
_Q_STREAMS = ("q_rc", "q_utt", "q_sum")
_KV_STREAMS = ("k_mem", "k_rc", "k_lc", "k_utt", "v_mem", "v_rc", "v_lc", "v_utt")
_STREAMS = _Q_STREAMS + _KV_STREAMS


def segment_attention_mask(
    num_frames: int,
    segment_length: int,
    right_context: int,
    left_context: int,
    max_memory: int,
    summary: bool,
    device: torch.device | None = None,
) -> Tensor:
    """The training mask (Q, K) bool, True = masked, for U = num_frames, n = ceil(U / s).

    Rows: [rc blocks (n*R), utterance (U), summaries (n, when `summary`)].
    Columns: [memory (n-1, when max_memory > 0), rc blocks (n*R), utterance (U)].
    Segment i's rc and utterance rows see memory [max(i-M, 0), i), rc block i and the
    utterance frames [max(i*s - LC, 0), min((i+1)*s, U)); its summary row sees the same
    except the memory. (Upstream's `_gen_attention_mask`, built by loops as upstream does.)
    TorchScript-compilable: scripted Emformers call it.
    """
    s, r, lc, m = segment_length, right_context, left_context, max_memory
    n = math.ceil(num_frames / s)
    use_mem = m > 0
    mem_cols = n - 1 if use_mem else 0
    rc_col0, utt_col0 = mem_cols, mem_cols + n * r
    utt_row0, sum_row0 = n * r, n * r + num_frames
    rows = sum_row0 + (n if summary else 0)
    mask = torch.ones(rows, utt_col0 + num_frames, dtype=torch.bool, device=device)
    for i in range(n):
        seg_start, seg_end = i * s, min((i + 1) * s, num_frames)
        # row blocks [start, end): segment i's rc block, its utterance rows, its summary row
        starts = [i * r, utt_row0 + seg_start]
        ends = [(i + 1) * r, utt_row0 + seg_end]
        if summary:
            starts.append(sum_row0 + i)
            ends.append(sum_row0 + i + 1)
        for k in range(len(starts)):
            a, b = starts[k], ends[k]
            mask[a:b, rc_col0 + i * r : rc_col0 + (i + 1) * r] = False
            lo = utt_col0 + max(seg_start - lc, 0)
            mask[a:b, lo : utt_col0 + seg_end] = False
            if use_mem and k < 2:  # summary rows do not see the memory
                mask[a:b, max(i - m, 0) : i] = False
    return mask


def valid_state_rows(past_length: Tensor, mem_rows: int, lc_rows: int, segment_length: int):
    """(valid memory rows, valid lc rows) of right-aligned state buffers, as 0-dim int64 device
    tensors (no host sync): min(mem_rows, ceil(past / s)) and min(lc_rows, past), past being
    element [0] of `past_length` (upstream reads batch element 0 for the whole batch)."""
    past = past_length.reshape(-1)[0].to(torch.int64).clamp(min=0)
    mem = torch.div(past + segment_length - 1, segment_length, rounding_mode="floor")
    return mem.clamp(max=mem_rows), past.clamp(max=lc_rows)


def _rows(t: Tensor | None) -> int:
    return 0 if t is None else t.size(0)


def _check_segment(
    streams: dict,
    num_heads,
    segment_length,
    right_context,
    left_context,
    max_memory,
    key_lengths,
    past_length,
    dropout_p,
    negative_inf,
) -> None:
    op = SEGMENT_OP
    for name in ("q_rc", "q_utt", "k_rc", "k_utt", "v_rc", "v_utt"):
        if not isinstance(streams[name], Tensor):
            raise ValueError(f"{op}: {name} must be a tensor (a (0, B, D) one for no rows)")
    for kind in ("mem", "lc"):
        if (streams["k_" + kind] is None) != (streams["v_" + kind] is None):
            raise ValueError(f"{op}: k_{kind} and v_{kind} must both be given or both be None")
    q_utt = streams["q_utt"]
    if q_utt.dim() != 3:
        raise ValueError(f"{op}: q_utt must be (U, B, D), got shape {tuple(q_utt.shape)}")
    if not q_utt.is_floating_point():
        raise ValueError(f"{op}: q_utt must be a floating-point tensor, got {q_utt.dtype}")
    U, B, D = q_utt.shape
    if D < 1:
        raise ValueError(f"{op}: q_utt must have D >= 1 features, got shape {tuple(q_utt.shape)}")
    for name, t in streams.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1:] != (B, D):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be (T, B={B}, D={D}), got {shape}")
        if t.dtype != q_utt.dtype:
            raise ValueError(f"{op}: {name} must have q_utt's dtype {q_utt.dtype}, got {t.dtype}")
        if t.device != q_utt.device:
            raise ValueError(
                f"{op}: {name} must be on q_utt's device {q_utt.device}, got {t.device}"
            )
    for kind in ("mem", "rc", "lc", "utt"):
        k, v = streams["k_" + kind], streams["v_" + kind]
        if k is not None and k.shape != v.shape:
            raise ValueError(
                f"{op}: v_{kind} must have k_{kind}'s shape {tuple(k.shape)}, got {tuple(v.shape)}"
            )
    if not _is_int(num_heads) or num_heads <= 0 or D % num_heads:
        raise ValueError(
            f"{op}: num_heads must be a positive divisor of D = {D}, got {num_heads!r}"
        )
    for name, val, low in (
        ("segment_length", segment_length, 1),
        ("right_context", right_context, 0),
        ("left_context", left_context, 0),
        ("max_memory", max_memory, 0),
    ):
        if not _is_int(val) or val < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}, got {val!r}")
    if U < 1 or streams["k_utt"].size(0) != U:
        raise ValueError(
            f"{op}: q_utt and k_utt must have the same U >= 1 rows, "
            f"got {U} and {streams['k_utt'].size(0)}"
        )
    infer = streams["k_lc"] is not None
    mode = "infer" if infer else "training"
    n = 1 if infer else math.ceil(U / segment_length)
    for name in ("q_rc", "k_rc"):
        if streams[name].size(0) != n * right_context:
            raise ValueError(
                f"{op}: {name} must have n * R = {n} * {right_context} rows ({mode}), "
                f"got {streams[name].size(0)}"
            )
    if _rows(streams["q_sum"]) not in (0, n):
        raise ValueError(
            f"{op}: q_sum must have 0 or n = {n} rows ({mode}), got {_rows(streams['q_sum'])}"
        )
    if not infer:
        want = n - 1 if max_memory > 0 else 0
        if _rows(streams["k_mem"]) != want:
            raise ValueError(
                f"{op}: k_mem must have {want} rows (training, n = {n}, "
                f"max_memory = {max_memory}), got {_rows(streams['k_mem'])}"
            )
        if past_length is not None:
            raise ValueError(f"{op}: past_length is for infer (k_lc/v_lc given) only")
    if key_lengths is not None and (
        not isinstance(key_lengths, Tensor)
        or key_lengths.shape != (B,)
        or key_lengths.dtype not in (torch.int32, torch.int64)
        or key_lengths.device != q_utt.device
    ):
        raise ValueError(
            f"{op}: key_lengths must be a (B,) = ({B},) int32/int64 tensor on "
            f"{q_utt.device}, got {key_lengths!r:.80}"
        )
    if past_length is not None and (
        not isinstance(past_length, Tensor)
        or past_length.numel() < 1
        or past_length.dtype not in (torch.int32, torch.int64)
        or past_length.device != q_utt.device
    ):
        raise ValueError(
            f"{op}: past_length must be an integer tensor on {q_utt.device} "
            f"(element [0] is read), got {past_length!r:.80}"
        )
    _check_scalars(op, dropout_p, negative_inf)


def emformer_segment_attention(
    q_rc: Tensor,
    q_utt: Tensor,
    q_sum: Tensor | None,
    k_mem: Tensor | None,
    k_rc: Tensor,
    k_lc: Tensor | None,
    k_utt: Tensor,
    v_mem: Tensor | None,
    v_rc: Tensor,
    v_lc: Tensor | None,
    v_utt: Tensor,
    *,
    num_heads: int,
    segment_length: int,
    right_context: int,
    left_context: int,
    max_memory: int,
    key_lengths: Tensor | None = None,
    past_length: Tensor | None = None,
    negative_inf: float = -1e8,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Emformer's segment attention on the projected streams, no concatenation, no dense mask.

    Streams (time-major, projected, D = H * hd >= 1, same dtype and device; None = 0 rows):
        q_rc (n*R, B, D) | q_utt (U, B, D) | q_sum (n or 0, B, D)          queries
        k_mem (Mr, B, D) | k_rc (n*R) | k_lc (LCr; infer only) | k_utt (U)   keys
        v_mem | v_rc | v_lc | v_utt, shaped as their keys                     values
    Mode: k_lc/v_lc given (possibly 0 rows) = infer (one segment, n = 1; every query sees every
    key except that the summary row does not see the memory); None = training (n =
    ceil(U / segment_length) segments, Mr = n - 1 when max_memory > 0, else 0; segment i's rc
    and utterance rows see memory [max(i - M, 0), i), rc block i and utterance
    [max(i*s - LC, 0), min((i+1)*s, U)); its summary row the same but the memory).

    Args:
        num_heads, segment_length, right_context (R), left_context (LC), max_memory (M).
        key_lengths: (B,) int tensor or None: key number j of the valid keys, in the order
            [mem | rc | lc | utt], is hidden from batch element b when j >= key_lengths[b].
        past_length: infer only: an int tensor on the streams' device whose element [0] is the
            frames seen so far; the memory/lc buffers are then right-aligned and only their
            last min(Mr, ceil(past / s)) / min(LCr, past) rows are keys. None: all rows are.
        negative_inf: upstream's finite fill for masked logits; a row that sees no key gets the
            uniform distribution over all keys.
        dropout_p, training: dropout on the probabilities (the reference backend only).
    Returns:
        (n*R + U + n_sum, B, D) in the streams' dtype, rows [rc | utt | sum]: heads
        concatenated, before the output projection. Scale (D / H)^-1/2; fp32 logits/softmax.

    Backends: `triton` (seqkern._triton.emformer_attention; CUDA, or CPU under
    TRITON_INTERPRET=1) and `reference` (the concatenations and dense masks the module
    builds, then `emformer_attention_ref`; differentiable). NaN and Inf inputs give upstream's
    NaN/Inf pattern in the output and the gradients on both, with one known exception on
    `triton`: a query row whose every visible logit is -inf (an Inf in its query or in the only
    keys it sees) is taken as a row that sees no key (0, or the value mean under key padding),
    where upstream averages the values hidden from it (NaN when none are).
    """
    values = (q_rc, q_utt, q_sum, k_mem, k_rc, k_lc, k_utt, v_mem, v_rc, v_lc, v_utt)
    streams = dict(zip(_STREAMS, values))
    _check_segment(
        streams,
        num_heads,
        segment_length,
        right_context,
        left_context,
        max_memory,
        key_lengths,
        past_length,
        dropout_p,
        negative_inf,
    )
    fwd = _SEGMENT_FWD[_chosen_backend(q_utt, num_heads, float(dropout_p), bool(training))]
    cfg = dict(
        num_heads=num_heads,
        segment_length=segment_length,
        right_context=right_context,
        left_context=left_context,
        max_memory=max_memory,
        negative_inf=float(negative_inf),
    )
    return fwd(streams, cfg, key_lengths, past_length, float(dropout_p), bool(training))


@torch.compiler.assume_constant_result
def _chosen_backend(x: Tensor, num_heads: int, dropout_p: float, training: bool) -> str:
    """backends.select's choice, by name. Under torch.compile it is made when the graph is
    traced (dynamo cannot trace the ContextVar behind use_backend) and holds for that graph."""
    return backends.select(SEGMENT_OP, x, num_heads, dropout_p, training).backend


def segment_attention_backend(x: Tensor, num_heads: int, dropout_p: float, training: bool) -> str:
    """The backend `emformer_segment_attention` would run for streams like `x` (raises
    BackendError when none is allowed)."""
    return backends.select(SEGMENT_OP, x, num_heads, float(dropout_p), bool(training)).backend


# -- reference ---------------------------------------------------------------------------------


def _segment_reference(streams, cfg, key_lengths, past_length, dropout_p, training):
    st = dict(streams)
    infer = st["k_lc"] is not None
    q_utt = st["q_utt"]
    U, device = q_utt.size(0), q_utt.device
    mem_rows = _rows(st["k_mem"])
    if infer and past_length is not None:
        past = max(int(past_length.reshape(-1)[0].item()), 0)  # host sync (the reference only)
        mv = min(mem_rows, math.ceil(past / cfg["segment_length"]))
        lcv = min(_rows(st["k_lc"]), past)
        for kind, rows, valid in (("mem", mem_rows, mv), ("lc", _rows(st["k_lc"]), lcv)):
            for p in "kv":
                if st[f"{p}_{kind}"] is not None:
                    st[f"{p}_{kind}"] = st[f"{p}_{kind}"][rows - valid :]
        mem_rows = mv
    present = [st[name] for name in _Q_STREAMS if st[name] is not None]
    query = torch.cat(present)
    kinds = ("mem", "rc", "lc", "utt") if infer else ("mem", "rc", "utt")
    key = torch.cat([st["k_" + kind] for kind in kinds if st["k_" + kind] is not None])
    value = torch.cat([st["v_" + kind] for kind in kinds if st["v_" + kind] is not None])
    n_sum = _rows(st["q_sum"])
    if infer:
        mask = torch.zeros(query.size(0), key.size(0), dtype=torch.bool, device=device)
        if n_sum:
            mask[-1, :mem_rows] = True
    else:
        mask = segment_attention_mask(
            U,
            cfg["segment_length"],
            cfg["right_context"],
            cfg["left_context"],
            cfg["max_memory"],
            n_sum > 0,
            device,
        )
    padding = None
    if key_lengths is not None:
        positions = torch.arange(key.size(0), device=device, dtype=key_lengths.dtype)
        padding = positions.expand(key_lengths.size(0), -1) >= key_lengths.unsqueeze(1)
    return emformer_attention_ref(
        query,
        key,
        value,
        mask,
        padding,
        cfg["num_heads"],
        negative_inf=cfg["negative_inf"],
        dropout_p=dropout_p,
        training=training,
    )


# -- triton --------------------------------------------------------------------------------------


def _segment_triton_supports(x: Tensor, num_heads: int, dropout_p: float, training: bool):
    if x.device.type == "cpu":
        if not backends.triton_interpret():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if x.dtype not in (torch.float32, torch.float16):
            return f"dtype {x.dtype} not supported by the Triton interpreter (float32, float16)"
    elif x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    else:
        return f"needs CUDA tensors, got {x.device}"
    D, B = x.size(-1), (x.size(1) if x.dim() == 3 else 1)
    if num_heads <= 0 or D % num_heads:
        return f"D = {D} is not a multiple of num_heads = {num_heads}"
    hd = D // num_heads
    if not 16 <= hd <= 128:
        return f"head dim {hd} outside 16..128"
    if B * num_heads > 65535:
        return f"B * H = {B * num_heads} > 65535"
    if training and dropout_p > 0:
        return f"attention dropout (p = {dropout_p}) in training is not supported"
    return None


def _unit_last(t: Tensor | None) -> Tensor | None:
    if t is None or t.size(0) == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


# The Triton kernels as torch.library ops (schema + fake), so torch.compile and export see two
# opaque calls rather than the launchers' Python; the reference backend is plain differentiable
# PyTorch and needs none. A stream passed as None has no gradient: the backward op returns an
# empty (0,) tensor in its place (an op's tensor list cannot hold None).
_SEGMENT_ARGS = (
    "Tensor q_rc, Tensor q_utt, Tensor? q_sum, Tensor? k_mem, Tensor k_rc, Tensor? k_lc,"
    " Tensor k_utt, Tensor? v_mem, Tensor v_rc, Tensor? v_lc, Tensor v_utt,"
    " Tensor? key_lengths, Tensor? past_length, int num_heads, int segment_length,"
    " int right_context, int left_context, int max_memory, float negative_inf, float scale"
)


def _segment_cfg(num_heads, segment_length, right_context, left_context, max_memory, neg, scale):
    return dict(
        num_heads=num_heads,
        segment_length=segment_length,
        right_context=right_context,
        left_context=left_context,
        max_memory=max_memory,
        negative_inf=neg,
        scale=scale,
    )


def _segment_fwd_impl(*args):
    from seqkern._triton.emformer_attention import segment_attention_fwd

    streams = tuple(_unit_last(t) for t in args[:11])
    key_lengths, past_length, *rest = args[11:]
    return segment_attention_fwd(
        *streams, **_segment_cfg(*rest), key_lengths=key_lengths, past_length=past_length
    )


def _segment_fwd_fake(*args):
    q_rc, q_utt, q_sum = args[:3]
    num_heads = args[13]
    rows = q_rc.size(0) + q_utt.size(0) + _rows(q_sum)
    B, D = q_utt.size(1), q_utt.size(2)
    out = q_utt.new_empty((rows, B, D))
    return out, q_utt.new_empty((B, num_heads, rows), dtype=torch.float32)


def _segment_bwd_impl(dout, *args):
    from seqkern._triton.emformer_attention import segment_attention_bwd

    streams = tuple(_unit_last(t) for t in args[:11])
    out, lse, key_lengths, past_length, *rest = args[11:]
    grads = segment_attention_bwd(
        _unit_last(dout),
        *streams,
        out,
        lse,
        **_segment_cfg(*rest),
        key_lengths=key_lengths,
        past_length=past_length,
    )
    return [dout.new_empty(0) if grads[n] is None else grads[n] for n in _STREAMS]


def _segment_bwd_fake(dout, *args):
    return [
        dout.new_empty(0)
        if t is None
        else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in args[:11]
    ]


define_op(
    "emformer_segment_attention",
    f"({_SEGMENT_ARGS}) -> (Tensor out, Tensor lse)",
    _segment_fwd_impl,
    _segment_fwd_fake,
)
define_op(
    "emformer_segment_attention_bwd",
    "(Tensor dout, Tensor q_rc, Tensor q_utt, Tensor? q_sum, Tensor? k_mem, Tensor k_rc,"
    " Tensor? k_lc, Tensor k_utt, Tensor? v_mem, Tensor v_rc, Tensor? v_lc, Tensor v_utt,"
    " Tensor out, Tensor lse, Tensor? key_lengths, Tensor? past_length, int num_heads,"
    " int segment_length, int right_context, int left_context, int max_memory,"
    " float negative_inf, float scale) -> Tensor[]",
    _segment_bwd_impl,
    _segment_bwd_fake,
)


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, key_lengths, past_length, *streams):
        scale = (streams[1].size(2) // cfg["num_heads"]) ** -0.5
        ctx.args = (
            cfg["num_heads"],
            cfg["segment_length"],
            cfg["right_context"],
            cfg["left_context"],
            cfg["max_memory"],
            cfg["negative_inf"],
            scale,
        )
        out, lse = torch.ops.seqkern.emformer_segment_attention(
            *streams, key_lengths, past_length, *ctx.args
        )
        # upstream's NaN pattern, in the output and in the out the backward's delta = dO . out
        # reads (so every row of a (b, h) whose values hold a NaN gets upstream's NaN gradient)
        out = _upstream_nan_pattern(out, dict(zip(_STREAMS, streams)), cfg, past_length)
        ctx.cfg = cfg
        ctx.present = tuple(t is not None for t in streams)
        ctx.save_for_backward(
            *(t for t in streams if t is not None), out, lse, key_lengths, past_length
        )
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        *saved, out, lse, key_lengths, past_length = ctx.saved_tensors
        it = iter(saved)
        streams = [next(it) if present else None for present in ctx.present]
        grads = torch.ops.seqkern.emformer_segment_attention_bwd(
            dout, *streams, out, lse, key_lengths, past_length, *ctx.args
        )
        grads = _upstream_nan_value_grads(
            list(grads), lse, dict(zip(_STREAMS, streams)), ctx.cfg, past_length
        )
        needs = ctx.needs_input_grad[3:]
        return (None, None, None) + tuple(
            g if need and present else None for g, need, present in zip(grads, needs, ctx.present)
        )


def _segment_triton_fwd(streams, cfg, key_lengths, past_length, dropout_p, training):
    out, _ = _SegmentAttention.apply(
        cfg, key_lengths, past_length, *(streams[name] for name in _STREAMS)
    )
    return out


def _state_valid(streams, cfg, past_length: Tensor | None):
    """(valid memory rows, valid lc rows) as 0-dim device tensors with past_length (infer),
    else (None, None): every row is a key."""
    if streams["k_lc"] is None or past_length is None:
        return None, None
    return valid_state_rows(
        past_length, _rows(streams["v_mem"]), _rows(streams["v_lc"]), cfg["segment_length"]
    )


def _key_rows(v: Tensor, valid: Tensor | None) -> Tensor | None:
    """(rows,) bool: the rows of a right-aligned state buffer that are keys (None: all)."""
    if valid is None:
        return None
    return torch.arange(v.size(0), device=v.device) >= v.size(0) - valid


def _upstream_nan_value_grads(grads: list, lse: Tensor, streams, cfg, past_length) -> list:
    """Upstream's dV = P^T dO is one dense product too: a query row whose softmax is NaN (a
    NaN or +Inf logit it sees; the kernel's lse is NaN there) has NaN probabilities for every
    key, masked or not, so dV of every key row of its (b, h) is NaN in that head's columns. The
    kernel visits only the keys the row sees: set the others NaN here (no host sync). The state
    rows `past_length` leaves out are no keys and keep their 0."""
    B, H, _ = lse.shape
    D = streams["q_utt"].size(2)
    nan_heads = lse.isnan().any(-1)  # (B, H)
    bad = nan_heads.repeat_interleave(D // H, dim=1)  # (B, D)
    mem_valid, lc_valid = _state_valid(streams, cfg, past_length)
    for kind, valid in (("mem", mem_valid), ("rc", None), ("lc", lc_valid), ("utt", None)):
        i = _STREAMS.index("v_" + kind)
        g = grads[i]
        if streams["v_" + kind] is None or g.numel() == 0:
            continue
        mask = bad.expand(g.size(0), B, D)
        rows = _key_rows(g, valid)
        if rows is not None:
            mask = mask & rows[:, None, None]
        grads[i] = g.masked_fill(mask, torch.nan)
    return grads


def _upstream_nan_pattern(out: Tensor, streams, cfg, past_length: Tensor | None) -> Tensor:
    """Upstream multiplies the probabilities by every value row in one dense product, so a NaN
    or Inf in value column c (of any key row it includes, masked or not) reaches column c of
    every query row, as 0 * NaN or 0 * Inf. The kernel skips key tiles a query block cannot see,
    so it leaves such rows finite: set them NaN here, where upstream has NaN. Rows the kernel
    did compute already agree (the same products). One pass over the values and the output, no
    host sync."""
    mem_valid, lc_valid = _state_valid(streams, cfg, past_length)
    bad = None
    for kind, valid in (("mem", mem_valid), ("rc", None), ("lc", lc_valid), ("utt", None)):
        v = streams["v_" + kind]
        if v is None or v.size(0) == 0:
            continue
        nonfinite = ~torch.isfinite(v)
        rows = _key_rows(v, valid)  # right-aligned buffers: only the last `valid` rows are keys
        if rows is not None:
            nonfinite = nonfinite & rows[:, None, None]
        column = nonfinite.any(0)  # (B, D)
        bad = column if bad is None else bad | column
    if bad is None:
        return out
    return torch.where(bad & torch.isfinite(out), torch.nan, out)


def _segment_triton_bwd(*args):  # the autograd.Function above runs the backward kernels
    raise NotImplementedError("emformer_segment_attention's triton backward runs via autograd")


_SEGMENT_FWD = {"reference": _segment_reference, "triton": _segment_triton_fwd}
backends.register_reference(SEGMENT_OP, _segment_reference)
backends.register(
    backends.Kernel(
        SEGMENT_OP, "triton", _segment_triton_fwd, _segment_triton_bwd, _segment_triton_supports
    )
)
