"""`seqkern bench` spec: Emformer's segment attention, training shape.

Op: `seqkern.ops.emformer.emformer_segment_attention` in training mode (k_lc = v_lc = None),
on the projected time-major (T, B, D) streams as the module produces them:

    queries  q_rc (n*R) | q_utt (U) | q_sum (n)          -> output rows [rc | utt | sum]
    keys     k_mem (n-1) | k_rc (n*R) | k_utt (U)        (values likewise)

Inputs (tensors only, as the harness wants): the nine float streams [q_rc, q_utt, q_sum,
k_mem, k_rc, k_utt, v_mem, v_rc, v_utt] (all require grad), then ``flags`` (a CPU int64
tensor (H, s, R, LC, M, has_lengths): reading it never synchronises with the GPU), then, when
has_lengths, the (B,) int32 device ``key_lengths`` computed as the module computes them
(`EmformerAttention._key_lengths`: lengths + Mr + n*R + U - max(lengths)). Attention dropout
is 0 (training=True, dropout_p=0): the triton backend has no attention dropout, and every
provider then computes the same deterministic function.

Providers:

* seqkern[backend]: the public op on each registered backend (the harness adds the rows).
* upstream: torchaudio's arithmetic, `emformer_attention_ref` (bmm, fp32 softmax with a -1e8
  fill) on the concatenated streams with the dense (Q, K) mask and a (B, K) key padding mask.
  The dense mask is built once per shape, outside the timing (upstream's model builds it once
  per forward for all its layers); the padding mask is built on every call (upstream builds it
  in every layer). The concatenations stand in for upstream's concatenation of the layer's
  inputs before its projections (the same number of D-wide rows). Also the float64 oracle.
* compile: torch.compile of that function (the mask passed in; not in --quick on CPU).
* sdpa: F.scaled_dot_product_attention on the concatenated streams seen as (B, H, T, hd)
  heads, with the boolean mask True = may attend (the negation of the dense mask, and of the
  padding). Not bit-exact with upstream where a query row sees no key (upstream: uniform
  weights from the finite fill; SDPA: NaN); no row here is such a row (every row sees its own
  rc block, which padding never hides), so its error column is meaningful. A reference point.
* flex (CUDA only): torch.compile(flex_attention) with a mask_mod that computes the same
  windows from the indices (and the key lengths); the block mask is built once per batch
  (per key_lengths tensor), outside the timing, as a model would reuse it in every layer.

GB/s (minimal traffic): fwd reads q (Q rows), k and v (K rows each) once and writes out (Q
rows), plus the key lengths; bwd reads q, k, v, out, dout and writes dq, dk, dv (no lse).
TFLOP/s: only the visible (unmasked, unpadded) query-key pairs count, 4 * hd flops per pair
and head in the forward (QK^T and PV), 2.5x that in the backward (flash-attention's
convention).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqkern.bench.core import Case, OpBench, Provider, _compile_provider, _raise_recompile_limit

N_STREAMS = 9  # q_rc, q_utt, q_sum, k_mem, k_rc, k_utt, v_mem, v_rc, v_utt

# --------------------------------------------------------------------------------------------
# Cases


def _layout(U: int, s: int, R: int, M: int) -> tuple[int, int, int, int]:
    """(n segments, memory rows Mr, summary rows, query rows Q, key rows K) for U frames."""
    n = math.ceil(U / s)
    mem_rows = n - 1 if M > 0 else 0
    sum_rows = n if M > 0 else 0
    return n, mem_rows, sum_rows, n * R + U + sum_rows, mem_rows + n * R + U


def _key_lengths(lengths: list[int], extra: int, device: torch.device | None = None) -> Tensor:
    from seqkern.modules.emformer import EmformerAttention

    return EmformerAttention._key_lengths(torch.tensor(lengths, device=device), extra)


def _case(B: int, H: int, hd: int, U: int, s: int, R: int, LC: int, M: int, ragged: bool):
    from seqkern.ops.emformer import segment_attention_mask

    n, mem_rows, sum_rows, Q, K = _layout(U, s, R, M)
    lengths = [U - b * (U // (2 * B)) for b in range(B)] if ragged else None  # max = U
    visible = ~segment_attention_mask(U, s, R, LC, M, sum_rows > 0)  # (Q, K) True = may attend
    if lengths is None:
        pairs = B * int(visible.sum())
    else:
        klen = _key_lengths(lengths, mem_rows + n * R + U).tolist()
        pairs = sum(int(visible[:, :kl].sum()) for kl in klen)
    name = f"B{B}-H{H}-hd{hd}-U{U}-s{s}-LC{LC}-R{R}-M{M}-{'ragged' if ragged else 'full'}"
    return Case(
        name,
        dict(B=B, H=H, hd=hd, U=U, s=s, R=R, LC=LC, M=M, lengths=lengths, Q=Q, K=K, pairs=pairs),
    )


def _cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_case(2, 2, 16, 20, 4, 2, 4, 2, ragged=True)]
    # Emformer base (torchaudio emformer_rnnt_base): input_dim 512 in 8 heads of 64, segment
    # 16, left context 32, right context 4, memory 4; 32 utterances of 10 s at 40 ms frames
    # (U = 250, n = 16 segments: 64 rc rows, 15 memory rows, 16 summary rows). "full": every
    # utterance U frames, no key lengths (what the module passes for B = 1); "ragged": lengths
    # U .. U/2 + 1, key lengths as the module computes them.
    return [_case(32, 8, 64, 250, 16, 4, 32, 4, ragged=r) for r in (False, True)]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, D, U, R = p["B"], p["H"] * p["hd"], p["U"], p["R"]
    n, mem_rows, sum_rows, Q, _ = _layout(U, p["s"], R, p["M"])
    gen = torch.Generator().manual_seed(0)

    def rnd(rows):
        return torch.randn(rows, B, D, generator=gen).to(device=device, dtype=dtype)

    rows = (n * R, U, sum_rows, mem_rows, n * R, U, mem_rows, n * R, U)
    streams = [rnd(r).requires_grad_() for r in rows]
    has_lengths = p["lengths"] is not None
    flags = torch.tensor([p["H"], p["s"], R, p["LC"], p["M"], int(has_lengths)])
    extra = [_key_lengths(p["lengths"], mem_rows + n * R + U, device)] if has_lengths else []
    return [*streams, flags, *extra], rnd(Q)


def _args(*inputs):
    """-> (9 streams, (H, s, R, LC, M), key_lengths or None)."""
    streams, flags, rest = inputs[:N_STREAMS], inputs[N_STREAMS], inputs[N_STREAMS + 1 :]
    H, s, R, LC, M, has_lengths = (int(v) for v in flags.tolist())  # CPU: no device sync
    return streams, (H, s, R, LC, M), (rest[0] if has_lengths else None)


# --------------------------------------------------------------------------------------------
# Providers


@functools.cache
def _dense_mask(U: int, s: int, R: int, LC: int, M: int, device: torch.device) -> Tensor:
    """(Q, K) bool, True = masked: built once per shape, as upstream's model does per forward."""
    from seqkern.ops.emformer import segment_attention_mask

    return segment_attention_mask(U, s, R, LC, M, M > 0, device)


