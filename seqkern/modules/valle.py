"""VALL-E's NAR decoder (espnet2.speechlm.module.valle.ValleNARDecoder) and its AdaLN blocks.

Same constructor, state_dict keys and kv_cache format as ESPnet 202506, with the intended
semantics of the fixed upstream variant (README "Differences from upstream"): every sample
gets its own attention residual (202506 broadcasts batch row 0), `causal` reaches every block,
and `forward` takes an optional `mask`.

The hot path: AdaLN is one `seqkern.adaln` kernel whose output is the projection's input, in
its dtype; q, k and v come from one GEMM over the concatenated weights (the key's absent bias
is zero), and `seqkern.ops.attention.attention_packed` reads the heads of that (B, T, 3D)
output in place, writes its result time-major (merging heads is free), and returns the
gradient of the packed projection in one tensor. With kv-cache hooks on the key and value
projections (`install_kv_cache_hook`), or for fewer tokens than n_state (where concatenating
the weights costs more than reading x three times), the three projections run separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqkern.ops.adaln import adaln
from seqkern.ops.attention import attention, attention_packed


def _check_tensor(owner: str, name: str, t, like: Tensor, shape: str) -> None:
    """`t` is a floating-point tensor on `like`'s device (attribute reads only: no sync)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor {shape}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(
            f"{owner}: {name} must be on the module's device {like.device}, got {t.device}"
        )


