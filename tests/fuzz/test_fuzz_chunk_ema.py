"""Property-based tests: chunk_attention, ema and ema_step on random inputs inside their support.

chunk_attention (reference, cpu, triton): B, Lq, Lk from 0, chunked blocks (nc >= 2 chunks of
c) and single blocks whose chunk_size does not cut the sequence (-1, 0, >= Lk and not dividing
it, or Lq != Lk), K and V at both ends of each backend's range, the bias as the dense matrix or
the per-offset vector (with or without its gradient), every key-padding form (ragged, random,
an all-padding batch row, all padding), causal or not, a drawn scaling.

ema (every registered backend: reference, cpu, cuda) through the public function and through
the op stages with an explicit chunk length (EmaFunction, a testing knob: chunks from 1 up,
not dividing L), L, B, D from 0, h from 1, truncation below, at and past L, ragged / random /
full padding, omega or not, parameters in x's dtype or in float32. ema_step (every registered
backend): a batch, shared or absent state, mixed dtypes, gradients (x, state, every parameter,
omega) on the reference, the inference-only kernels under no_grad.

Every tensor argument is drawn contiguous, transposed (time-major), strided (every other
element of a wider buffer) or expanded (stride 0 along one dim); NaN and Inf are placed at random
in an input. Outputs, returned states and every gradient (parameters included) are held to
seqkern.testing's rule against the float64 oracle (seqkern.reference run in float64 through
autograd; ema's FFT in float64). For ema with NaN/Inf in x the oracle is the float64 recurrence
`ema_scan_ref` (the FFT would spread a NaN over the whole channel, before it too) and the
reference in the kernel's dtype runs on the clean input: it is what bounds the rounding on the
entries the poison does not reach (the reference on the poisoned input has NaN there).

CI runs a fixed, derandomised profile ("ci", 25 examples a test: about a minute); a developer
runs more with `HYPOTHESIS_PROFILE=dev pytest tests/fuzz` (2,000 examples a test).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqkern import backends, use_backend  # noqa: E402
from seqkern.ops.chunk import chunk_attention  # noqa: E402
from seqkern.ops.ema import EmaFunction, ema, ema_step  # noqa: E402
from seqkern.reference.chunk import chunk_attention_ref  # noqa: E402
from seqkern.reference.ema import ema_ref, ema_scan_ref, ema_step_ref  # noqa: E402
from seqkern.testing import (  # noqa: E402
    assert_result_close_to_oracle,
    grads_or_zeros,
    poison_,
)

HAS_CUDA = torch.cuda.is_available()
ALL_FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _device(backend):
    """cuda runs CUDA tensors; triton runs them where a GPU is, else CPU ones in the interpreter."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _backends(op):
    """Every backend `op` registers, each skipped only where it cannot run in this process."""
    params = []
    for name in backends.BACKENDS:
        if name not in backends.kernels(op):
            continue
        why = backends.unavailable_reason(name)
        if why is None and name == "cuda" and not HAS_CUDA:
            why = "no CUDA device"
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


# ---------------------------------------------------------------------------------------------
# Shared helpers: layouts of a tensor argument, poison, the comparison


LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]


def _leaf(shape, layout, gen, expand_dim=0, dtype=torch.float64):
    """A float64 leaf for an argument of `shape` laid out as `layout`: transposed (the first two
    dims swapped: MEGA's time-major (L, B, .) buffers), strided (every other element of the last
    dim of a buffer twice as wide) or expanded (size 1 along `expand_dim`, stride 0 there)."""
    shape = list(shape)
    if layout == "transposed" and len(shape) >= 2:
        shape[0], shape[1] = shape[1], shape[0]
    elif layout == "strided":
        shape[-1] *= 2
    elif layout == "expanded":
        shape[expand_dim % len(shape)] = 1
    return torch.randn(shape, generator=gen, dtype=dtype)


def _view(leaf, shape, layout):
    """The argument of `shape` that `leaf` (from `_leaf`) is laid out as."""
    if layout == "transposed" and leaf.dim() >= 2:
        return leaf.transpose(0, 1)
    if layout == "strided":
        return leaf[..., ::2]
    if layout == "expanded":
        return leaf.expand(shape)
    return leaf


