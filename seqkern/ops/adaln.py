"""AdaLN: y = gamma * LayerNorm(x) + beta (LayerNorm without affine), as in VALL-E's AdaLN.

Layers, top to bottom:
    adaln()                  public function: checks the inputs, names what is wrong
    AdalnFunction            the autograd.Function
    seqkern::adaln           torch.library op (forward -> y, mean, rstd) with a fake
    seqkern::adaln_bwd       torch.library op (backward -> dx, dgamma, dbeta) with a fake
    backends.select("adaln") picks cuda / triton / cpu / reference for the inputs
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from seqkern import _ext, backends
from seqkern.ops._library import define_op
from seqkern.reference.adaln import adaln_bwd_ref, adaln_fwd_ref

OP = "adaln"


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _adaln_impl(x, gamma, beta, eps):
    return tuple(backends.select(OP, x, gamma).fwd(x, gamma, beta, eps))


def _adaln_fake(x, gamma, beta, eps):
    stats = x.new_empty(x.shape[:2], dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _adaln_bwd_impl(dy, x, gamma, mean, rstd):
    return tuple(backends.select(OP, x, gamma).bwd(dy, x, gamma, mean, rstd))


def _adaln_bwd_fake(dy, x, gamma, mean, rstd):
    return torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(gamma)


define_op(
    "adaln",
    "(Tensor x, Tensor gamma, Tensor beta, float eps) -> (Tensor y, Tensor mean, Tensor rstd)",
    _adaln_impl,
    _adaln_fake,
)
define_op(
    "adaln_bwd",
    "(Tensor dy, Tensor x, Tensor gamma, Tensor mean, Tensor rstd)"
    " -> (Tensor dx, Tensor dgamma, Tensor dbeta)",
    _adaln_bwd_impl,
    _adaln_bwd_fake,
)


class AdalnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
        y, mean, rstd = torch.ops.seqkern.adaln(x, gamma, beta, eps)
        ctx.save_for_backward(x, gamma, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, gamma, mean, rstd = ctx.saved_tensors
        dx, dgamma, dbeta = torch.ops.seqkern.adaln_bwd(dy, x, gamma, mean, rstd)
        return dx, dgamma, dbeta, None


def _check(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> None:
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"adaln: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, Tensor)):
        raise TypeError(f"adaln: eps must be a float, got {type(eps).__name__}")
    if x.dim() != 3:
        raise ValueError(f"adaln: x must be (B, T, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"adaln: x must be a floating-point tensor, got {x.dtype}")
    B, T, D = x.shape
    allowed = [(B, D), (B, 1, D), (B, T, D)]
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) not in allowed:
            raise ValueError(
                f"adaln: {name} must be (B, D), (B, 1, D) or (B, T, D) = {allowed} for x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != x.dtype:
            raise ValueError(f"adaln: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"adaln: {name} must be on x's device {x.device}, got {t.device}")
    if gamma.shape != beta.shape:
        raise ValueError(
            f"adaln: gamma and beta must have the same shape, got {tuple(gamma.shape)} and "
            f"{tuple(beta.shape)}"
        )


def adaln(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """Adaptive LayerNorm: ``gamma * LayerNorm(x) + beta``, LayerNorm without affine.

    Args:
        x: (B, T, D) float32, float16 or bfloat16 (float64 on the cpu and reference backends).
            Any strides.
        gamma, beta: (B, D) or (B, 1, D) (one modulation per batch element, as in VALL-E),
            or (B, T, D) (one per frame); same dtype and device as x.
        eps: added to the variance.
    Returns:
        (B, T, D) in x's dtype. Statistics are accumulated in fp32 (fp64 for fp64).

    Example:
        >>> x = torch.randn(2, 50, 256); g = 1 + torch.randn(2, 256); b = torch.randn(2, 256)
        >>> y = seqkern.adaln(x, g, b)  # (2, 50, 256)
    """
    _check(x, gamma, beta, eps)
    if gamma.dim() == 3 and gamma.shape[1] == 1 and x.shape[1] != 1:
        gamma, beta = gamma.squeeze(1), beta.squeeze(1)
    return AdalnFunction.apply(x, gamma, beta, eps)


# ---------------------------------------------------------------------------------------------
# Backends. `supports` returns None when the backend can run the inputs, else the reason.

_HALF_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _supports_reference(x: Tensor, gamma: Tensor) -> str | None:
    return None


def _supports_cpu(x: Tensor, gamma: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"needs CPU tensors, got {x.device}"
    if x.dtype not in _HALF_TYPES + (torch.float64,):
        return f"dtype {x.dtype} not supported"
    return None


def _supports_cuda(x: Tensor, gamma: Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"needs CUDA tensors, got {x.device}"
    if x.dtype not in _HALF_TYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    limit = getattr(_ext.C, "adaln_cuda_max_dim", 8192)
    if x.shape[-1] > limit:
        return f"D = {x.shape[-1]} > {limit} (the row must fit in registers)"
    return None


def _supports_triton(x: Tensor, gamma: Tensor) -> str | None:
    if x.device.type == "cpu":
        if not backends.triton_interpret():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if x.dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16"
    elif x.device.type != "cuda":
        return f"needs CUDA tensors, got {x.device}"
    if x.dtype not in _HALF_TYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    from seqkern._triton.adaln import MAX_DIM

    if x.shape[-1] > MAX_DIM:
        return f"D = {x.shape[-1]} > {MAX_DIM}"
    return None


def _triton_fwd(x, gamma, beta, eps):
    from seqkern._triton.adaln import adaln_fwd

    return adaln_fwd(x, gamma, beta, eps)


def _triton_bwd(dy, x, gamma, mean, rstd):
    from seqkern._triton.adaln import adaln_bwd

    return adaln_bwd(dy, x, gamma, mean, rstd)


backends.register(
    backends.Kernel(OP, "reference", adaln_fwd_ref, adaln_bwd_ref, _supports_reference)
)
backends.register(
    backends.Kernel(
        OP,
        "cpu",
        lambda x, g, b, eps: _ext.C.adaln_fwd_cpu(x, g, b, eps),
        lambda dy, x, g, m, r: _ext.C.adaln_bwd_cpu(dy, x, g, m, r),
        _supports_cpu,
    )
)
backends.register(
    backends.Kernel(
        OP,
        "cuda",
        lambda x, g, b, eps: _ext.C.adaln_fwd_cuda(x, g, b, eps),
        lambda dy, x, g, m, r: _ext.C.adaln_bwd_cuda(dy, x, g, m, r),
        _supports_cuda,
    )
)
backends.register(backends.Kernel(OP, "triton", _triton_fwd, _triton_bwd, _supports_triton))
