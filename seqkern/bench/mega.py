"""`seqkern bench` specs: MEGA's multi-head damped EMA and its single-head chunked attention."""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern.bench.core import Case, OpBench, Provider, _compile_provider, _raise_recompile_limit

# --------------------------------------------------------------------------------------------
# EMA: y = EMA(x) + omega * x over (B, L, D), h EMA heads per channel


def _ema_cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [Case("B2-L100-D64-h4", dict(B=2, L=100, D=64, h=4))]
    # B * L ~ 32k tokens, D 512..2048, L 256..16384 (MEGA's EMA heads: 4 in the ESPnet decoder)
    return [
        Case(f"B{B}-L{L}-D{D}-h4", dict(B=B, L=L, D=D, h=4))
        for B, L, D in ((128, 256, 512), (32, 1024, 1024), (8, 4096, 1024), (2, 16384, 2048))
    ]


def _ema_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, L, D, h = p["B"], p["L"], p["D"], p["h"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = shift + scale * torch.randn(*shape, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_()

    signs = torch.tensor([(-1.0) ** i for i in range(h)]).view(1, h, 1)
    x = rnd(B, L, D)
    damping, decay = rnd(D, h, 1, scale=0.5), rnd(D, h, 1, scale=0.5)
    expansion = (signs + 0.1 * torch.randn(D, h, 1, generator=gen)).to(device, dtype)
    projection, omega = rnd(D, h), rnd(D)
    return [x, damping, decay, expansion.requires_grad_(), projection, omega], rnd(B, L, D)


def _ema_upstream(x, damping, decay, expansion, projection, omega):
    # ESPnet's MultiHeadDampedEMA: the kernel materialised (D, h, L), an FFT convolution in
    # float32, then the residual.
    from seqkern.reference.ema import ema_ref

    return ema_ref(x, damping, decay, expansion, projection) + x * omega


def _ema_oracle(x, damping, decay, expansion, projection, omega):
    from seqkern.reference.ema import ema_ref

    y = ema_ref(x, damping, decay, expansion, projection, fft_dtype=x.dtype)
    return y + x * omega


def _ema_public(x, damping, decay, expansion, projection, omega):
    from seqkern.ops.ema import ema

    return ema(x, damping, decay, expansion, projection, omega=omega)


def _ema_baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _ema_upstream)]
    if not (quick and device.type == "cpu"):
        out.append(_compile_provider(_ema_upstream))
    return out


def _ema_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    # the count: x read and y written once (bwd: dy and x read, dx written)
    n = case.params["B"] * case.params["L"] * case.params["D"]
    es = torch.finfo(dtype).bits // 8
    return es * n * (2 if direction == "fwd" else 3)


def _ema_flops(case: Case, direction: str) -> int:
    p = case.params
    per = 4 * p["h"] + 2  # state update (2 FMA) and projection (1 FMA) per head, residual
    n = p["B"] * p["L"] * p["D"]
    return n * per * (1 if direction == "fwd" else 3)


EMA = OpBench(
    op="ema",
    cases=_ema_cases,
    make_inputs=_ema_inputs,
    oracle=_ema_oracle,
    public=_ema_public,
    baselines=_ema_baselines,
    bytes=_ema_bytes,
    flops=_ema_flops,
    oracle_dtype=torch.float64,
    notes=["GB/s counts x read and y written once (bwd: dy, x read, dx written)"],
)


# --------------------------------------------------------------------------------------------
# Chunked attention: single head, qk 128, v 1024, causal within chunks, per-offset bias


def _chunk_cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [Case("B2-L48-c16-K16-V40", dict(B=2, L=48, c=16, K=16, V=40))]
    return [
        Case("B16-L1024-c128-K128-V1024", dict(B=16, L=1024, c=128, K=128, V=1024)),
        Case("B8-L2048-c256-K128-V1024", dict(B=8, L=2048, c=256, K=128, V=1024)),
        Case("B4-L2048-full-K128-V1024", dict(B=4, L=2048, c=-1, K=128, V=1024)),
    ]


