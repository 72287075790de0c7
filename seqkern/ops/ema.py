"""Multi-head damped EMA (MEGA): public functions that run on the selected backend.

Only the reference backend exists so far: its `fwd` is plain differentiable PyTorch
(`seqkern.reference.ema`), so autograd differentiates through it. A fused kernel (a chunked
parallel scan over D*h channels in fp32) registers itself under the same op names.

    ema(...)       backends.select("ema", x)       full sequence
    ema_step(...)  backends.select("ema_step", x)  one step
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqkern import backends
from seqkern.reference.ema import ema_ref, ema_step_ref

OP = "ema"
OP_STEP = "ema_step"


def _check_params(fn: str, d: int, damping, decay, expansion, projection, x: Tensor) -> int:
    if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[0] != d:
        shape = tuple(projection.shape) if isinstance(projection, Tensor) else type(projection)
        raise ValueError(f"{fn}: projection must be (D, h) with D = {d}, got {shape}")
    h = projection.shape[1]
    for name, t in (("damping", damping), ("decay", decay), ("expansion", expansion)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (d, h, 1):
            raise ValueError(f"{fn}: {name} must be (D, h, 1) = {(d, h, 1)}, got {tuple(t.shape)}")
    for name, t in (
        ("damping", damping),
        ("decay", decay),
        ("expansion", expansion),
        ("projection", projection),
    ):
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")
    return h


def ema(
    x: Tensor,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
    pad_mask: Tensor | None = None,
    truncation: int | None = None,
) -> Tensor:
    """Multi-head damped EMA of a whole sequence (causal convolution, fp32 like upstream).

    Args:
        x: (B, L, D) floating point, any strides.
        damping, decay, expansion: (D, h, 1) raw parameters (damping and decay pre-sigmoid).
        projection: (D, h) kernel projection matrix.
        pad_mask: optional (B, L) bool, True = padding (zeroed before the convolution).
        truncation: optional kernel length limit (>= 1); None = the whole sequence.
    Returns:
        (B, L, D) in x's dtype: the EMA term, before upstream's residual and activation.

    Example:
        >>> D, h = 16, 2
        >>> p = [torch.randn(D, h, 1) for _ in range(3)]
        >>> y = seqkern.ops.ema.ema(torch.randn(2, 9, D), *p, torch.randn(D, h))
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ema: x must be a (B, L, D) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"ema: x must be floating point, got {x.dtype}")
    _check_params("ema", x.shape[2], damping, decay, expansion, projection, x)
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
            raise ValueError("ema: pad_mask must be a bool tensor (True = padding)")
        if tuple(pad_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"ema: pad_mask must be (B, L) = {tuple(x.shape[:2])}, got {tuple(pad_mask.shape)}"
            )
    if truncation is not None and (not isinstance(truncation, int) or truncation < 1):
        raise ValueError(f"ema: truncation must be None or an int >= 1, got {truncation!r}")
    kernel = backends.select(OP, x, damping)
    return kernel.fwd(x, damping, decay, expansion, projection, pad_mask, truncation)


def ema_step(
    x: Tensor,
    state: Tensor | None,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of the multi-head damped EMA (ignores truncation, as upstream).

    Args:
        x: (B, D) input at this step.
        state: (B, D, h), (D, h) (shared by the batch, as `init_state` gives) or None (zero).
        damping, decay, expansion: (D, h, 1) raw parameters; projection: (D, h).
    Returns:
        y: (B, D) the EMA term; new_state: (B, D, h). The coefficients are recomputed from the
        parameters at every call (no stale cache).
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ema_step: x must be a (B, D) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"ema_step: x must be floating point, got {x.dtype}")
    h = _check_params("ema_step", x.shape[1], damping, decay, expansion, projection, x)
    if state is not None:
        b, d = x.shape
        if not isinstance(state, Tensor) or tuple(state.shape) not in ((b, d, h), (d, h)):
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(
                f"ema_step: state must be (B, D, h) = {(b, d, h)} or (D, h), got {shape}"
            )
        if state.device != x.device:
            raise ValueError(
                f"ema_step: state must be on x's device {x.device}, got {state.device}"
            )
    kernel = backends.select(OP_STEP, x, damping)
    return kernel.fwd(x, state, damping, decay, expansion, projection)


backends.register_reference(OP, ema_ref)
backends.register_reference(OP_STEP, ema_step_ref)
