"""Drop-in Emformer and ConvEmformer (torchaudio 2.8.0).

Upstream: torchaudio/models/emformer.py (`Emformer`) and
torchaudio/prototype/models/conv_emformer.py (`ConvEmformer`). Same constructor signatures,
state_dict keys, `forward(input, lengths)` and streaming `infer(input, lengths, states)` with the
same per-layer state lists, and the same numerics (fp32 logits masked with a finite
`negative_inf`, memory clamped to [-10, 10] or squashed by tanh).

Layout: the public API is batch-major (B, T, D); inside, everything is time-major (T, B, D) as
upstream. The attention core runs through `seqkern.ops.emformer.emformer_segment_attention`:
with a kernel backend (triton) each stream is projected on its own and the kernel reads the
streams where they lie (no concatenation, no dense mask, no host sync in the attention); with
the reference backend the module runs upstream's arithmetic step for step (concatenations, one
projection GEMM, dense masks, `seqkern.ops.emformer.emformer_attention`).

Differences from upstream (all where upstream has no defined behaviour or would crash):
  * `infer` does not mutate the `states` lists passed in; it returns new lists.
  * `infer` casts the state's float buffers to the activation dtype, so fp16/bf16 streaming
    works (upstream crashes: its fp32 zero state promotes a half activation to fp32). For
    fp32/fp64 the states and outputs are the same as upstream's.
  * ConvEmformer with kernel_size=1 keeps an empty conv cache (upstream keeps the whole
    segment and crashes on the next `infer`).
  * No deprecation warnings; bad inputs raise ValueError naming the argument.

TorchScript: `torch.jit.script` works on Emformer and ConvEmformer (forward and infer) and on
torchaudio models holding them, as upstream. A scripted module runs the reference path, i.e.
upstream's arithmetic (no backend dispatch, no fused C++ step, no input checks beyond
upstream's): `torch.jit.is_scripting()` selects it, the eager-only code is `torch.jit.unused`.
"""

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqkern import _ext, backends
from seqkern.modules.sequence import SequenceModule
from seqkern.ops import emformer as emformer_ops
from seqkern.ops.emformer_conv import emformer_segment_conv, segment_conv_backend
from seqkern.reference.emformer import emformer_attention_ref

State = list[Tensor]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name}")
    return _ACTIVATIONS[name]()


def _weight_init_gains(strategy: str | None, num_layers: int) -> list[float | None]:
    """Per-layer xavier gain for the query and key/value projections (None = default init)."""
    if strategy is None:
        return [None] * num_layers
    if strategy == "depthwise":
        return [1.0 / math.sqrt(i + 1) for i in range(num_layers)]
    if strategy == "constant":
        return [1.0 / math.sqrt(2)] * num_layers
    raise ValueError(f"Unsupported weight_init_scale_strategy value {strategy}")


def _empty_like_rows(x: Tensor) -> Tensor:
    # Upstream uses a 1-D empty tensor for "no summary / no memory"; torch.cat accepts it next
    # to (T, B, D) tensors, and its dtype takes part in type promotion exactly as upstream.
    return torch.empty(0, dtype=x.dtype, device=x.device)


def _key_padding_mask(
    utterance: Tensor,
    right_context: Tensor,
    summary: Tensor,
    lengths: Tensor,
    mems: Tensor,
    left_context_rows: int,
) -> Tensor | None:
    """(B, Tk) bool, True = masked key; None for B = 1 (upstream then ignores lengths).

    Keys are [mems, right context, (left context), utterance]. Key k of batch element b is
    masked when k >= lengths_b + M + R' + LC, where R' = R + U - max(lengths): this masks the
    utterance tail beyond lengths_b only when max(lengths) == U (as upstream).
    """
    batch = right_context.size(1)
    if batch == 1:
        return None
    num_queries = right_context.size(0) + utterance.size(0) + summary.size(0)
    rc_rows = num_queries - torch.max(lengths).int() - summary.size(0)
    key_lengths = lengths + mems.size(0) + rc_rows + left_context_rows
    width = int(torch.max(key_lengths).item())
    positions = torch.arange(width, device=lengths.device, dtype=key_lengths.dtype)
    return positions.expand(batch, width) >= key_lengths.unsqueeze(1)