CHUNK_DTYPES = {
    "reference": ALL_FLOATS,
    "cpu": [torch.float64, torch.float32, torch.bfloat16],  # _supports_cpu: no float16
    # the interpreter has no bfloat16
    "triton": [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else []),
}
# q/k size K: both ends (1; the Triton kernels' one K tile of 256) and odd sizes between;
# V: 1, inside one V tile (64 in the interpreter), just past it and over three tiles
QK_SIZES = [1, 7, 16, 33, 256]
V_SIZES = [1, 13, 64, 65, 130]


# NaN at a random element of q, k, v or the bias. Infinite logits (Inf in q or k, -inf bias
# rows) are drawn by test_chunk_attention_infinite_logits_fuzz below (an open question).
NAN_POISONS = [None, None, "nan_q", "nan_k", "nan_v", "nan_b"]
INF_POISONS = ["inf_q", "inf_k", "-inf_b"]


@st.composite
def chunk_problems(draw, backend, poisons=tuple(NAN_POISONS)):
    B = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["chunked"] * 4 + ["single"] * 4 + ["bad_chunk"]))
    if mode == "chunked":  # nc >= 2 blocks of c x c
        c = draw(st.integers(1, 9))
        Lq = Lk = c * draw(st.integers(2, 4))
        chunk = c
    else:
        Lq = draw(st.integers(0, 20))
        Lk = draw(st.integers(0, 20))
        if mode == "bad_chunk":  # a chunk_size that does not divide the length: a ValueError
            Lk = Lq = max(Lq, 3)
            chunk = draw(st.integers(2, Lk - 1).filter(lambda c: Lk % c))
        else:  # one block: no chunking, a chunk not shorter than Lk, or Lq != Lk
            chunk = draw(
                st.sampled_from([-1, 0, Lk, Lk + 1, 2 * Lk + 3] + ([] if Lq == Lk else [1, 2]))
            )
    lq, lk = (chunk, chunk) if mode == "chunked" else (Lq, Lk)
    return dict(
        B=B,
        Lq=Lq,
        Lk=Lk,
        lq=lq,
        lk=lk,
        chunk=chunk,
        bad=mode == "bad_chunk",
        K=draw(st.sampled_from(QK_SIZES)),
        V=draw(st.sampled_from(V_SIZES)),
        dtype=draw(st.sampled_from(CHUNK_DTYPES[backend])),
        causal=draw(st.booleans()),
        form=draw(st.sampled_from(["rel", "dense"])) if lq + lk > 0 else "dense",
        bias_grad=draw(st.booleans()),
        scaling=draw(st.sampled_from([None, None, 0.3, 1.7])),
        pad=draw(st.sampled_from([None, None, "ragged", "random", "row", "all"])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(5)],  # q, k, v, bias, mask
        expand_dims=[draw(st.integers(0, 2)) for _ in range(5)],
        poison=draw(st.sampled_from(poisons)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _key_padding(p, gen):
    """(B, Lk) bool key padding of the drawn form, laid out as drawn; None for no mask."""
    B, Lk, kind = p["B"], p["Lk"], p["pad"]
    if kind is None:
        return None
    if kind == "ragged":
        lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
        pad = torch.arange(Lk)[None] >= lengths[:, None]
    elif kind == "random":
        pad = torch.rand(B, Lk, generator=gen) < 0.3
    elif kind == "row":  # batch row 0 all padding, the others random
        pad = torch.rand(B, Lk, generator=gen) < 0.2
        pad[:1] = True
    else:
        pad = torch.ones(B, Lk, dtype=torch.bool)
    layout = p["layouts"][4]
    if layout == "transposed":
        return pad.T.contiguous().T
    if layout == "strided":
        wide = torch.zeros(B, 2 * Lk, dtype=torch.bool)
        wide[:, ::2] = pad
        return wide[:, ::2]
    if layout == "expanded":  # one row for the whole batch
        return pad[:1].expand(B, Lk) if B else pad
    return pad


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@given(data=st.data())
def test_chunk_attention_fuzz(backend, data):
    check_chunk_attention(backend, data.draw(chunk_problems(backend)))


def check_chunk_attention(backend, p):
    B, Lq, Lk, lq, lk, K, V = (p[n] for n in ("B", "Lq", "Lk", "lq", "lk", "K", "V"))
    gen = torch.Generator().manual_seed(p["seed"])
    device = _device(backend)
    shapes = [(B, Lq, K), (B, Lk, K), (B, Lk, V)]
    shapes.append((lq + lk - 1,) if p["form"] == "rel" else (lq, lk))
    lays, dims = p["layouts"], p["expand_dims"]
    leaves64 = [_leaf(s, lays[i], gen, dims[i]) for i, s in enumerate(shapes)]
    leaves64[3] *= 0.5
    if p["poison"] == "-inf_b":  # a bias row (or a run of the vector) of -inf: an additive mask
        bias = leaves64[3]
        if bias.numel():
            i = int(torch.randint(bias.shape[0], (1,), generator=gen))
            bias[i] = -math.inf
    elif p["poison"] is not None:
        kind, name = p["poison"].split("_")
        poison_(leaves64["qkvb".index(name)], math.nan if kind == "nan" else math.inf, gen)
    kpm = _key_padding(p, gen)
    dout64 = torch.randn(B, Lq, V, generator=gen, dtype=torch.float64)
    kwargs = dict(chunk_size=p["chunk"], causal=p["causal"], scaling=p["scaling"])

    def run(dt, op, dev="cpu"):
        leaves = [t.to(device=dev, dtype=dt) for t in leaves64]
        for i, t in enumerate(leaves):
            t.requires_grad_(i < 3 or p["bias_grad"])
        args = [_view(t, s, lays[i]) for i, (t, s) in enumerate(zip(leaves, shapes, strict=True))]
        mask = None if kpm is None else kpm.to(dev)
        out = op(*args, key_padding_mask=mask, **kwargs)
        return [out, *grads_or_zeros(out, leaves, dout64.to(device=dev, dtype=dt))]

    if p["bad"]:
        with use_backend(backend), pytest.raises(ValueError, match="must divide the length"):
            run(p["dtype"], chunk_attention, device)
        return
    with use_backend(backend):  # the backward too: it selects its backend when it runs
        got = run(p["dtype"], chunk_attention, device)
    oracle = run(torch.float64, chunk_attention_ref)
    ref = run(p["dtype"], chunk_attention_ref)
    assert got[0].shape == (B, Lq, V) and got[0].dtype == p["dtype"]
    names = ["out", "dq", "dk", "dv", "dbias"][: len(got)]
    for name, g, o, r in zip(names, got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=p["poison"] is not None, gradient=name.startswith("d")
        )


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@given(data=st.data())
def test_chunk_attention_infinite_logits_fuzz(backend, data):
    check_chunk_attention(backend, data.draw(chunk_problems(backend, tuple(INF_POISONS))))


# ---------------------------------------------------------------------------------------------
# ema and ema_step

EMA_DTYPES = {"reference": ALL_FLOATS, "cpu": ALL_FLOATS, "cuda": ALL_FLOATS[1:]}
# names of the arguments, in the order of the leaves below
EMA_PARAMS = ["damping", "decay", "expansion", "projection"]


def _ema_params(D, h, regime, lays, dims, gen):
    """float64 leaves (damping, decay, expansion, projection) laid out as drawn. Regimes as in
    tests/ops/test_ema.py: long memory (q ~ 1 - 1e-3), short (q ~ 0.01), spread, or a mix."""
    shapes = [(D, h, 1)] * 3 + [(D, h)]
    leaves = [_leaf(s, lays[i], gen, dims[i]) for i, s in enumerate(shapes)]
    damping, decay, expansion = leaves[:3]
    with torch.no_grad():
        if regime in ("long", "short"):
            centre, spread = (-3.5, 0.3) if regime == "long" else (5.0, 0.5)
            damping.mul_(spread).add_(centre)
            decay.mul_(spread).add_(centre)
        elif regime == "mixed" and damping.numel():
            sel = torch.arange(damping.numel()).view(damping.shape) % 3
            damping.copy_(torch.where(sel == 1, -3.5 + 0.3 * damping, damping))
            damping.copy_(torch.where(sel == 2, 5.0 + 0.5 * damping, damping))
            sel = torch.arange(decay.numel()).view(decay.shape) % 3
            decay.copy_(torch.where(sel == 1, -3.5 + 0.3 * decay, decay))
            decay.copy_(torch.where(sel == 2, 5.0 + 0.5 * decay, decay))
        expansion.mul_(0.3).add_(1.0)
    return leaves, shapes


def _pad_mask(kind, B, L, layout, gen):
    if kind is None:
        return None
    if kind == "ragged":
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
        pad = torch.arange(L)[None] >= lengths[:, None]
    elif kind == "random":
        pad = torch.rand(B, L, generator=gen) < 0.3
    else:
        pad = torch.ones(B, L, dtype=torch.bool)
    if layout == "transposed":
        return pad.T.contiguous().T
    if layout == "expanded" and B:
        return pad[:1].expand(B, L)
    return pad


@st.composite
def ema_problems(draw, backend):
    L = draw(st.integers(0, 40))
    p = dict(
        B=draw(st.integers(0, 3)),
        L=L,
        D=draw(st.sampled_from([0, 1, 2, 5, 17, 70])),
        h=draw(st.sampled_from([1, 2, 3, 4, 16] + ([] if backend == "cuda" else [17]))),
        dtype=draw(st.sampled_from(EMA_DTYPES[backend])),
        param_dtype=draw(st.sampled_from(["x", "x", torch.float32])),
        truncation=draw(st.sampled_from([None, None, 1, 2, max(L - 1, 1), L or 1, L + 3])),
        pad=draw(st.sampled_from([None, None, "ragged", "random", "all"])),
        omega=draw(st.booleans()),
        # entry: the public function (chunk: the backend's choice) or the op stages with a chunk
        chunk=draw(st.sampled_from([None, None, 1, 2, 3, 7, 16, L + 2])),
        regime=draw(st.sampled_from(["mixed", "long", "short", "spread"])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(7)],  # x, params, omega, mask
        expand_dims=[draw(st.integers(0, 2)) for _ in range(7)],
        poison=draw(st.sampled_from([None, None, "nan_x", "inf_x", "nan_p"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if p["poison"] in ("nan_x", "inf_x") and backend == "reference":
        # the reference backend is upstream's FFT convolution: a NaN or Inf in x reaches every
        # output of its channel, also the steps before it (no causal pattern to hold it to)
        p["poison"] = draw(st.sampled_from([None, "nan_p"]))
    if p["poison"] in ("nan_x", "inf_x"):
        # the NaN-pattern oracle is the recurrence, which has no truncation
        p["truncation"] = draw(st.sampled_from([None, L + 3]))
    return p


def _ema_forward(x, params, mask, om, truncation, fft_dtype):
    """The reference backend's forward (`_reference_fwd`), with the FFT in `fft_dtype`."""
    y = ema_ref(x, *params, pad_mask=mask, truncation=truncation, fft_dtype=fft_dtype)
    return y if om is None else (y + x * om).to(x.dtype)


def _ema_scan_forward(x, params, mask, om):
    """The same through the recurrence (float64 oracle when an input holds NaN or Inf)."""
    xm = x if mask is None else x.masked_fill(mask.unsqueeze(-1), 0.0)
    if x.shape[1] == 0:
        y = ema_ref(xm, *params)  # no step: zeros (the scan would stack nothing)
    else:
        y, _ = ema_scan_ref(xm, *params)
    return y if om is None else (y + x * om).to(x.dtype)


@pytest.mark.parametrize("backend", _backends("ema"))
@given(data=st.data())
def test_ema_fuzz(backend, data):
    check_ema(backend, data.draw(ema_problems(backend)))


def check_ema(backend, p):
    B, L, D, h, dtype = p["B"], p["L"], p["D"], p["h"], p["dtype"]
    pdt = dtype if p["param_dtype"] == "x" else p["param_dtype"]
    gen = torch.Generator().manual_seed(p["seed"])
    lays, dims = p["layouts"], p["expand_dims"]
    x_leaf = _leaf((B, L, D), lays[0], gen, dims[0])
    params, pshapes = _ema_params(D, h, p["regime"], lays[1:5], dims[1:5], gen)
    om_leaf = _leaf((D,), lays[5], gen) if p["omega"] else None
    mask = _pad_mask(p["pad"], B, L, lays[6], gen)
    dy64 = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    clean = [x_leaf, *params] + ([om_leaf] if p["omega"] else [])
    leaves64 = [t.clone() for t in clean]
    poison = p["poison"]
    if poison is not None:
        value = math.inf if poison == "inf_x" else math.nan
        target = leaves64[0] if poison != "nan_p" else leaves64[1 + p["seed"] % 4]
        poison_(target, value, gen)
    shapes = [(B, L, D), *pshapes] + ([(D,)] if p["omega"] else [])
    device = _device(backend)
    trunc, chunk = p["truncation"], p["chunk"]

    def run(leaves64, dts, fn, dev="cpu"):
        leaves = [t.to(device=dev, dtype=dt).requires_grad_() for t, dt in zip(leaves64, dts)]
        args = [_view(t, s, lays[i]) for i, (t, s) in enumerate(zip(leaves, shapes, strict=True))]
        om = args[5] if p["omega"] else None
        m = None if mask is None else mask.to(dev)
        y = fn(args[0], args[1:5], m, om)
        return [y, *grads_or_zeros(y, leaves, dy64.to(device=dev, dtype=dts[0]))]

    def kernel(x, prm, m, om):
        if chunk is None:
            return ema(x, *prm, pad_mask=m, truncation=trunc, omega=om)
        return EmaFunction.apply(x, *prm, m, om, trunc or 0, chunk)

    dts = [dtype] + [pdt] * (len(leaves64) - 1)
    with use_backend(backend):
        got = run(leaves64, dts, kernel, device)
    f64 = [torch.float64] * len(leaves64)
    # the reference in x's dtype: upstream's float32 FFT, which is the reference backend itself
    # (documented); the kernels accumulate float64 inputs in float64, held to the float64 FFT
    fft = torch.float64 if dtype == torch.float64 and backend != "reference" else torch.float32
    poisoned_x = poison in ("nan_x", "inf_x")
    if poisoned_x:
        oracle = run(leaves64, f64, _ema_scan_forward)
        ref = run(clean, dts, lambda x, prm, m, om: _ema_forward(x, prm, m, om, None, fft))
    else:
        oracle = run(leaves64, f64, lambda *a: _ema_forward(*a, trunc, torch.float64))
        ref = run(leaves64, dts, lambda *a: _ema_forward(*a, trunc, fft))
    assert got[0].shape == (B, L, D) and got[0].dtype == dtype
    names = ["y", "dx", *(f"d{n}" for n in EMA_PARAMS), "domega"]
    if poison == "inf_x":
        # The parameter gradients sum Inf terms of either sign: whether that gives +-Inf or NaN
        # depends on the order of the sum (the recurrence's autograd sums per step, the kernels
        # sum G and R first), not on the kernel being right. y and dx are held to the rule.
        names = names[:2]
    for name, g, o, r in zip(names, got, oracle, ref):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poison is not None, gradient=name.startswith("d")
        )


@st.composite
def ema_step_problems(draw, backend):
    return dict(
        B=draw(st.integers(0, 3)),
        D=draw(st.sampled_from([0, 1, 2, 5, 17, 70])),
        h=draw(st.sampled_from([1, 2, 3, 16] + ([] if backend == "cuda" else [17]))),
        dtype=draw(st.sampled_from(EMA_DTYPES[backend])),
        param_dtype=draw(st.sampled_from(["x", "x", torch.float32, torch.float64])),
        state=draw(st.sampled_from(["batch", "shared", None])),
        state_dtype=draw(st.sampled_from(["x", "x", torch.float32])),
        omega=draw(st.booleans()),
        regime=draw(st.sampled_from(["mixed", "long", "short", "spread"])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(7)],  # x, params, omega, state
        expand_dims=[draw(st.integers(0, 2)) for _ in range(7)],
        poison=draw(st.sampled_from([None, None, "nan_x", "inf_x", "nan_s", "inf_s", "nan_p"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _step_dtype(*dts):
    out = dts[0]
    for dt in dts[1:]:
        out = torch.promote_types(out, dt)
    return out


@pytest.mark.parametrize("backend", _backends("ema_step"))
@given(data=st.data())
def test_ema_step_fuzz(backend, data):
    check_ema_step(backend, data.draw(ema_step_problems(backend)))


def check_ema_step(backend, p):
    B, D, h, dtype = p["B"], p["D"], p["h"], p["dtype"]
    pdt = dtype if p["param_dtype"] == "x" else p["param_dtype"]
    sdt = dtype if p["state_dtype"] == "x" else p["state_dtype"]
    if backend != "reference" and _step_dtype(dtype, pdt, sdt) not in EMA_DTYPES[backend]:
        pdt = sdt = dtype  # the kernels run the promoted dtype they support (cuda: no float64)
    gen = torch.Generator().manual_seed(p["seed"])
    lays, dims = p["layouts"], p["expand_dims"]
    x_leaf = _leaf((B, D), lays[0], gen, dims[0])
    params, pshapes = _ema_params(D, h, p["regime"], lays[1:5], dims[1:5], gen)
    shapes = [(B, D), *pshapes]
    leaves64, dts = [x_leaf, *params], [dtype] + [pdt] * 4
    if p["omega"]:
        leaves64.append(_leaf((D,), lays[5], gen))
        shapes.append((D,))
        dts.append(pdt)
    if p["state"] is not None:
        sshape = (B, D, h) if p["state"] == "batch" else (D, h)
        leaves64.append(_leaf(sshape, lays[6], gen, dims[6]))
        shapes.append(sshape)
        dts.append(sdt)
    lays = lays[:5] + ([lays[5]] if p["omega"] else []) + [lays[6]]  # one per leaf
    poison = p["poison"]
    if poison == "nan_p":
        poison_(leaves64[1 + p["seed"] % 4], math.nan, gen)
    elif poison is not None and (poison[-1] == "x" or p["state"] is not None):
        value = math.nan if poison.startswith("nan") else math.inf
        poison_(leaves64[0 if poison[-1] == "x" else -1], value, gen)
    else:
        poison = None
    out_dt = _step_dtype(*dts)
    dy64 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    ds64 = torch.randn(B, D, h, generator=gen, dtype=torch.float64)
    # the cpu and cuda step kernels are inference-only (documented): gradients on the reference
    with_grad = backend == "reference"
    device = _device(backend)

    def run(dts, fn, dev="cpu", grad=True):
        leaves = [t.to(device=dev, dtype=dt).requires_grad_(grad) for t, dt in zip(leaves64, dts)]
        args = [_view(t, s, lays[i]) for i, (t, s) in enumerate(zip(leaves, shapes, strict=True))]
        om = args[5] if p["omega"] else None
        state = args[-1] if p["state"] is not None else None
        y, new_state = fn(args[0], state, args[1:5], om)
        if not grad:
            return [y, new_state]
        odt = y.dtype
        both = torch.cat([y.reshape(-1), new_state.reshape(-1)])
        dout = torch.cat([dy64.reshape(-1), ds64.reshape(-1)]).to(device=dev, dtype=odt)
        return [y, new_state, *grads_or_zeros(both, leaves, dout)]

    def kernel(x, state, prm, om):
        return ema_step(x, state, *prm, omega=om)

    def reference(x, state, prm, om):
        y, s = ema_step_ref(x, state, *prm)
        return (y if om is None else (y + x * om).to(y.dtype)), s

    with use_backend(backend):
        if with_grad:
            got = run(dts, kernel, device)
        else:
            with torch.no_grad():
                got = run(dts, kernel, device, grad=False)
    oracle = run([torch.float64] * len(dts), reference, grad=with_grad)
    ref = run(dts, reference, grad=with_grad)
    assert got[0].shape == (B, D) and got[1].shape == (B, D, h)
    assert got[0].dtype == got[1].dtype == out_dt
    names = ["y", "state", "dx", *(f"d{n}" for n in EMA_PARAMS)]
    names += ["domega"] * p["omega"] + ["dstate"] * (p["state"] is not None)
    for name, g, o, r in zip(names[: len(got)], got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poison is not None, gradient=name.startswith("d")
        )
