"""seqkern.swap(model): accelerate an existing model in place, keeping its weights.

Every instance of a supported upstream class inside `model` (ESPnet's BEATs attention, VALL-E
NAR decoder, MEGA transducer decoder; torchaudio's Emformer and ConvEmformer) is replaced by
the seqkern module built with the same configuration and holding the *same* Parameter and
buffer objects, so optimisers, tied weights and state_dict keys are untouched.
`seqkern.unswap(model)` puts the originals back.

Upstream classes are recognised by their import path, so neither ESPnet nor torchaudio is ever
imported by seqkern.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from seqkern.backends import BACKENDS, BackendError, unavailable_reason, use_backend


@dataclass(frozen=True)
class SwapRule:
    upstream: str  # "<module>.<qualname>" of the upstream class
    build: Callable[[nn.Module], nn.Module]  # a seqkern module configured like the instance
    methods: tuple[str, ...] = ("forward",)  # run under the swap's backend setting


def _beats_mha(m: nn.Module) -> nn.Module:
    from seqkern.modules.beats import BeatsMultiheadAttention

    if any(p._forward_pre_hooks for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj)):
        raise _CannotSwap("quantization noise (q_noise > 0) is not supported")
    # BEATs attaches layer 0's bias table to every later layer, whose flag stays False: build
    # the table wherever the instance has one, and keep the flag as found.
    has_table = hasattr(m, "relative_attention_bias")
    new = BeatsMultiheadAttention(
        m.embed_dim,
        m.num_heads,
        kdim=m.kdim,
        vdim=m.vdim,
        dropout=m.dropout_module.p,
        bias=m.q_proj.bias is not None,
        add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn,
        self_attention=m.self_attention,
        encoder_decoder_attention=m.encoder_decoder_attention,
        has_relative_attention_bias=m.has_relative_attention_bias or has_table,
        num_buckets=m.num_buckets,
        max_distance=m.max_distance,
        gru_rel_pos=m.gru_rel_pos,
        rescale_init=m.k_proj.bias is None,
    )
    new.has_relative_attention_bias = m.has_relative_attention_bias
    return new


def _valle_nar(m: nn.Module) -> nn.Module:
    from seqkern.modules.valle import ValleNARDecoder

    if m.blocks and m.blocks[0].cross_attn is not None:
        raise _CannotSwap("cross-attention blocks are not supported")
    return ValleNARDecoder(
        n_level=m.level_emb.num_embeddings,
        n_ctx=m.pos_emb.num_embeddings,
        n_state=m.pos_emb.embedding_dim,
        n_head=m.blocks[0].attn.n_head if len(m.blocks) else 1,
        n_layer=len(m.blocks),
        causal=m.causal,
    )


_ACTIVATIONS = {"ReLU": "relu", "GELU": "gelu", "SiLU": "silu"}


def _activation_name(module: nn.Module) -> str:
    name = _ACTIVATIONS.get(type(module).__name__)
    if name is None or getattr(module, "approximate", "none") != "none":
        raise _CannotSwap(f"activation {module!r} is not one upstream's constructor can make")
    return name


def _emformer_common(m: nn.Module) -> dict:
    if not len(m.emformer_layers):
        raise _CannotSwap("no layers")
    first = m.emformer_layers[0]
    return dict(
        input_dim=first.input_dim,
        num_heads=first.attention.num_heads,
        num_layers=len(m.emformer_layers),
        segment_length=m.segment_length,
        dropout=first.dropout.p,
        left_context_length=m.left_context_length,
        right_context_length=m.right_context_length,
        max_memory_size=m.max_memory_size,
        weight_init_scale_strategy=None,  # the weights are the instance's anyway
        tanh_on_mem=first.attention.tanh_on_mem,
        negative_inf=first.attention.negative_inf,
    )


def _emformer(m: nn.Module) -> nn.Module:
    from seqkern.modules.emformer import Emformer

    common = _emformer_common(m)
    first = m.emformer_layers[0]
    return Emformer(
        ffn_dim=first.pos_ff[1].out_features,
        activation=_activation_name(first.pos_ff[2]),
        **common,
    )


def _conv_emformer(m: nn.Module) -> nn.Module:
    from seqkern.modules.emformer import ConvEmformer

    common = _emformer_common(m)
    first = m.emformer_layers[0]
    return ConvEmformer(
        ffn_dim=first.ffn0.module[1].out_features,
        kernel_size=first.kernel_size,
        ffn_activation=_activation_name(first.ffn0.module[2]),
        conv_activation=_activation_name(first.conv.post_conv[1]),
        **common,
    )


def _mega_activation(act: nn.Module) -> tuple[str, dict]:
    """(activation_type, activation_args) of ESPnet's get_activation that builds `act`."""
    kind = type(act).__name__
    if kind == "Swish":
        return "swish", {"swish_beta": act.beta}
    if kind == "FTSwish":
        return "ftswish", {"ftswish_threshold": act.threshold, "ftswish_mean_shift": act.mean_shift}
    if kind == "Smish":
        return "smish", {"smish_alpha": act.alpha, "smish_beta": act.beta}
    if kind == "Mish":
        if hasattr(act, "softplus"):
            raise _CannotSwap("Mish without torch's builtin (torch < 1.9) is not supported")
        return "mish", {}
    if kind == "Hardtanh":
        return "hardtanh", {"hardtanh_min_val": act.min_val, "hardtanh_max_val": act.max_val}
    if kind == "LeakyReLU":
        return "leaky_relu", {"leakyrelu_neg_slope": act.negative_slope}
    simple = {"ReLU": "relu", "SELU": "selu", "Tanh": "tanh", "Identity": "identity"}
    if kind in simple:
        return simple[kind], {}
    raise _CannotSwap(f"activation {kind} is not one ESPnet's get_activation makes")


