"""Bad input to every public op raises a clear TypeError or ValueError naming the argument.

One table: for each op a valid baseline call (small float32 CPU tensors) and mutations of it,
each making one argument bad in one way (not a tensor, wrong rank, a dim that does not fit
another argument, an integer/bool or a second float dtype, the "meta" device, a mask of the
wrong dtype or shape, a scalar of the wrong type or out of its documented range). Each case
expects the op's own check to raise, with a message naming the argument: not an error from
inside torch, not a crash, not a silently computed result. `test_baseline_runs` keeps the table
from passing vacuously. Nothing else is compared.
"""

import pytest
import torch

from seqkern.ops.adaln import adaln
from seqkern.ops.attention import attention, attention_packed
from seqkern.ops.chunk import chunk_attention
from seqkern.ops.ema import ema, ema_step
from seqkern.ops.emformer import emformer_attention, emformer_segment_attention
from seqkern.ops.emformer_conv import emformer_segment_conv
from seqkern.ops.linear import linear_rows
from seqkern.ops.relbias import relbias_attention

TYPE = (TypeError, ValueError)  # a Python value of the wrong type: either is a clear error
B, D = 2, 8


def r(*shape):
    return torch.randn(*shape)


def no(*shape):
    return torch.zeros(*shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Baselines: keyword arguments of one valid call


def _attention():
    q, k, v = r(B, 2, 5, 8), r(B, 2, 6, 8), r(B, 2, 6, 8)
    return dict(q=q, k=k, v=v, mask=~no(B, 1, 1, 6), causal=False, scale=None)


def _attention_packed():
    return dict(qkv=r(B, 5, 3 * 16), n_head=2, mask=~no(B, 1, 1, 5), causal=True, scale=None)


def _relbias():
    qkv = dict(q=r(B, 2, 5, 8), k=r(B, 2, 6, 8), v=r(B, 2, 6, 8), scale=8**-0.5)
    masks = dict(attn_mask=torch.zeros(5, 6), key_padding_mask=no(B, 6), dropout_p=0.0)
    return qkv | masks | dict(bias=r(1, 2, 5, 6), gate=r(B, 2, 5, 1))


def _chunk():
    qkv = dict(q=r(B, 8, 4), k=r(B, 8, 4), v=r(B, 8, 6), bias=r(4, 4), key_padding_mask=no(B, 8))
    return qkv | dict(chunk_size=4, causal=True, scaling=None, dropout_p=0.0)


def _params(d=4, h=2):
    return dict(
        damping=r(d, h, 1), decay=r(d, h, 1), expansion=r(d, h, 1), projection=r(d, h), omega=r(d)
    )


def _ema():
    return dict(x=r(B, 7, 4), **_params(), pad_mask=no(B, 7), truncation=None)


def _ema_step():
    return dict(x=r(B, 4), state=r(B, 4, 2), **_params())


def _adaln():
    return dict(x=r(B, 5, D), gamma=r(B, D), beta=r(B, D), eps=1e-5)


def _linear():
    return dict(x=r(3, D), weight=r(5, D), bias=r(5))


def _emformer():
    qkv = dict(query=r(5, B, D), key=r(6, B, D), value=r(6, B, D), num_heads=2)
    return qkv | dict(attention_mask=no(5, 6), key_padding_mask=no(B, 6), dropout_p=0.0)


def _streams(rows: dict) -> dict:
    return {name: None if n is None else r(n, B, D) for name, n in rows.items()}


def _segment_train():  # U = 4, s = 2: n = 2 segments, R = 1, M = 1: one memory row
    rows = dict(q_rc=2, q_utt=4, q_sum=2, k_mem=1, k_rc=2, k_lc=None, k_utt=4)
    rows.update({"v" + name[1:]: n for name, n in rows.items() if name[0] == "k"})
    sizes = dict(segment_length=2, right_context=1, left_context=1, max_memory=1)
    return _streams(rows) | sizes | dict(num_heads=2, key_lengths=torch.tensor([7, 5]))


def _segment_infer():  # one segment of U = s = 2, state: 2 memory rows and 1 lc row
    rows = dict(q_rc=1, q_utt=2, q_sum=1, k_mem=2, k_rc=1, k_lc=1, k_utt=2)
    rows.update({"v" + name[1:]: n for name, n in rows.items() if name[0] == "k"})
    sizes = dict(segment_length=2, right_context=1, left_context=1, max_memory=2)
    return _streams(rows) | sizes | dict(num_heads=2, past_length=torch.tensor([3]))


def _segment_conv():  # n = 2 rc blocks of R = 1, U = 4, k = 3
    tensors = dict(z=r(2 + 4, B, 3), weight=r(3, 1, 3), bias=r(3), cache=r(B, 3, 2))
    return tensors | dict(utterance_length=4, segment_length=2, right_context=1)


OPS = {
    "attention": (attention, _attention),
    "attention_packed": (attention_packed, _attention_packed),
    "relbias_attention": (relbias_attention, _relbias),
    "chunk_attention": (chunk_attention, _chunk),
    "ema": (ema, _ema),
    "ema_step": (ema_step, _ema_step),
    "adaln": (adaln, _adaln),
    "linear_rows": (linear_rows, _linear),
    "emformer_attention": (emformer_attention, _emformer),
    "emformer_segment_attention": (emformer_segment_attention, _segment_train),
    "emformer_segment_attention_infer": (emformer_segment_attention, _segment_infer),
    "emformer_segment_conv": (emformer_segment_conv, _segment_conv),
}


# ---------------------------------------------------------------------------------------------
# Mutations: functions of the baseline's arguments


def put(**changes):
    """Replace arguments; a callable is called with the baseline arguments for the value."""

    def mutate(a):
        new = {name: (v(a) if callable(v) else v) for name, v in changes.items()}
        return {**a, **new}

    return mutate


def via(f, *preset):
    """A mutation maker: (name, *extra) -> argument `name` becomes f(argument, *preset, *extra)."""
    return lambda name, *extra: put(**{name: lambda a: f(a[name], *preset, *extra)})


listed, as_, meta = via(torch.Tensor.tolist), via(torch.Tensor.to), via(torch.Tensor.to, "meta")


def rand(**shapes):
    return put(**{name: lambda a, s=s: r(*s) for name, s in shapes.items()})


def rows(n, *names):
    return put(**{name: lambda a, m=name: a[m][:n] for name in names})


I64, F64 = torch.int64, torch.float64
CASES = []


def add(op, id, mutate, exc, match):
    CASES.append(pytest.param(op, mutate, exc, match, id=f"{op}-{id}"))


op = "attention"
for name in ("q", "k", "v"):
    add(op, f"{name}-list", listed(name), TypeError, f"attention: {name} must be a torch.Tensor")
add(op, "q-rank3", put(q=lambda a: a["q"][0]), ValueError, r"q must be \(B, H, L, hd\)")
add(op, "k-batch", rows(1, "k", "v"), ValueError, r"k \(1, 2, 6, 8\) / v .* do not fit q")
add(op, "v-length", rand(v=(B, 2, 5, 8)), ValueError, r"k \(.*\) / v \(2, 2, 5, 8\) do not fit")
add(op, "k-headdim", rand(k=(B, 2, 6, 4)), ValueError, "q and k must have the same head dim")
add(op, "v-headdim", rand(v=(B, 2, 6, 4)), ValueError, "v must have q's head dim")
add(op, "q-int", as_("q", I64), ValueError, "q must be floating point")
add(op, "v-bool", as_("v", torch.bool), ValueError, "v must be floating point")
add(op, "k-float64", as_("k", F64), ValueError, "k must match q's dtype")
add(op, "v-meta", meta("v"), ValueError, "v must match q's dtype/device")
add(op, "mask-list", listed("mask"), TypeError, "mask must be a tensor or None")
add(op, "mask-int", as_("mask", I64), ValueError, "mask must be bool or floating point")
add(op, "mask-shape", put(mask=no(5, 7)), ValueError, r"mask \(5, 7\) is not broadcastable")
add(op, "mask-meta", meta("mask"), ValueError, "mask must be on q's device")
add(op, "scale-str", put(scale="0.5"), TYPE, "scale")
add(op, "scale-bool", put(scale=True), TYPE, "scale")

op = "attention_packed"
add(op, "qkv-list", listed("qkv"), TYPE, "qkv must be")
add(op, "qkv-rank4", put(qkv=lambda a: a["qkv"][None]), ValueError, r"qkv must be a \(B, T, 3")
add(op, "qkv-int", as_("qkv", I64), ValueError, "qkv must be floating point")
add(op, "qkv-lastdim", rand(qkv=(B, 5, 47)), ValueError, "qkv's last dim 47")
add(op, "n_head-3", put(n_head=3), ValueError, "qkv's last dim 48 .* n_head = 3")
for bad in (0, -2, 2.0, True, "2", None):
    add(op, f"n_head-{bad!r}", put(n_head=bad), TYPE, "n_head must be a positive int")
add(op, "mask-shape", put(mask=no(5, 4)), ValueError, r"mask \(5, 4\) is not broadcastable")
add(op, "mask-int", as_("mask", I64), ValueError, "mask must be bool or floating point")
add(op, "scale-str", put(scale="0.5"), TYPE, "scale")

op = "relbias_attention"
for name in ("q", "k", "v", "bias", "gate", "attn_mask", "key_padding_mask"):
    add(op, f"{name}-list", listed(name), TypeError, f"relbias_attention: {name} must be a")
add(op, "q-rank3", put(q=lambda a: a["q"][0]), ValueError, r"q must be \(B, H, L, hd\)")
add(op, "k-batch", rows(1, "k", "v"), ValueError, r"k \(1, 2, 6, 8\) / v .* do not fit q")
add(op, "v-length", rand(v=(B, 2, 5, 8)), ValueError, r"k \(.*\) / v \(2, 2, 5, 8\) do not fit")
add(op, "k-headdim", rand(k=(B, 2, 6, 4)), ValueError, "q, k and v must share the head dim")
add(op, "q-int", as_("q", I64), ValueError, "q must be floating point")
add(op, "k-float64", as_("k", F64), ValueError, "k must be floating point, with q's dtype")
add(op, "v-meta", meta("v"), ValueError, r"v must be .* with q's dtype and device")
add(op, "scale-str", put(scale="0.35"), TypeError, "scale must be a float")
add(op, "scale-bool", put(scale=True), TypeError, "scale must be a float")
add(op, "bias-int", as_("bias", I64), ValueError, "bias must be floating point")
add(op, "bias-shape", rand(bias=(B, 2, 5, 7)), ValueError, r"bias \(2, 2, 5, 7\) is not broadc")
add(op, "bias-meta", meta("bias"), ValueError, "bias must be on q's device")
add(op, "gate-shape", rand(gate=(B, 2, 5, 6)), ValueError, r"gate must be \(B, H, T, 1\)")
add(op, "gate-int", as_("gate", I64), ValueError, "gate must be floating point")
add(op, "attn_mask-bool", as_("attn_mask", torch.bool), ValueError, "attn_mask must be floating")
add(op, "attn_mask-shape", rand(attn_mask=(6, 5)), ValueError, r"attn_mask must be \(T, S\)")
add(op, "kpm-float", as_("key_padding_mask", torch.float32), ValueError, "key_padding_mask must")
add(op, "kpm-shape", put(key_padding_mask=no(B, 5)), ValueError, r"key_padding_mask must be \(B")
add(op, "kpm-meta", meta("key_padding_mask"), ValueError, "key_padding_mask must be on q")
add(op, "rel_bias-shape", put(bias=None, rel_bias=r(2, 11)), ValueError, r"rel_bias must be \(H")
add(op, "rel_bias-and-bias", put(rel_bias=r(2, 10)), ValueError, "give bias or rel_bias")
rel_int = put(bias=None, rel_bias=torch.zeros(2, 10, dtype=I64))
add(op, "rel_bias-int", rel_int, ValueError, "rel_bias must be floating point")
for bad in (-0.1, 1.5):
    add(op, f"dropout_p-{bad}", put(dropout_p=bad), ValueError, "dropout_p")
add(op, "dropout_p-str", put(dropout_p="0.1"), TYPE, "dropout_p")

op = "chunk_attention"
for name in ("q", "k", "v", "bias"):
    add(op, f"{name}-list", listed(name), TYPE, f"chunk_attention: {name} must be a torch.Tensor")
add(op, "kpm-list", listed("key_padding_mask"), TYPE, "key_padding_mask must be a bool tensor")
add(op, "q-rank2", put(q=lambda a: a["q"][0]), ValueError, "q must be 3-D")
add(op, "k-batch", rows(1, "k", "v"), ValueError, r"k must be \(B, Lk, K\) = \(2, Lk, 4\)")
add(op, "k-feature", rand(k=(B, 8, 3)), ValueError, r"k must be \(B, Lk, K\)")
add(op, "v-length", rand(v=(B, 6, 6)), ValueError, r"v must be \(B, Lk, V\)")
add(op, "bias-shape", rand(bias=(4, 5)), ValueError, r"bias must be the \(4, 4\) matrix")
add(op, "q-int", as_("q", I64), ValueError, "q must be floating point")
add(op, "bias-int", as_("bias", I64), ValueError, "bias must be floating point")
add(op, "k-float64", as_("k", F64), ValueError, "k must have q's dtype")
add(op, "v-meta", meta("v"), ValueError, "v must be on q's device")
add(op, "kpm-float", as_("key_padding_mask", torch.float32), ValueError, "key_padding_mask must")
add(op, "kpm-shape", put(key_padding_mask=no(B, 7)), ValueError, r"key_padding_mask must be \(B")
add(op, "kpm-meta", meta("key_padding_mask"), ValueError, "key_padding_mask must be on q")
add(op, "chunk_size-3", put(chunk_size=3), ValueError, "chunk_size 3 must divide the length 8")
for bad in (4.0, True, "4", None):
    add(op, f"chunk_size-{bad!r}", put(chunk_size=bad), TYPE, "chunk_size")
for bad in (-0.1, 1.5):
    add(op, f"dropout_p-{bad}", put(dropout_p=bad), ValueError, r"dropout_p must be in \[0, 1\]")
add(op, "dropout_p-str", put(dropout_p="0.1"), TYPE, "dropout_p")
add(op, "scaling-str", put(scaling="0.5"), TYPE, "scaling")

for op in ("ema", "ema_step"):
    for name in ("damping", "decay", "expansion", "projection", "omega"):
        add(op, f"{name}-list", listed(name), TYPE, f"{op}: {name} must be")
    add(op, "damping-shape", rand(damping=(4, 3, 1)), ValueError, r"damping must be \(D, h, 1\)")
    add(op, "decay-D", rand(decay=(3, 2, 1)), ValueError, r"decay must be \(D, h, 1\)")
    add(op, "projection-D", rand(projection=(3, 2)), ValueError, r"projection must be \(D, h\)")
    add(op, "expansion-int", as_("expansion", I64), ValueError, "expansion must be floating")
    add(op, "damping-bool", as_("damping", torch.bool), ValueError, "damping must be floating")
    add(op, "projection-meta", meta("projection"), ValueError, "projection must be on x")
    add(op, "decay-meta", meta("decay"), ValueError, "decay must be on x's device")
    add(op, "omega-shape", rand(omega=(3,)), ValueError, r"omega must be \(D,\)")
    add(op, "omega-int", as_("omega", I64), ValueError, "omega must be floating point")
    add(op, "omega-meta", meta("omega"), ValueError, "omega must be on x's device")
    add(op, "x-list", listed("x"), TYPE, f"{op}: x must be a")
    add(op, "x-int", as_("x", I64), ValueError, "x must be floating point")

op = "ema"
add(op, "x-rank2", put(x=lambda a: a["x"][0]), ValueError, r"x must be a \(B, L, D\) tensor")
add(op, "pad_mask-float", as_("pad_mask", torch.float32), ValueError, "pad_mask must be a bool")
add(op, "pad_mask-shape", put(pad_mask=no(B, 6)), ValueError, r"pad_mask must be \(B, L\)")
add(op, "pad_mask-meta", meta("pad_mask"), ValueError, "pad_mask must be on x's device")
for bad in (0, -1, 2.5, True, "3"):
    add(op, f"truncation-{bad!r}", put(truncation=bad), TYPE, "truncation must be None or an int")

op = "ema_step"
add(op, "x-rank3", put(x=lambda a: a["x"][None]), ValueError, r"x must be a \(B, D\) tensor")
add(op, "state-list", listed("state"), TYPE, "state must be")
add(op, "state-shape", rand(state=(B, 4, 3)), ValueError, r"state must be \(B, D, h\)")
add(op, "state-batch", rand(state=(3, 4, 2)), ValueError, r"state must be \(B, D, h\)")
add(op, "state-int", as_("state", I64), ValueError, "state must be floating point")
add(op, "state-meta", meta("state"), ValueError, "state must be on x's device")

op = "adaln"
for name in ("x", "gamma", "beta"):
    add(op, f"{name}-list", listed(name), TypeError, f"adaln: {name} must be a torch.Tensor")
add(op, "x-rank2", put(x=lambda a: a["x"][0]), ValueError, r"x must be \(B, T, D\)")
add(op, "x-int", as_("x", I64), ValueError, "x must be a floating-point tensor")
add(op, "gamma-D", rand(gamma=(B, D - 1)), ValueError, r"gamma must be \(B, D\)")
add(op, "beta-batch", rand(beta=(3, D)), ValueError, r"beta must be \(B, D\)")
add(op, "gamma-T", rand(gamma=(B, 4, D), beta=(B, 4, D)), ValueError, r"gamma must be \(B, D\)")
add(op, "beta-vs-gamma", rand(beta=(B, 1, D)), ValueError, "gamma and beta must have the same")
add(op, "gamma-float64", as_("gamma", F64), ValueError, "gamma must have x's dtype")
add(op, "beta-int", as_("beta", I64), ValueError, "beta must have x's dtype")
add(op, "beta-meta", meta("beta"), ValueError, "beta must be on x's device")
add(op, "eps-str", put(eps="1e-5"), TypeError, "eps must be a float")
add(op, "eps-None", put(eps=None), TypeError, "eps must be a float")
add(op, "eps-bool", put(eps=True), TypeError, "eps must be a float")

op = "linear_rows"
for name in ("x", "weight", "bias"):
    add(op, f"{name}-list", listed(name), TypeError, f"linear_rows: {name} must be a torch.Tensor")
add(op, "x-int", as_("x", I64), ValueError, "x must be floating point")
add(op, "weight-int", as_("weight", I64), ValueError, "weight must be floating point")
add(op, "bias-bool", as_("bias", torch.bool), ValueError, "bias must be floating point")
add(op, "weight-float64", as_("weight", F64), ValueError, "weight must have x's dtype")
add(op, "bias-meta", meta("bias"), ValueError, "bias must have x's dtype and device")
add(op, "x-rank0", put(x=torch.tensor(1.0)), ValueError, r"x \(\.\.\., K\), got x \(\)")
add(op, "weight-rank3", rand(weight=(5, D, 1)), ValueError, r"weight must be \(N, K\)")
add(op, "weight-K", rand(weight=(5, D - 1)), ValueError, r"weight must be \(N, K\)")
add(op, "bias-N", rand(bias=(4,)), ValueError, r"bias must be \(N,\) = \(5,\)")

op = "emformer_attention"
for name in ("query", "key", "value"):
    add(op, f"{name}-list", listed(name), TYPE, f"{name} must be a tensor")
add(op, "query-rank2", put(query=lambda a: a["query"][0]), ValueError, r"query must be \(T, B, D")
add(op, "key-batch", rand(key=(6, 1, D), value=(6, 1, D)), ValueError, r"key must be \(Tk, B, D\)")
add(op, "key-feature", rand(key=(6, B, 4), value=(6, B, 4)), ValueError, r"key must be \(Tk, B")
add(op, "value-length", rand(value=(5, B, D)), ValueError, "value must have key's shape")
add(op, "query-int", as_("query", I64), ValueError, "query must be a floating-point tensor")
add(op, "key-float64", as_("key", F64), ValueError, "key must have query's dtype")
add(op, "value-meta", meta("value"), ValueError, "value must be on query's device")
for name, shape in (("attention_mask", (5, 7)), ("key_padding_mask", (B, 5))):
    add(op, f"{name}-list", listed(name), TYPE, f"{name} must be a bool tensor")
    add(op, f"{name}-float", as_(name, torch.float32), ValueError, f"{name} must be bool")
    add(op, f"{name}-shape", put(**{name: no(*shape)}), ValueError, f"{name} must have shape")
    add(op, f"{name}-meta", meta(name), ValueError, f"{name} must be on query's device")
for bad in (3, 0, -2, 2.0, True):
    add(op, f"num_heads-{bad!r}", put(num_heads=bad), TYPE, "num_heads must be a positive divisor")
for bad in (-0.1, 1.5, True, "0.1"):
    add(op, f"dropout_p-{bad!r}", put(dropout_p=bad), TYPE, r"dropout_p must be a number in \[0")
for bad in (float("-inf"), float("nan"), "-1e8"):
    add(op, f"negative_inf-{bad!r}", put(negative_inf=bad), TYPE, "negative_inf must be a finite")

op = "emformer_segment_attention"
for name in ("q_utt", "k_rc", "v_utt"):
    add(op, f"{name}-list", listed(name), TYPE, f"{name} must be a tensor")
add(op, "q_sum-list", listed("q_sum"), TYPE, r"q_sum must be \(T, B=2, D=8\)")
add(op, "v_mem-None", put(v_mem=None), ValueError, "k_mem and v_mem must both be given")
add(op, "q_utt-rank2", put(q_utt=lambda a: a["q_utt"][0]), ValueError, r"q_utt must be \(U, B")
add(op, "q_utt-int", as_("q_utt", I64), ValueError, "q_utt must be a floating-point tensor")
add(op, "k_utt-batch", rand(k_utt=(4, 1, D)), ValueError, r"k_utt must be \(T, B=2, D=8\)")
add(op, "v_rc-feature", rand(v_rc=(2, B, 4)), ValueError, r"v_rc must be \(T, B=2, D=8\)")
add(op, "v_utt-length", rand(v_utt=(3, B, D)), ValueError, "v_utt must have k_utt's shape")
add(op, "k_utt-U", rand(k_utt=(3, B, D), v_utt=(3, B, D)), ValueError, "q_utt and k_utt must")
add(op, "k_rc-float64", as_("k_rc", F64), ValueError, "k_rc must have q_utt's dtype")
add(op, "v_mem-meta", meta("v_mem"), ValueError, "v_mem must be on q_utt's device")
add(op, "q_rc-rows", rand(q_rc=(3, B, D)), ValueError, r"q_rc must have n \* R = 2 \* 1 rows")
add(op, "q_sum-rows", rand(q_sum=(1, B, D)), ValueError, "q_sum must have 0 or n = 2 rows")
add(op, "k_mem-rows", rand(k_mem=(2, B, D), v_mem=(2, B, D)), ValueError, "k_mem must have 1 r")
for bad in (3, 0, 2.0, True):
    add(op, f"num_heads-{bad!r}", put(num_heads=bad), TYPE, "num_heads must be a positive divisor")
SIZES = dict(segment_length=(0, 2.0, True), right_context=(-1,), left_context=(1.5,))
for name, bad in [(n, b) for n, bads in (SIZES | dict(max_memory=(-1,))).items() for b in bads]:
    add(op, f"{name}-{bad!r}", put(**{name: bad}), TYPE, f"{name} must be an int >=")
add(op, "key_lengths-shape", put(key_lengths=torch.tensor([7, 5, 3])), ValueError, "key_lengths")
add(op, "key_lengths-float", as_("key_lengths", torch.float32), ValueError, r"key_lengths must")
add(op, "key_lengths-meta", meta("key_lengths"), ValueError, r"key_lengths must be a \(B,\)")
add(op, "key_lengths-list", listed("key_lengths"), TYPE, r"key_lengths must be a \(B,\)")
past = put(past_length=torch.tensor([3]))
add(op, "past_length-training", past, ValueError, "past_length is for infer")
add(op, "dropout_p-2", put(dropout_p=2.0), ValueError, r"dropout_p must be a number in \[0, 1\]")
add(op, "negative_inf-nan", put(negative_inf=float("nan")), ValueError, "negative_inf must be")

op = "emformer_segment_attention_infer"
add(op, "v_lc-None", put(v_lc=None), ValueError, "k_lc and v_lc must both be given")
add(op, "k_lc-feature", rand(k_lc=(1, B, 4)), ValueError, r"k_lc must be \(T, B=2, D=8\)")
add(op, "q_rc-rows", rand(q_rc=(2, B, D)), ValueError, r"q_rc must have n \* R = 1 \* 1 rows")
add(op, "past_length-float", as_("past_length", torch.float32), ValueError, "past_length must")
past = put(past_length=torch.zeros(0, dtype=I64))
add(op, "past_length-empty", past, ValueError, "past_length must be an integer tensor")
add(op, "past_length-meta", meta("past_length"), ValueError, "past_length must be an integer")
add(op, "past_length-int", put(past_length=3), TYPE, "past_length must be an integer tensor")

op = "emformer_segment_conv"
add(op, "z-list", listed("z"), TYPE, "z must be a tensor")
add(op, "z-rank2", put(z=lambda a: a["z"][0]), ValueError, r"z must be \(n\*R \+ U, B, D\)")
add(op, "z-int", as_("z", I64), ValueError, "z must be a floating-point tensor")
add(op, "weight-list", listed("weight"), TYPE, "weight must be the depthwise Conv1d weight")
add(op, "weight-rank2", rand(weight=(3, 3)), ValueError, r"weight must be the depthwise .* \(3,")
add(op, "weight-D", rand(weight=(4, 1, 3)), ValueError, r"weight must be the depthwise Conv1d")
add(op, "weight-k0", rand(weight=(3, 1, 0), cache=(B, 3, 0)), ValueError, "weight must have a k")
add(op, "weight-float64", as_("weight", F64), ValueError, "weight must have z's dtype")
add(op, "bias-list", listed("bias"), TYPE, r"bias must be \(D,\)")
add(op, "bias-D", rand(bias=(4,)), ValueError, r"bias must be \(D,\) = \(3,\)")
add(op, "bias-float64", as_("bias", F64), ValueError, "bias must have z's dtype")
add(op, "bias-meta", meta("bias"), ValueError, "bias must be on z's device")
add(op, "cache-list", listed("cache"), TYPE, r"cache must be \(B, D, k - 1\)")
add(op, "cache-k", rand(cache=(B, 3, 3)), ValueError, r"cache must be \(B, D, k - 1\)")
add(op, "cache-batch", rand(cache=(1, 3, 2)), ValueError, r"cache must be \(B, D, k - 1\)")
add(op, "cache-int", as_("cache", I64), ValueError, "cache must have z's dtype")
add(op, "cache-meta", meta("cache"), ValueError, "cache must be on z's device")
SIZES = dict(utterance_length=(0, 4.0, True), segment_length=(0, "2"), right_context=(-1,))
for name, bad in [(n, b) for n, bads in SIZES.items() for b in bads]:
    add(op, f"{name}-{bad!r}", put(**{name: bad}), TYPE, f"{name} must be an int >=")
add(op, "utterance_length-rows", put(utterance_length=7), ValueError, "utterance_length = 7")
add(op, "right_context-rows", put(right_context=4), ValueError, "R = right_context = 4")


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(OPS))
def test_baseline_runs(op):
    fn, make = OPS[op]
    assert fn(**make()) is not None


@pytest.mark.parametrize("op, mutate, exc, match", CASES)
def test_bad_input_raises(op, mutate, exc, match):
    fn, make = OPS[op]
    args = mutate(make())
    with pytest.raises(exc, match=match):
        fn(**args)
