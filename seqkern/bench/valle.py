"""`seqkern bench` specs for VALL-E's NAR decoder: its attention, and one whole AdaLN block.

Also home of the plain-PyTorch transcription of the upstream (ESPnet 202506) block and decoder
that the "upstream", "compile" and "parts" baselines run, shared with
benchmarks/valle_decoder.py. The transcription follows upstream's arithmetic op for op (see
the spec's sections 1.3 and 1.4), with the intended per-sample semantics: every sample gets its
own attention residual (202506's ``[0]`` would broadcast sample 0's), ``causal`` reaches the
attention and the mask is a forward argument.

Ops and providers (every provider computes the same function and is checked against the
float64 oracle):

* ``attention``: q (B, H, T, hd), k and v (B, H, S, hd), a ragged (B, 1, 1, S) bool key
  padding mask (True = may attend) or bottom-right causal; oracle `attention_ref`.
  seqkern[backend]: `seqkern.ops.attention.attention` on each registered backend (the harness
  adds these). upstream: `F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
  is_causal=causal)`, exactly as upstream calls it (PyTorch picks its SDPA kernel). flex (CUDA
  only): `torch.compile(flex_attention)` with a block mask.
* ``valle_block``: one `seqkern.modules.valle.ResidualAttentionBlockAdaLM` forward,
  x (B, T, D), the level embedding emb (B, D), an optional (B, 1, 1, T) mask, and every
  parameter as an input (so the backward times every weight gradient too); oracle: the same
  module on the reference backend. seqkern: that module on auto backends, run through
  `torch.func.functional_call` (swapping the parameters in costs some host time, the same on
  every call). upstream: `upstream_block`, eager. compile: `torch.compile(upstream_block)`.
  parts: `parts_block`, the sum of the best off-the-shelf parts.

The inputs of every op here are tensors only, as the harness wants: the structural settings
(heads, causal, whether a mask follows) travel in a small int64 ``flags`` tensor kept on the
CPU, so reading them never synchronises with the GPU. Both specs time bfloat16 on a GPU (the
issue's targets); weights and activations share the dtype (a model cast with `.to(dtype)`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqkern
from seqkern.bench.core import Case, OpBench, Provider, _compile_provider, _raise_recompile_limit

# --------------------------------------------------------------------------------------------
# Shared helpers

# One block's parameters under upstream's state_dict names (spec 1.2), in a fixed order: the
# order of the parameters in the block benchmark's input list.
BLOCK_KEYS: tuple[str, ...] = (
    "attn.query.weight",
    "attn.query.bias",
    "attn.key.weight",
    "attn.value.weight",
    "attn.value.bias",
    "attn.out.weight",
    "attn.out.bias",
    "attn_ln.weight.weight",
    "attn_ln.bias.weight",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "mlp_ln.weight.weight",
    "mlp_ln.bias.weight",
)


def key_padding_mask(B: int, S: int, device: torch.device) -> Tensor:
    """(B, 1, 1, S) bool, True = may attend: ragged right padding, every row keeps >= S/2 keys.

    SDPA returns NaN for a query row that sees no key (seqkern returns 0), so every row here
    keeps at least half of its keys.
    """
    lengths = S - torch.arange(B) * (S // (2 * B))
    return (torch.arange(S)[None] < lengths[:, None]).view(B, 1, 1, S).to(device)


def condition_weights_(module: nn.Module, seed: int = 0) -> None:
    """In place: make every AdaLN of `module` (a block or a decoder) well conditioned.

    Upstream initialises AdaLN's gamma map to an all-ones (D, D) matrix, which makes
    gamma = sum(e) * 1: degenerate, and of size sqrt(D) for a unit embedding. Here the gamma
    map is the identity plus noise of size 0.1 / sqrt(D), the beta map is that noise alone,
    and a decoder's level embeddings are 1 + 0.1 N(0, 1), so gamma ~ 1 +- 0.1 and
    beta ~ +-0.1 as in a trained model. The other weights keep PyTorch's default (random)
    initialisation. The values do not change the timings, only how meaningful the error
    columns are.
    """
    from seqkern.modules.valle import AdaLN

    gen = torch.Generator().manual_seed(seed)

    def noise(shape, scale):
        return scale * torch.randn(shape, generator=gen)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, AdaLN):
                D = m.n_state
                w, b = m.weight.weight, m.bias.weight
                w.copy_(torch.eye(D) + noise(w.shape, 0.1 / D**0.5))
                b.copy_(noise(b.shape, 0.1 / D**0.5))
        level_emb = getattr(module, "level_emb", None)
        if isinstance(level_emb, nn.Embedding):
            level_emb.weight.copy_(1 + noise(level_emb.weight.shape, 0.1))


def _sub(p: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# The upstream transcription (ESPnet 202506, per-sample semantics)


def upstream_adaln(x: Tensor, emb: Tensor, w_gamma: Tensor, w_beta: Tensor) -> Tensor:
    """Upstream AdaLN: (B, T, D), (B, D), (D, D), (D, D) -> (B, T, D).

    LayerNorm without affine and eps 1e-5, in x's dtype (no upcast), then gamma * n + beta
    with gamma = emb Wg^T, beta = emb Wb^T (plain Linears in the parameters' dtype) broadcast
    over T; the result has the promoted dtype, as upstream's.
    """
    n = F.layer_norm(x, (x.shape[-1],), eps=1e-5)
    return F.linear(emb, w_gamma).unsqueeze(1) * n + F.linear(emb, w_beta).unsqueeze(1)


def _upstream_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    # upstream's Linear casts its parameters to the input's dtype on every call
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def upstream_block(
    x: Tensor,
    emb: Tensor,
    p: Mapping[str, Tensor],
    n_head: int,
    causal: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """Upstream ResidualAttentionBlockAdaLM, eager, per sample: (B, T, D), (B, D) -> (B, T, D).

    p: the block's parameters under upstream's names (BLOCK_KEYS). mask: bool (True = may
    attend) or additive float, broadcastable to (B, H, T, T), e.g. a (B, 1, 1, T) key padding
    mask. Three separate projections (the key has no bias), SDPA with `attn_mask` /
    `is_causal` as upstream calls it, the out projection, then the exact-GELU MLP; both norms
    are `upstream_adaln`.
    """
    if causal and mask is not None:
        raise ValueError("mask is not allowed when the attention is causal")
    B, T, D = x.shape
    a = upstream_adaln(x, emb, p["attn_ln.weight.weight"], p["attn_ln.bias.weight"])
    q = _upstream_linear(a, p["attn.query.weight"], p["attn.query.bias"])
    k = _upstream_linear(a, p["attn.key.weight"])
    v = _upstream_linear(a, p["attn.value.weight"], p["attn.value.bias"])

    def heads(t: Tensor) -> Tensor:
        return t.view(B, T, n_head, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=mask, is_causal=causal
    )
    x = x + _upstream_linear(o.transpose(1, 2).flatten(2), p["attn.out.weight"], p["attn.out.bias"])
    h = upstream_adaln(x, emb, p["mlp_ln.weight.weight"], p["mlp_ln.bias.weight"])
    h = F.gelu(_upstream_linear(h, p["mlp.0.weight"], p["mlp.0.bias"]))
    return x + _upstream_linear(h, p["mlp.2.weight"], p["mlp.2.bias"])


def parts_block(
    x: Tensor,
    emb: Tensor,
    p: Mapping[str, Tensor],
    n_head: int,
    causal: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """The block as the sum of the best off-the-shelf parts: (B, T, D), (B, D) -> (B, T, D).

    `seqkern.adaln` for both norms, ONE fused QKV GEMM (weights concatenated on every call, a
    zero bias for the key; the concatenation is (3D, D) of copying, a real fused model would
    store it once), SDPA on the strided head views, then cuBLAS GEMMs with exact GELU and the
    residual adds as separate PyTorch ops. Same arithmetic as `upstream_block`.
    """
    B, T, D = x.shape

    def norm(z: Tensor, name: str) -> Tensor:
        w_gamma, w_beta = p[f"{name}.weight.weight"], p[f"{name}.bias.weight"]
        return seqkern.adaln(z, F.linear(emb, w_gamma), F.linear(emb, w_beta))

    w_qkv = torch.cat([p["attn.query.weight"], p["attn.key.weight"], p["attn.value.weight"]])
    bq = p["attn.query.bias"]
    b_qkv = torch.cat([bq, torch.zeros_like(bq), p["attn.value.bias"]])
    qkv = F.linear(norm(x, "attn_ln"), w_qkv, b_qkv)  # (B, T, 3D)
    q, k, v = qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    x = x + F.linear(o.transpose(1, 2).flatten(2), p["attn.out.weight"], p["attn.out.bias"])
    h = F.gelu(F.linear(norm(x, "mlp_ln"), p["mlp.0.weight"], p["mlp.0.bias"]))
    return x + F.linear(h, p["mlp.2.weight"], p["mlp.2.bias"])


def upstream_decoder(
    x: Tensor,
    level: Tensor,
    p: Mapping[str, Tensor],
    n_head: int,
    n_layer: int,
    causal: bool = False,
    mask: Tensor | None = None,
    parts: bool = False,
) -> Tensor:
    """Upstream ValleNARDecoder.forward without a kv cache: (B, T, D), (B,) long -> (B, T, D).

    p: the decoder's parameters under upstream's state_dict names (pos_emb.weight,
    blocks.{i}.*, ln.*, level_emb.weight), e.g. ``dict(model.named_parameters())`` of a
    seqkern ValleNARDecoder, which shares them. e = level_emb[level]; h = x + pos_emb[:T];
    each block; the final AdaLN. parts: run `parts_block` and `seqkern.adaln` instead of the
    upstream transcription (the "sum of the best parts" decoder).
    """
    e = F.embedding(level, p["level_emb.weight"])
    h = x + p["pos_emb.weight"][: x.shape[1]].unsqueeze(0)
    block = parts_block if parts else upstream_block
    for i in range(n_layer):
        h = block(h, e, _sub(p, f"blocks.{i}."), n_head, causal, mask)
    w_gamma, w_beta = p["ln.weight.weight"], p["ln.bias.weight"]
    if parts:
        return seqkern.adaln(h, F.linear(e, w_gamma), F.linear(e, w_beta))
    return upstream_adaln(h, e, w_gamma, w_beta)


def _flags(flags: Tensor) -> list[int]:
    return [int(v) for v in flags.tolist()]  # a CPU tensor: no device sync


# --------------------------------------------------------------------------------------------
# attention: inputs [q, k, v, flags] or [q, k, v, flags, mask]; flags = (causal, has_mask)


def _attention_cases(quick: bool, device: torch.device) -> list[Case]:
    def case(B, H, T, hd, causal):
        name = f"B{B}-H{H}-T{T}-hd{hd}-{'causal' if causal else 'pad'}"
        return Case(name, dict(B=B, H=H, T=T, S=T, hd=hd, causal=causal))

    if quick:
        return [case(2, 2, 24, 16, False), case(2, 2, 24, 16, True)]
    # VALL-E NAR: n_state 1024 in 16 heads of 64 (and 8 of 128), B * T ~ 16k frames
    return [
        case(16, 16, 1024, 64, False),
        case(16, 16, 1024, 64, True),
        case(16, 8, 1024, 128, False),
    ]


def _attention_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, H, T, S, hd = p["B"], p["H"], p["T"], p["S"], p["hd"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = (rnd(B, H, L, hd).requires_grad_() for L in (T, S, S))
    flags = torch.tensor([int(p["causal"]), int(not p["causal"])])
    extra = [] if p["causal"] else [key_padding_mask(B, S, device)]
    return [q, k, v, flags, *extra], rnd(B, H, T, hd)


def _attention_args(q, k, v, flags, *mask):
    causal, has_mask = _flags(flags)
    return q, k, v, (mask[0] if has_mask else None), bool(causal)


def _attention_oracle(*inputs):
    from seqkern.reference.attention import attention_ref

    q, k, v, mask, causal = _attention_args(*inputs)
    return attention_ref(q, k, v, mask=mask, causal=causal)


def _attention_public(*inputs):
    from seqkern.ops.attention import attention

    q, k, v, mask, causal = _attention_args(*inputs)
    return attention(q, k, v, mask=mask, causal=causal)


def _attention_upstream(*inputs):
    # upstream's MultiHeadAttention core: SDPA with the bool mask or is_causal (T == S here)
    q, k, v, mask, causal = _attention_args(*inputs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _attention_flex_provider() -> Provider | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    _raise_recompile_limit()
    flex = torch.compile(flex_attention, dynamic=False)

    @functools.cache
    def causal_block_mask(T: int, S: int, device: torch.device):
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + (S - T)  # bottom-right aligned

        return create_block_mask(mask_mod, None, None, T, S, device=device)

    def run(*inputs):
        q, k, v, mask, causal = _attention_args(*inputs)
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        if causal:
            # data independent: built once and reused, as a model would
            return flex(q, k, v, block_mask=causal_block_mask(T, S, q.device))
        if mask is None:
            return flex(q, k, v)
        if mask.dtype != torch.bool or mask.shape[1:3] != (1, 1):
            raise NotImplementedError("the flex baseline takes (B, 1, 1, S) key padding masks")
        return flex(q, k, v, block_mask=padding_block_mask(mask, B, T, S))

    last: list = []  # [(mask, its _version, block mask)]: the mask of the current batch

    def padding_block_mask(mask: Tensor, B: int, T: int, S: int):
        # A model builds the block mask once per batch and reuses it in every layer, forward
        # and backward: built on the first call for this mask tensor, outside the timing.
        if last and last[0][0] is mask and last[0][1] == mask._version:
            return last[0][2]
        keep = mask.reshape(mask.shape[0], S).expand(B, S)

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, kv_idx]

        block_mask = create_block_mask(mask_mod, B, None, T, S, device=mask.device)
        last[:] = [(mask, mask._version, block_mask)]  # holds the mask: its id stays unique
        return block_mask

    return Provider("flex", run)


def _attention_baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _attention_upstream)]
    if device.type == "cuda":
        flex = _attention_flex_provider()
        if flex is not None:
            out.append(flex)
    return out


def _attention_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    qkvo = p["B"] * p["H"] * (p["T"] + p["S"]) * p["hd"]  # q and o (T rows), k and v (S rows)
    mask = 0 if p["causal"] else p["B"] * p["S"]  # (B, 1, 1, S) bool
    # fwd: q, k, v read, o written; bwd: q, k, v, o, do read, dq, dk, dv written
    return es * qkvo * (2 if direction == "fwd" else 4) + mask


def _attention_flops(case: Case, direction: str) -> int:
    p = case.params
    fwd = 4 * p["B"] * p["H"] * p["T"] * p["S"] * p["hd"]
    if p["causal"]:
        fwd //= 2
    return fwd if direction == "fwd" else int(2.5 * fwd)  # flash-attention's convention


ATTENTION = OpBench(
    op="attention",
    cases=_attention_cases,
    make_inputs=_attention_inputs,
    oracle=_attention_oracle,
    public=_attention_public,
    baselines=_attention_baselines,
    bytes=_attention_bytes,
    flops=_attention_flops,
    notes=[
        "upstream: F.scaled_dot_product_attention with the bool key padding mask or is_causal",
        "flex: torch.compile(flex_attention); block masks built once per mask (per batch), "
        "outside the timing",
    ],
    gpu_dtypes=(torch.bfloat16,),  # the targets are bf16; keeps gpu_check short
)


# --------------------------------------------------------------------------------------------
# valle_block: inputs [x, emb, flags, (mask,) *params in BLOCK_KEYS order];
# flags = (n_head, causal, has_mask)


def _block_cases(quick: bool, device: torch.device) -> list[Case]:
    def case(B, T, D, H, causal):
        name = f"B{B}-T{T}-D{D}-H{H}-{'causal' if causal else 'pad'}"
        return Case(name, dict(B=B, T=T, D=D, H=H, causal=causal))

    if quick:  # B * T >= D: the seqkern module takes its fused-QKV path
        return [case(2, 40, 64, 4, False), case(2, 40, 64, 4, True)]
    # VALL-E NAR: n_state 1024, 16 heads, B * T ~ 16k frames
    return [case(16, 1024, 1024, 16, False), case(16, 1024, 1024, 16, True)]


@functools.cache
def _meta_block(D: int, H: int, causal: bool) -> nn.Module:
    # the structure functional_call runs; every parameter is supplied on each call
    from seqkern.modules.valle import ResidualAttentionBlockAdaLM

    with torch.device("meta"):
        return ResidualAttentionBlockAdaLM(D, H, False, causal)


def _block_param_names(block: nn.Module) -> list[str]:
    names = [n for n, _ in block.named_parameters()]
    if sorted(names) != sorted(BLOCK_KEYS):
        raise RuntimeError(
            "valle_block bench: the seqkern block's parameters no longer have upstream's names "
            f"{sorted(BLOCK_KEYS)}; got {sorted(names)}: update seqkern/bench/valle.py"
        )
    return names


def _block_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    from seqkern.modules.valle import ResidualAttentionBlockAdaLM

    p = case.params
    B, T, D, H, causal = p["B"], p["T"], p["D"], p["H"], p["causal"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = ResidualAttentionBlockAdaLM(D, H, False, causal)  # default init, on the CPU
    condition_weights_(block, seed=1)
    _block_param_names(block)
    named = dict(block.named_parameters())
    params = [named[k].detach().to(device, dtype).requires_grad_() for k in BLOCK_KEYS]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, D, generator=gen).to(device, dtype).requires_grad_()
    emb = (1 + 0.1 * torch.randn(B, D, generator=gen)).to(device, dtype).requires_grad_()
    flags = torch.tensor([H, int(causal), int(not causal)])
    extra = [] if causal else [key_padding_mask(B, T, device)]
    dy = torch.randn(B, T, D, generator=gen).to(device, dtype)
    return [x, emb, flags, *extra, *params], dy


def _block_args(x, emb, flags, *rest):
    """-> x, emb, params (BLOCK_KEYS -> tensor), n_head, causal, mask."""
    n_head, causal, has_mask = _flags(flags)
    mask, params = (rest[0], rest[1:]) if has_mask else (None, rest)
    return x, emb, dict(zip(BLOCK_KEYS, params, strict=True)), n_head, bool(causal), mask


def _block_public(*inputs):
    # seqkern's ResidualAttentionBlockAdaLM (auto backends), run functionally on the inputs
    x, emb, p, n_head, causal, mask = _block_args(*inputs)
    block = _meta_block(x.shape[-1], n_head, causal)
    return torch.func.functional_call(block, p, (x,), {"level": emb, "mask": mask})


def _block_oracle(*inputs):
    with seqkern.use_backend("reference"):
        return _block_public(*inputs)


def _block_upstream(*inputs):
    x, emb, p, n_head, causal, mask = _block_args(*inputs)
    return upstream_block(x, emb, p, n_head, causal, mask)


def _block_parts(*inputs):
    x, emb, p, n_head, causal, mask = _block_args(*inputs)
    return parts_block(x, emb, p, n_head, causal, mask)


def _block_compile_provider() -> Provider:
    # compile the transcription with the structural flags as Python constants
    inner = _compile_provider(upstream_block).fn

    def run(*inputs):
        x, emb, p, n_head, causal, mask = _block_args(*inputs)
        return inner(x, emb, p, n_head, causal, mask)

    return Provider("compile", run)


def _block_baselines(device: torch.device, quick: bool) -> list[Provider]:
    # The block is a module, not a registered op, so the harness adds no seqkern[backend]
    # rows for it: its one seqkern row (auto backends) comes from here.
    out = [
        Provider("seqkern", _block_public),
        Provider("upstream", _block_upstream),
        Provider("parts", _block_parts),
    ]
    if not (quick and device.type == "cpu"):
        out.append(_block_compile_provider())
    return out


def _block_weights(D: int) -> int:
    # q, k, v, out: 4 D^2 + 3 D; MLP: 8 D^2 + 5 D; two AdaLNs: 4 D^2
    return 16 * D * D + 8 * D


def _block_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    act = p["B"] * p["T"] * p["D"]  # x, y, dy, dx
    emb = p["B"] * p["D"]
    mask = 0 if p["causal"] else p["B"] * p["T"]  # (B, 1, 1, T) bool, one byte each
    w = _block_weights(p["D"])
    if direction == "fwd":  # x, emb, mask, weights read; y written
        return es * (2 * act + emb + w) + mask
    # dy, x, emb, mask, weights read; dx, demb, every weight gradient written
    return es * (3 * act + 2 * emb + 2 * w) + mask


def _block_flops(case: Case, direction: str) -> int:
    p = case.params
    B, T, D = p["B"], p["T"], p["D"]
    gemms = 24 * B * T * D * D  # qkv 6, out 2, MLP 16 (x B T D^2)
    attn = 4 * B * T * T * D
    fwd = gemms + (attn // 2 if p["causal"] else attn)
    return fwd if direction == "fwd" else 2 * fwd


VALLE_BLOCK = OpBench(
    op="valle_block",
    cases=_block_cases,
    make_inputs=_block_inputs,
    oracle=_block_oracle,
    public=_block_public,
    baselines=_block_baselines,
    bytes=_block_bytes,
    flops=_block_flops,
    notes=[
        "seqkern: seqkern.modules.valle.ResidualAttentionBlockAdaLM, auto backends",
        "upstream: eager transcription of ESPnet 202506's block with per-sample semantics",
        "compile: torch.compile of that transcription",
        "parts: seqkern.adaln + one fused QKV GEMM + SDPA + cuBLAS GEMMs, unfused epilogues",
        "GB/s: weights, x, emb and mask read once, y written once (bwd: dy, x, weights read; "
        "dx and every gradient written); the block is GEMM-bound, read TFLOP/s",
        "TFLOP/s: fwd 24 B T D^2 (GEMMs) + 4 B T^2 D (attention, halved when causal); bwd 2x",
    ],
    gpu_dtypes=(torch.bfloat16,),
)