def _mega_normalization(norm: nn.Module) -> tuple[str, dict]:
    """(normalization_type, normalization_args) of ESPnet's get_normalization for `norm`."""
    kind = type(norm).__name__
    if kind == "LayerNorm":
        return "layer_norm", {"eps": norm.eps}
    if kind == "RMSNorm":
        return "rms_norm", {"eps": norm.eps, "partial": norm.p}
    if kind == "ScaleNorm":
        return "scale_norm", {"eps": norm.eps}
    if kind == "BasicNorm":
        return "basic_norm", {}  # its eps is a learned parameter, adopted with the rest
    raise _CannotSwap(f"normalization {kind} is not one ESPnet's get_normalization makes")


def _mega_decoder(m: nn.Module) -> nn.Module:
    from seqkern.modules.mega import MEGADecoder

    if not len(m.mega_blocks):
        raise _CannotSwap("no blocks")
    mega, ffn = m.mega_blocks[0]
    activation_type, activation_args = _mega_activation(mega.activation)
    normalization_type, normalization_args = _mega_normalization(m.final_norm)
    rotary = type(mega.rel_pos_bias).__name__ == "RotaryRelativePositionBias"
    return MEGADecoder(
        vocab_size=m.vocab_size,
        block_size=m.output_size,
        linear_size=ffn.linear1.out_features,
        qk_size=m.mega_att_k_size,
        v_size=m.mega_att_v_size,
        num_heads=m.mega_num_heads,
        rel_pos_bias_type="rotary" if rotary else "simple",
        max_positions=mega.rel_pos_bias.max_positions,
        truncation_length=mega.multihead_damped_ema.truncation_length,
        normalization_type=normalization_type,
        normalization_args=normalization_args,
        activation_type=activation_type,
        activation_args=activation_args,
        chunk_size=m.chunk_size,
        num_blocks=m.num_blocks,
        dropout_rate=mega.dropout.p,
        embed_dropout_rate=m.dropout_embed.p,
        att_dropout_rate=mega.dropout_attn.p,
        ema_dropout_rate=mega.dropout_ema.p,
        ffn_dropout_rate=ffn.dropout.p,
        embed_pad=m.pad_idx,
    )


