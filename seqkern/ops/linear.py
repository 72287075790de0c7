"""`linear_rows`: `x @ weight.T + bias` for the few rows a decoding step has (a beam).

A step runs every Linear of a block on B = beam-size rows: matrix-vector products, bound by
reading the weights once. On the CPU, BLAS reaches a fraction of the memory bandwidth at 1-8
rows; the `cpu` kernel (csrc/linear/small_linear_cpu.cpp) streams each weight row once and
dots it with every row of x. Anything else (more rows, other devices and dtypes, or when a
gradient is needed) runs `torch.nn.functional.linear`, the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import _ext, backends

OP = "linear_rows"


def _linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _supports_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    if x.device.type != "cpu":
        return f"needs CPU tensors, got {x.device}"
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return f"dtype {x.dtype} not supported (float32, float64)"
    if bias is not None and bias.dtype != x.dtype:
        return "bias must have x's dtype"
    limit = getattr(_ext.C, "small_linear_max_rows", 8)
    if x.dim() != 2 or x.shape[0] > limit:
        return f"needs (M, K) with M <= {limit} rows (BLAS is as fast beyond)"
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return "inference only (no backward): a gradient is required"
    return None


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias` for (M, K) x, (N, K) weight, (N,) bias -> (M, N).

    Same result as `torch.nn.functional.linear` (up to summation order); fast for M <= 8 rows
    on the CPU in inference.

    Example:
        >>> lin = torch.nn.Linear(256, 1024)
        >>> y = linear_rows(torch.randn(4, 256), lin.weight, lin.bias)  # (4, 1024)
    """
    _check(x, weight, bias)
    return backends.select(OP, x, weight, bias).fwd(x, weight, bias)


def _check(x, weight, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_rows: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"linear_rows: {name} must be floating point, got {t.dtype}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"linear_rows: {name} must have x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({t.dtype}, {t.device})"
            )
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_rows: weight must be (N, K) for x (..., K), got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"linear_rows: bias must be (N,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


backends.register_reference(OP, _linear_ref)
backends.register(
    backends.Kernel(
        OP,
        "cpu",
        lambda x, w, b: _ext.C.small_linear_cpu(x, w, b),
        None,
        _supports_cpu,
    )
)
