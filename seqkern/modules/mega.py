"""Drop-in MEGA transducer decoder: `espnet2.asr_transducer.decoder.mega_decoder.MEGADecoder`
(ESPnet 202506), with its MEGA blocks, multi-head damped EMA, relative-position biases,
normalized FFN, normalizations and activations.

Same constructor signatures, state_dict keys, forward/inference numerics and decoder state
layouts as upstream, so ESPnet's `BeamSearchTransducer` runs on it. The hot paths go through
`seqkern.ops.ema` (the EMA convolution and step) and `seqkern.ops.chunk` (the attention).

Differences from upstream (all where upstream crashes, goes stale or gives NaN):
* a query row whose keys are all masked outputs 0 instead of NaN;
* `stack_qk_states`/`create_batch_states` build on the states' device and dtype (upstream:
  CPU float32), and also accept 3-D (1, Lk, ·) key/value states;
* `init_state` is created in the parameters' dtype (upstream: float32; values are zeros);
* the EMA step recomputes its coefficients from the parameters at each call (upstream caches
  them and can go stale after `load_state_dict` or `.to()`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from seqkern import _ext, backends
from seqkern.modules.sequence import SequenceModule
from seqkern.ops.chunk import chunk_attention
from seqkern.ops.ema import ema, ema_step
from seqkern.ops.linear import linear_rows


def _check_tensor(owner: str, name: str, t: Any, like: Tensor) -> None:
    """`t` is a floating-point tensor on `like`'s device with its dtype (any floating dtype under
    autocast); a ValueError / TypeError naming `owner` and `name` otherwise. Attribute reads
    only: nothing synchronises with the device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(
            f"{owner}: {name} must be on the module's device {like.device}, got {t.device}"
        )
    if not t.is_floating_point() or (
        t.dtype != like.dtype and not torch.is_autocast_enabled(t.device.type)
    ):
        raise TypeError(f"{owner}: {name} must have the module's dtype {like.dtype}, got {t.dtype}")


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """`layer(x)`; a one-step (1, B, ·) input runs as a B-row matrix-vector product
    (`linear_rows`: the weight read once), unless the layer has hooks that must see the call."""
    if (
        x.dim() == 3
        and x.shape[0] == 1
        and x.dtype == layer.weight.dtype  # else (autocast) nn.Linear casts, as upstream's
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    ):
        return linear_rows(x[0], layer.weight, layer.bias).unsqueeze(0)
    return layer(x)


# ---------------------------------------------------------------------------------------------
# Activations (espnet2/asr_transducer/activation.py)


class FTSwish(nn.Module):
    """Flatten-T Swish: x * sigmoid(x) + threshold where that is >= 0, else threshold."""

    def __init__(self, threshold: float = -0.2, mean_shift: float = 0) -> None:
        super().__init__()
        if not threshold < 0:
            raise ValueError(f"FTSwish: threshold must be < 0, got {threshold}")
        self.threshold = threshold
        self.mean_shift = mean_shift

    def forward(self, x: Tensor) -> Tensor:
        y = x * torch.sigmoid(x) + self.threshold
        # The floor is a float32 scalar, as upstream's torch.tensor([threshold]).
        floor = torch.tensor(self.threshold, dtype=torch.float32, device=x.device)
        y = torch.where(y >= 0, y, floor.to(y.dtype))
        if self.mean_shift != 0:
            y = y - self.mean_shift
        return y


class Mish(nn.Module):
    """Mish: x * tanh(softplus(x)) (upstream uses torch's builtin on any recent torch)."""

    def __init__(
        self, softplus_beta: float = 1.0, softplus_threshold: int = 20, use_builtin: bool = True
    ) -> None:
        super().__init__()
        self.use_builtin = use_builtin
        self.softplus_beta = softplus_beta
        self.softplus_threshold = softplus_threshold

    def forward(self, x: Tensor) -> Tensor:
        if self.use_builtin:
            return nn.functional.mish(x)
        sp = nn.functional.softplus(x, beta=self.softplus_beta, threshold=self.softplus_threshold)
        return x * torch.tanh(sp)


class Smish(nn.Module):
    """Smish: (alpha * x) * tanh(log(1 + sigmoid(beta * x))); alpha, beta <= 0 become 1."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha if alpha > 0 else 1
        self.beta = beta if beta > 0 else 1

    def forward(self, x: Tensor) -> Tensor:
        return (self.alpha * x) * torch.tanh(torch.log(1 + torch.sigmoid(self.beta * x)))


class Swish(nn.Module):
    """Swish: SiLU for beta <= 1, else the E-swish (beta * x) * sigmoid(x)."""

    def __init__(self, beta: float = 1.0, use_builtin: bool = True) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        if self.beta > 1:
            return (self.beta * x) * torch.sigmoid(x)
        return nn.functional.silu(x)


def get_activation(
    activation_type: str,
    ftswish_threshold: float = -0.2,
    ftswish_mean_shift: float = 0.0,
    hardtanh_min_val: int = -1.0,
    hardtanh_max_val: int = 1.0,
    leakyrelu_neg_slope: float = 0.01,
    smish_alpha: float = 1.0,
    smish_beta: float = 1.0,
    softplus_beta: float = 1.0,
    softplus_threshold: int = 20,
    swish_beta: float = 1.0,
) -> nn.Module:
    """The activation module upstream's `get_activation` builds (same names and arguments)."""
    makers = {
        "ftswish": lambda: FTSwish(ftswish_threshold, ftswish_mean_shift),
        "hardtanh": lambda: nn.Hardtanh(min_val=hardtanh_min_val, max_val=hardtanh_max_val),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope=leakyrelu_neg_slope),
        "mish": lambda: Mish(softplus_beta, softplus_threshold, use_builtin=True),
        "relu": nn.ReLU,
        "selu": nn.SELU,
        "smish": lambda: Smish(smish_alpha, smish_beta),
        "swish": lambda: Swish(swish_beta, use_builtin=True),
        "tanh": nn.Tanh,
        "identity": nn.Identity,
    }
    if activation_type not in makers:
        raise ValueError(
            f"activation_type must be one of {sorted(makers)}, got {activation_type!r}"
        )
    return makers[activation_type]()


