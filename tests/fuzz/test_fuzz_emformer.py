"""Property-based tests: the Emformer ops on random inputs inside their documented support.

emformer_attention (dense masks), emformer_segment_attention (the streams where they lie: training
layouts of n = ceil(U / s) segments with or without memory and summaries, infer layouts with
right-aligned memory / left-context state and `past_length`, ragged `key_lengths`) and
emformer_segment_conv (rc blocks of any count, a cache or none, a bias or none), on every
backend each op registers that runs here. Shapes from T = 1 (and B = 0) up past one tile, not
multiples of any block; every tensor argument contiguous, batch-major storage seen time-major,
a column slice of a wider buffer, every other column (a non-unit last stride) or expanded
(stride 0); NaN and Inf placed at random. The output and the gradient of every tensor argument
are held to seqkern.testing's rule against the float64 oracle (the reference run in float64);
where a NaN or Inf is placed, the output's NaN pattern must be the oracle's and the gradients
must carry NaN exactly where the poisoned value reaches. (One documented deviation of the
triton segment attention is drawn rarely, about 1 in 300 random examples, and not in the ci
profile: an Inf query whose row sees only -inf logits; tests/ops/test_emformer_kernel.py holds
it as a strict xfail.)

CI runs a fixed, derandomised profile ("ci", 25 examples a test); a developer runs more with
`HYPOTHESIS_PROFILE=dev pytest tests/fuzz` (2,000 examples a test).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqkern import backends, use_backend  # noqa: E402
from seqkern.ops.emformer import OP as DENSE_OP  # noqa: E402
from seqkern.ops.emformer import (  # noqa: E402
    SEGMENT_OP,
    emformer_attention,
    emformer_segment_attention,
)
from seqkern.ops.emformer_conv import OP as CONV_OP  # noqa: E402
from seqkern.ops.emformer_conv import emformer_segment_conv  # noqa: E402
from seqkern.testing import (  # noqa: E402
    assert_result_close_to_oracle,
    grads_or_zeros,
    poison_,
)

DTYPES = {
    "reference": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],  # the interpreter has no bfloat16
}
# head dims: both ends of each backend's range and one inside (triton: 16..128)
HEAD_DIMS = {"reference": [1, 7, 16], "cpu": [1, 7, 16], "triton": [16, 24, 128]}


def _backends(op):
    """Every backend `op` registers, as params; those that cannot run CPU tensors here skip."""
    out = []
    for name in backends.BACKENDS:
        if name not in backends.kernels(op) or name == "cuda":  # the fuzz runs CPU tensors
            continue
        why = backends.unavailable_reason(name)
        if name == "triton" and why is None and not backends.triton_interpret():
            why = "CPU tensors need TRITON_INTERPRET=1"
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(name, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# Layouts: a float64 leaf (what gradients are taken of) and the view the op sees

# time-major (T, B, D) streams
STREAM_LAYOUTS = ["contiguous", "batch_major", "column_slice", "every_other", "expanded_b"]


def _stream_leaf(gen, T, B, D, layout):
    shape = {
        "contiguous": (T, B, D),
        "batch_major": (B, T, D),
        "column_slice": (T, B, 2 * D + 3),
        "every_other": (T, B, 2 * D),
        "expanded_b": (T, 1, D),
    }[layout]
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _stream_view(leaf, T, B, D, layout):
    if layout == "batch_major":
        return leaf.transpose(0, 1)
    if layout == "column_slice":
        return leaf[..., 2 : 2 + D]
    if layout == "every_other":
        return leaf[..., ::2]
    if layout == "expanded_b":
        return leaf.expand(T, B, D)
    return leaf


POISONS = [None, None, "nan_q", "inf_q", "nan_k", "inf_k", "nan_v"]


# ---------------------------------------------------------------------------------------------
# emformer_attention: concatenated q/k/v, dense masks


MASK_LAYOUTS = ["contiguous", "transposed", "expanded"]


def _bool_mask(gen, rows, cols, density, layout):
    """A (rows, cols) bool mask, True = masked with probability `density`, in `layout`."""
    if layout == "expanded":  # one row broadcast over every row: stride 0
        return (torch.rand(1, cols, generator=gen) < density).expand(rows, cols)
    m = torch.rand(rows, cols, generator=gen) < density
    if layout == "transposed":
        return m.t().contiguous().t()
    return m


@pytest.mark.parametrize("backend", _backends(DENSE_OP))
@given(data=st.data())
def test_emformer_attention_fuzz(backend, data):
    draw = data.draw
    B, H = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    Tq, Tk = draw(st.integers(0, 12)), draw(st.integers(0, 12))  # 0: no query / no key
    hd = draw(st.sampled_from(HEAD_DIMS[backend]))
    dtype = draw(st.sampled_from(DTYPES[backend]))
    layouts = [draw(st.sampled_from(STREAM_LAYOUTS)) for _ in range(3)]
    mask_spec = (draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])), draw(st.sampled_from(MASK_LAYOUTS)))
    kpm_spec = draw(st.sampled_from([None, 0.0, 0.3, 1.0]))
    kpm_layout = draw(st.sampled_from(MASK_LAYOUTS))
    negative_inf = draw(st.sampled_from([-1e8, -1e4, -1e30]))
    dropout_p = draw(st.sampled_from([0.0, 0.2]))  # outside training: no dropout
    poison = draw(st.sampled_from(POISONS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    D = H * hd
    rows = (Tq, Tk, Tk)
    leaves64 = [_stream_leaf(gen, T, B, D, lay) for T, lay in zip(rows, layouts)]
    if poison is not None:
        kind, value = poison.split("_")[1], math.nan if poison.startswith("nan") else math.inf
        poison_(leaves64["qkv".index(kind)], value, gen)
    mask = _bool_mask(gen, Tq, Tk, *mask_spec)
    kpm = None if kpm_spec is None else _bool_mask(gen, B, Tk, kpm_spec, kpm_layout)
    dout64 = torch.randn(Tq, B, D, generator=gen, dtype=torch.float64)

    def run(dt):
        leaves = [t.to(dt).requires_grad_() for t in leaves64]
        views = [_stream_view(t, T, B, D, lay) for t, T, lay in zip(leaves, rows, layouts)]
        out = emformer_attention(
            *views, mask, kpm, H, negative_inf=negative_inf, dropout_p=dropout_p
        )
        return [out, *grads_or_zeros(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(dtype)
    with use_backend("reference"):
        oracle = run(torch.float64)
        ref = run(dtype)
    assert got[0].shape == (Tq, B, D) and got[0].dtype == dtype
    for name, g, o, r in zip(["out", "dq", "dk", "dv"], got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poison is not None, gradient=name.startswith("d")
        )


# ---------------------------------------------------------------------------------------------
# emformer_segment_attention: the streams where they lie


Q_STREAMS = ("q_rc", "q_utt", "q_sum")
KV_STREAMS = ("k_mem", "k_rc", "k_lc", "k_utt", "v_mem", "v_rc", "v_lc", "v_utt")
STREAMS = Q_STREAMS + KV_STREAMS


@st.composite
def segment_problems(draw, backend):
    """A segment attention problem for `backend`: a dict of sizes, the rows of each stream
    (None: the stream is passed as None), layouts, key lengths, past_length and poison."""
    p = dict(
        infer=draw(st.booleans()),
        B=draw(st.integers(0, 3)),
        H=draw(st.integers(1, 2)),
        hd=draw(st.sampled_from(HEAD_DIMS[backend])),
        dtype=draw(st.sampled_from(DTYPES[backend])),
        s=draw(st.one_of(st.integers(1, 7), st.integers(13, 18))),  # long: 2 query tiles
        R=draw(st.integers(0, 3)),
        LC=draw(st.integers(0, 6)),
        M=draw(st.integers(0, 3)),
    )
    if p["infer"]:  # one segment of any U (the last chunk of an utterance may be short)
        U, n = draw(st.one_of(st.integers(1, 9), st.integers(14, 18))), 1
        Mr, LCr = draw(st.integers(0, 4)), draw(st.integers(0, 7))
    else:  # U not a multiple of s; R + s + 1 > 16 rows: a segment of two 16-row query tiles
        U = draw(st.integers(1, 24))
        n = math.ceil(U / p["s"])
        Mr, LCr = (n - 1 if p["M"] > 0 else 0), None
    n_sum = draw(st.sampled_from([0, n]))
    rows = dict(q_rc=n * p["R"], q_utt=U, q_sum=n_sum, k_mem=Mr, k_rc=n * p["R"], k_lc=LCr)
    rows["k_utt"] = U
    if n_sum == 0 and draw(st.booleans()):
        rows["q_sum"] = None
    if Mr == 0 and draw(st.booleans()):
        rows["k_mem"] = None
    for kind in ("mem", "rc", "lc", "utt"):
        rows["v_" + kind] = rows["k_" + kind]
    p.update(U=U, n=n, rows=rows)
    p["layouts"] = {name: draw(st.sampled_from(STREAM_LAYOUTS)) for name in STREAMS}

    past, mv, lcv = None, Mr, LCr or 0
    if p["infer"] and draw(st.booleans()):
        value = draw(st.integers(0, 3 * (Mr + LCr) + 2))
        shape = draw(st.sampled_from([(1,), (1, max(p["B"], 1)), (max(p["B"], 1),)]))
        past = torch.full(shape, value, dtype=draw(st.sampled_from([torch.int32, torch.int64])))
        mv, lcv = min(Mr, math.ceil(value / p["s"])), min(LCr, value)
    p["past_length"] = past
    p["num_keys"] = mv + n * p["R"] + lcv + U
    p["key_lengths"] = None
    if draw(st.booleans()):
        full = draw(st.booleans())  # the module's: most batch elements see every key
        lengths = [
            p["num_keys"] if full and b == 0 else draw(st.integers(0, p["num_keys"] + 1))
            for b in range(p["B"])
        ]
        dt = draw(st.sampled_from([torch.int32, torch.int64]))
        p["key_lengths"] = torch.tensor(lengths, dtype=dt).reshape(p["B"])
    p["negative_inf"] = draw(st.sampled_from([-1e8, -1e4, -1e30]))
    p["training"] = draw(st.booleans())
    p["dropout_p"] = 0.0 if p["training"] else draw(st.sampled_from([0.0, 0.1]))
    poison = draw(st.sampled_from(POISONS))
    if poison is not None:
        kind = poison.split("_")[1]
        names = Q_STREAMS if kind == "q" else [n for n in KV_STREAMS if n[0] == kind]
        candidates = [name for name in names if rows[name]]
        poison = (draw(st.sampled_from(candidates)), poison.split("_")[0])
    p["poison"] = poison
    return p


@pytest.mark.parametrize("backend", _backends(SEGMENT_OP))
@given(data=st.data())
def test_emformer_segment_attention_fuzz(backend, data):
    p = data.draw(segment_problems(backend))
    check_segment_attention(backend, p, data.draw(st.integers(0, 2**31 - 1)))


def check_segment_attention(backend, p, seed):
    """One drawn problem on `backend`, against the oracle (also the regression tests' entry)."""
    gen = torch.Generator().manual_seed(seed)
    B, D, rows, layouts = p["B"], p["H"] * p["hd"], p["rows"], p["layouts"]
    present = [name for name in STREAMS if rows[name] is not None]
    leaves64 = {name: _stream_leaf(gen, rows[name], B, D, layouts[name]) for name in present}
    if p["poison"] is not None:
        name, kind = p["poison"]
        poison_(leaves64[name], math.nan if kind == "nan" else math.inf, gen)
    Tq = rows["q_rc"] + rows["q_utt"] + (rows["q_sum"] or 0)
    dout64 = torch.randn(Tq, B, D, generator=gen, dtype=torch.float64)
    kwargs = dict(
        num_heads=p["H"],
        segment_length=p["s"],
        right_context=p["R"],
        left_context=p["LC"],
        max_memory=p["M"],
        key_lengths=p["key_lengths"],
        past_length=p["past_length"],
        negative_inf=p["negative_inf"],
        dropout_p=p["dropout_p"],
        training=p["training"],
    )

    def run(dt):
        leaves = {name: t.to(dt).requires_grad_() for name, t in leaves64.items()}
        streams = [
            _stream_view(leaves[n], rows[n], B, D, layouts[n]) if n in leaves else None
            for n in STREAMS
        ]
        out = emformer_segment_attention(*streams, **kwargs)
        return [out, *grads_or_zeros(out, list(leaves.values()), dout64.to(dt))]

    with use_backend(backend):
        got = run(p["dtype"])
    with use_backend("reference"):
        oracle = run(torch.float64)
        ref = run(p["dtype"])
    assert got[0].shape == (Tq, B, D) and got[0].dtype == p["dtype"]
    names = ["out"] + [f"d{name}" for name in present]
    for name, g, o, r in zip(names, got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=p["poison"] is not None, gradient=name.startswith("d")
        )


# ---------------------------------------------------------------------------------------------
# emformer_segment_conv: ConvEmformer's depthwise conv over [rc blocks ; utterance]


@st.composite
def conv_problems(draw, backend):
    p = dict(
        B=draw(st.integers(0, 3)),
        D=draw(st.sampled_from([1, 5, 16, 40, 0])),  # 40: two channel tiles (interpreter)
        k=draw(st.integers(1, 6)),
        s=draw(st.integers(1, 6)),
        R=draw(st.integers(0, 3)),
        U=draw(st.integers(1, 20)),
        dtype=draw(st.sampled_from(DTYPES[backend])),
    )
    full = math.ceil(p["U"] / p["s"])
    # rc blocks: the training layout, one (infer), none, or more than the segments (they end at U)
    n = draw(st.sampled_from([full, 1, 0, full + 1]))
    p["n"] = 0 if p["R"] == 0 else n
    p["bias"] = draw(st.booleans())
    p["cache"] = draw(st.booleans())
    p["layouts"] = dict(
        z=draw(st.sampled_from(STREAM_LAYOUTS)),
        weight=draw(st.sampled_from(["contiguous", "tap_major", "expanded"])),
        bias=draw(st.sampled_from(["contiguous", "every_other", "expanded"])),
        cache=draw(st.sampled_from(["contiguous", "tail", "channel_last", "expanded"])),
    )
    poisons = [None, None, "nan_z", "inf_z", "nan_weight", "inf_weight", "nan_bias", "nan_cache"]
    p["poison"] = draw(st.sampled_from(poisons))
    return p


def _conv_leaves(p, gen):
    """float64 leaves {name: tensor} of the present arguments, and the views the op sees."""
    B, D, k, T = p["B"], p["D"], p["k"], p["n"] * p["R"] + p["U"]
    lay = p["layouts"]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    leaves = dict(z=_stream_leaf(gen, T, B, D, lay["z"]))
    leaves["weight"] = {
        "contiguous": lambda: 0.5 * rnd(D, 1, k),
        "tap_major": lambda: 0.5 * rnd(k, D),  # (k, D) storage seen (D, 1, k)
        "expanded": lambda: 0.5 * rnd(1, 1, k),  # one channel's taps for every channel
    }[lay["weight"]]()
    if p["bias"]:
        leaves["bias"] = {
            "contiguous": lambda: rnd(D),
            "every_other": lambda: rnd(2 * D),
            "expanded": lambda: rnd(1),
        }[lay["bias"]]()
    if p["cache"]:
        leaves["cache"] = {
            "contiguous": lambda: rnd(B, D, k - 1),
            "tail": lambda: rnd(B, D, k - 1 + 5),  # the last k - 1 frames of a longer buffer
            "channel_last": lambda: rnd(B, k - 1, D),
            "expanded": lambda: rnd(1, D, k - 1),
        }[lay["cache"]]()
    return leaves


def _conv_views(p, leaves):
    B, D, k, T = p["B"], p["D"], p["k"], p["n"] * p["R"] + p["U"]
    lay = p["layouts"]
    z = _stream_view(leaves["z"], T, B, D, lay["z"])
    w = leaves["weight"]
    if lay["weight"] == "tap_major":
        w = w.t().unsqueeze(1)
    elif lay["weight"] == "expanded":
        w = w.expand(D, 1, k)
    bias = leaves.get("bias")
    if bias is not None and lay["bias"] == "every_other":
        bias = bias[1::2]
    elif bias is not None and lay["bias"] == "expanded":
        bias = bias.expand(D)
    cache = leaves.get("cache")
    if cache is not None:
        if lay["cache"] == "tail":
            cache = cache[:, :, 5:]
        elif lay["cache"] == "channel_last":
            cache = cache.transpose(1, 2)
        elif lay["cache"] == "expanded":
            cache = cache.expand(B, D, k - 1)
    return z, w, bias, cache


@pytest.mark.parametrize("backend", _backends(CONV_OP))
@given(data=st.data())
def test_emformer_segment_conv_fuzz(backend, data):
    p = data.draw(conv_problems(backend))
    check_segment_conv(backend, p, data.draw(st.integers(0, 2**31 - 1)))


def check_segment_conv(backend, p, seed):
    """One drawn problem on `backend`, against the oracle."""
    gen = torch.Generator().manual_seed(seed)
    leaves64 = _conv_leaves(p, gen)
    if p["poison"] is not None:
        kind, name = p["poison"].split("_")
        if name in leaves64:
            poison_(leaves64[name], math.nan if kind == "nan" else math.inf, gen)
    T = p["n"] * p["R"] + p["U"]
    dy64 = torch.randn(T, p["B"], p["D"], generator=gen, dtype=torch.float64)
    lengths = dict(utterance_length=p["U"], segment_length=p["s"], right_context=p["R"])

    def run(dt):
        leaves = {name: t.to(dt).requires_grad_() for name, t in leaves64.items()}
        y = emformer_segment_conv(*_conv_views(p, leaves), **lengths)
        return [y, *grads_or_zeros(y, list(leaves.values()), dy64.to(dt))]

    with use_backend(backend):
        got = run(p["dtype"])
    with use_backend("reference"):
        oracle = run(torch.float64)
        ref = run(p["dtype"])
    assert got[0].shape == (T, p["B"], p["D"]) and got[0].dtype == p["dtype"]
    names = ["out"] + [f"d{name}" for name in leaves64]
    for name, g, o, r in zip(names, got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=p["poison"] is not None, gradient=name.startswith("d")
        )
