"""`seqkern bench` spec: ConvEmformer's depthwise segment convolution.

Op: `seqkern.ops.emformer_conv.emformer_segment_conv`, the middle of ConvEmformer's
`ConvolutionModule.forward` (after pre_conv, before post_conv): a depthwise causal conv of
width k over the time-major (T, B, D) pre-conv rows z = [rc blocks (n*R) ; utterance (U)],

    utterance outputs   the causal conv over [cache | utterance] (cache None: zeros)
    rc block i outputs  the conv over [the k-1 frames of [cache | utterance] that end where
                        segment i ends | rc block i]

returned as y = [rc outputs (n*R) ; utterance outputs (U)], (n*R + U, B, D).

Inputs (tensors only, as the harness wants): ``z`` (n*R + U, B, D), ``weight`` (D, 1, k) and
``bias`` (D,) (all three require grad), then ``flags`` (a CPU int64 tensor (U, s, R, has_cache):
reading it never synchronises with the GPU), then, when has_cache, the (B, D, k-1) ``cache``
(it requires grad too: the harness differentiates every float input, and the op is
differentiable in the cache).

Cases: the Emformer base configuration (torchaudio emformer_rnnt_base: input_dim 512,
segment 16, right context 4) with ConvEmformer's kernel 8:

* train: 32 utterances of 10 s at 40 ms frames (U = 250, n = ceil(U/16) = 16 rc blocks of 4
  rows, T = 314), cache None (training), forward and backward.
* stream: one streaming step of 256 streams (U = 16 = one segment, one rc block of 4 rows,
  T = 20) with a (B, D, 7) cache. This is the infer shape, whose cost is the forward; the
  harness times both directions of every case, so it also has a bwd row (the gradients of z,
  weight, bias and cache at that shape), which is not a streaming cost.

Providers:

* seqkern[backend]: the public op on each registered backend (the harness adds the rows: on a
  GPU `triton`, which reads z and the cache where they lie; the op has no CPU kernel, so a CPU
  run has no seqkern row).
* upstream: torchaudio's arithmetic, `emformer_segment_conv_ref`: the module's own cat of the
  cache (zeros allocated on every call when None) and the utterance, a grouped F.conv1d, then
  each rc block's window cat + stack + one more grouped conv, as seqkern/modules/emformer.py's
  ConvolutionModule (upstream `_ConvolutionModule`) writes it. Also the float64 oracle.
* compile: torch.compile of that function (the lengths as Python constants; not in --quick on
  CPU).

GB/s (minimal traffic): fwd reads z (and the cache) once and writes y, plus the weight and
bias; bwd reads dy and z (and the cache) and writes dz, plus the weight read and the weight,
bias (and cache) gradients written. TFLOP/s: 2k flops (k multiply-adds) per output element in
the forward; 2x that in the backward (dz and dweight, each k multiply-adds per dy element).
"""

from __future__ import annotations

import math

import torch

from seqkern.bench.core import Case, OpBench, Provider, _compile_provider
from seqkern.ops.emformer_conv import emformer_segment_conv, emformer_segment_conv_ref

# --------------------------------------------------------------------------------------------
# Cases


def _case(B: int, D: int, k: int, U: int, s: int, R: int, cache: bool) -> Case:
    n = math.ceil(U / s) if R > 0 else 0
    T = n * R + U
    name = f"B{B}-D{D}-k{k}-U{U}-s{s}-R{R}-{'stream' if cache else 'train'}"
    return Case(name, dict(B=B, D=D, k=k, U=U, s=s, R=R, n=n, T=T, cache=cache))