# ---------------------------------------------------------------------------------------------
# Normalizations (espnet2/asr_transducer/normalization.py)


class BasicNorm(nn.Module):
    """x * (mean(x^2) + exp(eps))^-1/2, with a learnable log-eps (state_dict key `eps`)."""

    def __init__(self, normalized_shape: int, eps: float = 0.25) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(eps).log().detach())

    def forward(self, x: Tensor) -> Tensor:
        return x * (x.pow(2).mean(dim=-1, keepdim=True) + self.eps.exp()) ** -0.5


class RMSNorm(nn.Module):
    """scale * x / (rms(x) + eps); with 0 < partial < 1 the RMS uses the leading fraction."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, partial: float = 0.0) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.partial = 0 < partial < 1
        self.p = partial
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.partial:
            n = int(self.normalized_shape * self.p)
            norm = x[..., :n].norm(2, dim=-1, keepdim=True)
        else:
            n = self.normalized_shape
            norm = x.norm(2, dim=-1, keepdim=True)
        rms = norm * n ** (-1.0 / 2)
        return self.scale * (x / (rms + self.eps))


class ScaleNorm(nn.Module):
    """x * scale / max(||x||, eps), scale initialised to sqrt(D)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(normalized_shape**0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.scale / torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps))


def get_normalization(
    normalization_type: str, eps: float | None = None, partial: float | None = None
) -> tuple[type, dict]:
    """(class, kwargs) as upstream's `get_normalization`; layer_norm defaults to eps 1e-12."""
    table = {
        "basic_norm": (BasicNorm, {"eps": 0.25 if eps is None else eps}),
        "layer_norm": (nn.LayerNorm, {"eps": 1e-12 if eps is None else eps}),
        "rms_norm": (
            RMSNorm,
            {"eps": 1e-5 if eps is None else eps, "partial": -1.0 if partial is None else partial},
        ),
        "scale_norm": (ScaleNorm, {"eps": 1e-5 if eps is None else eps}),
    }
    if normalization_type not in table:
        raise ValueError(
            f"normalization_type must be one of {sorted(table)}, got {normalization_type!r}"
        )
    return table[normalization_type]


# ---------------------------------------------------------------------------------------------
# Relative position biases (…/decoder/modules/mega/positional_bias.py)


class RelativePositionBias(nn.Module):
    """Learned bias per relative offset: B[i, j] = w[M - 1 + j - i], w of length 2M - 1."""

    def __init__(self, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.relative_position_bias = nn.Parameter(torch.empty(2 * max_positions - 1))
        self.reset_parameters()

    def reset_parameters(self, val: float = 0.0, std: float = 0.02) -> None:
        nn.init.normal_(self.relative_position_bias, mean=val, std=std)

    def _check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"Length {length} is too long for the maximum number of "
                f"allowed positions {self.max_positions}."
            )

    def forward(self, length: int) -> Tensor:
        """(length, length) bias; ValueError when length > max_positions (as upstream)."""
        self._check_length(length)
        pos = torch.arange(length, device=self.relative_position_bias.device)
        offsets = pos.unsqueeze(0) - pos.unsqueeze(1) + (self.max_positions - 1)
        return self.relative_position_bias[offsets]

    def offsets(self, query_length: int, key_length: int) -> Tensor:
        """The same bias as a per-offset vector, for the last `query_length` rows of
        `forward(key_length)`: rel (query_length + key_length - 1,) with
        bias[i, j] = rel[j - i + query_length - 1]. A view of the parameter: nothing
        (query_length x key_length) is built, and the attention kernels gather it per tile."""
        self._check_length(key_length)
        m = self.max_positions
        return self.relative_position_bias[m - key_length : m + query_length - 1]


