"""`seqkern bench` spec: BEATs relative-position-bias attention."""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern.bench.core import Case, OpBench, Provider, _raise_recompile_limit

# --------------------------------------------------------------------------------------------
# BEATs relative-position-bias attention


def _relbias_cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [Case("B2-H2-T40-hd16", dict(B=2, H=2, T=40, hd=16))]
    # BEATs: 12 heads of 64, B * T ~ 16k frames
    return [
        Case(f"B{B}-H12-T{T}-hd64", dict(B=B, H=12, T=T, hd=64))
        for B, T in ((32, 500), (10, 1500), (5, 3000))
    ]


def _relbias_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, H, T, hd = p["B"], p["H"], p["T"], p["hd"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    q, k, v = rnd(B, H, T, hd), rnd(B, H, T, hd), rnd(B, H, T, hd)
    rel = rnd(H, 2 * T - 1, scale=0.5)
    gate = (0.5 + torch.rand(B, H, T, 1, generator=gen)).to(device=device, dtype=dtype)
    lengths = T - torch.arange(B) * (T // (2 * B))  # ragged, every row has keys
    kpm = (torch.arange(T)[None] >= lengths[:, None]).to(device)
    for t in (q, k, v, rel, gate):
        t.requires_grad_()
    return [q, k, v, rel, gate, kpm], rnd(B, H, T, hd)


def _relbias_oracle(q, k, v, rel, gate, kpm):
    from seqkern.reference.relbias import relbias_attention_ref

    scale = q.shape[-1] ** -0.5
    return relbias_attention_ref(q, k, v, scale, gate=gate, key_padding_mask=kpm, rel_bias=rel)[0]


def _relbias_public(q, k, v, rel, gate, kpm):
    from seqkern.ops.relbias import relbias_attention

    scale = q.shape[-1] ** -0.5
    return relbias_attention(q, k, v, scale, gate=gate, key_padding_mask=kpm, rel_bias=rel)[0]


def _dense_bias(rel: Tensor, T: int) -> Tensor:
    from seqkern.reference.relbias import expand_rel_bias

    return expand_rel_bias(rel, T, T).unsqueeze(0)  # (1, H, T, T)


def _relbias_upstream(q, k, v, rel, gate, kpm):
    # upstream materialises the bias, repeated over the batch, and runs eager attention
    from seqkern.reference.relbias import relbias_attention_ref

    B, H, T, _ = q.shape
    bias = _dense_bias(rel, T).expand(B, H, T, T).contiguous()
    return relbias_attention_ref(
        q, k, v, q.shape[-1] ** -0.5, bias=bias, gate=gate, key_padding_mask=kpm
    )[0]


def _relbias_sdpa(q, k, v, rel, gate, kpm):
    T = q.shape[2]
    mask = gate * _dense_bias(rel, T)
    mask = mask.masked_fill(kpm[:, None, None, :], float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _relbias_sdpa_nobias(q, k, v, rel, gate, kpm):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _relbias_flex_provider() -> Provider | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    _raise_recompile_limit()
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, rel, gate, kpm):
        T = q.shape[2]
        lengths = (~kpm).sum(-1)

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = gate[b, h, q_idx, 0] * rel[h, kv_idx - q_idx + T - 1]
            return torch.where(kv_idx < lengths[b], score + bias, float("-inf"))

        return flex(q, k, v, score_mod=score_mod)

    return Provider("flex", run)


def _relbias_baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [
        Provider("upstream", _relbias_upstream),
        Provider("sdpa", _relbias_sdpa),
        Provider("sdpa_nobias", _relbias_sdpa_nobias, exact=False),
    ]
    if device.type == "cuda":
        flex = _relbias_flex_provider()
        if flex is not None:
            out.append(flex)
    return out


def _relbias_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    qkvo = p["B"] * p["H"] * p["T"] * p["hd"]
    return es * qkvo * (4 if direction == "fwd" else 8)  # q,k,v,o (+ do, dq, dk, dv)


def _relbias_flops(case: Case, direction: str) -> int:
    p = case.params
    fwd = 4 * p["B"] * p["H"] * p["T"] ** 2 * p["hd"]
    return fwd if direction == "fwd" else int(2.5 * fwd)  # flash-attention's convention


SPEC = OpBench(
    op="relbias_attention",
    cases=_relbias_cases,
    make_inputs=_relbias_inputs,
    oracle=_relbias_oracle,
    public=_relbias_public,
    baselines=_relbias_baselines,
    bytes=_relbias_bytes,
    flops=_relbias_flops,
    oracle_dtype=torch.float32,
    gpu_dtypes=(torch.bfloat16,),  # the targets are bf16; keeps gpu_check short
)