def _cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [
            _case(2, 16, 4, 10, 4, 2, cache=False),  # 3 rc blocks, the last segment partial
            _case(3, 16, 4, 4, 4, 2, cache=True),
        ]
    # Emformer base (torchaudio emformer_rnnt_base): D 512, segment 16, right context 4;
    # ConvEmformer's depthwise kernel 8. train: 32 utterances of 10 s at 40 ms frames (U 250,
    # 16 rc blocks), cache None. stream: one segment of 256 streams with its cache.
    return [
        _case(32, 512, 8, 250, 16, 4, cache=False),
        _case(256, 512, 8, 16, 16, 4, cache=True),
    ]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device):
    p = case.params
    B, D, k, T = p["B"], p["D"], p["k"], p["T"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = scale * torch.randn(*shape, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_()

    z = rnd(T, B, D)
    weight = rnd(D, 1, k, scale=k**-0.5)  # Conv1d's fan-in scale: y ~ O(1)
    bias = rnd(D, scale=0.1)
    flags = torch.tensor([p["U"], p["s"], p["R"], int(p["cache"])])
    extra = [rnd(B, D, k - 1)] if p["cache"] else []
    dy = torch.randn(T, B, D, generator=gen).to(device=device, dtype=dtype)
    return [z, weight, bias, flags, *extra], dy


def _args(z, weight, bias, flags, *rest):
    """-> (z, weight, bias, cache or None, (U, s, R))."""
    U, s, R, has_cache = (int(v) for v in flags.tolist())  # CPU: no device sync
    return z, weight, bias, (rest[0] if has_cache else None), (U, s, R)


# --------------------------------------------------------------------------------------------
# Providers


def _upstream(*inputs):
    z, weight, bias, cache, lengths = _args(*inputs)
    return emformer_segment_conv_ref(z, weight, bias, cache, *lengths)


def _public(*inputs):
    z, weight, bias, cache, (U, s, R) = _args(*inputs)
    return emformer_segment_conv(
        z, weight, bias, cache, utterance_length=U, segment_length=s, right_context=R
    )


def _compile() -> Provider:
    inner = _compile_provider(emformer_segment_conv_ref).fn

    def run(*inputs):
        z, weight, bias, cache, lengths = _args(*inputs)
        return inner(z, weight, bias, cache, *lengths)

    return Provider("compile", run)


def _baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _upstream)]
    if not (quick and device.type == "cpu"):
        out.append(_compile())
    return out


# --------------------------------------------------------------------------------------------
# Counts


def _bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    es = torch.finfo(dtype).bits // 8
    rows = p["T"] * p["B"] * p["D"]  # elements of z (and of y, dy, dz)
    params = p["D"] * p["k"] + p["D"]  # weight and bias
    cache = p["B"] * p["D"] * (p["k"] - 1) if p["cache"] else 0
    if direction == "fwd":  # z, cache, weight, bias read; y written
        return es * (2 * rows + cache + params)
    # dy, z, cache, weight read; dz, dcache, dweight, dbias written
    return es * (3 * rows + 2 * cache + p["D"] * p["k"] + params)


def _flops(case: Case, direction: str) -> int:
    p = case.params
    fwd = 2 * p["k"] * p["T"] * p["B"] * p["D"]  # k multiply-adds per output element
    return fwd if direction == "fwd" else 2 * fwd  # dz and dweight


SPEC = OpBench(
    op="emformer_segment_conv",
    cases=_cases,
    make_inputs=_inputs,
    oracle=_upstream,
    public=_public,
    baselines=_baselines,
    bytes=_bytes,
    flops=_flops,
    notes=[
        "Emformer base: D 512, kernel 8, segment 16, right context 4; train: B 32, U 250, 16 rc "
        "blocks, cache None; stream: B 256, U 16, one rc block, (B, D, 7) cache",
        "stream is the infer shape (its cost is the fwd); its bwd row is a by-product of the "
        "harness timing both directions",
        "upstream: emformer_segment_conv_ref (the module's cat + grouped F.conv1d + per-block rc "
        "windows: torchaudio's arithmetic)",
        "compile: torch.compile of that function (not in --quick on CPU)",
        "GB/s: z (and cache) read and y written once, plus weight and bias (bwd: dy, z, cache, "
        "weight read; dz, dcache, dweight, dbias written)",
        "TFLOP/s: 2k per output element; bwd 2x (dz, dweight)",
    ],
    gpu_dtypes=(torch.bfloat16,),  # the Emformer targets are bf16, as emformer.py's spec
)