class RotaryRelativePositionBias(nn.Module):
    """Bias rot(alpha) rot(beta)^T, with rotary embeddings of the constant rows alpha, beta.

    The sine/cosine tables are float32, cast to the buffer `_pe`'s dtype and device, and grow
    on demand (no maximum length), as upstream.
    """

    def __init__(self, size: int, max_positions: int = 2048) -> None:
        super().__init__()
        self.sine, self.cosine = self.get_sinusoid_embeddings(max_positions, size)
        self.alpha = nn.Parameter(torch.empty(1, size))
        self.beta = nn.Parameter(torch.empty(1, size))
        self.register_buffer("_pe", torch.zeros(1))
        self.size = size
        self.max_positions = max_positions
        self.reset_parameters()

    def reset_parameters(self, val: float = 0.0, std: float = 0.02) -> None:
        nn.init.normal_(self.alpha, mean=val, std=std)
        nn.init.normal_(self.beta, mean=val, std=std)

    @staticmethod
    def get_sinusoid_embeddings(max_positions: int, size: int) -> tuple[Tensor, Tensor]:
        """(sin, cos), each (max_positions, size // 2), float32."""
        half = size // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / half))
        angles = torch.arange(max_positions, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
        return torch.sin(angles), torch.cos(angles)

    def rotary(self, x: Tensor) -> Tensor:
        """Rotary embedding of x (L, size): halves (a, b) -> (a cos - b sin, b cos + a sin)."""
        length, dim = x.shape
        if dim % 2:
            raise ValueError(f"rotary relative position bias needs an even qk_size, got {dim}")
        if self.sine is None or length > self.sine.shape[0]:
            self.sine, self.cosine = self.get_sinusoid_embeddings(length, dim)
            self.max_positions = length
        self.sine, self.cosine = self.sine.to(self._pe), self.cosine.to(self._pe)
        sin, cos = self.sine[:length], self.cosine[:length]
        a, b = x[:, : dim // 2], x[:, dim // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)

    def forward(self, length: int) -> Tensor:
        """(length, length) bias."""
        rot_a = self.rotary(self.alpha.expand(length, self.size))
        rot_b = self.rotary(self.beta.expand(length, self.size))
        return torch.einsum("mk,nk->mn", rot_a, rot_b)


# ---------------------------------------------------------------------------------------------
# Multi-head damped EMA (…/decoder/modules/mega/multi_head_damped_ema.py)


class MultiHeadDampedEMA(SequenceModule):
    """Multi-head damped EMA: activation(EMA(x) + x * residual_weight).

    `forward(x (L, B, D), mask (B, 1, L) True = pad, state {"ema_state": ...})` keeps upstream's
    time-major signature and returns (out (L, B, D), None) for a whole sequence, or
    (out (1, B, D), new ema state (B, D, h)) for one step when `state` is given.

    SequenceModule interface: `d_model = d_output = size`; `default_state(B)` is a (B, D, h)
    zero state; `step(x_t (B, D), state)` -> ((B, D), (B, D, h)). Stepping from the default
    state equals the full forward with truncation_length None (the step never truncates, as
    upstream). The coefficients are recomputed at every call: no cache that can go stale.
    """

    def __init__(
        self,
        size: int,
        num_heads: int = 4,
        activation: nn.Module | None = None,
        truncation_length: int | None = None,
    ) -> None:
        super().__init__()
        self.damping_factor = nn.Parameter(torch.empty(size, num_heads, 1))
        self.decay_factor = nn.Parameter(torch.empty(size, num_heads, 1))
        self.ema_expansion_matrix = nn.Parameter(torch.empty(size, num_heads, 1))
        self.kernel_projection_matrix = nn.Parameter(torch.empty(size, num_heads))
        self.residual_weight = nn.Parameter(torch.empty(size))
        self.scaling = math.sqrt(1.0 / num_heads)
        self.truncation_length = truncation_length
        self.activation = nn.ReLU() if activation is None else activation
        self.num_heads = num_heads
        self.d_model = size
        self.d_output = size
        self.reset_parameters()

    def reset_parameters(self, val: float = 0.0, std1: float = 0.2, std2: float = 1.0) -> None:
        with torch.no_grad():
            nn.init.normal_(self.damping_factor, mean=val, std=std1)
            nn.init.normal_(self.decay_factor, mean=val, std=std1)
            signs = torch.ones(self.num_heads, 1)
            signs[1::2] = -1.0  # +1, -1, +1, ... over the heads
            self.ema_expansion_matrix.normal_(mean=val, std=0.02).add_(signs)
            nn.init.normal_(self.kernel_projection_matrix, mean=val, std=std2)
            nn.init.normal_(self.residual_weight, mean=val, std=std2)

    def _params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.damping_factor,
            self.decay_factor,
            self.ema_expansion_matrix,
            self.kernel_projection_matrix,
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: dict[str, Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.size(-1) != self.d_model:
            raise ValueError(
                f"MultiHeadDampedEMA: x must be (L, B, {self.d_model}), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        # The residual x * residual_weight (unmasked x) is fused into the EMA ops' output.
        omega = self.residual_weight
        if state is not None:
            if x.shape[0] != 1:
                raise ValueError(f"MultiHeadDampedEMA: a step takes L = 1, got x {tuple(x.shape)}")
            xt = x[0]
            if mask is not None:
                y, new_state = ema_step(
                    xt.masked_fill(mask[:, 0, -1:], 0.0), state["ema_state"], *self._params()
                )
                return self.activation((y + xt * omega).unsqueeze(0)), new_state
            y, new_state = ema_step(xt, state["ema_state"], *self._params(), omega=omega)
            return self.activation(y.unsqueeze(0)), new_state
        pad = None if mask is None else mask[:, 0, :]
        y = ema(
            x.transpose(0, 1),
            *self._params(),
            pad_mask=pad,
            truncation=self.truncation_length,
            omega=omega,
        )
        return self.activation(y.transpose(0, 1)), None

    # SequenceModule interface -----------------------------------------------------------
    def default_state(self, *batch_shape: int, device: Any = None) -> Tensor:
        d, h = self.kernel_projection_matrix.shape
        dev = self.residual_weight.device if device is None else device
        return torch.zeros(*batch_shape, d, h, dtype=self.residual_weight.dtype, device=dev)

    def step(self, x: Tensor, state: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        """x (B, D), state (B, D, h) / (D, h) / None -> (y (B, D), new state (B, D, h))."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.size(-1) != self.d_model:
            raise ValueError(
                f"MultiHeadDampedEMA.step: x must be (B, {self.d_model}), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        y, new_state = ema_step(x, state, *self._params(), omega=self.residual_weight)
        return self.activation(y), new_state

    @property
    def d_state(self) -> int:
        return self.kernel_projection_matrix.numel()

    @property
    def state_to_tensor(self):
        return lambda state: None if state is None else state.flatten(-2)


# ---------------------------------------------------------------------------------------------
# Normalized FFN (…/decoder/modules/mega/feed_forward.py)


class NormalizedPositionwiseFeedForward(nn.Module):
    """norm(x + dropout(linear2(dropout(act(linear1(x))))))."""

    def __init__(
        self,
        size: int,
        hidden_size: int,
        normalization: nn.Module | None = None,
        activation: nn.Module | None = None,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, size)
        self.normalization = nn.LayerNorm(size) if normalization is None else normalization
        self.activation = nn.ReLU() if activation is None else activation
        self.dropout = nn.Dropout(p=dropout_rate)
        self.hidden_dropout = nn.Dropout(p=dropout_rate)
        self.reset_parameters()

    def reset_parameters(self, val: float = 0.0, std: float = 0.02) -> None:
        for lin in (self.linear1, self.linear2):
            nn.init.normal_(lin.weight, mean=val, std=std)
            nn.init.constant_(lin.bias, val)

    def forward(self, x: Tensor) -> Tensor:
        owner = "NormalizedPositionwiseFeedForward"
        _check_tensor(owner, "x", x, self.linear1.weight)
        if x.dim() == 0 or x.size(-1) != self.linear1.in_features:
            raise ValueError(
                f"{owner}: x must be (..., {self.linear1.in_features}), got {tuple(x.shape)}"
            )
        h = self.hidden_dropout(self.activation(_linear(self.linear1, x)))
        return self.normalization(self.dropout(_linear(self.linear2, h)) + x)


# ---------------------------------------------------------------------------------------------
# MEGA block (…/decoder/blocks/mega.py)


class MEGA(nn.Module):
    """Moving-average equipped gated attention block (single-head attention, EMA heads).

    `forward(x (L, B, D), mask (B, 1, L) True = pad, attn_mask, state)` -> (x (L, B, D), state).
    Any non-None `attn_mask` means causal (the decoder only ever passes the causal mask).
    With `state` (a dict prev_key (B, Lk, K) / prev_value (B, Lk, V) / ema_state, each may be
    None), L must be 1 and the new state is returned, else None.
    """

    def __init__(
        self,
        size: int = 512,
        num_heads: int = 4,
        qk_size: int = 128,
        v_size: int = 1024,
        activation: nn.Module | None = None,
        normalization: nn.Module | None = None,
        rel_pos_bias_type: str = "simple",
        max_positions: int = 2048,
        truncation_length: int | None = None,
        chunk_size: int = -1,
        dropout_rate: float = 0.0,
        att_dropout_rate: float = 0.0,
        ema_dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        activation = nn.ReLU() if activation is None else activation
        self.multihead_damped_ema = MultiHeadDampedEMA(
            size, num_heads=num_heads, activation=activation, truncation_length=truncation_length
        )
        if chunk_size > 0:
            max_positions = chunk_size
        if rel_pos_bias_type == "rotary":
            self.rel_pos_bias = RotaryRelativePositionBias(qk_size, max_positions)
        elif rel_pos_bias_type == "simple":
            self.rel_pos_bias = RelativePositionBias(max_positions)
        else:
            raise ValueError("Only 'rotary' and 'simple' are valid values for rel_pos_bias_type")
        self.proj_v = nn.Linear(size, v_size)
        self.proj_mx = nn.Linear(size, qk_size + v_size + 2 * size)
        self.proj_h = nn.Linear(v_size, size)
        self.qk_weight = nn.Parameter(torch.empty(2, qk_size))
        self.qk_bias = nn.Parameter(torch.empty(2, qk_size))
        self.scaling = qk_size**-0.5
        self.activation = activation
        self.normalization = nn.LayerNorm(size) if normalization is None else normalization
        self.dropout = nn.Dropout(p=dropout_rate)
        self.dropout_attn = nn.Dropout(p=att_dropout_rate)
        self.dropout_ema = nn.Dropout(p=ema_dropout_rate)
        self.qk_size = qk_size
        self.v_size = v_size
        self.size = size
        self._ema_heads = num_heads
        self.chunk_size = chunk_size
        self.reset_parameters()

    def reset_parameters(self, val: float = 0.0, std: float = 0.02) -> None:
        for lin in (self.proj_v, self.proj_mx, self.proj_h):
            nn.init.normal_(lin.weight, mean=val, std=std)
            nn.init.constant_(lin.bias, val)
        nn.init.normal_(self.qk_weight, mean=val, std=std)
        nn.init.constant_(self.qk_bias, val)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        attn_mask: Tensor | bool | None = None,
        state: dict[str, Tensor | None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | None] | None]:
        self._check_inputs(x, mask, state)
        if state is not None and mask is None and self._fused_step_ok(x, state):
            return self._fused_step(x, state)
        length, batch, _ = x.shape
        residual = x
        value = self.activation(_linear(self.proj_v, x))  # (L, B, V)
        ema_out, ema_state = self.multihead_damped_ema(x, mask=mask, state=state)
        mx = _linear(self.proj_mx, self.dropout_ema(ema_out))
        gate, qk_gates, hidden = torch.split(
            mx, [self.size, self.qk_size + self.v_size, self.size], dim=-1
        )
        gate = torch.sigmoid(gate)
        base, att_gate = torch.split(self.activation(qk_gates), [self.qk_size, self.v_size], -1)
        qk = base.unsqueeze(2) * self.qk_weight + self.qk_bias  # (L, B, 2, K)
        query, key = qk[:, :, 0].transpose(0, 1), qk[:, :, 1].transpose(0, 1)  # (B, L, K)
        value = value.transpose(0, 1)  # (B, L, V)

        if state is not None:
            if state.get("prev_key") is not None:
                key = torch.cat([state["prev_key"], key], dim=1)
            if state.get("prev_value") is not None:
                value = torch.cat([state["prev_value"], value], dim=1)
            if self.chunk_size > 0 and key.shape[1] % self.chunk_size == 0:
                # Upstream keeps the last key/value at a chunk boundary (not an empty context).
                state = {
                    "prev_key": key[:, -1:, :],
                    "prev_value": value[:, -1:, :],
                    "ema_state": ema_state,
                }
            else:
                state = {"prev_key": key, "prev_value": value, "ema_state": ema_state}
            key_pad, causal = None, False
        else:
            key_pad = None if mask is None else mask[:, 0, :]
            causal = attn_mask is not None

        ctx = key.shape[1]
        chunked = 0 < self.chunk_size < ctx and length == ctx
        block = self.chunk_size if chunked else ctx
        if isinstance(self.rel_pos_bias, RelativePositionBias):
            # per offset, gathered in the kernel: (block_q + block - 1,)
            bias = self.rel_pos_bias.offsets(block if chunked else length, block)
        else:  # rotary: dense, built as upstream builds it (shared by the batch and chunks)
            bias = self.rel_pos_bias(block)
            if length != ctx:
                bias = bias[-length:]
        if query.dtype != value.dtype and torch.is_autocast_enabled(query.device.type):
            # autocast: q and k come from elementwise ops (parameter dtype), v from a Linear
            # (the autocast dtype); upstream's matmuls run in the autocast dtype
            query, key = query.to(value.dtype), key.to(value.dtype)
        out = chunk_attention(
            query,
            key,
            self.dropout(value),
            bias,
            key_padding_mask=key_pad,
            chunk_size=self.chunk_size,
            causal=causal,
            scaling=self.scaling,
            dropout_p=self.dropout_attn.p,
            training=self.training,
        ).transpose(0, 1)  # (L, B, V)

        h = self.dropout(self.activation(hidden + _linear(self.proj_h, out * att_gate)))
        return self.normalization(torch.addcmul(residual, gate, h - residual)), state

    def _inputs_ok(self, x: Tensor, mask: Tensor | None, state: dict | None) -> bool:
        """The common case, in as few attribute reads as a decoding step can afford: x, and a
        state in x's dtype and device with the shapes `_check_inputs` names."""
        w = self.qk_weight  # (one Module attribute lookup: they cost a microsecond each)
        if mask is not None or not isinstance(x, Tensor) or x.dim() != 3:
            return False
        dtype, device = w.dtype, w.device
        if x.dtype != dtype or x.device != device or x.shape[2] != self.size:
            return False
        if state is None:
            return True
        if type(state) is not dict:
            return False
        batch = x.shape[1]
        ema_state, prev_key = state.get("ema_state"), state.get("prev_key")
        prev_value = state.get("prev_value")
        if ema_state is not None:
            n = ema_state.dim()
            if (
                ema_state.dtype != dtype
                or ema_state.device != device
                or not (n == 2 or (n == 3 and ema_state.shape[0] == batch))
                or ema_state.shape[-2:] != (self.size, self._ema_heads)
            ):
                return False
        if prev_key is None:
            return prev_value is None
        return (
            prev_value is not None
            and prev_key.dtype == dtype
            and prev_value.dtype == dtype
            and prev_key.device == device
            and prev_value.device == device
            and prev_key.dim() == 3
            and prev_key.shape[0] == batch
            and prev_key.shape[2] == self.qk_size
            and prev_value.shape == (batch, prev_key.shape[1], self.v_size)
        )

    def _check_inputs(self, x: Tensor, mask: Tensor | None, state: dict | None) -> None:
        """Each argument's shape, dtype and device, named when wrong (attribute reads only: no
        device sync, nothing that grows with the sequence)."""
        if self._inputs_ok(x, mask, state):
            return
        _check_tensor("MEGA", "x", x, self.proj_v.weight)
        if x.dim() != 3 or x.size(-1) != self.size:
            raise ValueError(f"MEGA: x must be (L, B, {self.size}), got {tuple(x.shape)}")
        length, batch = x.shape[0], x.shape[1]
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"MEGA: mask must be a bool tensor (True = padding), got {what}")
            # a step's mask may cover the cached keys too: only its last column is read
            if (
                mask.dim() != 3
                or mask.shape[:2] != (batch, 1)
                or (state is None and mask.shape[2] != length)
            ):
                raise ValueError(
                    f"MEGA: mask must be (B, 1, L) = ({batch}, 1, {length}), got "
                    f"{tuple(mask.shape)}"
                )
        if state is None:
            return
        if not isinstance(state, dict):
            raise TypeError(f"MEGA: state must be a dict, got {type(state).__name__}")
        d, h = self.multihead_damped_ema.kernel_projection_matrix.shape
        ema_state = state.get("ema_state")
        prev_key, prev_value = state.get("prev_key"), state.get("prev_value")
        for name, t in (
            ("ema_state", ema_state),
            ("prev_key", prev_key),
            ("prev_value", prev_value),
        ):
            if t is not None:
                _check_tensor("MEGA", f"state[{name!r}]", t, x)
        if ema_state is not None and ema_state.shape not in ((batch, d, h), (d, h)):
            raise ValueError(
                f"MEGA: state['ema_state'] must be (B, D, h) = ({batch}, {d}, {h}) or (D, h), "
                f"got {tuple(ema_state.shape)}"
            )
        if (prev_key is None) != (prev_value is None):
            raise ValueError("MEGA: state['prev_key'] and state['prev_value'] go together")
        if prev_key is not None:
            if (
                prev_key.dim() != 3
                or prev_key.shape[0] != batch
                or prev_key.shape[2] != self.qk_size
            ):
                raise ValueError(
                    f"MEGA: state['prev_key'] must be (B, Lk, K) = ({batch}, Lk, {self.qk_size}), "
                    f"got {tuple(prev_key.shape)}"
                )
            if prev_value.shape != (batch, prev_key.shape[1], self.v_size):
                raise ValueError(
                    f"MEGA: state['prev_value'] must be (B, Lk, V) = ({batch}, "
                    f"{prev_key.shape[1]}, {self.v_size}), got {tuple(prev_value.shape)}"
                )

    # -- one decoding step as one C++ call (csrc/mega/mega_step_cpu.cpp) -----------------------
    def _fused_step_ok(self, x: Tensor, state: dict[str, Tensor | None]) -> bool:
        """The fused CPU step covers ESPnet's default block (SiLU, LayerNorm, simple bias) in
        float32 inference on at most 8 rows; anything else runs the ops above."""
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] > 8:
            return False
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return False
        order = backends.allowed_backends()
        if order is not None and "cpu" not in order:
            return False
        if backends.unavailable_reason("cpu") or not hasattr(_ext.C, "mega_step_cpu"):
            return False
        act, norm = self.activation, self.normalization
        silu = isinstance(act, nn.SiLU) or (isinstance(act, Swish) and act.beta <= 1)
        if not silu or type(norm) is not nn.LayerNorm or norm.weight is None:
            return False
        if not isinstance(self.rel_pos_bias, RelativePositionBias):
            return False
        if self.training and any(
            d.p > 0 for d in (self.dropout, self.dropout_attn, self.dropout_ema)
        ):
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return False
        tensors = [state.get(k) for k in ("ema_state", "prev_key", "prev_value")]
        if (state.get("prev_key") is None) != (state.get("prev_value") is None):
            return False
        return all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in tensors)

    def _fused_step(self, x: Tensor, state: dict[str, Tensor | None]):
        ema = self.multihead_damped_ema
        prev_key = state.get("prev_key")
        key_len = 0 if prev_key is None else prev_key.shape[1]
        rel = self.rel_pos_bias.offsets(1, key_len + 1)  # ValueError past max_positions
        norm = self.normalization
        out, ema_state, key, value = _ext.C.mega_step_cpu(
            x[0],
            state.get("ema_state"),
            prev_key,
            state.get("prev_value"),
            ema.damping_factor,
            ema.decay_factor,
            ema.ema_expansion_matrix,
            ema.kernel_projection_matrix,
            ema.residual_weight,
            self.proj_v.weight,
            self.proj_v.bias,
            self.proj_mx.weight,
            self.proj_mx.bias,
            self.proj_h.weight,
            self.proj_h.bias,
            self.qk_weight,
            self.qk_bias,
            rel,
            norm.weight,
            norm.bias,
            norm.eps,
            self.scaling,
        )
        if self.chunk_size > 0 and key.shape[1] % self.chunk_size == 0:
            key, value = key[:, -1:], value[:, -1:]  # upstream keeps the last key at a boundary
        return out.unsqueeze(0), {"prev_key": key, "prev_value": value, "ema_state": ema_state}


# ---------------------------------------------------------------------------------------------
# The decoder (…/decoder/mega_decoder.py)

State = list[dict[str, Tensor | None]]


class MEGADecoder(nn.Module):
    """MEGA decoder for transducer models (https://arxiv.org/pdf/2209.10655.pdf).

    Same arguments and defaults as upstream. `forward(labels (B, L))` -> (B, L, D);
    `inference(labels (B, 1), states)` -> ((B, 1, D), states); `score`, `batch_score`,
    `init_state`, `select_state`, `create_batch_states`, `stack_qk_states`, `set_device` as
    upstream (see the module docstring for the differences).

    Also a recurrent interface: `default_state(B)` gives an empty-context state (EMA zeros, no
    keys), and `step(labels (B,), state)` -> ((B, D), state); with chunk_size = -1 stepping from
    `default_state` equals `forward`. (Upstream's `init_state` seeds one zero key/value, so
    decoding from it differs from `forward`; beam search uses that.)

    Example:
        >>> dec = MEGADecoder(10, block_size=16, linear_size=24, qk_size=8, v_size=12)
        >>> out = dec(torch.tensor([[0, 3, 4, 5]]))  # (1, 4, 16)
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 512,
        linear_size: int = 1024,
        qk_size: int = 128,
        v_size: int = 1024,
        num_heads: int = 4,
        rel_pos_bias_type: str = "simple",
        max_positions: int = 2048,
        truncation_length: int | None = None,
        normalization_type: str = "layer_norm",
        normalization_args: dict = {},  # noqa: B006 - upstream's signature
        activation_type: str = "swish",
        activation_args: dict = {},  # noqa: B006
        chunk_size: int = -1,
        num_blocks: int = 4,
        dropout_rate: float = 0.0,
        embed_dropout_rate: float = 0.0,
        att_dropout_rate: float = 0.0,
        ema_dropout_rate: float = 0.0,
        ffn_dropout_rate: float = 0.0,
        embed_pad: int = 0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, block_size, padding_idx=embed_pad)
        self.dropout_embed = nn.Dropout(p=embed_dropout_rate)
        activation = get_activation(activation_type, **activation_args)
        norm_cls, norm_kw = get_normalization(normalization_type, **normalization_args)

        def block() -> nn.ModuleList:
            mega = MEGA(
                block_size,
                num_heads=num_heads,
                qk_size=qk_size,
                v_size=v_size,
                activation=activation,
                normalization=norm_cls(block_size, **norm_kw),
                rel_pos_bias_type=rel_pos_bias_type,
                max_positions=max_positions,
                truncation_length=truncation_length,
                chunk_size=chunk_size,
                dropout_rate=dropout_rate,
                att_dropout_rate=att_dropout_rate,
                ema_dropout_rate=ema_dropout_rate,
            )
            ffn = NormalizedPositionwiseFeedForward(
                block_size,
                linear_size,
                normalization=norm_cls(block_size, **norm_kw),
                activation=activation,
                dropout_rate=ffn_dropout_rate,
            )
            return nn.ModuleList([mega, ffn])

        self.mega_blocks = nn.ModuleList([block() for _ in range(num_blocks)])
        self.final_norm = norm_cls(block_size, **norm_kw)

        self.vocab_size = vocab_size
        self.output_size = block_size
        self.chunk_size = chunk_size
        self.mega_num_heads = num_heads
        self.mega_att_k_size = qk_size
        self.mega_att_v_size = v_size
        self.mega_ema_size = block_size
        self.mega_ema_num_heads = num_heads
        self.pad_idx = embed_pad
        self.num_blocks = num_blocks
        self.score_cache: dict[str, tuple[Tensor, State]] = {}
        self.device = next(self.parameters()).device

    # -- full sequence ------------------------------------------------------------------
    def forward(self, labels: Tensor) -> Tensor:
        """labels (B, L) int -> (B, L, D). Every pad id except at position 0 is a padding key."""
        self._check_labels("forward", labels, "(B, L)")
        if labels.dim() != 2 or labels.shape[1] == 0:
            raise ValueError(
                f"MEGADecoder.forward: labels must be (B, L) with L >= 1, got {tuple(labels.shape)}"
            )
        _, length = labels.shape
        extra = 0
        if 0 < self.chunk_size < length and length % self.chunk_size:
            extra = -length % self.chunk_size
            labels = nn.functional.pad(labels, (0, extra), value=self.pad_idx)
        mask = (labels == self.pad_idx).unsqueeze(1)
        mask[..., 0] = False
        x = self.dropout_embed(self._embed(labels)).transpose(0, 1)
        for mega, ffn in self.mega_blocks:
            x, _ = mega(x, mask=mask, attn_mask=True)
            x = ffn(x)
        out = self.final_norm(x).transpose(0, 1)
        return out[:, :length] if extra else out

    # -- streaming ------------------------------------------------------------------------
    def inference(self, labels: Tensor, states: State) -> tuple[Tensor, State]:
        """labels (B, 1), states (one dict per block) -> ((B, 1, D), new states)."""
        self._check_labels("inference", labels, "(B, 1)")
        if labels.dim() != 2:
            raise ValueError(
                f"MEGADecoder.inference: labels must be (B, 1), got {tuple(labels.shape)}"
            )
        if not isinstance(states, (list, tuple)) or len(states) < self.num_blocks:
            got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(
                f"MEGADecoder.inference: states must hold one state per block "
                f"({self.num_blocks}), got {got}"
            )
        x = self._embed(labels).transpose(0, 1)
        new_states = []
        for (mega, ffn), state in zip(self.mega_blocks, states):
            x, new_state = mega(x, state=state)
            x = ffn(x)
            new_states.append(new_state)
        return self.final_norm(x).transpose(0, 1), new_states

    def _check_labels(self, method: str, labels: Any, shape: str) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(
                f"MEGADecoder.{method}: labels must be a torch.Tensor {shape}, got "
                f"{type(labels).__name__}"
            )
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"MEGADecoder.{method}: labels must be integer token ids (int64 or int32), got "
                f"{labels.dtype}"
            )
        if labels.device != self.embed.weight.device:
            raise ValueError(
                f"MEGADecoder.{method}: labels must be on the decoder's device "
                f"{self.embed.weight.device}, got {labels.device}"
            )

    def _embed(self, labels: Tensor) -> Tensor:
        try:
            return self.embed(labels)
        except IndexError as err:  # (on the CPU; checking the range elsewhere needs a sync)
            raise IndexError(
                f"MEGADecoder: labels must be token ids in [0, vocab_size = {self.vocab_size})"
            ) from err

    def set_device(self, device: torch.device) -> None:
        self.device = device

    def score(self, label_sequence: list[int], states: State) -> tuple[Tensor, State]:
        """Decoder output (1, D) for the last label, memoised on the label sequence."""
        key = "_".join(map(str, label_sequence))
        if key not in self.score_cache:
            label = torch.full((1, 1), label_sequence[-1], dtype=torch.long, device=self.device)
            self.score_cache[key] = self.inference(label, states=states)
        out, states = self.score_cache[key]
        return out[0], states

    def batch_score(self, hyps: list[Any]) -> tuple[Tensor, State]:
        """Outputs (B, D) and batched states for the hypotheses' last labels and states."""
        labels = torch.tensor([[h.yseq[-1]] for h in hyps], dtype=torch.long, device=self.device)
        states = self.create_batch_states([h.dec_state for h in hyps])
        out, states = self.inference(labels, states=states)
        return out.squeeze(1), states

    def _state_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_state(self, batch_size: int = 0) -> State:
        """Upstream's initial state (batch_size ignored): EMA (D, h) zeros, one zero key/value
        (1, 1, K) / (1, 1, V) per block."""
        kw = {"dtype": self._state_dtype(), "device": self.device}
        return [
            {
                "ema_state": torch.zeros(self.output_size, self.mega_ema_num_heads, **kw),
                "prev_key": torch.zeros(1, 1, self.mega_att_k_size, **kw),
                "prev_value": torch.zeros(1, 1, self.mega_att_v_size, **kw),
            }
            for _ in range(self.num_blocks)
        ]

    def select_state(self, states: State, idx: int) -> State:
        """Row idx of a batched state: ema (D, h), prev_key (Lk, K), prev_value (Lk, V)."""
        return [
            {name: states[b][name][idx] for name in ("ema_state", "prev_key", "prev_value")}
            for b in range(self.num_blocks)
        ]

    def stack_qk_states(self, state_list: list[Tensor], dim: int) -> Tensor:
        """Left-pad with zeros to the longest and stack: [(Lk_i, dim)] -> (N, max Lk, dim).

        Built on the states' device and promoted dtype (upstream: CPU float32). A 3-D
        (1, Lk, dim) state is taken as (Lk, dim).
        """
        rows = [s[0] if s.dim() == 3 and s.shape[0] == 1 else s for s in state_list]
        dtype = rows[0].dtype
        for s in rows[1:]:
            dtype = torch.promote_types(dtype, s.dtype)
        max_len = max(s.shape[0] for s in rows)
        if all(s.shape[0] == max_len and s.dtype == dtype for s in rows):
            return torch.stack(rows)  # nothing to pad
        out = torch.zeros(len(rows), max_len, dim, dtype=dtype, device=rows[0].device)
        for i, s in enumerate(rows):
            out[i, max_len - s.shape[0] :] = s
        return out

    def create_batch_states(self, new_states: list[State]) -> State:
        """Batch hypotheses states: ema (B, D, h), prev_key (B, Lk, K), prev_value (B, Lk, V)."""
        return [
            {
                "ema_state": torch.stack([s[b]["ema_state"] for s in new_states]),
                "prev_key": self.stack_qk_states(
                    [s[b]["prev_key"] for s in new_states], self.mega_att_k_size
                ),
                "prev_value": self.stack_qk_states(
                    [s[b]["prev_value"] for s in new_states], self.mega_att_v_size
                ),
            }
            for b in range(self.num_blocks)
        ]

    # -- recurrent interface ------------------------------------------------------------
    def default_state(self, *batch_shape: int, device: Any = None) -> State:
        """Empty-context state for a (B,) batch: EMA zeros (B, D, h), no keys/values."""
        dev = self.embed.weight.device if device is None else device
        return [
            {
                "ema_state": torch.zeros(
                    *batch_shape,
                    self.output_size,
                    self.mega_ema_num_heads,
                    dtype=self._state_dtype(),
                    device=dev,
                ),
                "prev_key": None,
                "prev_value": None,
            }
            for _ in range(self.num_blocks)
        ]

    def step(self, labels: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """labels (B,) -> (out (B, D), new state); `state=None` means `default_state(B)`."""
        if labels.dim() != 1:
            raise ValueError(f"MEGADecoder.step: labels must be (B,), got {tuple(labels.shape)}")
        if state is None:
            state = self.default_state(labels.shape[0], device=labels.device)
        out, state = self.inference(labels.unsqueeze(1), state)
        return out[:, 0], state
