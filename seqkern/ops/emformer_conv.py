"""ConvEmformer's depthwise causal convolution over [right-context blocks ; utterance].

One op, `emformer_segment_conv()`: the middle of `ConvolutionModule.forward` (after pre_conv,
before post_conv). From the pre-conv rows z = [rc blocks (n*R) ; utterance (U)] (time-major),
a cache (B, D, k-1) of the frames before the utterance (None: zeros) and the depthwise
Conv1d's weight (D, 1, k) and bias (D,):

    utterance outputs   the causal conv over [cache | utterance]
    rc block i outputs  the conv over [the k-1 frames of [cache | utterance] that end where
                        segment i ends (frame min((i+1)*s, U)) | rc block i]

returned time-major as [rc outputs (n*R) ; utterance outputs (U)].

Backends: `triton` (an autograd.Function around seqkern._triton.emformer_conv, which reads z
and the cache where they lie: no cat, stack or permute copies; CUDA tensors, or CPU under
TRITON_INTERPRET=1 in fp32/fp16) and `reference` (`emformer_segment_conv_ref`: the module's own
cat + F.conv1d(groups=D) + rc windows, plain differentiable PyTorch, registered with
bwd=None). The public function checks its inputs and dispatches through `backends.select`, so
`use_backend("triton")` raises BackendError rather than fall back to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqkern import backends

OP = "emformer_segment_conv"


def _check(
    z: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cache: Tensor | None,
    utterance_length: int,
    segment_length: int,
    right_context: int,
) -> None:
    if not isinstance(z, Tensor):
        raise ValueError(f"{OP}: z must be a tensor, got {type(z).__name__}")
    if z.dim() != 3:
        raise ValueError(f"{OP}: z must be (n*R + U, B, D), got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"{OP}: z must be a floating-point tensor, got {z.dtype}")
    T, B, D = z.shape
    for name, val, low in (
        ("utterance_length", utterance_length, 1),
        ("segment_length", segment_length, 1),
        ("right_context", right_context, 0),
    ):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{OP}: {name} must be an int >= {low}, got {val!r}")
    U, R = utterance_length, right_context
    n_rc = T - U
    if n_rc < 0 or (R == 0 and n_rc != 0) or (R > 0 and n_rc % R):
        raise ValueError(
            f"{OP}: z must have n * R + U rows (U = utterance_length = {U}, R = right_context "
            f"= {R}, n >= 0 rc blocks), got {T}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[:2] != (D, 1):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"{OP}: weight must be the depthwise Conv1d weight (D, 1, k) = ({D}, 1, k), got {shape}"
        )
    k = weight.size(2)
    if k < 1:
        raise ValueError(f"{OP}: weight must have a kernel size k >= 1, got {k}")
    tensors = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (D,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{OP}: bias must be (D,) = ({D},) or None, got {shape}")
        tensors.append(("bias", bias))
    if cache is not None:
        if not isinstance(cache, Tensor) or tuple(cache.shape) != (B, D, k - 1):
            shape = tuple(cache.shape) if isinstance(cache, Tensor) else type(cache).__name__
            raise ValueError(
                f"{OP}: cache must be (B, D, k - 1) = ({B}, {D}, {k - 1}) or None, got {shape}"
            )
        tensors.append(("cache", cache))
    for name, t in tensors:
        if t.dtype != z.dtype:
            raise ValueError(f"{OP}: {name} must have z's dtype {z.dtype}, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"{OP}: {name} must be on z's device {z.device}, got {t.device}")


def emformer_segment_conv(
    z: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cache: Tensor | None,
    *,
    utterance_length: int,
    segment_length: int,
    right_context: int,
) -> Tensor:
    """ConvEmformer's depthwise conv of the right-context blocks and the utterance.

    Args:
        z: (n*R + U, B, D) pre-conv rows [rc blocks ; utterance], time-major (any strides; the
            triton backend copies only a z whose last stride is not 1).
        weight: (D, 1, k) depthwise Conv1d weight; bias: (D,) or None. Same dtype/device as z.
        cache: (B, D, k - 1) frames before the utterance, or None (zeros: training).
        utterance_length: U >= 1; segment_length: s >= 1; right_context: R >= 0 (R = 0: z holds
            the utterance only).
    Returns:
        y (n*R + U, B, D) in z's dtype: [rc outputs ; utterance outputs]. Utterance frame u is
        the conv over frames u-k+1 .. u of [cache | utterance]; rc row r of block i the conv
        over positions r .. r+k-1 of [frames E_i-k+1 .. E_i-1 | rc block i],
        E_i = min((i+1)*s, U). Differentiable in z, weight, bias and cache.

    Example:
        >>> z = torch.randn(3 * 2 + 10, 2, 40)       # n = 3 blocks of R = 2, U = 10, B = 2
        >>> w, b = torch.randn(40, 1, 5), torch.randn(40)
        >>> y = emformer_segment_conv(z, w, b, None, utterance_length=10, segment_length=4,
        ...                           right_context=2)  # (16, 2, 40)
    """
    _check(z, weight, bias, cache, utterance_length, segment_length, right_context)
    kernel = backends.select(OP, z)
    return kernel.fwd(z, weight, bias, cache, utterance_length, segment_length, right_context)


def segment_conv_backend(z: Tensor) -> str:
    """The backend `emformer_segment_conv` would run for rows like `z` (raises BackendError
    when none is allowed)."""
    return backends.select(OP, z).backend


# -- reference ---------------------------------------------------------------------------------


def emformer_segment_conv_ref(
    z: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cache: Tensor | None,
    utterance_length: int,
    segment_length: int,
    right_context: int,
) -> Tensor:
    """The oracle: ConvolutionModule.forward's conv step as the module writes it (cat the cache
    and the utterance, a grouped F.conv1d, then each rc block's window cat + stack + one more
    conv). Plain differentiable PyTorch."""
    U, R = utterance_length, right_context
    n_rc = z.size(0) - U
    batch, dim = z.size(1), z.size(2)
    state_size = weight.size(2) - 1
    if dim == 0:  # no channels (F.conv1d refuses groups = 0): an empty y, zero gradients
        link = weight.sum() + (0.0 if bias is None else bias.sum())
        return z * (link if cache is None else link + cache.sum())
    z_rc, z_utt = z[:n_rc], z[n_rc:].permute(1, 2, 0)  # z_utt: (B, D, U)
    if cache is None:
        cache = torch.zeros(batch, dim, state_size, device=z.device, dtype=z.dtype)
    padded = torch.cat([cache, z_utt], dim=2)
    conv_utt = F.conv1d(padded, weight, bias, groups=dim).permute(2, 0, 1)
    if R == 0 or n_rc == 0:
        return conv_utt
    blocks = []
    for i in range(n_rc // R):
        end = min(state_size + (i + 1) * segment_length, padded.size(2))
        prefix = padded[:, :, end - state_size : end]  # (B, D, k-1)
        rc = z_rc[i * R : (i + 1) * R].permute(1, 2, 0)  # (B, D, R)
        blocks.append(torch.cat([prefix, rc], dim=2))
    n = len(blocks)
    stacked = torch.stack(blocks)  # (n, B, D, k-1+R)
    out = F.conv1d(stacked.reshape(n * batch, dim, stacked.size(3)), weight, bias, groups=dim)
    out = out.reshape(n, batch, dim, R).permute(0, 3, 1, 2).reshape(n * R, batch, dim)
    return torch.cat([out, conv_utt])


backends.register_reference(OP, emformer_segment_conv_ref)


# -- triton --------------------------------------------------------------------------------------


def _triton_supports(z: Tensor) -> str | None:
    if z.device.type == "cpu":
        if not backends.triton_interpret():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if z.dtype not in (torch.float32, torch.float16):
            return f"dtype {z.dtype} not supported by the Triton interpreter (float32, float16)"
    elif z.device.type == "cuda":
        if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {z.dtype} not supported (float32, float16, bfloat16)"
    else:
        return f"needs CUDA tensors, got {z.device}"
    if z.dim() == 3 and z.size(1) > 65535:
        return f"batch size {z.size(1)} > 65535"
    return None


def _unit_last(t: Tensor | None) -> Tensor | None:
    if t is None or t.numel() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


class EmformerSegmentConvFunction(torch.autograd.Function):
    """The triton backend: y from seqkern._triton.emformer_conv's forward kernel, gradients of
    z, cache, weight and bias from its backward kernel (no double backward)."""

    @staticmethod
    def forward(ctx, z, weight, bias, cache, utterance_length, segment_length, right_context):
        from seqkern._triton.emformer_conv import segment_conv_fwd

        z = _unit_last(z)
        lengths = (utterance_length, segment_length, right_context)
        y = segment_conv_fwd(z, weight, bias, cache, *lengths)
        ctx.lengths = lengths
        ctx.has_bias = bias is not None
        ctx.save_for_backward(z, weight, cache)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from seqkern._triton.emformer_conv import segment_conv_bwd

        z, weight, cache = ctx.saved_tensors
        dz, dcache, dweight, dbias = segment_conv_bwd(
            _unit_last(dy), z, weight, cache, *ctx.lengths
        )
        need = ctx.needs_input_grad
        return (
            dz if need[0] else None,
            dweight if need[1] else None,
            dbias if ctx.has_bias and need[2] else None,
            dcache if need[3] else None,
            None,
            None,
            None,
        )


def _triton_fwd(z, weight, bias, cache, utterance_length, segment_length, right_context):
    return EmformerSegmentConvFunction.apply(
        z, weight, bias, cache, utterance_length, segment_length, right_context
    )


def _triton_bwd(*args):  # the autograd.Function above runs the backward kernel
    raise NotImplementedError("emformer_segment_conv's triton backward runs via autograd")


backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _triton_supports))