RULES: list[SwapRule] = [
    SwapRule("espnet2.asr.encoder.beats_encoder.MultiheadAttention", _beats_mha),
    SwapRule("espnet2.speechlm.module.valle.ValleNARDecoder", _valle_nar),
    SwapRule(
        "espnet2.asr_transducer.decoder.mega_decoder.MEGADecoder",
        _mega_decoder,
        ("forward", "inference", "score", "batch_score"),
    ),
    SwapRule("torchaudio.models.emformer.Emformer", _emformer, ("forward", "infer")),
    SwapRule(
        "torchaudio.prototype.models.conv_emformer.ConvEmformer",
        _conv_emformer,
        ("forward", "infer"),
    ),
]


class _CannotSwap(Exception):
    """This instance uses a feature the seqkern module does not have; it is left as it is."""


def _rule_for(module: nn.Module) -> SwapRule | None:
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return next((r for r in RULES if r.upstream == name), None)


def _adopt_tensors(new: nn.Module, old: nn.Module) -> None:
    """Make `new` hold `old`'s very Parameter and buffer objects, key for key."""
    new_keys, old_keys = set(new.state_dict()), set(old.state_dict())
    if new_keys != old_keys:
        raise RuntimeError(
            "seqkern.swap: state_dict keys differ: only upstream "
            f"{sorted(old_keys - new_keys)[:5]}, only seqkern {sorted(new_keys - old_keys)[:5]}"
        )
    device = next((t.device for t in old.state_dict().values()), None)
    if device is not None:
        new.to(device)  # non-persistent buffers of the new module
    for name, param in old.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        new.get_submodule(owner)._parameters[leaf] = param
    for name, buf in old.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        target = new.get_submodule(owner)
        if leaf in target._buffers:
            target._buffers[leaf] = buf
    # Same registration order as the original, so state_dict() lists the keys in its order.
    for name, old_sub in old.named_modules(remove_duplicate=False):
        try:
            new_sub = new.get_submodule(name)
        except AttributeError:  # parameter-free internals may differ (e.g. an activation's)
            continue
        for attr in ("_parameters", "_buffers", "_modules"):
            mine, theirs = getattr(new_sub, attr), getattr(old_sub, attr)
            order = [k for k in theirs if k in mine] + [k for k in mine if k not in theirs]
            setattr(new_sub, attr, {k: mine[k] for k in order})