class EmformerAttention(nn.Module):
    """Emformer's attention (upstream `_EmformerAttention`): queries [rc, utterance, summary],
    keys/values [mems, rc, (left context), utterance]; returns the rc+utterance rows and the new
    memory (the summary rows, tanh'd or clamped to [-10, 10])."""

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        weight_init_gain: float | None = None,
        tanh_on_mem: bool = False,
        negative_inf: float = -1e8,
    ):
        super().__init__()
        if input_dim % num_heads != 0:
            raise ValueError(
                f"input_dim ({input_dim}) is not a multiple of num_heads ({num_heads})."
            )
        self.input_dim = input_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.tanh_on_mem = tanh_on_mem
        self.negative_inf = negative_inf
        self.scaling = (input_dim // num_heads) ** -0.5
        # The segment layout, set by the owning layer (configure_segments); the kernel path
        # derives the mask from it.
        self.segment_length: int | None = None
        self.left_context_length = 0
        self.max_memory_size = 0

        self.emb_to_key_value = nn.Linear(input_dim, 2 * input_dim, bias=True)
        self.emb_to_query = nn.Linear(input_dim, input_dim, bias=True)
        self.out_proj = nn.Linear(input_dim, input_dim, bias=True)
        if weight_init_gain:
            nn.init.xavier_uniform_(self.emb_to_key_value.weight, gain=weight_init_gain)
            nn.init.xavier_uniform_(self.emb_to_query.weight, gain=weight_init_gain)

    def configure_segments(
        self, segment_length: int, left_context_length: int, max_memory_size: int
    ) -> None:
        """The segment layout (s, LC, M) of the layer that owns this attention."""
        self.segment_length = segment_length
        self.left_context_length = left_context_length
        self.max_memory_size = max_memory_size

    def _backend(self, x: Tensor) -> str:
        """Which backend `emformer_segment_attention` runs for activations like x (a scripted
        module runs the reference)."""
        if torch.jit.is_scripting():
            return "reference"
        return self._eager_backend(x)

    @torch.jit.unused
    def _eager_backend(self, x: Tensor) -> str:
        return emformer_ops.segment_attention_backend(
            x, self.num_heads, float(self.dropout), self.training
        )

    def _need_segments(self) -> int:
        if self.segment_length is None:
            raise ValueError(
                "EmformerAttention: call configure_segments(segment_length, left_context_length,"
                " max_memory_size) or pass an attention_mask"
            )
        return self.segment_length

    def _project_streams(self, utterance: Tensor, right_context: Tensor, summary: Tensor):
        """Per-stream projections, no concatenation of activations: rc and utterance through
        one GEMM each with [Wq; Wkv] (q, k, v are column slices), the summary through Wq."""
        d = self.input_dim
        weight = torch.cat([self.emb_to_query.weight, self.emb_to_key_value.weight])
        bias = torch.cat([self.emb_to_query.bias, self.emb_to_key_value.bias])
        q_rc, k_rc, v_rc = F.linear(right_context, weight, bias).split(d, dim=2)
        q_utt, k_utt, v_utt = F.linear(utterance, weight, bias).split(d, dim=2)
        q_sum = self.emb_to_query(summary) if summary.dim() == 3 and summary.size(0) else None
        return q_rc, q_utt, q_sum, k_rc, k_utt, v_rc, v_utt

    def _project_memory(self, mems: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if mems.dim() != 3 or mems.size(0) == 0:
            return None, None
        k_mem, v_mem = self.emb_to_key_value(mems).chunk(2, dim=2)
        return k_mem, v_mem

    def _finish(self, attention: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
        projected = self.out_proj(attention)
        output = projected[:num_out]
        new_mems = projected[num_out:]
        new_mems = torch.tanh(new_mems) if self.tanh_on_mem else torch.clamp(new_mems, -10, 10)
        return output, new_mems

    @staticmethod
    def _key_lengths(lengths: Tensor, extra) -> Tensor | None:
        """Device (B,) int32 key lengths: lengths + extra - max(lengths) (upstream's
        `_gen_padding_mask` rule, see `_key_padding_mask`); None for B = 1. No host sync."""
        if lengths.size(0) == 1:
            return None
        key_lengths = lengths + (extra - torch.max(lengths).to(torch.int64))
        if key_lengths.is_floating_point():  # float lengths: key j is hidden when j >= klen
            key_lengths = torch.ceil(key_lengths)
        return key_lengths.to(torch.int32)

    @torch.jit.unused
    def _segment_forward(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mems: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Training path on the segment kernel: (rc+utterance rows, memory (all n rows))."""
        s = self._need_segments()
        utt_rows = utterance.size(0)
        n = math.ceil(utt_rows / s)
        rc = right_context.size(0) // n
        q_rc, q_utt, q_sum, k_rc, k_utt, v_rc, v_utt = self._project_streams(
            utterance, right_context, summary
        )
        k_mem, v_mem = (None, None)
        if self.max_memory_size > 0:
            k_mem, v_mem = self._project_memory(mems)
            if k_mem is None:  # one segment: no memory rows (the kernel takes 0 rows)
                k_mem, v_mem = k_utt[:0], v_utt[:0]
        mem_rows = 0 if k_mem is None else k_mem.size(0)
        key_lengths = self._key_lengths(lengths, mem_rows + n * rc + utt_rows)
        attention = emformer_ops.emformer_segment_attention(
            q_rc, q_utt, q_sum, k_mem, k_rc, None, k_utt, v_mem, v_rc, None, v_utt,
            num_heads=self.num_heads,
            segment_length=s,
            right_context=rc,
            left_context=self.left_context_length,
            max_memory=self.max_memory_size,
            key_lengths=key_lengths,
            negative_inf=self.negative_inf,
            dropout_p=float(self.dropout),
            training=self.training,
        )  # fmt: skip
        return self._finish(attention, n * rc + utt_rows)

    def _attend(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mems: Tensor,
        attention_mask: Tensor,
        left_context_key: Tensor | None = None,
        left_context_val: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (rc+utterance output rows, new memory rows, keys, values)."""
        num_queries = right_context.size(0) + utterance.size(0) + summary.size(0)
        query = self.emb_to_query(torch.cat([right_context, utterance, summary]))
        key, value = self.emb_to_key_value(torch.cat([mems, right_context, utterance])).chunk(
            2, dim=2
        )
        lc_rows = 0
        if left_context_key is not None and left_context_val is not None:
            # Upstream inserts the cached left context after M + R' key rows, with
            # R' = R + U - max(lengths) (= R when the chunk is full).
            rc_rows = num_queries - int(torch.max(lengths).int()) - summary.size(0)
            split = mems.size(0) + rc_rows
            key = torch.cat([key[:split], left_context_key, key[split:]])
            value = torch.cat([value[:split], left_context_val, value[split:]])
            lc_rows = left_context_key.size(0)

        padding_mask = _key_padding_mask(utterance, right_context, summary, lengths, mems, lc_rows)
        # Under autocast an fp32 state promotes the keys (kept so for the state); upstream's
        # bmm then casts them to the autocast dtype, as done here
        cast = _autocast_to(query)
        attention = _attention_core(
            query,
            key.to(query.dtype) if cast else key,
            value.to(query.dtype) if cast else value,
            attention_mask,
            padding_mask,
            self.num_heads,
            negative_inf=self.negative_inf,
            dropout_p=float(self.dropout),
            training=self.training,
        )
        projected = self.out_proj(attention)

        output = projected[: num_queries - summary.size(0)]
        new_mems = projected[num_queries - summary.size(0) :]
        new_mems = torch.tanh(new_mems) if self.tanh_on_mem else torch.clamp(new_mems, -10, 10)
        return output, new_mems, key, value

    def forward(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mems: Tensor,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Training path. Inputs (T, B, D) time-major; returns ((R+U, B, D) rows in the order
        [rc, utterance], (S-1, B, D) memory: the last summary's output is dropped).

        attention_mask None: the segment mask of `configure_segments`' layout (the kernel
        derives it; the reference backend builds it densely). A given mask runs the dense op.
        """
        if attention_mask is None:
            if self._backend(utterance) != "reference":
                output, new_mems = self._segment_forward(
                    utterance, lengths, right_context, summary, mems
                )
                return output, new_mems[:-1]
            s = self._need_segments()
            n = math.ceil(utterance.size(0) / s)
            attention_mask = emformer_ops.segment_attention_mask(
                utterance.size(0),
                s,
                right_context.size(0) // n,
                self.left_context_length,
                self.max_memory_size,
                summary.size(0) > 0,
                utterance.device,
            )
        output, new_mems, _, _ = self._attend(
            utterance, lengths, right_context, summary, mems, attention_mask
        )
        return output, new_mems[:-1]

    def infer(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mems: Tensor,
        left_context_key: Tensor,
        left_context_val: Tensor,
        past_length: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One streaming step. Every query sees every key, except that the summary row does
        not see the memory.

        past_length None: mems / left_context_* are the valid rows; returns (rc+utterance
        rows, memory (S, B, D), keys and values after the first M + R rows, i.e. [left
        context, utterance]).
        past_length (the state's (1, B) int32 past length): mems / left_context_* are the whole
        right-aligned state buffers (valid rows: the last min(M_max, ceil(past / s)) and
        min(LC, past)); the keys and values returned are then the new left-context buffers
        (LC, B, D): the last LC rows of [left_context_key, keys after the first M + R rows],
        which is what the state keeps. The kernel path reads the buffers whole and computes
        both without a host sync.
        """
        if past_length is not None:
            if self._backend(utterance) != "reference":
                return self._segment_infer(
                    utterance,
                    lengths,
                    right_context,
                    summary,
                    mems,
                    left_context_key,
                    left_context_val,
                    past_length,
                )
            # Upstream reads the past length of batch element 0 (a host sync) for the batch.
            past = int(past_length.reshape(-1)[0].item())
            lc_buf = left_context_key.size(0)
            lc_rows = min(lc_buf, past)
            mem_rows = min(mems.size(0), math.ceil(past / self._need_segments()))
            output, new_mems, key, value = self._infer_rows(
                utterance,
                lengths,
                right_context,
                summary,
                mems[mems.size(0) - mem_rows :],
                left_context_key[lc_buf - lc_rows :],
                left_context_val[lc_buf - lc_rows :],
            )
            keys = torch.cat([left_context_key, key])
            values = torch.cat([left_context_val, value])
            return (
                output,
                new_mems,
                keys[keys.size(0) - lc_buf :],
                values[values.size(0) - lc_buf :],
            )
        return self._infer_rows(
            utterance, lengths, right_context, summary, mems, left_context_key, left_context_val
        )

    def _infer_rows(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mems: Tensor,
        left_context_key: Tensor,
        left_context_val: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`infer` without past_length: mems / left_context_* are the valid rows."""
        num_queries = right_context.size(0) + utterance.size(0) + summary.size(0)
        num_keys = (
            right_context.size(0) + utterance.size(0) + mems.size(0) + left_context_key.size(0)
        )
        mask = torch.zeros(num_queries, num_keys, dtype=torch.bool, device=utterance.device)
        mask[-1, : mems.size(0)] = True
        output, new_mems, key, value = self._attend(
            utterance,
            lengths,
            right_context,
            summary,
            mems,
            mask,
            left_context_key=left_context_key,
            left_context_val=left_context_val,
        )
        start = mems.size(0) + right_context.size(0)
        return output, new_mems, key[start:], value[start:]

    @torch.jit.unused
    def _segment_infer(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        summary: Tensor,
        mem_buf: Tensor,
        lc_key: Tensor,
        lc_val: Tensor,
        past_length: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`infer` with past_length on the segment kernel (whole buffers, no host sync)."""
        s = self._need_segments()
        utt_rows, rc = utterance.size(0), right_context.size(0)
        lc_buf = lc_key.size(0)
        q_rc, q_utt, q_sum, k_rc, k_utt, v_rc, v_utt = self._project_streams(
            utterance, right_context, summary
        )
        k_mem, v_mem = self._project_memory(mem_buf)
        mem_valid, lc_valid = emformer_ops.valid_state_rows(
            past_length, 0 if k_mem is None else k_mem.size(0), lc_buf, s
        )
        key_lengths = self._key_lengths(lengths, mem_valid + rc + utt_rows + lc_valid)
        cast = _autocast_to(q_utt)  # an fp32 lc state meets autocast keys (see _attend)
        lc_k, lc_v = (lc_key.to(q_utt.dtype), lc_val.to(q_utt.dtype)) if cast else (lc_key, lc_val)
        attention = emformer_ops.emformer_segment_attention(
            q_rc, q_utt, q_sum, k_mem, k_rc, lc_k, k_utt, v_mem, v_rc, lc_v, v_utt,
            num_heads=self.num_heads,
            segment_length=s,
            right_context=rc,
            left_context=self.left_context_length,
            max_memory=self.max_memory_size,
            key_lengths=key_lengths,
            past_length=past_length,
            negative_inf=self.negative_inf,
            dropout_p=float(self.dropout),
            training=self.training,
        )  # fmt: skip
        output, new_mems = self._finish(attention, rc + utt_rows)
        if lc_buf == 0:
            return output, new_mems, lc_key, lc_val
        # The new lc buffer: the last LC rows of S = [lc buffer, keys after M + R rows], where
        # upstream's keys after M + R rows are [utt[:a], valid lc rows, utt[a:]] with
        # a = U - max(lengths) (upstream inserts the lc after M + R + a keys; a = 0 for a full
        # chunk). Row p of S is row idx(p) of C = [lc buffer, utterance keys].
        a = (utt_rows - torch.max(lengths).to(torch.int64)).clamp(0, utt_rows)
        p = torch.arange(lc_buf, device=lc_key.device) + (utt_rows + lc_valid)
        idx = torch.where(
            p < lc_buf + a,
            p,
            torch.where(p < lc_buf + a + lc_valid, p - a - lc_valid, p - lc_valid),
        )
        next_k = torch.cat([lc_key, k_utt]).index_select(0, idx)
        next_v = torch.cat([lc_val, v_utt]).index_select(0, idx)
        return output, new_mems, next_k, next_v


class _SegmentMeans:
    """For modules with upstream's `memory_op` (an AvgPool1d over segments)."""

    def _segment_means(self, x: Tensor) -> Tensor:
        """(T, B, D) -> (ceil(T / s), B, D): the mean of each segment (a partial last one too)."""
        return self.memory_op(x.permute(1, 2, 0)).permute(2, 0, 1)


class _StreamingLayerState(_SegmentMeans):
    """State handling shared by both layer types (which set input_dim, left_context_length,
    max_memory_size and segment_length).

    Per layer state: [memory (M_max, B, D), lc_key (LC, B, D), lc_val (LC, B, D),
    past_length (1, B) int32] (+ conv_cache (B, D, k-1) for ConvEmformer). Buffers are
    right-aligned; the initial tensors are fp32 zeros whatever the input dtype (as upstream).
    """

    def _base_state(self, batch_size: int, device: torch.device | None) -> State:
        return [
            torch.zeros(self.max_memory_size, batch_size, self.input_dim, device=device),
            torch.zeros(self.left_context_length, batch_size, self.input_dim, device=device),
            torch.zeros(self.left_context_length, batch_size, self.input_dim, device=device),
            torch.zeros(1, batch_size, dtype=torch.int32, device=device),
        ]

    @staticmethod
    def _in_dtype(state: State, dtype: torch.dtype) -> State:
        """The state's float buffers in the activation dtype.

        Upstream keeps the fp32 zero init and relies on torch.cat's type promotion, which gives
        the same values for fp32/fp64 activations (zeros and fp32 values cast exactly) but
        crashes for fp16/bf16 (an fp32 row reaches a half Linear); casting first fixes that.
        """
        return [t if not t.is_floating_point() else t.to(dtype) for t in state]

    def _next_state(
        self, state: State, next_k: Tensor, next_v: Tensor, num_frames: int, mems: Tensor
    ) -> State:
        """The updated first four entries (a new list; `state` is left untouched).

        next_k / next_v: the keys/values to append to the lc buffers (`EmformerAttention.infer`
        with past_length returns the new (LC, B, D) buffers themselves, which this keeps)."""
        keys = torch.cat([state[1], next_k])
        values = torch.cat([state[2], next_v])
        memory = torch.cat([state[0], mems])
        if self.max_memory_size > 0:  # upstream slices [-0:], i.e. keeps all, when M_max = 0
            memory = memory[-self.max_memory_size :]
        return [
            memory,
            keys[keys.size(0) - self.left_context_length :],
            values[values.size(0) - self.left_context_length :],
            state[3] + num_frames,
        ]

    # -- the fused C++ step (csrc/emformer/conv_emformer_step_cpu.cpp) -----------------------
    # Each layer type names its op (`_fused_op`) and, as dotted submodule paths, the modules
    # whose weight and bias the op takes in its order (`_fused_modules`), the LayerNorms whose
    # eps it takes (`_fused_norms`) and the activation modules it takes codes for
    # (`_fused_acts`: one code per group, every module of a group the same activation).

    _fused_op = ""
    # "bf16": the fused step reads bfloat16 copies of the Linear weights (seqkern.swap's
    # cpu_weights); a plain str attribute: not in the state_dict, never read by TorchScript
    _cpu_weights: str | None = None
    _fused_modules: tuple[str, ...] = ()
    _fused_norms: tuple[str, ...] = ()
    _fused_acts: tuple[tuple[str, ...], ...] = ()

    @torch.jit.unused
    def _fused_args(self) -> tuple[list[Tensor], list[float], list[int]] | None:
        """(weights, eps, activation codes) for the fused op, or None where a module is not
        what it takes (an activation it lacks, a parametrised or missing weight).

        Submodules and Parameters are read from the `_modules` / `_parameters` dicts: the
        attribute route (nn.Module.__getattr__) costs about a microsecond a name, and this
        runs for every layer on every segment."""
        try:
            mods = [_submodule(self, path) for path in self._fused_modules]
            weights = [m._parameters[name] for m in mods for name in ("weight", "bias")]
            codes = []
            for group in self._fused_acts:
                found = {_activation_code(_submodule(self, path)) for path in group}
                if len(found) != 1 or None in found:
                    return None
                codes.append(found.pop())
            eps = [float(_submodule(self, path).eps) for path in self._fused_norms]
        except (KeyError, AttributeError):
            return None
        if any(w is None for w in weights):
            return None
        return weights, eps, codes

    @torch.jit.unused
    def _fused_plan(
        self, x: Tensor, state: State | None
    ) -> tuple[list[Tensor], list[float], list[int]] | None:
        """The fused C++ step's arguments (weights, eps, activation codes) where it applies:
        float32/float64 CPU inference (no autograd, no active dropout, no tracing) with
        ReLU/GELU/SiLU activations. None where the ops must run."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return None
        order = backends.allowed_backends()
        if order is not None and "cpu" not in order:
            return None
        if backends.unavailable_reason("cpu") or not hasattr(_ext.C, self._fused_op):
            return None
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        if torch.is_autocast_enabled("cpu"):  # the step has no mixed precision: the ops do
            return None
        if self.training and self.dropout.p > 0:
            return None
        args = self._fused_args()  # every parameter of the layer
        if args is None:
            return None
        weights = args[0]
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            return None
        if any(w.dtype != x.dtype or w.device.type != "cpu" for w in weights):
            return None
        if state is not None and any(t.device.type != "cpu" for t in state):
            return None
        if self._cpu_weights == "bf16" and x.dtype == torch.float32:
            weights = [_bf16_copy(w) if w.dim() == 2 else w for w in weights]
            return weights, args[1], args[2]
        return args

    @torch.jit.unused
    def _fused_infer(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        state: State | None,
        mems: Tensor,
        plan: tuple[list[Tensor], list[float], list[int]],
    ) -> tuple[Tensor, Tensor, State, Tensor]:
        """`infer` as one C++ call; `plan` is what `_fused_plan` returned."""
        weights, eps, codes = plan
        if state is None:
            state = self.init_state(utterance.size(1), device=utterance.device)
        state = self._in_dtype(state, utterance.dtype)
        utt, rc, next_m, *new_state = getattr(_ext.C, self._fused_op)(
            utterance,
            right_context,
            mems,
            *state,
            lengths,
            weights,
            eps,
            self.attention.num_heads,
            self.segment_length,
            *codes,
            self.attention.tanh_on_mem,
            float(self.attention.negative_inf),
        )
        return utt, rc, new_state, next_m


class EmformerLayer(_StreamingLayerState, nn.Module):
    """One Emformer layer (upstream `_EmformerLayer`): pre-LN attention with memory, then a
    pre-LN feed-forward block, both residual, then an output LayerNorm."""

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        segment_length: int,
        dropout: float = 0.0,
        activation: str = "relu",
        left_context_length: int = 0,
        max_memory_size: int = 0,
        weight_init_gain: float | None = None,
        tanh_on_mem: bool = False,
        negative_inf: float = -1e8,
    ):
        super().__init__()
        # Submodules are created in upstream's order, so a seeded construction gives the same
        # initial weights as upstream.
        self.attention = EmformerAttention(
            input_dim,
            num_heads,
            dropout=dropout,
            weight_init_gain=weight_init_gain,
            tanh_on_mem=tanh_on_mem,
            negative_inf=negative_inf,
        )
        self.attention.configure_segments(segment_length, left_context_length, max_memory_size)
        self.dropout = nn.Dropout(dropout)
        self.memory_op = nn.AvgPool1d(segment_length, stride=segment_length, ceil_mode=True)
        self.pos_ff = nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, ffn_dim),
            _activation(activation),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, input_dim),
            nn.Dropout(dropout),
        )
        self.layer_norm_input = nn.LayerNorm(input_dim)
        self.layer_norm_output = nn.LayerNorm(input_dim)

        self.left_context_length = left_context_length
        self.segment_length = segment_length
        self.max_memory_size = max_memory_size
        self.input_dim = input_dim
        self.use_mem = max_memory_size > 0

    def init_state(self, batch_size: int, device: torch.device | None = None) -> State:
        return self._base_state(batch_size, device)

    def _pre_norm(self, utterance: Tensor, right_context: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.layer_norm_input(torch.cat([right_context, utterance]))
        rc = right_context.size(0)
        return normed[rc:], normed[:rc]

    def _post_attention(
        self, attn_out: Tensor, utterance: Tensor, right_context: Tensor
    ) -> tuple[Tensor, Tensor]:
        x = self.dropout(attn_out) + torch.cat([right_context, utterance])
        x = self.pos_ff(x) + x
        x = self.layer_norm_output(x)
        rc = right_context.size(0)
        return x[rc:], x[:rc]

    def forward(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        mems: Tensor,
        attention_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(U, B, D), (B,), (R_tot, B, D), (n-1, B, D), mask -> (utterance, rc, memory).

        attention_mask None: the segment mask of the layer's layout (see EmformerAttention)."""
        ln_utt, ln_rc = self._pre_norm(utterance, right_context)
        # Emformer summarises the layer-normed utterance (ConvEmformer: the raw input).
        summary = self._segment_means(ln_utt) if self.use_mem else _empty_like_rows(ln_utt)
        attn_out, new_mems = self.attention(ln_utt, lengths, ln_rc, summary, mems, attention_mask)
        out_utt, out_rc = self._post_attention(attn_out, utterance, right_context)
        return out_utt, out_rc, new_mems

    # the order of csrc/emformer/conv_emformer_step_cpu.cpp's emformer_step_cpu
    _fused_op = "emformer_step_cpu"
    _fused_modules = (
        "layer_norm_input", "attention.emb_to_query", "attention.emb_to_key_value",
        "attention.out_proj", "pos_ff.0", "pos_ff.1", "pos_ff.4", "layer_norm_output",
    )  # fmt: skip
    _fused_norms = ("layer_norm_input", "pos_ff.0", "layer_norm_output")
    _fused_acts = (("pos_ff.2",),)

    def infer(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        state: State | None,
        mems: Tensor,
    ) -> tuple[Tensor, Tensor, State, Tensor]:
        """One segment: returns (utterance, rc, new layer state, memory for the next layer).

        In eager, float32/float64 CPU inference runs as one fused C++ call (`_fused_plan`)."""
        if not torch.jit.is_scripting():
            plan = self._fused_plan(utterance, state)
            if plan is not None:
                return self._fused_infer(utterance, lengths, right_context, state, mems, plan)
        ln_utt, ln_rc = self._pre_norm(utterance, right_context)
        if state is None:
            state = self.init_state(ln_utt.size(1), device=ln_utt.device)
        state = self._in_dtype(state, ln_utt.dtype)
        summary = self._segment_means(ln_utt)[:1] if self.use_mem else _empty_like_rows(ln_utt)
        attn_out, next_m, next_k, next_v = self.attention.infer(
            ln_utt, lengths, ln_rc, summary, state[0], state[1], state[2], past_length=state[3]
        )
        new_state = self._next_state(state, next_k, next_v, utterance.size(0), mems)
        out_utt, out_rc = self._post_attention(attn_out, utterance, right_context)
        return out_utt, out_rc, new_state, next_m


class ResidualContainer(nn.Module):
    """`module(x) * output_weight + x` (upstream `_ResidualContainer`, the half-step FFN)."""

    def __init__(self, module: nn.Module, output_weight: float):
        super().__init__()
        self.module = module
        self.output_weight = output_weight

    def forward(self, input: Tensor) -> Tensor:
        return self.module(input) * self.output_weight + input


class ConvolutionModule(nn.Module):
    """ConvEmformer's convolution block (upstream `_ConvolutionModule`).

    LN -> Linear(D, 2D) -> GLU, then a depthwise conv of width k, causal over the utterance
    (prefixed by a (B, D, k-1) cache, zeros when None). Each right-context block i is
    convolved with the k-1 pre-conv frames that end where segment i ends. Then
    LN -> activation -> Linear -> Dropout, plus the block's input.
    """

    def __init__(
        self,
        input_dim: int,
        segment_length: int,
        right_context_length: int,
        kernel_size: int,
        activation: str = "silu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.input_dim = input_dim
        self.segment_length = segment_length
        self.right_context_length = right_context_length
        self.state_size = kernel_size - 1
        self.pre_conv = nn.Sequential(
            nn.LayerNorm(input_dim), nn.Linear(input_dim, 2 * input_dim, bias=True), nn.GLU()
        )
        self.conv = nn.Conv1d(
            input_dim, input_dim, kernel_size, stride=1, padding=0, groups=input_dim
        )
        self.post_conv = nn.Sequential(
            nn.LayerNorm(input_dim),
            _activation(activation),
            nn.Linear(input_dim, input_dim, bias=True),
            nn.Dropout(p=dropout),
        )

    def _conv_right_context(self, padded_utt: Tensor, z_rc: Tensor) -> Tensor:
        """padded_utt (B, D, k-1+U) and z_rc (n*R, B, D) -> conv outputs (n*R, B, D)."""
        rc_len = self.right_context_length
        total, batch, dim = z_rc.shape
        if total % rc_len != 0:
            raise ValueError("Tensor length should be divisible by its right context length")
        blocks: list[Tensor] = []
        for i in range(total // rc_len):
            end = min(self.state_size + (i + 1) * self.segment_length, padded_utt.size(2))
            prefix = padded_utt[:, :, end - self.state_size : end]  # (B, D, k-1)
            rc = z_rc[i * rc_len : (i + 1) * rc_len].permute(1, 2, 0)  # (B, D, R)
            blocks.append(torch.cat([prefix, rc], dim=2))
        stacked = torch.stack(blocks)  # (n, B, D, k-1+R)
        out = self.conv(stacked.reshape(-1, dim, stacked.size(3)))  # (n*B, D, R)
        out = out.reshape(-1, batch, dim, rc_len).permute(0, 3, 1, 2)  # (n, R, B, D)
        return out.reshape(-1, batch, dim)

    def _kernel_conv(self, z: Tensor, utterance_length: int) -> bool:
        """Whether the depthwise conv runs as the `emformer_segment_conv` op on a kernel (it
        reads z and the cache where they lie) rather than as the cat/stack/Conv1d code below,
        which is the op's reference (always, in a scripted module). Raises BackendError where
        the allowed backends exclude the reference and no kernel takes z."""
        if torch.jit.is_scripting():
            return False
        return self._eager_kernel_conv(z, utterance_length)

    @torch.jit.unused
    def _eager_kernel_conv(self, z: Tensor, utterance_length: int) -> bool:
        if utterance_length == 0:
            return False
        if self.conv.weight.dtype != z.dtype and not _autocast_to(z):
            return False  # nn.Conv1d would refuse the mix too: the reference path says so
        return segment_conv_backend(z) != "reference"

    @torch.jit.unused
    def _kernel_forward(
        self, x: Tensor, z: Tensor, rc: int, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` past the pre-conv block z of x = [rc, utterance] with the conv as the
        `emformer_segment_conv` op."""
        # under autocast the weights and the cache meet z in its (autocast) dtype, as
        # nn.Conv1d's autocast casts would have them
        weight, bias = self.conv.weight.to(z.dtype), self.conv.bias.to(z.dtype)
        y = emformer_segment_conv(
            z,
            weight,
            bias,
            None if state is None else state.to(z.dtype),
            utterance_length=x.size(0) - rc,
            segment_length=self.segment_length,
            right_context=self.right_context_length,
        )
        out = self.post_conv(y) + x
        return out[rc:], out[:rc], self._next_cache(x, z[rc:], state)

    def _next_cache(self, x: Tensor, z_utt: Tensor, state: Tensor | None) -> Tensor:
        """The last k-1 frames of [cache ; utterance pre-conv rows] as (B, D, k-1), in the
        dtype the reference's concatenation gives (a zero cache has x's dtype)."""
        k1, (U, B, D) = self.state_size, z_utt.shape
        dtype = torch.promote_types(x.dtype if state is None else state.dtype, z_utt.dtype)
        tail = z_utt[max(U - k1, 0) :].permute(1, 2, 0).to(dtype)
        if U >= k1:
            return tail
        if state is None:
            state = z_utt.new_zeros(B, D, k1, dtype=dtype)
        return torch.cat([state.to(dtype), tail], dim=2)[:, :, -k1:]

    def forward(
        self, utterance: Tensor, right_context: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(U, B, D), (n*R, B, D), cache (B, D, k-1) or None -> (utterance, rc, new cache)."""
        x = torch.cat([right_context, utterance])
        z = self.pre_conv(x)
        rc = right_context.size(0)
        if self._kernel_conv(z, utterance.size(0)):
            return self._kernel_forward(x, z, rc, state)
        z_rc, z_utt = z[:rc], z[rc:].permute(1, 2, 0)  # z_utt: (B, D, U)
        if state is None:
            state = torch.zeros(
                x.size(1), x.size(2), self.state_size, device=x.device, dtype=x.dtype
            )
        padded = torch.cat([state, z_utt], dim=2)
        conv_utt = self.conv(padded).permute(2, 0, 1)
        if self.right_context_length > 0:
            y = torch.cat([self._conv_right_context(padded, z_rc), conv_utt])
        else:
            y = conv_utt
        out = self.post_conv(y) + x
        new_state = padded[:, :, padded.size(2) - self.state_size :]
        return out[rc:], out[:rc], new_state


class ConvEmformerLayer(_StreamingLayerState, nn.Module):
    """One ConvEmformer layer (upstream `_ConvEmformerLayer`): half-step FFN, attention with
    memory, convolution block, half-step FFN, output LayerNorm."""

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        segment_length: int,
        kernel_size: int,
        dropout: float = 0.0,
        ffn_activation: str = "relu",
        left_context_length: int = 0,
        right_context_length: int = 0,
        max_memory_size: int = 0,
        weight_init_gain: float | None = None,
        tanh_on_mem: bool = False,
        negative_inf: float = -1e8,
        conv_activation: str = "silu",
    ):
        super().__init__()
        self.attention = EmformerAttention(
            input_dim,
            num_heads,
            dropout=dropout,
            weight_init_gain=weight_init_gain,
            tanh_on_mem=tanh_on_mem,
            negative_inf=negative_inf,
        )
        self.attention.configure_segments(segment_length, left_context_length, max_memory_size)
        self.dropout = nn.Dropout(dropout)
        self.memory_op = nn.AvgPool1d(segment_length, stride=segment_length, ceil_mode=True)
        act = _activation(ffn_activation)
        self.ffn0 = ResidualContainer(self._ffn(input_dim, ffn_dim, act, dropout), 0.5)
        self.ffn1 = ResidualContainer(self._ffn(input_dim, ffn_dim, act, dropout), 0.5)
        self.layer_norm_input = nn.LayerNorm(input_dim)
        self.layer_norm_output = nn.LayerNorm(input_dim)
        self.conv = ConvolutionModule(
            input_dim,
            segment_length,
            right_context_length,
            kernel_size,
            activation=conv_activation,
            dropout=dropout,
        )
        self.left_context_length = left_context_length
        self.segment_length = segment_length
        self.max_memory_size = max_memory_size
        self.input_dim = input_dim
        self.kernel_size = kernel_size
        self.use_mem = max_memory_size > 0

    @staticmethod
    def _ffn(input_dim: int, ffn_dim: int, act: nn.Module, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, ffn_dim),
            act,
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, input_dim),
            nn.Dropout(dropout),
        )

    def init_state(self, batch_size: int, device: torch.device | None = None) -> State:
        cache = torch.zeros(batch_size, self.input_dim, self.kernel_size - 1, device=device)
        return self._base_state(batch_size, device) + [cache]

    def _pre_attention(
        self, utterance: Tensor, right_context: Tensor, summary: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (ffn0 output over [rc, utt, summary], and its LN'd rc, utt, summary parts)."""
        f0 = self.ffn0(torch.cat([right_context, utterance, summary]))
        normed = self.layer_norm_input(f0)
        rc, utt = right_context.size(0), utterance.size(0)
        return f0, normed[:rc], normed[rc : rc + utt], normed[rc + utt :]

    def _post_attention(
        self, attn_out: Tensor, f0: Tensor, cache: Tensor | None, rc: int, utt: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.dropout(attn_out) + f0[: rc + utt]
        conv_utt, conv_rc, cache = self.conv(x[rc:], x[:rc], cache)
        x = self.ffn1(torch.cat([conv_rc, conv_utt]))
        x = self.layer_norm_output(x)
        return x[rc:], x[:rc], cache

    def _summary(self, utterance: Tensor) -> Tensor:
        # ConvEmformer summarises the raw layer input (Emformer: the layer-normed one).
        if self.use_mem:
            return self._segment_means(utterance)
        return _empty_like_rows(utterance)

    def forward(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        mems: Tensor,
        attention_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(U, B, D), (B,), (R_tot, B, D), (n-1, B, D), mask -> (utterance, rc, memory).

        attention_mask None: the segment mask of the layer's layout (see EmformerAttention)."""
        f0, ln_rc, ln_utt, ln_summary = self._pre_attention(
            utterance, right_context, self._summary(utterance)
        )
        attn_out, new_mems = self.attention(
            ln_utt, lengths, ln_rc, ln_summary, mems, attention_mask
        )
        out_utt, out_rc, _ = self._post_attention(
            attn_out, f0, None, right_context.size(0), utterance.size(0)
        )
        return out_utt, out_rc, new_mems

    # the order of csrc/emformer/conv_emformer_step_cpu.cpp's conv_emformer_step_cpu
    _fused_op = "conv_emformer_step_cpu"
    _fused_modules = (
        "ffn0.module.0", "ffn0.module.1", "ffn0.module.4", "layer_norm_input",
        "attention.emb_to_query", "attention.emb_to_key_value", "attention.out_proj",
        "conv.pre_conv.0", "conv.pre_conv.1", "conv.conv", "conv.post_conv.0",
        "conv.post_conv.2", "ffn1.module.0", "ffn1.module.1", "ffn1.module.4",
        "layer_norm_output",
    )  # fmt: skip
    _fused_norms = (
        "ffn0.module.0", "layer_norm_input", "conv.pre_conv.0", "conv.post_conv.0",
        "ffn1.module.0", "layer_norm_output",
    )  # fmt: skip
    _fused_acts = (("ffn0.module.2", "ffn1.module.2"), ("conv.post_conv.1",))

    def infer(
        self,
        utterance: Tensor,
        lengths: Tensor,
        right_context: Tensor,
        state: State | None,
        mems: Tensor,
    ) -> tuple[Tensor, Tensor, State, Tensor]:
        """One segment: returns (utterance, rc, new layer state, memory for the next layer).

        In eager, float32/float64 CPU inference runs as one fused C++ call (`_fused_plan`)."""
        if not torch.jit.is_scripting():
            plan = self._fused_plan(utterance, state)
            if plan is not None:
                return self._fused_infer(utterance, lengths, right_context, state, mems, plan)
        summary = self._summary(utterance)[:1]
        f0, ln_rc, ln_utt, ln_summary = self._pre_attention(utterance, right_context, summary)
        if state is None:
            state = self.init_state(ln_utt.size(1), device=ln_utt.device)
        state = self._in_dtype(state, ln_utt.dtype)
        attn_out, next_m, next_k, next_v = self.attention.infer(
            ln_utt,
            lengths,
            ln_rc,
            ln_summary,
            state[0],
            state[1],
            state[2],
            past_length=state[3],
        )
        out_utt, out_rc, cache = self._post_attention(
            attn_out, f0, state[4], right_context.size(0), utterance.size(0)
        )
        new_state = self._next_state(state, next_k, next_v, utterance.size(0), mems) + [cache]
        return out_utt, out_rc, new_state, next_m


_ACTIVATION_CODES = {nn.ReLU: 0, nn.GELU: 1, nn.SiLU: 2}


def _autocast_to(x: Tensor) -> bool:
    """Whether autocast is on for x's device and x is in its lower-precision dtype (False in
    a scripted module: TorchScript has its own autocast, which casts the ops' inputs)."""
    if torch.jit.is_scripting():
        return False
    return _eager_autocast_to(x)


@torch.jit.unused
def _eager_autocast_to(x: Tensor) -> bool:
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and x.dtype == torch.get_autocast_dtype(kind)


def _attention_core(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    key_padding_mask: Tensor | None,
    num_heads: int,
    negative_inf: float,
    dropout_p: float,
    training: bool,
) -> Tensor:
    """`emformer_ops.emformer_attention` (its backend dispatch) in eager; its reference when
    scripted."""
    if torch.jit.is_scripting():
        return emformer_attention_ref(
            query, key, value, attention_mask, key_padding_mask, num_heads,
            negative_inf, dropout_p, training,
        )  # fmt: skip
    return _dispatched_attention(
        query, key, value, attention_mask, key_padding_mask, num_heads,
        negative_inf, dropout_p, training,
    )  # fmt: skip


@torch.jit.unused
def _dispatched_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    key_padding_mask: Tensor | None,
    num_heads: int,
    negative_inf: float,
    dropout_p: float,
    training: bool,
) -> Tensor:
    return emformer_ops.emformer_attention(
        query, key, value, attention_mask, key_padding_mask, num_heads,
        negative_inf=negative_inf, dropout_p=dropout_p, training=training,
    )  # fmt: skip


# id(Parameter) -> (a weak reference to it, its (_version, data_ptr), the bfloat16 copy):
# remade when the weight is written in place (load_state_dict, an optimizer step) or given new
# data, dropped with the Parameter. (Not a WeakKeyDictionary: it compares keys with ==, which
# on tensors is elementwise.)
_BF16_COPIES: dict[int, tuple[weakref.ref, tuple[int, int], Tensor]] = {}


def _bf16_copy(w: Tensor) -> Tensor:
    """The weight `w` (n, k) rounded to bfloat16 (to nearest even), cached per Parameter: packed
    for the CPU's matrix units (AMX / AVX512-BF16, a 3-D tensor) where the extension has that
    GEMM, else (n, k) for the AVX-512 skinny GEMM, which widens it back to float32."""
    packed = bool(_ext.C.bf16_packed_available())
    key = (w._version, w.data_ptr(), packed)
    hit = _BF16_COPIES.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        if packed:
            copy = _ext.C.pack_bf16_linear_weight(w.detach())
        else:
            copy = w.detach().to(torch.bfloat16).contiguous()
    ident = id(w)

    def drop(_ref, ident=ident):
        entry = _BF16_COPIES.get(ident)
        if entry is not None and entry[0] is _ref:
            del _BF16_COPIES[ident]

    _BF16_COPIES[ident] = (weakref.ref(w, drop), key, copy)
    return copy


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """root's submodule at a dotted path, read from the `_modules` dicts (KeyError if none)."""
    for name in path.split("."):
        root = root._modules[name]
    return root


def _activation_code(module: nn.Module) -> int | None:
    """The fused step's code for an activation module (exact GELU only), else None."""
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return None
    return _ACTIVATION_CODES.get(type(module))


class _EmformerBase(_SegmentMeans, SequenceModule):
    """Shared driver (upstream `_EmformerImpl`): right-context blocks, the segment attention
    mask, the initial memory, and the layer loops for `forward` and `infer`."""

    _state_len = 4

    def __init__(
        self,
        emformer_layers: nn.ModuleList,
        input_dim: int,
        segment_length: int,
        left_context_length: int = 0,
        right_context_length: int = 0,
        max_memory_size: int = 0,
    ):
        super().__init__()
        self.use_mem = max_memory_size > 0
        self.memory_op = nn.AvgPool1d(segment_length, stride=segment_length, ceil_mode=True)
        self.emformer_layers = emformer_layers
        self.left_context_length = left_context_length
        self.right_context_length = right_context_length
        self.segment_length = segment_length
        self.max_memory_size = max_memory_size
        self.input_dim = input_dim
        self.d_model = input_dim
        self.d_output = input_dim

    # -- full sequence --------------------------------------------------------------------

    def _right_context(self, x: Tensor) -> Tensor:
        """x (U + R, B, D) -> (n*R, B, D): block i < n-1 is the R frames after segment i; the
        last block is the final R frames of x."""
        s, r = self.segment_length, self.right_context_length
        num_segments = math.ceil((x.size(0) - r) / s)
        blocks = [x[(i + 1) * s : (i + 1) * s + r] for i in range(num_segments - 1)]
        blocks.append(x[x.size(0) - r :])
        return torch.cat(blocks)

    # Upstream's helper names and signatures: torchaudio's own models call them
    # (EmformerHuBERT.extract_features runs the layers itself from these two).

    def _gen_right_context(self, input: Tensor) -> Tensor:
        """input (U + R, B, D), time-major -> the right-context blocks (n*R, B, D)."""
        return self._right_context(input)

    def _gen_attention_mask(self, input: Tensor) -> Tensor:
        """input: the utterance (U, B, D), time-major -> the dense (Q, K) bool mask."""
        return self._attention_mask(input.size(0), input.device)

    def _attention_mask(self, num_frames: int, device: torch.device) -> Tensor:
        """(Q, K) bool, True = masked, for U = num_frames, n = ceil(U / s) segments.

        Rows: [rc blocks (n*R), utterance (U), summaries (n, with memory)].
        Columns: [memory (n-1, with memory), rc blocks (n*R), utterance (U)].
        Segment i's rc and utterance rows see memory [max(i-M, 0), i), rc block i and the
        utterance frames [max(i*s - LC, 0), min((i+1)*s, U)); its summary row sees the same
        except the memory.
        """
        return emformer_ops.segment_attention_mask(
            num_frames,
            self.segment_length,
            self.right_context_length,
            self.left_context_length,
            self.max_memory_size,
            self.use_mem,
            device,
        )

    @torch.jit.unused
    def _check_input(self, input: Tensor, lengths: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() != 3:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input must be a (B, T, D) tensor, got {shape}")
        if not input.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got {input.dtype}")
        if input.size(2) != self.input_dim:
            raise ValueError(
                f"input must have feature dimension input_dim = {self.input_dim}, "
                f"got {input.size(2)}"
            )
        if not isinstance(lengths, Tensor) or lengths.dim() != 1:
            shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths)
            raise ValueError(f"lengths must be a 1-D tensor of shape (B,), got {shape}")
        if lengths.size(0) != input.size(0):
            raise ValueError(
                f"lengths must have one entry per batch element (B = {input.size(0)}), "
                f"got {lengths.size(0)}"
            )
        if lengths.device != input.device:
            raise ValueError(
                f"lengths must be on input's device {input.device}, got {lengths.device}"
            )

    def forward(self, input: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Training and non-streaming inference.

        Args:
            input: (B, U + right_context_length, D): the utterance right-padded with R frames of
                right context.
            lengths: (B,) valid utterance frames per batch element (ignored when B = 1).
        Returns:
            (output (B, U, D), lengths): the lengths are returned unchanged.
        """
        if not torch.jit.is_scripting():  # scripted: upstream's checks only
            self._check_input(input, lengths)
        if input.size(1) <= self.right_context_length:
            raise ValueError(
                f"input must have more than right_context_length = {self.right_context_length} "
                f"frames (at least one utterance frame), got {input.size(1)}"
            )
        x = input.permute(1, 0, 2)
        right_context = self._right_context(x)
        utterance = x[: x.size(0) - self.right_context_length]
        # the kernel path derives the mask; the reference path needs it dense
        mask: Tensor | None = None
        if self._reference_attention(utterance):
            mask = self._attention_mask(utterance.size(0), input.device)
        if self.use_mem:
            mems = self._segment_means(utterance)[:-1]
        else:
            mems = _empty_like_rows(x)
        output = utterance
        for layer in self.emformer_layers:
            output, right_context, mems = layer(output, lengths, right_context, mems, mask)
        return output.permute(1, 0, 2), lengths

    def _reference_attention(self, utterance: Tensor) -> bool:
        """Whether the layers' attention runs the reference (always when scripted)."""
        if torch.jit.is_scripting():
            return True
        return self._eager_reference_attention(utterance)

    @torch.jit.unused
    def _eager_reference_attention(self, utterance: Tensor) -> bool:
        if not len(self.emformer_layers):
            return True
        return self.emformer_layers[0].attention._backend(utterance) == "reference"

    # -- streaming ------------------------------------------------------------------------

    @torch.jit.unused
    def _check_states(self, states: list[State], batch: int) -> None:
        if not isinstance(states, (list, tuple)) or len(states) != len(self.emformer_layers):
            raise ValueError(
                f"states must be a list with one state per layer ({len(self.emformer_layers)}), "
                f"got {states!r:.80}"
            )
        for i, state in enumerate(states):
            if not isinstance(state, (list, tuple)) or len(state) != self._state_len:
                raise ValueError(
                    f"states[{i}] must be a list of {self._state_len} tensors, got {state!r:.80}"
                )
            if state[3].shape != (1, batch):
                raise ValueError(
                    f"states[{i}][3] (past length) must have shape (1, {batch}), "
                    f"got {tuple(state[3].shape)}"
                )

    @torch.jit.export
    def infer(
        self, input: Tensor, lengths: Tensor, states: list[State] | None = None
    ) -> tuple[Tensor, Tensor, list[State]]:
        """Streaming inference on one segment.

        Args:
            input: (B, segment_length + right_context_length, D): one segment followed by its
                R frames of right context (exactly that many frames).
            lengths: (B,) valid frames in `input`, right context included.
            states: the states returned by the previous call, or None to start.
        Returns:
            (output (B, segment_length, D), output lengths clamp(lengths - R, min=0), states).
            states[l] = [memory (M_max, B, D), lc_key (LC, B, D), lc_val (LC, B, D),
            past_length (1, B) int32] (+ conv_cache (B, D, k-1) for ConvEmformer).
        """
        expected = self.segment_length + self.right_context_length
        if isinstance(input, Tensor) and input.dim() >= 2 and input.size(1) != expected:
            raise ValueError(
                "Per configured segment_length and right_context_length"
                f", expected size of {expected} for dimension 1 of input"
                f", but got {input.size(1)}."
            )
        if not torch.jit.is_scripting():  # scripted: upstream's checks only
            self._check_input(input, lengths)
            if states is not None:
                self._check_states(states, input.size(0))
        x = input.permute(1, 0, 2)
        utterance = x[: self.segment_length]
        right_context = x[self.segment_length :]
        output_lengths = torch.clamp(lengths - self.right_context_length, min=0)
        if self.use_mem:
            mems = self._segment_means(utterance)
        else:
            mems = _empty_like_rows(x)
        output = utterance
        new_states: list[State] = []
        for i, layer in enumerate(self.emformer_layers):
            layer_state = None if states is None else list(states[i])
            output, right_context, state, mems = layer.infer(
                output,
                output_lengths,
                right_context,
                layer_state,
                mems,
            )
            new_states.append(state)
        return output.permute(1, 0, 2), output_lengths, new_states

    # -- SequenceModule interface -----------------------------------------------------------

    def default_state(self, *batch_shape: int, device: torch.device | None = None) -> list[State]:
        """The initial `infer` state for batch size B: per layer, the fp32 zero buffers that
        upstream creates itself when `states` is None (infer(x, l, default_state(B)) equals
        infer(x, l, None))."""
        if len(batch_shape) != 1:
            raise ValueError(f"default_state takes one batch size, got {batch_shape}")
        return [layer.init_state(batch_shape[0], device=device) for layer in self.emformer_layers]

    def step(
        self, x: Tensor, state: list[State] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, list[State]]:
        """One streaming step = one `infer` call on one segment window.

        Here a step is a segment, not a frame: x is (B, segment_length + right_context_length,
        D) (the segment and its look-ahead) and the output is (B, segment_length, D). Windows
        advance by segment_length. `lengths` defaults to full windows.
        """
        if lengths is None:
            lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
        output, _, state = self.infer(x, lengths, state)
        return output, state


class Emformer(_EmformerBase):
    """Emformer (Shi et al. 2021), a drop-in for `torchaudio.models.Emformer` (2.8.0).

    Args: as upstream: input_dim, num_heads, ffn_dim, num_layers, segment_length,
    dropout=0.0, activation="relu" ("relu" | "gelu" | "silu"), left_context_length=0,
    right_context_length=0, max_memory_size=0, weight_init_scale_strategy="depthwise"
    ("depthwise" | "constant" | None), tanh_on_mem=False, negative_inf=-1e8.

    Example:
        >>> model = Emformer(24, 3, 48, 2, segment_length=4, right_context_length=1)
        >>> out, lengths = model(torch.rand(2, 13, 24), torch.tensor([12, 9]))  # (2, 12, 24)
        >>> out, lengths, states = model.infer(torch.rand(2, 5, 24), torch.tensor([5, 5]))
    """

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        segment_length: int,
        dropout: float = 0.0,
        activation: str = "relu",
        left_context_length: int = 0,
        right_context_length: int = 0,
        max_memory_size: int = 0,
        weight_init_scale_strategy: str | None = "depthwise",
        tanh_on_mem: bool = False,
        negative_inf: float = -1e8,
    ):
        gains = _weight_init_gains(weight_init_scale_strategy, num_layers)
        layers = nn.ModuleList(
            EmformerLayer(
                input_dim,
                num_heads,
                ffn_dim,
                segment_length,
                dropout=dropout,
                activation=activation,
                left_context_length=left_context_length,
                max_memory_size=max_memory_size,
                weight_init_gain=gains[i],
                tanh_on_mem=tanh_on_mem,
                negative_inf=negative_inf,
            )
            for i in range(num_layers)
        )
        super().__init__(
            layers,
            input_dim,
            segment_length,
            left_context_length=left_context_length,
            right_context_length=right_context_length,
            max_memory_size=max_memory_size,
        )


class ConvEmformer(_EmformerBase):
    """Convolution-augmented Emformer, a drop-in for torchaudio 2.8.0's prototype
    `torchaudio.prototype.models.ConvEmformer` (without its deprecation warnings).

    Args: as upstream: input_dim, num_heads, ffn_dim, num_layers, segment_length, kernel_size,
    dropout=0.0, ffn_activation="relu", left_context_length=0, right_context_length=0,
    max_memory_size=0, weight_init_scale_strategy="depthwise", tanh_on_mem=False,
    negative_inf=-1e8, conv_activation="silu".

    Example:
        >>> model = ConvEmformer(24, 3, 48, 2, segment_length=4, kernel_size=3,
        ...                      right_context_length=2)
        >>> out, lengths = model(torch.rand(2, 14, 24), torch.tensor([12, 9]))  # (2, 12, 24)
    """

    _state_len = 5

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        segment_length: int,
        kernel_size: int,
        dropout: float = 0.0,
        ffn_activation: str = "relu",
        left_context_length: int = 0,
        right_context_length: int = 0,
        max_memory_size: int = 0,
        weight_init_scale_strategy: str | None = "depthwise",
        tanh_on_mem: bool = False,
        negative_inf: float = -1e8,
        conv_activation: str = "silu",
    ):
        gains = _weight_init_gains(weight_init_scale_strategy, num_layers)
        layers = nn.ModuleList(
            ConvEmformerLayer(
                input_dim,
                num_heads,
                ffn_dim,
                segment_length,
                kernel_size,
                dropout=dropout,
                ffn_activation=ffn_activation,
                left_context_length=left_context_length,
                right_context_length=right_context_length,
                max_memory_size=max_memory_size,
                weight_init_gain=gains[i],
                tanh_on_mem=tanh_on_mem,
                negative_inf=negative_inf,
                conv_activation=conv_activation,
            )
            for i in range(num_layers)
        )
        super().__init__(
            layers,
            input_dim,
            segment_length,
            left_context_length=left_context_length,
            right_context_length=right_context_length,
            max_memory_size=max_memory_size,
        )