def _concat(streams):
    q_rc, q_utt, q_sum, k_mem, k_rc, k_utt, v_mem, v_rc, v_utt = streams
    return (
        torch.cat([q_rc, q_utt, q_sum]),
        torch.cat([k_mem, k_rc, k_utt]),
        torch.cat([v_mem, v_rc, v_utt]),
    )


def _upstream_core(
    q_rc, q_utt, q_sum, k_mem, k_rc, k_utt, v_mem, v_rc, v_utt, mask, key_lengths, num_heads
):
    from seqkern.reference.emformer import emformer_attention_ref

    streams = (q_rc, q_utt, q_sum, k_mem, k_rc, k_utt, v_mem, v_rc, v_utt)
    query, key, value = _concat(streams)
    padding = None
    if key_lengths is not None:  # upstream's _gen_padding_mask, in every layer
        positions = torch.arange(key.size(0), device=key.device, dtype=key_lengths.dtype)
        padding = positions.expand(key_lengths.size(0), -1) >= key_lengths.unsqueeze(1)
    return emformer_attention_ref(
        query, key, value, mask, padding, num_heads, negative_inf=-1e8, training=True
    )


def _upstream(*inputs):
    streams, (H, s, R, LC, M), key_lengths = _args(*inputs)
    mask = _dense_mask(streams[1].size(0), s, R, LC, M, streams[1].device)
    return _upstream_core(*streams, mask, key_lengths, H)


