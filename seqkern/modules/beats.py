"""BEATs' fairseq-style MultiheadAttention (espnet2.asr.encoder.beats_encoder.MultiheadAttention).

Same constructor, state_dict keys and forward contract as upstream (ESPnet 202506), with the
relative-position-bias attention running through `seqkern.ops.relbias_attention`. Where
upstream crashes, seqkern implements fairseq's evident intent (README "Differences from
upstream"): `incremental_state` works (upstream lacks fairseq's state helpers), the position
bias follows the cache offset in incremental decoding, `add_bias_kv` and `add_zero_attn` add
their extra key column (also next to a relative bias), and a query whose keys are all padding
gives 0 instead of NaN.
"""

from __future__ import annotations

import math
import uuid

import torch
from torch import Tensor, nn

from seqkern.ops.relbias import RelativePositionBias, relbias_attention
from seqkern.reference.relbias import ALPHA, expand_rel_bias, relative_position_bucket

IncrementalState = dict[str, dict[str, Tensor | None]]


class BeatsMultiheadAttention(nn.Module):
    """Multi-head attention with BEATs' relative position bias and gated relative bias.

    Inputs are time-major: query (T, B, E), key (S, B, kdim), value (S, B, vdim).
    forward returns (attn (T, B, E), attn_weights, position_bias): attn_weights is the
    head-averaged softmax (B, T, S), or (H, B, T, S) with need_head_weights, or None;
    position_bias is the ungated (B * H, T, S) bias, to pass to the next layer.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        kdim=None,
        vdim=None,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        self_attention=False,
        encoder_decoder_attention=False,
        q_noise=0.0,
        qn_block_size=8,
        has_relative_attention_bias=False,
        num_buckets=32,
        max_distance=128,
        gru_rel_pos=False,
        rescale_init=False,
    ):
        super().__init__()
        if q_noise > 0:
            raise NotImplementedError(
                "BeatsMultiheadAttention: q_noise > 0 (quantization-noise training) is not "
                "supported; use q_noise=0.0"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.qkv_same_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self_attention and not self.qkv_same_dim:
            raise ValueError("self-attention requires kdim == vdim == embed_dim")
        self.num_heads = num_heads
        self.dropout_module = nn.Dropout(dropout)
        self.has_relative_attention_bias = has_relative_attention_bias
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.head_dim = embed_dim // num_heads
        self.q_head_dim = self.k_head_dim = self.head_dim
        self.scaling = self.head_dim**-0.5
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention

        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=not rescale_init)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.q_head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self._incremental_state_id = str(uuid.uuid4())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = 1 / math.sqrt(2) if self.qkv_same_dim else 1.0
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        if self.has_relative_attention_bias:
            nn.init.xavier_normal_(self.relative_attention_bias.weight)

    # -- relative position bias --------------------------------------------------------------

    def compute_rel_bias(self, query_length: int, key_length: int, query_offset: int = 0) -> Tensor:
        """Ungated bias per relative distance, (H, T + S - 1): entry j - i + T - 1 is the bias of
        query i (at position offset + i) and key j. O(H * T): no T x S tensor."""
        device = self.relative_attention_bias.weight.device
        distance = torch.arange(query_length + key_length - 1, device=device)
        distance = distance - (query_length - 1) - query_offset  # key pos - query pos
        bucket = relative_position_bucket(distance, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).transpose(0, 1)

    def compute_bias(self, query_length: int, key_length: int, query_offset: int = 0) -> Tensor:
        """Ungated bias (H, T, S) for queries at positions offset..offset+T-1, keys 0..S-1."""
        rel = self.compute_rel_bias(query_length, key_length, query_offset)
        return expand_rel_bias(rel, query_length, key_length)

    # -- fairseq incremental state --------------------------------------------------------------

    def _state_key(self, key: str) -> str:
        return f"{self._incremental_state_id}.{key}"

    def get_incremental_state(self, incremental_state: IncrementalState | None, key: str):
        if incremental_state is None:
            return None
        return incremental_state.get(self._state_key(key))

    def set_incremental_state(self, incremental_state: IncrementalState | None, key: str, value):
        if incremental_state is not None:
            incremental_state[self._state_key(key)] = value
        return incremental_state

    def _get_input_buffer(self, incremental_state):
        return self.get_incremental_state(incremental_state, "attn_state") or {}

    def _set_input_buffer(self, incremental_state, buffer):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    @staticmethod
    def _append_prev_key_padding_mask(
        key_padding_mask: Tensor | None,
        prev_key_padding_mask: Tensor | None,
        batch_size: int,
        src_len: int,
        static_kv: bool,
    ) -> Tensor | None:
        """fairseq's merge of the cached and the new key padding masks (float 0/1)."""
        if prev_key_padding_mask is not None and static_kv:
            return prev_key_padding_mask
        if prev_key_padding_mask is not None and key_padding_mask is not None:
            return torch.cat([prev_key_padding_mask.float(), key_padding_mask.float()], dim=1)
        if prev_key_padding_mask is not None:
            missing = src_len - prev_key_padding_mask.size(1)
            if missing > 0:
                filler = prev_key_padding_mask.new_zeros(batch_size, missing).float()
                return torch.cat([prev_key_padding_mask.float(), filler], dim=1)
            return prev_key_padding_mask.float()
        if key_padding_mask is not None:
            missing = src_len - key_padding_mask.size(1)
            if missing > 0:  # fairseq pads on the left here
                filler = key_padding_mask.new_zeros(batch_size, missing).float()
                return torch.cat([filler, key_padding_mask.float()], dim=1)
            return key_padding_mask.float()
        return prev_key_padding_mask

    # -- forward --------------------------------------------------------------------------------

    def _check_inputs(self, query, key, value, position_bias) -> None:
        """Shapes, dtypes and devices of forward's tensors, each named when wrong (attribute
        reads only: no device sync). Masks are checked by relbias_attention."""
        name = "BeatsMultiheadAttention"
        if not isinstance(query, Tensor):
            raise TypeError(f"{name}: query must be a torch.Tensor, got {type(query).__name__}")
        if query.dim() != 3 or query.size(-1) != self.embed_dim:
            raise ValueError(f"query must be (T, B, {self.embed_dim}), got {tuple(query.shape)}")
        bsz = query.size(1)
        args = [("query", query, self.q_proj.weight, self.embed_dim)]
        if key is not None:
            if not isinstance(key, Tensor):
                raise TypeError(f"{name}: key must be a torch.Tensor, got {type(key).__name__}")
            if key.dim() != 3 or key.size(1) != bsz:
                raise ValueError(f"key must be (S, {bsz}, kdim), got {tuple(key.shape)}")
            if not self.self_attention:  # self-attention projects the query (as upstream)
                args.append(("key", key, self.k_proj.weight, self.kdim))
        if value is not None and not self.self_attention and not self.encoder_decoder_attention:
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: value must be a torch.Tensor, got {type(value).__name__}")
            src_len = key.size(0) if key is not None else value.size(0)
            if value.dim() != 3 or value.shape[:2] != (src_len, bsz):
                raise ValueError(
                    f"{name}: value must be (S, B, vdim) = ({src_len}, {bsz}, {self.vdim}) like "
                    f"key, got {tuple(value.shape)}"
                )
            args.append(("value", value, self.v_proj.weight, self.vdim))
        for arg, t, weight, dim in args:
            if t.size(-1) != dim:
                what = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[arg]
                raise ValueError(
                    f"{name}: {arg} must have {what} = {dim} features, got {tuple(t.shape)}"
                )
            if t.device != weight.device:
                raise ValueError(
                    f"{name}: {arg} must be on the module's device {weight.device}, got {t.device}"
                )
            if not t.is_floating_point() or (
                t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type)
            ):
                raise TypeError(
                    f"{name}: {arg} must have the module's dtype {weight.dtype}, got {t.dtype}"
                )
        if isinstance(position_bias, Tensor):
            per_row = bsz * self.num_heads * query.size(0)
            if position_bias.numel() % max(per_row, 1) or position_bias.dim() < 2:
                raise ValueError(
                    f"{name}: position_bias must be (B * H, T, S) = ({bsz * self.num_heads}, "
                    f"{query.size(0)}, S), got {tuple(position_bias.shape)}"
                )

    def _heads(self, x: Tensor, bsz: int) -> Tensor:
        """(L, B, E) -> (B, H, L, hd)."""
        return x.reshape(x.size(0), bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: IncrementalState | None = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if need_head_weights:
            need_weights = True
        self._check_inputs(query, key, value, position_bias)
        tgt_len, bsz, _ = query.shape

        saved_state = None
        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if "prev_key" in saved_state and static_kv:
                if not (self.encoder_decoder_attention and not self.self_attention):
                    raise ValueError("static_kv needs encoder_decoder_attention")
                key = value = None

        if saved_state is not None and "prev_key" in saved_state:
            cached = saved_state["prev_key"].size(0)
            if cached != bsz:
                raise ValueError(
                    f"BeatsMultiheadAttention: incremental_state holds keys of batch {cached}, "
                    f"query has batch {bsz}"
                )
        if self.self_attention:
            q_in, k, v = self.q_proj(query), self.k_proj(query), self.v_proj(query)
        elif self.encoder_decoder_attention:
            q_in = self.q_proj(query)
            k = v = None
            if key is not None:
                k, v = self.k_proj(key), self.v_proj(key)
        else:
            if key is None or value is None:
                raise ValueError("key and value are required unless self/enc-dec attention")
            q_in, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)

        q = self._heads(q_in, bsz)  # raw projection; the scale is applied in the op
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # upstream adds it in place, in the logits' dtype
        if k is not None:
            k, v = self._heads(k, bsz), self._heads(v, bsz)
        elif saved_state is None or "prev_key" not in saved_state:
            raise ValueError(
                "BeatsMultiheadAttention: key is required for encoder-decoder attention "
                "(incremental_state holds no cached keys)"
            )
        if self.bias_k is not None:
            k = torch.cat([k, self._heads(self.bias_k.expand(1, bsz, -1), bsz)], dim=2)
            v = torch.cat([v, self._heads(self.bias_v.expand(1, bsz, -1), bsz)], dim=2)
            attn_mask = _pad_cols(attn_mask, 1)
            key_padding_mask = _pad_cols(key_padding_mask, 1)

        prev_len = 0
        if saved_state is not None:
            if "prev_key" in saved_state:
                prev_key = saved_state["prev_key"]
                prev_len = prev_key.size(2)
                k = prev_key if static_kv else torch.cat([prev_key, k], dim=2)
            if "prev_value" in saved_state:
                prev_value = saved_state["prev_value"]
                v = prev_value if static_kv else torch.cat([prev_value, v], dim=2)
            key_padding_mask = self._append_prev_key_padding_mask(
                key_padding_mask,
                saved_state.get("prev_key_padding_mask"),
                bsz,
                k.size(2),
                static_kv,
            )
            saved_state["prev_key"], saved_state["prev_value"] = k, v
            saved_state["prev_key_padding_mask"] = key_padding_mask
            self._set_input_buffer(incremental_state, saved_state)
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None

        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, self.num_heads, 1, self.head_dim)], dim=2)
            attn_mask = _pad_cols(attn_mask, 1)
            key_padding_mask = _pad_cols(key_padding_mask, 1)
        src_len = k.size(2)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must be (B, S) = {(bsz, src_len)}, got "
                f"{tuple(key_padding_mask.shape)}"
            )

        # The position bias as upstream returns it: ungated, (B * H, T, S_keys). The attention
        # itself gets the compact per-distance form when no extra key column is involved.
        # A RelativePositionBias handle (from this or an earlier seqkern layer) keeps it compact.
        rel_bias = None
        if self.has_relative_attention_bias and position_bias is None:
            n_keys = src_len - int(self.bias_k is not None) - int(self.add_zero_attn)
            # new queries sit after the prev_len cached keys (self-attention decoding)
            offset = 0 if static_kv else prev_len
            rel = self.compute_rel_bias(tgt_len, n_keys, offset)  # (H, T + S - 1)
            position_bias = RelativePositionBias(rel, bsz, tgt_len, n_keys)
        if isinstance(position_bias, RelativePositionBias):
            if position_bias.shape[-1] == src_len and position_bias.batch == bsz:
                rel_bias = position_bias.rel_bias

        if before_softmax:
            if isinstance(position_bias, RelativePositionBias):
                position_bias = position_bias.materialize()
            logits = torch.matmul(q * (self.scaling / ALPHA), k.transpose(-1, -2))
            logits = (logits - logits.amax(dim=-1, keepdim=True)) * ALPHA
            if attn_mask is not None:
                logits = logits + attn_mask
            if key_padding_mask is not None:
                pad = key_padding_mask.to(torch.bool)[:, None, None, :]
                logits = logits.masked_fill(pad, float("-inf"))
            flat = bsz * self.num_heads
            return (
                logits.reshape(flat, tgt_len, src_len),
                v.reshape(flat, src_len, self.head_dim),
                position_bias,
            )

        bias = gate = None
        if position_bias is not None:
            if rel_bias is None:  # materialises a RelativePositionBias if it does not fit
                bias = position_bias.reshape(bsz, self.num_heads, tgt_len, -1)
                if bias.size(-1) < src_len:  # the extra bias_kv / zero-attn keys get no bias
                    bias = torch.nn.functional.pad(bias, (0, src_len - bias.size(-1)))
            if self.gru_rel_pos:
                groups = self.grep_linear(q).view(bsz, self.num_heads, tgt_len, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(groups).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # (B, H, T, 1)

        out, probs = relbias_attention(
            q,
            k,
            v,
            self.scaling,
            bias=bias,
            gate=gate,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0,
            need_weights=need_weights,
            rel_bias=rel_bias,
        )
        attn = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))
        weights = None
        if need_weights:
            weights = probs.transpose(1, 0)  # (H, B, T, S)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return attn, weights, position_bias


def _pad_cols(mask: Tensor | None, n: int) -> Tensor | None:
    """Append n zero columns (a visible extra key) to a (rows, S) mask."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_zeros(mask.size(0), n)], dim=1)