class Linear(nn.Linear):
    """nn.Linear that runs in the input's dtype (casts its parameters), as upstream's."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class AdaLN(nn.Module):
    """gamma(level) * LayerNorm(x) + beta(level), LayerNorm without affine.

    `weight` and `bias` are bias-free Linear(D, D) maps of the level embedding (upstream
    initialises them to all-ones and all-zeros matrices).
    """

    def __init__(self, n_state: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Linear(n_state, n_state, bias=False)
        self.bias = nn.Linear(n_state, n_state, bias=False)
        nn.init.constant_(self.weight.weight, 1.0)
        nn.init.constant_(self.bias.weight, 0.0)
        self.n_state = n_state
        self.eps = eps

    def forward(self, x: Tensor, level_emb: Tensor) -> Tensor:
        """x (B, T, D); level_emb (B, D) or (B, T, D) -> (B, T, D).

        The result has the promoted dtype of x and the parameters, as upstream's does.
        """
        D, w = self.n_state, self.weight.weight
        _check_tensor("AdaLN", "x", x, w, f"(B, T, {D})")
        _check_tensor("AdaLN", "level_emb", level_emb, w, f"(B, {D}) or (B, T, {D})")
        if x.dim() != 3 or x.size(-1) != D:
            raise ValueError(f"AdaLN: x must be (B, T, {D}), got {tuple(x.shape)}")
        B, T = x.shape[0], x.shape[1]
        if level_emb.shape[:-1] not in ((B,), (B, 1), (B, T)) or level_emb.size(-1) != D:
            raise ValueError(
                f"AdaLN: level_emb must be (B, D) or (B, T, D) = ({B}, {D}) or ({B}, {T}, {D}) "
                f"for x {tuple(x.shape)}, got {tuple(level_emb.shape)}"
            )
        if level_emb.dtype != w.dtype and not torch.is_autocast_enabled(w.device.type):
            # upstream's plain nn.Linear maps it: it must have the parameters' dtype
            raise TypeError(
                f"AdaLN: level_emb must have the module's dtype {w.dtype}, got {level_emb.dtype}"
            )
        gamma, beta = self.weight(level_emb), self.bias(level_emb)
        dtype = torch.promote_types(x.dtype, gamma.dtype)
        return adaln(x.to(dtype), gamma.to(dtype), beta.to(dtype), self.eps)


class MultiHeadAttention(nn.Module):
    """Self/cross attention with query, key (no bias), value and out projections."""

    def __init__(self, n_state: int, n_head: int, causal: bool = False):
        super().__init__()
        if n_state % n_head:
            raise ValueError(f"n_state {n_state} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)
        self.causal = causal

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        mask: Tensor | None = None,
        kv_cache: dict | None = None,
    ) -> Tensor:
        """x (B, T, D); xa (B, S, D) for cross attention; mask as `ValleNARDecoder.forward`."""
        D, w = self.query.in_features, self.query.weight
        _check_tensor("MultiHeadAttention", "x", x, w, f"(B, T, {D})")
        if x.dim() != 3 or x.size(-1) != D:
            raise ValueError(f"MultiHeadAttention: x must be (B, T, {D}), got {tuple(x.shape)}")
        if xa is not None:
            _check_tensor("MultiHeadAttention", "xa", xa, w, f"(B, S, {D})")
            if xa.dim() != 3 or xa.size(-1) != D or xa.size(0) != x.size(0):
                raise ValueError(
                    f"MultiHeadAttention: xa must be (B, S, D) = ({x.size(0)}, S, {D}), got "
                    f"{tuple(xa.shape)}"
                )
            if xa.dtype != x.dtype:
                raise TypeError(
                    f"MultiHeadAttention: xa must have x's dtype {x.dtype}, got {xa.dtype}"
                )
        if self.causal and mask is not None:
            raise ValueError("mask is not allowed when the attention is causal")
        if xa is None and x.shape[0] * x.shape[1] >= x.shape[2] and not self._kv_hooked():
            # one GEMM for q, k and v; attention reads its heads in place and hands back the
            # gradient of the packed projection whole
            D = x.shape[-1]
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.query.bias.new_zeros(D), self.value.bias])
            qkv = F.linear(x, weight.to(x.dtype), bias.to(x.dtype))
            return self.out(attention_packed(qkv, self.n_head, mask=mask, causal=self.causal))
        q = self.query(x)
        if kv_cache is None or xa is None or self.key not in kv_cache:
            # With install_kv_cache_hook's hooks, these return cached + new keys/values.
            k = self.key(x if xa is None else xa)
            v = self.value(x if xa is None else xa)
        else:
            k, v = kv_cache[self.key], kv_cache[self.value]
        return self.out(self.qkv_attention(q, k, v, mask))

    def _kv_hooked(self) -> bool:
        """True when hooks (install_kv_cache_hook's, or anyone's) watch the key or value
        projection: they must see those modules run."""
        from torch.nn.modules import module as _module

        return any(
            bool(m._forward_hooks or m._forward_pre_hooks) for m in (self.key, self.value)
        ) or bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)

    def qkv_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, D), (B, S, D), (B, S, D) -> (B, T, D)."""
        if self.causal and mask is not None:
            raise ValueError("mask is not allowed when the attention is causal")

        def heads(t: Tensor) -> Tensor:  # (the head size spelled out: T or B may be 0)
            return t.view(*t.shape[:2], self.n_head, t.shape[-1] // self.n_head).transpose(1, 2)

        out = attention(heads(q), heads(k), heads(v), mask=mask, causal=self.causal)
        return out.transpose(1, 2).flatten(start_dim=2)


class ResidualAttentionBlockAdaLM(nn.Module):
    """Pre-norm transformer block whose norms are AdaLN, conditioned on the level embedding."""

    def __init__(
        self, n_state: int, n_head: int, cross_attention: bool = False, causal: bool = False
    ):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, causal=causal)
        self.attn_ln = AdaLN(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = AdaLN(n_state) if cross_attention else None
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(Linear(n_state, n_mlp), nn.GELU(), Linear(n_mlp, n_state))
        self.mlp_ln = AdaLN(n_state)

    def forward(
        self,
        x: Tensor,
        level: Tensor,
        xa: Tensor | None = None,
        mask: Tensor | None = None,
        kv_cache: dict | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_ln(x, level), mask=mask, kv_cache=kv_cache)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x, level), xa, kv_cache=kv_cache)
        return x + self.mlp(self.mlp_ln(x, level))