def _public(*inputs):
    from seqkern.ops.emformer import emformer_segment_attention

    streams, (H, s, R, LC, M), key_lengths = _args(*inputs)
    q_rc, q_utt, q_sum, k_mem, k_rc, k_utt, v_mem, v_rc, v_utt = streams
    return emformer_segment_attention(
        q_rc, q_utt, q_sum, k_mem, k_rc, None, k_utt, v_mem, v_rc, None, v_utt,
        num_heads=H,
        segment_length=s,
        right_context=R,
        left_context=LC,
        max_memory=M,
        key_lengths=key_lengths,
        negative_inf=-1e8,
        dropout_p=0.0,
        training=True,
    )  # fmt: skip


def _compile() -> Provider:
    inner = _compile_provider(_upstream_core).fn

    def run(*inputs):
        streams, (H, s, R, LC, M), key_lengths = _args(*inputs)
        mask = _dense_mask(streams[1].size(0), s, R, LC, M, streams[1].device)
        return inner(*streams, mask, key_lengths, H)

    return Provider("compile", run)


def _heads(x: Tensor, H: int) -> Tensor:
    T, B, D = x.shape
    return x.view(T, B, H, D // H).permute(1, 2, 0, 3)  # (B, H, T, hd), a view


def _unheads(o: Tensor) -> Tensor:
    B, H, T, hd = o.shape
    return o.permute(2, 0, 1, 3).reshape(T, B, H * hd)


def _sdpa(*inputs):
    streams, (H, s, R, LC, M), key_lengths = _args(*inputs)
    query, key, value = _concat(streams)
    allowed = ~_dense_mask(streams[1].size(0), s, R, LC, M, query.device)  # True = may attend
    if key_lengths is not None:
        positions = torch.arange(key.size(0), device=key.device, dtype=key_lengths.dtype)
        keep = positions.expand(key_lengths.size(0), -1) < key_lengths.unsqueeze(1)
        allowed = allowed & keep[:, None, None, :]  # (B, 1, Q, K)
    out = F.scaled_dot_product_attention(
        _heads(query, H), _heads(key, H), _heads(value, H), attn_mask=allowed
    )
    return _unheads(out)


def segment_mask_mod(U: int, s: int, R: int, LC: int, M: int, key_lengths: Tensor | None):
    """FlexAttention mask_mod (True = may attend) of the training segment layout: the windows
    of `segment_attention_mask` from the indices, and key j hidden when j >= key_lengths[b]."""
    n, mem_rows, _, _, _ = _layout(U, s, R, M)
    rc_rows = n * R
    r1 = max(R, 1)  # R == 0: no rc rows or columns, the divisions are never selected

    def mask_mod(b, h, q_idx, kv_idx):
        is_rc = q_idx < rc_rows
        is_sum = q_idx >= rc_rows + U
        seg = torch.where(
            is_rc, q_idx // r1, torch.where(is_sum, q_idx - rc_rows - U, (q_idx - rc_rows) // s)
        )
        mem_ok = (kv_idx < mem_rows) & (kv_idx >= seg - M) & (kv_idx < seg) & ~is_sum
        in_rc = (kv_idx >= mem_rows) & (kv_idx < mem_rows + rc_rows)
        rc_ok = in_rc & ((kv_idx - mem_rows) // r1 == seg)
        u = kv_idx - mem_rows - rc_rows
        utt_ok = (u >= 0) & (u >= seg * s - LC) & (u < (seg + 1) * s)
        ok = mem_ok | rc_ok | utt_ok
        if key_lengths is not None:
            ok = ok & (kv_idx < key_lengths[b])
        return ok

    return mask_mod


def _flex_provider() -> Provider | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    _raise_recompile_limit()
    flex = torch.compile(flex_attention, dynamic=False)
    last: list = []  # [(key, key_lengths, its _version, block mask)]: the current batch's

    def block_mask(cfg, key_lengths, B, Q, K, device):
        # built on the first call for this layout and key_lengths tensor, outside the timing
        key = (cfg, B, Q, K, device)
        version = None if key_lengths is None else key_lengths._version
        if last and last[0][0] == key and last[0][1] is key_lengths and last[0][2] == version:
            return last[0][3]
        U, s, R, LC, M = cfg
        mask_mod = segment_mask_mod(U, s, R, LC, M, key_lengths)
        bm = create_block_mask(
            mask_mod, B if key_lengths is not None else None, None, Q, K, device=device
        )
        last[:] = [(key, key_lengths, version, bm)]  # holds key_lengths: its id stays unique
        return bm

    def run(*inputs):
        streams, (H, s, R, LC, M), key_lengths = _args(*inputs)
        query, key, value = _concat(streams)
        (Q, B, _), K = query.shape, key.size(0)
        cfg = (streams[1].size(0), s, R, LC, M)
        bm = block_mask(cfg, key_lengths, B, Q, K, query.device)
        out = flex(_heads(query, H), _heads(key, H), _heads(value, H), block_mask=bm)
        return _unheads(out)

    return Provider("flex", run)


def _baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _upstream), Provider("sdpa", _sdpa)]
    if not (quick and device.type == "cpu"):
        out.append(_compile())
    if device.type == "cuda":
        flex = _flex_provider()
        if flex is not None:
            out.append(flex)
    return out


