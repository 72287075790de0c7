"""Multi-head damped EMA reference (ESPnet MEGA, `MultiHeadDampedEMA` in
espnet2/asr_transducer/decoder/modules/mega/multi_head_damped_ema.py).

Notation, per channel d and EMA head n (D channels, h heads):

    p = sigmoid(damping)            (D, h, 1)   the weight of the new input
    q = 1 - p * sigmoid(decay)      (D, h, 1)   the weight of the previous state
    s_t = p * beta * x_t + q * s_{t-1}          beta = the expansion matrix
    y_t = sum_n s_t[n] * eta[n] * sqrt(1 / h)   eta  = the kernel projection matrix

The full sequence is the causal convolution of x with the kernel
k[d, l] = sum_n p beta q^l eta sqrt(1/h), computed like upstream: the kernel in the parameters'
dtype, the convolution by FFT in float32, cast back to x's dtype. `truncation` keeps only the
first `truncation` taps of the kernel. The step ignores truncation (as upstream).

Op boundary: the raw (pre-sigmoid) parameters go in, so a fused kernel (a chunked parallel
scan over D*h channels in fp32) can compute the coefficients itself; the output is the EMA
term only, before upstream's `activation(y + x * residual_weight)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ema_coefficients(damping: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """(p, q) = (sigmoid(damping), 1 - sigmoid(damping) * sigmoid(decay)), shapes (D, h, 1)."""
    p = torch.sigmoid(damping)
    q = 1.0 - p * torch.sigmoid(decay)
    return p, q


def ema_kernel_ref(
    damping: Tensor, decay: Tensor, expansion: Tensor, projection: Tensor, length: int
) -> Tensor:
    """The damped EMA kernel, (D, length), in the parameters' dtype (upstream's arithmetic)."""
    p, q = ema_coefficients(damping, decay)
    scaling = math.sqrt(1.0 / projection.shape[-1])
    powers = torch.arange(length).to(p).view(1, 1, length) * torch.log(q)
    taps = (p * expansion) * torch.exp(powers)  # (D, h, length)
    return torch.einsum("dnl,dn->dl", taps, projection * scaling)


def ema_ref(
    x: Tensor,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
    pad_mask: Tensor | None = None,
    truncation: int | None = None,
    fft_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Multi-head damped EMA over a whole sequence (the causal convolution), the oracle.

    Args:
        x: (B, L, D) input, any strides.
        damping, decay, expansion: (D, h, 1) raw parameters (`damping_factor`, `decay_factor`,
            `ema_expansion_matrix`); damping and decay go through a sigmoid here.
        projection: (D, h) `kernel_projection_matrix` (the sqrt(1/h) scaling is applied here).
        pad_mask: optional (B, L) bool, True = padding: those inputs are zeroed first.
        truncation: keep only the first min(truncation, L) kernel taps (None = L).
        fft_dtype: dtype of the FFT convolution; float32 is upstream's (even for float64 x).
    Returns:
        (B, L, D) EMA output in x's dtype (before the residual and the activation).

    Example:
        >>> D, h = 16, 2
        >>> y = ema_ref(torch.randn(2, 9, D), *(torch.randn(D, h, 1) for _ in range(3)),
        ...             torch.randn(D, h))  # (2, 9, 16)
    """
    length = x.shape[1]
    xt = x.transpose(1, 2)  # (B, D, L)
    if pad_mask is not None:
        xt = xt.masked_fill(pad_mask.unsqueeze(1), 0.0)
    taps = length if truncation is None else min(truncation, length)
    kernel = ema_kernel_ref(damping, decay, expansion, projection, taps)
    if x.numel() == 0:  # no step, batch row or channel: nothing to convolve (an FFT needs n > 0)
        # zeros that keep the graph, so every input gets its gradient: exactly 0 (an empty sum),
        # also for a NaN parameter (through * 0 of the raw parameters, not through the kernel)
        anchor = sum(t.sum() for t in (damping, decay, expansion, projection)) * 0
        return (x * 0 + anchor).to(x.dtype)
    n = 2 * length
    x_f = torch.fft.rfft(xt.to(fft_dtype), n=n)
    k_f = torch.fft.rfft(kernel.to(fft_dtype), n=n)
    y = torch.fft.irfft(x_f * k_f, n=n)[..., :length]
    return y.to(x.dtype).transpose(1, 2)


def ema_step_ref(
    x: Tensor,
    state: Tensor | None,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
) -> tuple[Tensor, Tensor]:
    """One EMA step: s = p*beta*x + q*state ; y = sum_n s * eta * sqrt(1/h).

    Computed in the parameters'/inputs' promoted dtype, exactly as upstream's `ema_one_step`.

    Args:
        x: (B, D) input at this step.
        state: (B, D, h) or (D, h) (broadcast over the batch) previous state, or None (zero).
        damping, decay, expansion: (D, h, 1) raw parameters; projection: (D, h).
    Returns:
        y: (B, D) EMA output; new_state: (B, D, h).
    """
    p, q = ema_coefficients(damping, decay)
    scaling = math.sqrt(1.0 / projection.shape[-1])
    new_state = (p * expansion).squeeze(-1) * x.unsqueeze(-1)
    if state is not None:
        new_state = new_state + q.squeeze(-1) * state
    # einsum does not promote: both in the promoted dtype of x, the parameters and the state
    eta = projection * scaling
    dt = torch.promote_types(new_state.dtype, eta.dtype)
    new_state = new_state.to(dt)
    y = torch.einsum("bdn,dn->bd", new_state, eta.to(dt))
    return y, new_state


def ema_scan_ref(
    x: Tensor,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The same EMA as a plain recurrence over time (no truncation): (B, L, D), final state.

    For tests: `ema_scan_ref` equals `ema_ref` (truncation None, zero initial state).
    """
    ys = []
    for t in range(x.shape[1]):
        y, state = ema_step_ref(x[:, t], state, damping, decay, expansion, projection)
        ys.append(y)
    return torch.stack(ys, dim=1), state