def _chunk_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, L, c, K, V = p["B"], p["L"], p["c"], p["K"], p["V"]
    blk = L if c <= 0 else c
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = scale * torch.randn(*shape, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(B, L, K), rnd(B, L, K), rnd(B, L, V)
    rel = rnd(2 * blk - 1, scale=0.5)
    lengths = L - torch.arange(B) * (L // (4 * B))  # ragged right padding
    kpm = (torch.arange(L)[None] >= lengths[:, None]).to(device)
    return [q, k, v, rel, kpm], rnd(B, L, V)


def _chunk_size(q: Tensor, rel: Tensor) -> int:
    blk = (rel.shape[0] + 1) // 2
    return blk if blk < q.shape[1] else -1


def _chunk_public(q, k, v, rel, kpm):
    from seqkern.ops.chunk import chunk_attention

    return chunk_attention(q, k, v, rel, key_padding_mask=kpm, chunk_size=_chunk_size(q, rel))


def _chunk_oracle(q, k, v, rel, kpm):
    from seqkern.reference.chunk import chunk_attention_ref

    return chunk_attention_ref(q, k, v, rel, key_padding_mask=kpm, chunk_size=_chunk_size(q, rel))


def _dense(rel: Tensor) -> Tensor:
    blk = (rel.shape[0] + 1) // 2
    pos = torch.arange(blk, device=rel.device)
    return rel[pos[None, :] - pos[:, None] + blk - 1]  # (blk, blk)


def _chunk_upstream(q, k, v, rel, kpm):
    # ESPnet's MEGA.softmax_attention: the (c, c) bias materialised, float32 softmax, eager
    from seqkern.reference.chunk import chunk_attention_ref

    return chunk_attention_ref(
        q, k, v, _dense(rel), key_padding_mask=kpm, chunk_size=_chunk_size(q, rel)
    )


def _blocks(q, k, v, kpm, blk):
    B, L, _ = q.shape
    nc = L // blk
    q4 = q.reshape(B * nc, 1, blk, -1)
    k4 = k.reshape(B * nc, 1, blk, -1)
    v4 = v.reshape(B * nc, 1, blk, -1)
    pad = kpm.reshape(B * nc, blk)
    pad = pad & ~pad.all(-1, keepdim=True)  # upstream: an all-padding block is unmasked
    return q4, k4, v4, pad


def _chunk_sdpa(q, k, v, rel, kpm):
    blk = (rel.shape[0] + 1) // 2
    q4, k4, v4, pad = _blocks(q, k, v, kpm, blk)
    causal = torch.ones(blk, blk, dtype=torch.bool, device=q.device).triu(1)
    mask = _dense(rel).masked_fill(causal, float("-inf"))
    mask = mask[None, None].masked_fill(pad[:, None, None, :], float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _chunk_flex_provider() -> Provider | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    _raise_recompile_limit()
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, rel, kpm):
        B, L, _ = q.shape
        blk = (rel.shape[0] + 1) // 2
        nc = L // blk
        q4, k4, v4, pad = _blocks(q, k, v, kpm, blk)
        pad = pad.reshape(B, nc * blk)

        def mask_mod(b, h, q_idx, kv_idx):
            same = (q_idx // blk) == (kv_idx // blk)
            return same & (kv_idx <= q_idx) & ~pad[b, kv_idx]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel[kv_idx - q_idx + blk - 1]

        mask = create_block_mask(mask_mod, B, None, L, L, device=q.device)
        out = flex(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), score_mod=score_mod, block_mask=mask
        )
        return out.squeeze(1)

    return Provider("flex", run)


def _chunk_baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _chunk_upstream), Provider("sdpa", _chunk_sdpa)]
    if device.type == "cuda":
        flex = _chunk_flex_provider()
        if flex is not None:
            out.append(flex)
    return out


def _chunk_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    qkvo = p["B"] * p["L"] * (2 * p["K"] + 2 * p["V"])
    return es * qkvo * (1 if direction == "fwd" else 2)  # (+ do, dq, dk, dv)


def _chunk_flops(case: Case, direction: str) -> int:
    p = case.params
    blk = p["L"] if p["c"] <= 0 else p["c"]
    # causal: half of each (blk x blk) block; QK^T (K) and PV (V)
    fwd = p["B"] * p["L"] * blk * (p["K"] + p["V"])
    return fwd if direction == "fwd" else int(2.5 * fwd)


CHUNK = OpBench(
    op="chunk_attention",
    cases=_chunk_cases,
    make_inputs=_chunk_inputs,
    oracle=_chunk_oracle,
    public=_chunk_public,
    baselines=_chunk_baselines,
    bytes=_chunk_bytes,
    flops=_chunk_flops,
    # float64 even for the full sizes: the (B, blocks, c, c) logits fit easily, and a float32
    # oracle would make the float32 reference's own error read 0
    oracle_dtype=torch.float64,
    gpu_dtypes=(torch.bfloat16,),
)