# --------------------------------------------------------------------------------------------
# Counts


def _bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    row = p["B"] * p["H"] * p["hd"]  # one (B, D) row of a stream
    lengths = 0 if p["lengths"] is None else 4 * p["B"]  # (B,) int32
    if direction == "fwd":  # q, k, v read; out written
        return es * row * (2 * p["Q"] + 2 * p["K"]) + lengths
    # q, k, v, out, dout read; dq, dk, dv written
    return es * row * (4 * p["Q"] + 4 * p["K"]) + lengths


def _flops(case: Case, direction: str) -> int:
    p = case.params
    fwd = 4 * p["pairs"] * p["H"] * p["hd"]  # visible (b, query, key) pairs only
    return fwd if direction == "fwd" else int(2.5 * fwd)  # flash-attention's convention


SPEC = OpBench(
    op="emformer_segment_attention",
    cases=_cases,
    make_inputs=_inputs,
    oracle=_upstream,
    public=_public,
    baselines=_baselines,
    bytes=_bytes,
    flops=_flops,
    notes=[
        "training mode, attention dropout 0; k_lc/v_lc None; key lengths as the module's",
        "upstream: emformer_attention_ref (bmm, fp32 softmax, -1e8 fill) on the concatenated "
        "streams; dense mask built once per shape outside the timing, padding mask per call",
        "compile: torch.compile of that function (not in --quick on CPU)",
        "sdpa: F.scaled_dot_product_attention with the negated bool mask; same function here "
        "(every row sees a key), NaN where a row sees none (upstream: uniform)",
        "flex: torch.compile(flex_attention), mask_mod from indices; block mask per batch, "
        "outside the timing",
        "GB/s: q, k, v read and out written once (bwd: q, k, v, out, dout read; dq, dk, dv "
        "written)",
        "TFLOP/s: 4 hd per visible (unmasked, unpadded) query-key pair and head; bwd 2.5x",
    ],
    gpu_dtypes=(torch.bfloat16,),  # the targets are bf16; keeps gpu_check short
)