class ValleNARDecoder(nn.Module):
    """VALL-E's non-autoregressive decoder: a transformer whose norms are level-conditioned.

    Args:
        n_level: number of NAR levels (codebooks after the first).
        n_ctx: maximum sequence length (learned absolute positions).
        n_state, n_head, n_layer: width, heads, depth.
        causal: causal self-attention in every block (ValleLM's NAR uses False).
        layer_class: the block class, called as layer_class(n_state, n_head, False, causal).
    """

    def __init__(
        self,
        n_level: int,
        n_ctx: int,
        n_state: int,
        n_head: int,
        n_layer: int,
        causal: bool = True,
        layer_class=ResidualAttentionBlockAdaLM,
    ):
        super().__init__()
        self.pos_emb = nn.Embedding(n_ctx, n_state)
        self.blocks = nn.ModuleList(
            [layer_class(n_state, n_head, False, causal) for _ in range(n_layer)]
        )
        self.ln = AdaLN(n_state)
        self.causal = causal
        self.level_emb = nn.Embedding(n_level, n_state)

    def forward(
        self,
        x: Tensor,
        level: Tensor,
        kv_cache: dict | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, D) float; level (B,) or (B, T) long -> (B, T, D).

        kv_cache: upstream's dict {attn.key / attn.value module: (B, T_cached, D)}, filled by
            the hooks of `install_kv_cache_hook`; its length offsets the positions.
        mask: for non-causal decoders, bool (True = may attend) or additive float, broadcastable
            to (B, H, T, S), e.g. a (B, 1, 1, S) key padding mask.
        """
        if self.causal and mask is not None:
            raise ValueError("mask is not allowed when causal")
        D, w = self.pos_emb.embedding_dim, self.pos_emb.weight
        _check_tensor("ValleNARDecoder", "x", x, w, f"(B, T, {D})")
        if x.dim() != 3 or x.size(-1) != D:
            raise ValueError(f"x must be (B, T, {D}), got {tuple(x.shape)}")
        if not isinstance(level, Tensor) or level.dtype not in (torch.int64, torch.int32):
            what = level.dtype if isinstance(level, Tensor) else type(level).__name__
            raise TypeError(
                f"ValleNARDecoder: level must be an integer tensor (B,) or (B, T), got {what}"
            )
        if level.dim() not in (1, 2) or level.shape != x.shape[: level.dim()]:
            raise ValueError(
                f"level must be (B,) or (B, T) for x {tuple(x.shape)}, got {tuple(level.shape)}"
            )
        if level.device != w.device:
            raise ValueError(
                f"ValleNARDecoder: level must be on the module's device {w.device}, got "
                f"{level.device}"
            )
        try:
            emb = self.level_emb(level)
        except IndexError as err:  # (on the CPU; checking the range elsewhere needs a sync)
            n = self.level_emb.num_embeddings
            raise IndexError(f"ValleNARDecoder: level must be in [0, n_level = {n})") from err
        offset = 0
        if kv_cache:
            cached = next(iter(kv_cache.values()))
            if cached.dim() != 3 or cached.shape[0] != x.shape[0]:
                raise ValueError(
                    f"ValleNARDecoder: kv_cache holds (B, T_cached, D) = {tuple(cached.shape)}, "
                    f"not of x's batch {x.shape[0]}"
                )
            offset = cached.shape[1]
        if offset + x.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(
                f"positions {offset}..{offset + x.shape[1] - 1} exceed n_ctx = "
                f"{self.pos_emb.num_embeddings}"
            )
        x = x + self.pos_emb.weight[offset : offset + x.shape[1]].unsqueeze(0)
        for block in self.blocks:
            x = block(x, level=emb, mask=mask, kv_cache=kv_cache)
        return self.ln(x, emb)


def install_kv_cache_hook(model: nn.Module, cache: dict | None):
    """Upstream's espnet2.speechlm.net_utils.install_kv_cache_hook, for seqkern's attention.

    Hooks every MultiHeadAttention's key and value projections: the first call stores the
    output, later ones append to it (detached); either way the attention sees cached + new.
    Returns (cache, hooks); remove the hooks with `h.remove()`.
    """
    cache = {**cache} if cache is not None else {}
    hooks = []

    def save_to_cache(module, _, output):
        cache[module] = (
            output if module not in cache else torch.cat([cache[module], output], dim=1).detach()
        )
        return cache[module]

    for layer in model.modules():
        if isinstance(layer, MultiHeadAttention):
            hooks.append(layer.key.register_forward_hook(save_to_cache))
            hooks.append(layer.value.register_forward_hook(save_to_cache))
    return cache, hooks