class _Pinned:
    """`module.<name>` run under `use_backend(*backend)`, set as an instance attribute.

    An object, not a closure over the bound method: copy.deepcopy (AveragedModel, EMA
    teachers) and pickling (torch.save of the whole model) copy it with the module, so the copy
    runs its own forward on its own weights.
    """

    def __init__(self, module: nn.Module, name: str, backend: tuple[str, ...]):
        self.module, self.name, self.backend = module, name, backend
        self.__doc__ = getattr(type(module), name).__doc__

    def __call__(self, *args, **kwargs):
        with use_backend(*self.backend):
            return getattr(type(self.module), self.name)(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{type(self.module).__name__}.{self.name} under backend {self.backend}>"


def _swap_one(module: nn.Module, rule: SwapRule, backend: tuple[str, ...] | None) -> nn.Module:
    new = rule.build(module)
    _adopt_tensors(new, module)
    new.train(module.training)
    # Not registered as a submodule: the original must not appear in state_dict or .modules().
    object.__setattr__(new, "_seqkern_original", module)
    if backend:
        for name in rule.methods:
            object.__setattr__(new, name, _Pinned(new, name, backend))
    return new


CPU_WEIGHTS = (None, "bf16")


def swap(
    model: nn.Module,
    backend: str | tuple[str, ...] | None = None,
    cpu_weights: str | None = None,
) -> nn.Module:
    """Replace, in place, every supported upstream module inside `model` by seqkern's.

    Args:
        model: any nn.Module (an ESPnet BeatsEncoder, a transducer model with a MEGA decoder, a
            torchaudio RNN-T with an Emformer transcriber, a VALL-E model, ...).
        backend: optional backend name(s) the swapped modules run under (as `use_backend`);
            None means auto.
        cpu_weights: None (float32 weights, the default) or "bf16": the fused CPU streaming
            step of every Emformer / ConvEmformer layer reads a bfloat16 copy of its Linear
            weights (made once, remade when a weight changes), half the bytes per segment.
            Where oneDNN packs bfloat16 on this CPU (AMX) the Linears run on the matrix units
            with their inputs rounded to bfloat16 too; elsewhere x stays float32 and the
            weight is widened. Sums are float32 either way (README: the error on the
            streaming outputs). The model's own Parameters
            and state_dict stay float32 and untouched; the copies cost half their memory
            again. Float32 inference only: float64, autograd and the op path use the weights.
    Returns:
        `model` (or, if `model` itself is a supported upstream module, its replacement).
        Weights are shared, not copied: the swapped model's parameters are the same objects.
        A model with nothing to swap comes back unchanged, with a warning.

    Example:
        >>> encoder = seqkern.swap(encoder)          # BEATs attention now runs on seqkern ops
        >>> encoder = seqkern.unswap(encoder)        # and back
    """
    if cpu_weights not in CPU_WEIGHTS:
        raise ValueError(
            f"seqkern.swap: cpu_weights must be one of {CPU_WEIGHTS}, got {cpu_weights!r}"
        )
    if isinstance(backend, str):
        backend = (backend,)
    if backend is not None:
        bad = [b for b in backend if b not in BACKENDS]
        if bad:
            raise ValueError(
                f"seqkern.swap: unknown backend(s) {bad}; expected names from {BACKENDS}"
            )
        why = {b: unavailable_reason(b) for b in backend}
        if all(why.values()):  # refuse now, not at the first forward
            raise BackendError(
                "seqkern.swap: no requested backend can run in this process: "
                + "; ".join(f"{b}: {w}" for b, w in why.items())
            )
    swapped, skipped = 0, []

    def visit(parent: nn.Module) -> None:
        nonlocal swapped
        for name, child in list(parent.named_children()):
            rule = _rule_for(child)
            if rule is None:
                visit(child)
                continue
            try:
                new = _swap_one(child, rule, backend)
            except _CannotSwap as why:
                skipped.append(f"{type(child).__qualname__} at {name}: {why}")
                visit(child)
                continue
            setattr(parent, name, new)  # nn.ModuleList/Sequential children are named "0", "1"
            swapped += 1

    root_rule = _rule_for(model)
    if root_rule is not None:
        try:
            model, swapped = _swap_one(model, root_rule, backend), 1
        except _CannotSwap as why:
            skipped.append(f"{type(model).__qualname__}: {why}")
    else:
        visit(model)
    for s in skipped:
        warnings.warn(f"seqkern.swap: left as it is: {s}", stacklevel=2)
    if cpu_weights is not None:
        layers = [m for m in model.modules() if hasattr(m, "_cpu_weights")]
        for layer in layers:
            layer._cpu_weights = cpu_weights
        if not layers:
            warnings.warn(
                f"seqkern.swap: cpu_weights={cpu_weights!r} applies to Emformer / ConvEmformer "
                "layers, and this model has none",
                stacklevel=2,
            )
    if swapped == 0:
        warnings.warn(
            f"seqkern.swap: nothing to swap in {type(model).__name__}; supported: "
            + ", ".join(r.upstream for r in RULES),
            stacklevel=2,
        )
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Undo `swap`: put every original upstream module back. Returns `model` (or the original
    when `model` itself was swapped)."""
    original = getattr(model, "_seqkern_original", None)
    if original is not None:
        return original

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            orig = getattr(child, "_seqkern_original", None)
            if orig is not None:
                setattr(parent, name, orig)
            else:
                visit(child)

    visit(model)
    return model


def supported() -> list[str]:
    """Import paths of the upstream classes `swap` replaces."""
    return [r.upstream for r in RULES]


__all__ = ["swap", "unswap", "supported", "RULES", "SwapRule"]
