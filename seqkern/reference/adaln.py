"""AdaLN reference (ESPnet VALL-E, espnet2/speechlm/module/transformer.py `AdaLN`).

Upstream computes `gamma * layer_norm(x) + beta` where the LayerNorm has no affine and
eps = 1e-5, and gamma, beta are per-batch projections of the level embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adaln_ref(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """The oracle: exactly upstream's arithmetic, in the dtype of the inputs.

    Args:
        x: (B, T, D).
        gamma, beta: (B, D) (one modulation per batch element, as in VALL-E) or (B, T, D).
    Returns:
        (B, T, D): gamma * LayerNorm(x) + beta.
    """
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    if gamma.dim() == 2:
        gamma, beta = gamma.unsqueeze(1), beta.unsqueeze(1)
    return gamma * normed + beta


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def adaln_fwd_ref(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference backend's forward stage: (y, mean, rstd), statistics in fp32 (fp64 for fp64).

    The same contract as every other backend's forward: mean and rstd are (B, T).
    """
    xf = x.to(_acc_dtype(x))
    mean = xf.mean(dim=-1)
    centered = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.square().mean(dim=-1) + eps)
    normed = centered * rstd.unsqueeze(-1)
    g, b = gamma.to(xf.dtype), beta.to(xf.dtype)
    if g.dim() == 2:
        g, b = g.unsqueeze(1), b.unsqueeze(1)
    return (g * normed + b).to(x.dtype), mean, rstd


def adaln_bwd_ref(
    dy: Tensor, x: Tensor, gamma: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference backend's backward stage: (dx, dgamma, dbeta), written out by hand.

    With xhat = (x - mean) * rstd and g = dy * gamma:
        dx     = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
        dgamma = dy * xhat, dbeta = dy, each summed over T when gamma is (B, D).
    (Tests check this formula against autograd through `adaln_ref` in float64.)

    x - mean is centred once more on its own mean: the saved mean is rounded to fp32, and where
    |mean| >> the row's spread that rounding shifts every xhat alike, which dx (a difference of
    near-equal terms) amplifies by rstd (several times the fp32 reference's error at D = 2).
    """
    acc = _acc_dtype(x)
    dyf, xf = dy.to(acc), x.to(acc)
    centered = xf - mean.unsqueeze(-1)
    centered = centered - centered.mean(dim=-1, keepdim=True)
    xhat = centered * rstd.unsqueeze(-1)
    per_batch = gamma.dim() == 2
    gf = gamma.to(acc).unsqueeze(1) if per_batch else gamma.to(acc)
    g = dyf * gf
    dx = rstd.unsqueeze(-1) * (
        g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True)
    )
    if per_batch:
        dgamma, dbeta = (dyf * xhat).sum(dim=1), dyf.sum(dim=1)
    else:
        dgamma, dbeta = dyf * xhat, dyf.clone()  # an op's output may not alias its input dy
    return dx.to(x.dtype), dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)
