"""MEGA's multi-head damped EMA: the cpu (C++) and cuda kernels against the float64 oracle.

Forward and every gradient (x, damping, decay, expansion, projection, omega) of the chunked scan
against autograd through `ema_ref` in float64, over chunk lengths that exercise the carries
(1, 3, 4, 7, 16, auto), truncation None / < L / == L / > L, ragged padding, time-major strided
x, odd D and h in {1, 2, 3, 4}; the streaming step against `ema_step_ref`; stepping equals the
full forward; NaN stays visible; bad inputs name the argument; opcheck and torch.compile. The
cuda tier repeats the comparisons on a GPU; on CPU-only machines the CUDA kernels' bodies are
also run by a serial host emulation and must equal the CPU kernels.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch

from seqkern import BackendError, _ext, backends, use_backend
from seqkern.ops.ema import EmaFunction, ema, ema_step
from seqkern.reference.ema import ema_ref, ema_step_ref
from seqkern.testing import assert_close_to_oracle, grads_of, rel_rms_error, upcast

needs_c = pytest.mark.skipif(_ext.C is None, reason=f"seqkern._C not built: {_ext.C_ERROR}")

# (B, L, D, h, truncation, chunk, pad, omega, time_major). chunk 0 = the backend's choice.
CPU_CASES = [
    (1, 1, 8, 2, None, 0, False, True, False),  # L = 1
    (2, 1, 5, 1, 3, 4, True, False, True),  # L = 1, truncation > L
    (3, 23, 17, 4, None, 4, True, True, True),  # L off the chunk, odd D, ragged, time-major
    (2, 30, 16, 2, 7, 3, True, True, False),  # truncation < L, across chunks
    (2, 19, 9, 4, 19, 7, False, True, True),  # truncation == L (no subtraction)
    (1, 40, 33, 1, 100, 1, True, False, False),  # truncation > L, one step per chunk
    (2, 64, 12, 2, 16, 16, True, True, True),  # L a multiple of the chunk, truncation = chunk
    (2, 50, 7, 3, 5, 7, False, True, False),  # h = 3, truncation < chunk
    (2, 25, 6, 2, 13, 4, True, True, True),  # truncation > chunk, not a multiple
    (2, 300, 70, 4, None, 0, True, True, True),  # auto; D past one CPU channel block (64)
    (1, 600, 20, 2, 250, 0, True, True, False),  # auto cuts time (few tiles), truncation
    # long reductions, past 4096: the state carried over L, the parameter gradients summed
    # over B * L (ddamping, ddecay, dexpansion, dprojection, domega)
    (2, 4100, 16, 2, None, 0, True, True, True),
    (1, 4500, 8, 3, 1000, 0, False, True, False),
]
# The cuda tier: speech-sized shapes (MEGA decoder D = 512..1024, h = 4..16) plus odd ones.
CUDA_CASES = [
    (1, 1, 8, 2, None, 0, False, True, False),
    (3, 23, 17, 4, None, 4, True, True, True),
    (2, 30, 16, 2, 7, 3, True, True, False),
    (2, 19, 9, 4, 19, 7, False, True, True),
    (1, 40, 33, 1, 100, 1, True, False, False),
    (2, 50, 7, 3, 5, 7, False, True, False),
    (2, 25, 6, 2, 13, 4, True, True, True),
    (8, 1000, 512, 4, None, 0, True, True, True),
    (4, 777, 1024, 16, 100, 0, True, True, False),
    (2, 513, 258, 8, None, 64, True, True, True),
    (3, 300, 129, 5, 31, 0, False, True, True),
]
CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_ema_inputs(
    B: int,
    L: int,
    D: int,
    h: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    pad: bool = False,
    omega: bool = True,
    time_major: bool = False,
    seed: int = 0,
    requires_grad: bool = True,
):
    """Fresh random (x, [damping, decay, expansion, projection], omega, pad_mask, dy).

    A third of the (d, n) pairs have q near 1 (long memory, ~1 - 1e-3), a third near 0 (~0.01),
    the rest spread in between; expansion is upstream's alternating +-1 plus noise. x is a
    time-major (L, B, D) buffer seen as (B, L, D) when `time_major` (what MEGA passes).
    pad_mask: ragged lengths plus one padded step inside a sequence.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    regime = (torch.arange(D * h) % 3).view(D, h, 1)
    damping, decay = rand(D, h, 1), rand(D, h, 1)
    damping = torch.where(regime == 1, -3.5 + 0.3 * damping, damping)
    decay = torch.where(regime == 1, -3.5 + 0.3 * decay, decay)
    damping = torch.where(regime == 2, 5.0 + 0.5 * damping, damping)
    decay = torch.where(regime == 2, 5.0 + 0.5 * decay, decay)
    signs = torch.ones(h, 1, dtype=torch.float64)
    signs[1::2] = -1.0
    expansion = 0.3 * rand(D, h, 1) + signs
    projection = rand(D, h)
    om = rand(D) if omega else None
    x = rand(L, B, D).transpose(0, 1) if time_major else rand(B, L, D)
    dy = rand(B, L, D)
    mask = None
    if pad:
        lengths = torch.randint(1, L + 1, (B,), generator=gen)
        lengths[0] = L
        mask = torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)
        if L > 2:
            mask[0, L // 2] = True  # every pad id counts, mid-sequence too (upstream)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    x = x.to(device=device, dtype=dtype)  # keeps the time-major strides
    params = [cast(t) for t in (damping, decay, expansion, projection)]
    om = cast(om)
    for t in [x, *params, om]:
        if t is not None:
            t.requires_grad_(requires_grad)
    mask = None if mask is None else mask.to(device)
    return x, params, om, mask, cast(dy)


def _ref_forward(x, params, om, mask, truncation, fft_dtype):
    y = ema_ref(x, *params, pad_mask=mask, truncation=truncation, fft_dtype=fft_dtype)
    return y if om is None else y + x * om


def _leaves(x, params, om):
    return [x, *params] + ([om] if om is not None else [])


def _check_against_oracle(backend, dtype, case, device):
    B, L, D, h, trunc, chunk, pad, omega, time_major = case
    x, params, om, mask, dy = make_ema_inputs(
        B,
        L,
        D,
        h,
        dtype=dtype,
        device=device,
        pad=pad,
        omega=omega,
        time_major=time_major,
        seed=B * 1000 + L * 10 + D,
    )
    assert x.is_contiguous() != time_major or L == 1 or B == 1
    with use_backend(backend):
        if chunk == 0:
            y = ema(x, *params, pad_mask=mask, truncation=trunc, omega=om)
        else:
            y = EmaFunction.apply(x, *params, mask, om, trunc or 0, chunk)
        got = (y, *grads_of(y, _leaves(x, params, om), dy))

    inputs64 = upcast(_leaves(x, params, om))
    om64 = inputs64[5] if omega else None
    y64 = _ref_forward(inputs64[0], inputs64[1:5], om64, mask, trunc, torch.float64)
    oracle = (y64, *grads_of(y64, inputs64, dy.to(torch.float64)))
    inputs_dt = upcast(_leaves(x, params, om), dtype)
    om_dt = inputs_dt[5] if omega else None
    fft = torch.float64 if dtype == torch.float64 else torch.float32
    y_dt = _ref_forward(inputs_dt[0], inputs_dt[1:5], om_dt, mask, trunc, fft)
    ref = (y_dt, *grads_of(y_dt, inputs_dt, dy))

    names = ["y", "dx", "ddamping", "ddecay", "dexpansion", "dprojection", "domega"]
    for name, g, o, r in zip(names, got, oracle, ref):
        assert g.dtype == dtype and g.shape == o.shape, name
        assert_close_to_oracle(g, o, r, name=f"{backend} {name}")


def _case_id(device, dtype, case):
    B, L, D, h, trunc, chunk, pad, omega, tm = case
    return (
        f"{device}-{str(dtype)[6:]}-B{B}L{L}D{D}h{h}-t{trunc}-c{chunk or 'auto'}"
        f"{'-pad' if pad else ''}{'-omega' if omega else ''}{'-tm' if tm else ''}"
    )


def _cases():
    for device, cases, dtypes in (
        ("cpu", CPU_CASES, CPU_DTYPES),
        ("cuda", CUDA_CASES, CUDA_DTYPES),
    ):
        marks = [pytest.mark.cuda] if device == "cuda" else [needs_c]
        for dtype in dtypes:
            for case in cases:
                yield pytest.param(
                    device, dtype, case, id=_case_id(device, dtype, case), marks=marks
                )


@pytest.mark.parametrize("device,dtype,case", list(_cases()))
def test_ema_matches_oracle(device, dtype, case):
    _check_against_oracle(device, dtype, case, device)


@needs_c
@pytest.mark.parametrize("chunk", [0, 64, 333])
def test_ema_long_sequence_relative_rms(chunk):
    # 4000 steps with q up to ~1 - 1e-3: the carries compose over many chunks, and the sums
    # over time are long. Relative RMS against the oracle, at most 2x the fp32 reference's
    # (upstream's FFT; both round q = 1 - p * delta to fp32, which dominates).
    x, params, om, mask, dy = make_ema_inputs(2, 4000, 24, 2, pad=True, seed=7)
    leaves = _leaves(x, params, om)
    with use_backend("cpu"):
        y = EmaFunction.apply(x, *params, mask, om, 0, chunk)
        got = (y, *grads_of(y, leaves, dy))
    inputs64 = upcast(leaves)
    y64 = _ref_forward(inputs64[0], inputs64[1:5], inputs64[5], mask, None, torch.float64)
    oracle = (y64, *grads_of(y64, inputs64, dy.to(torch.float64)))
    inputs32 = upcast(leaves, torch.float32)
    y32 = _ref_forward(inputs32[0], inputs32[1:5], inputs32[5], mask, None, torch.float32)
    ref = (y32, *grads_of(y32, inputs32, dy))
    for name, g, o, r in zip(["y", "dx", "dd", "dc", "de", "dp", "do"], got, oracle, ref):
        err, ref_err = rel_rms_error(g, o), rel_rms_error(r, o)
        assert err <= 2 * ref_err + 2e-7, f"{name}: {err:.2e} vs reference {ref_err:.2e}"


# ---------------------------------------------------------------------------------------------
# The step


def _step_cases():
    for device, dtypes in (("cpu", CPU_DTYPES), ("cuda", CUDA_DTYPES)):
        marks = [pytest.mark.cuda] if device == "cuda" else [needs_c]
        for dtype in dtypes:
            for state_kind in ("batch", "shared", "none"):
                for omega in (False, True):
                    yield pytest.param(
                        device,
                        dtype,
                        state_kind,
                        omega,
                        id=f"{device}-{str(dtype)[6:]}-{state_kind}{'-omega' if omega else ''}",
                        marks=marks,
                    )


def _step_state(kind, B, D, h, dtype, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    shape = (B, D, h) if kind == "batch" else (D, h)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _step_ref(x, state, params, om):
    y, s = ema_step_ref(x, state, *params)
    return (y if om is None else y + x * om), s


@pytest.mark.parametrize("device,dtype,state_kind,omega", list(_step_cases()))
def test_ema_step_matches_oracle(device, dtype, state_kind, omega):
    B, D, h = 3, 13, 4
    x, params, om, _, _ = make_ema_inputs(
        B, 1, D, h, dtype=dtype, device=device, omega=omega, requires_grad=False, seed=11
    )
    x = x[:, 0]
    state = _step_state(state_kind, B, D, h, dtype, device)
    with use_backend(device):
        y, new_state = ema_step(x, state, *params, omega=om)

    def run(dt):
        up = [None if t is None else t.to(dt) for t in (x, state, om, *params)]
        return _step_ref(up[0], up[1], up[3:], up[2])

    for name, g, o, r in zip(("y", "state"), (y, new_state), run(torch.float64), run(dtype)):
        assert g.dtype == dtype and g.shape == o.shape, name
        assert_close_to_oracle(g, o, r, name=f"{device} step {name}")


@needs_c
def test_ema_step_promotes_like_the_reference():
    # fp16 x with fp32 parameters and state: outputs in fp32, as ema_step_ref gives.
    x, params, om, _, _ = make_ema_inputs(2, 1, 6, 2, requires_grad=False)
    state = _step_state("batch", 2, 6, 2, torch.float32, "cpu")
    x16 = x[:, 0].half()
    with use_backend("cpu"):
        y, s = ema_step(x16, state, *params, omega=om)
    want_y, want_s = _step_ref(x16, state, params, om)
    assert y.dtype == want_y.dtype == torch.float32 and s.dtype == want_s.dtype
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.float64, marks=needs_c),
        pytest.param("cpu", torch.float32, marks=needs_c),
        pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
    ],
)
def test_stepping_equals_full_forward(device, dtype):
    B, L, D, h = 2, 37, 11, 3
    x, params, om, _, _ = make_ema_inputs(
        B, L, D, h, dtype=dtype, device=device, requires_grad=False, seed=5
    )
    with use_backend(device):
        full = ema(x, *params, omega=om)
        state, ys = None, []
        for t in range(L):
            y, state = ema_step(x[:, t], state, *params, omega=om)
            ys.append(y)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert rel_rms_error(torch.stack(ys, 1), full) < tol


@needs_c
def test_step_kernel_is_inference_only():
    x, params, om, _, _ = make_ema_inputs(2, 1, 6, 2, seed=2)  # requires grad
    x = x[:, 0]
    state = _step_state("batch", 2, 6, 2, torch.float32, "cpu")
    with use_backend("cpu"), pytest.raises(BackendError, match="inference-only"):
        ema_step(x, state, *params, omega=om)
    # Auto: the reference runs, and the gradient is the reference's.
    assert backends.select("ema_step", x, state, *params, om).backend == "reference"
    y, s = ema_step(x, state, *params, omega=om)
    one = torch.tensor(1.0)
    g = grads_of(y.sum() + s.sum(), [x, *params, om], one)
    y_r, s_r = _step_ref(x, state, params, om)
    g_r = grads_of(y_r.sum() + s_r.sum(), [x, *params, om], one)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert backends.select("ema_step", x, state, *params, om).backend == "cpu"


# ---------------------------------------------------------------------------------------------
# NaN, empty, backend selection


@needs_c
@pytest.mark.parametrize("truncation", [None, 3])
@pytest.mark.parametrize("omega", [False, True])
def test_ema_nan_stays_visible(truncation, omega):
    B, L, D, h = 2, 12, 5, 2
    x, params, om, _, _ = make_ema_inputs(B, L, D, h, omega=omega, requires_grad=False)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 6] = True
    x[1, 4, 3] = float("nan")  # a real step: NaN from there on in that channel
    x[0, 6, 1] = float("nan")  # a padded step: zeroed for the EMA; only x * omega sees it
    x[0, 6, 2] = float("inf")
    with use_backend("cpu"):
        y = EmaFunction.apply(x, *params, mask, om, truncation or 0, 3)
    want = torch.zeros(B, L, D, dtype=torch.bool)
    want[1, 4:, 3] = True
    if omega:
        want[0, 6, 1] = True
    got = torch.isnan(y)
    if truncation is not None:
        # Past the window the recurrence keeps the NaN (the subtraction cannot remove it):
        # still visible, never hidden.
        later = torch.zeros_like(want)
        later[1, 4 + truncation :, 3] = True
        got = got & ~later
        want = want & ~later
    assert torch.equal(got, want), "NaN hidden or leaked"
    inf = torch.isinf(y)
    assert bool(inf[0, 6, 2]) == omega and int(inf.sum()) == int(omega)


@needs_c
def test_ema_empty():
    for B, L, D in ((2, 0, 4), (0, 5, 4), (2, 5, 0)):
        x, params, om, _, _ = make_ema_inputs(B, L, D, 2)
        with use_backend("cpu"):
            y = ema(x, *params, omega=om)
            assert y.shape == (B, L, D)
            grads = torch.autograd.grad(y.sum(), [x, *params, om])
        for g, t in zip(grads, [x, *params, om]):
            assert g.shape == t.shape and not g.any()


@needs_c
def test_auto_selection_and_the_reference_stays_the_oracle(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    x, params, om, _, _ = make_ema_inputs(2, 9, 6, 2, requires_grad=False)
    assert backends.select("ema", x, params[0]).backend == "cpu"
    assert backends.select("ema_step", x[:, 0], None, *params, om).backend == "cpu"
    with use_backend("reference"):
        assert backends.select("ema", x, params[0]).fwd is ema_ref
        torch.testing.assert_close(ema(x, *params), ema_ref(x, *params), rtol=0, atol=0)
        # the reference stays plain autograd: second derivatives work
        xg = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(ema(xg, *params, omega=om).pow(2).sum(), xg, create_graph=True)
        g.sum().backward()


def test_explicit_cuda_without_a_gpu_names_the_reason():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    x, params, om, _, _ = make_ema_inputs(2, 5, 4, 2)
    with use_backend("cuda"), pytest.raises(BackendError, match="cuda:"):
        ema(x, *params)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _good(B=2, L=5, D=4, h=2):
    x, params, om, _, _ = make_ema_inputs(B, L, D, h, requires_grad=False)
    return x, params, om


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(x=a["x"][0]), "x must be a"),
        (lambda a: a.update(x=a["x"].long()), "x must be floating point"),
        (lambda a: a.update(damping=a["damping"][:, :1]), "damping must be"),
        (lambda a: a.update(decay=a["decay"].int()), "decay must be floating point"),
        (lambda a: a.update(projection=a["projection"][:3]), "projection must be"),
        (lambda a: a.update(pad_mask=torch.zeros(2, 5)), "pad_mask must be a bool"),
        (lambda a: a.update(pad_mask=torch.zeros(2, 4, dtype=torch.bool)), "pad_mask must be"),
        (lambda a: a.update(omega=torch.ones(3)), "omega must be"),
        (lambda a: a.update(truncation=0), "truncation must be"),
        (lambda a: a.update(expansion=a["expansion"].to("meta")), "expansion must be on"),
        (
            lambda a: a.update(pad_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta")),
            "pad_mask must be on",
        ),
        (lambda a: a.update(omega=torch.ones(4, device="meta")), "omega must be on"),
    ],
)
def test_ema_bad_input_names_the_argument(mutate, match):
    x, params, om = _good()
    args = dict(
        x=x,
        damping=params[0],
        decay=params[1],
        expansion=params[2],
        projection=params[3],
        pad_mask=None,
        truncation=None,
        omega=om,
    )
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ema(**args)


def test_ema_step_bad_input_names_the_argument():
    x, params, om = _good()
    x = x[:, 0]
    with pytest.raises(ValueError, match="x must be a"):
        ema_step(x[0], None, *params)
    with pytest.raises(ValueError, match="state must be"):
        ema_step(x, torch.zeros(4, 3), *params)
    with pytest.raises(ValueError, match="state must be on"):
        ema_step(x, torch.zeros(4, 2, device="meta"), *params)
    with pytest.raises(ValueError, match="omega must be"):
        ema_step(x, None, *params, omega=torch.ones(5))
    with pytest.raises(ValueError, match="projection must be"):
        ema_step(x, None, *params[:3], params[3].T)


@needs_c
def test_ema_cpp_glue_checks_its_own_inputs():
    x, (d, c, e, p), om = _good()
    C = _ext.C
    with pytest.raises(RuntimeError, match="damping must have shape"):
        C.ema_fwd_cpu(x, d[:, :1], c, e, p, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="pad_mask must have dtype"):
        C.ema_fwd_cpu(x, d, c, e, p, torch.zeros(2, 5), None, 0, 0)
    with pytest.raises(RuntimeError, match="omega must have shape"):
        C.ema_fwd_cpu(x, d, c, e, p, None, torch.ones(3), 0, 0)
    with pytest.raises(RuntimeError, match="truncation must be"):
        C.ema_fwd_cpu(x, d, c, e, p, None, None, -1, 0)
    with pytest.raises(RuntimeError, match="chunk must be"):
        C.ema_fwd_cpu(x, d, c, e, p, None, None, 0, -2)
    with pytest.raises(RuntimeError, match="x must be float32"):
        C.ema_fwd_cpu(x.int(), d, c, e, p, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="dy must have the shape"):
        C.ema_bwd_cpu(x[:, :2], x, d, c, e, p, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="state must have x's dtype"):
        C.ema_step_cpu(x[:, 0], torch.zeros(2, 4, 2, dtype=torch.float64), d, c, e, p, None)
    with pytest.raises(RuntimeError, match="state must be"):
        C.ema_step_cpu(x[:, 0], torch.zeros(3, 4, 2), d, c, e, p, None)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_c), "reference"])
def test_ema_opcheck(backend):
    x, params, om, mask, dy = make_ema_inputs(
        2, 9, 6, 2, pad=True, time_major=True, requires_grad=False
    )
    state = _step_state("batch", 2, 6, 2, torch.float32, "cpu")
    with use_backend(backend):
        for m, o, trunc, chunk in ((None, None, 0, 0), (mask, om, 4, 3)):
            torch.library.opcheck(
                torch.ops.seqkern.ema_fwd.default, (x, *params, m, o, trunc, chunk)
            )
            torch.library.opcheck(
                torch.ops.seqkern.ema_bwd.default, (dy, x, *params, m, o, trunc, chunk)
            )
        for s in (None, state, state[0]):
            torch.library.opcheck(torch.ops.seqkern.ema_step.default, (x[:, 0], s, *params, om))


@needs_c
def test_ema_torch_compile_fullgraph():
    x, params, om, mask, dy = make_ema_inputs(2, 11, 8, 2, pad=True, time_major=True)

    def block(x, mask, damping, decay, expansion, projection, om):
        params = (damping, decay, expansion, projection)
        return ema(x * 2.0, *params, pad_mask=mask, truncation=5, omega=om).relu()

    compiled = torch.compile(block, fullgraph=True)
    leaves = _leaves(x, params, om)
    # One compiled graph; the op picks the backend at run time.
    for backend in ("cpu", "reference"):
        with use_backend(backend):
            y = compiled(x, mask, *params, om)
            got = grads_of(y, leaves, dy)
            y_eager = block(x, mask, *params, om)
            want = grads_of(y_eager, leaves, dy)
        torch.testing.assert_close(y, y_eager)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

    step = torch.compile(
        lambda x, s: ema_step(x, s, *[p.detach() for p in params], omega=om.detach()),
        fullgraph=True,
    )
    x0 = x[:, 0].detach()
    state = _step_state("batch", 2, 8, 2, torch.float32, "cpu")
    with use_backend("cpu"):
        y, s = step(x0, state)
        y_e, s_e = ema_step(x0, state, *[p.detach() for p in params], omega=om.detach())
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(s, s_e)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(2, 17, 5, 3, None, True), (3, 12, 4, 2, 5, False)])
def test_reference_bwd_stage_matches_autograd(dtype, case):
    # Inside the op the reference's backward is written out (an op may run below autograd);
    # it must be what autograd through ema_ref gives.
    B, L, D, h, trunc, omega = case
    x, params, om, mask, dy = make_ema_inputs(
        B, L, D, h, dtype=dtype, pad=True, omega=omega, time_major=True
    )
    with use_backend("reference"):
        got = torch.ops.seqkern.ema_bwd(dy, x, *params, mask, om, trunc or 0, 0)
    inputs64 = upcast(_leaves(x, params, om))
    y64 = _ref_forward(
        inputs64[0], inputs64[1:5], inputs64[5] if omega else None, mask, trunc, torch.float64
    )
    oracle = grads_of(y64, inputs64, dy.to(torch.float64))
    inputs_dt = upcast(_leaves(x, params, om), dtype)
    y_dt = _ref_forward(
        inputs_dt[0], inputs_dt[1:5], inputs_dt[5] if omega else None, mask, trunc, torch.float32
    )
    ref = grads_of(y_dt, inputs_dt, dy)
    names = ["dx", "ddamping", "ddecay", "dexpansion", "dprojection", "domega"]
    for name, g, o, r in zip(names, got, oracle, ref):
        assert g.shape == o.shape, name
        assert_close_to_oracle(g.to(r.dtype), o, r, name=f"reference stage {name}")
    assert got[-1].numel() == (D if omega else 0)


@pytest.mark.cuda
def test_cuda_declines_too_many_heads_and_the_op_falls_back():
    x, params, om, _, _ = make_ema_inputs(2, 9, 6, 17, device="cuda", requires_grad=False)
    with use_backend("cuda"), pytest.raises(BackendError, match="h = 17"):
        ema(x, *params, omega=om)
    assert backends.select("ema", x, params[0]).backend == "reference"


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x, params, om, mask, dy = make_ema_inputs(
        2, 40, 10, 4, device="cuda", pad=True, time_major=True, requires_grad=False
    )
    with use_backend("cuda"):
        for m, o, trunc, chunk in ((None, None, 0, 0), (mask, om, 7, 8)):
            torch.library.opcheck(
                torch.ops.seqkern.ema_fwd.default, (x, *params, m, o, trunc, chunk)
            )
            torch.library.opcheck(
                torch.ops.seqkern.ema_bwd.default, (dy, x, *params, m, o, trunc, chunk)
            )
        torch.library.opcheck(torch.ops.seqkern.ema_step.default, (x[:, 0], None, *params, om))
        xg = x.detach().requires_grad_()
        f = torch.compile(lambda x: ema(x, *params, pad_mask=mask, omega=om).relu(), fullgraph=True)
        y = f(xg)
        (g,) = torch.autograd.grad(y, xg, dy)
        y_e = ema(xg, *params, pad_mask=mask, omega=om).relu()
        (g_e,) = torch.autograd.grad(y_e, xg, dy)
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(g, g_e)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels, emulated on the host. They use no shared memory and no synchronisation, so
# running every thread of every block one after another on the CPU is a faithful execution of
# their arithmetic and indexing (tiles, chunk carries, partial-sum slots, VEC = 2, phase order),
# on every CPU run. Compiling them for the host takes ~20 s on 2 cores
# (SEQKERN_SKIP_CUDA_EMULATION=1 skips it).


def _emulation_unavailable() -> str | None:
    if os.environ.get("SEQKERN_SKIP_CUDA_EMULATION") == "1":
        return "SEQKERN_SKIP_CUDA_EMULATION=1"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "no ninja (torch.utils.cpp_extension needs it)"
    return None


_EMU_STUB = r"""
// Host stand-in for csrc/include/sk_cuda.cuh: runs the CUDA kernels' bodies serially on the CPU.
#pragma once
#include <cmath>
#include <cstdint>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 blockIdx, threadIdx, blockDim;
namespace seqkern {
template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
}  // namespace seqkern
"""

_EMU_CPP = r"""
// Serial host emulation of csrc/ema/ema_kernel.cuh, launched as csrc/ema/ema.cu does (the
// launcher's choices restated: H = the next power of two >= h; VEC = 2 when aligned, H <= 4).
#include <torch/extension.h>

#include <optional>

#include "ema/ema_kernel.cuh"

using namespace seqkern::ema;
using OptT = std::optional<at::Tensor>;

template <typename F>
void launch(int64_t blocks, int threads, F&& f) {
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (int t = 0; t < threads; ++t) {
      threadIdx.x = t;
      f();
    }
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int H, typename F>
void tiled(bool vec2, F&& f) {
  using two = std::integral_constant<int, 2>;
  using one = std::integral_constant<int, 1>;
  if constexpr (H <= 4) {
    if (vec2) return f(std::integral_constant<int, H>{}, two{});
  }
  f(std::integral_constant<int, H>{}, one{});
}

template <typename F>
void with_tiling(int64_t h, bool vec2, F&& f) {
  if (h <= 1) return tiled<1>(vec2, f);
  if (h <= 2) return tiled<2>(vec2, f);
  if (h <= 4) return tiled<4>(vec2, f);
  if (h <= 8) return tiled<8>(vec2, f);
  tiled<16>(vec2, f);
}

template <typename T>
bool rows_vec2(const void* p, int64_t sb, int64_t st, int64_t B, int64_t L) {
  return reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0 && (B == 1 || sb % 2 == 0) &&
         (L == 1 || st % 2 == 0);
}

const float* fp(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* mp(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
const bool* bp(const at::Tensor& t) { return t.defined() ? t.data_ptr<bool>() : nullptr; }
at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }
at::Tensor nans(at::IntArrayRef shape, const at::Tensor& like) {
  return at::full(shape, NAN, like.options().dtype(at::kFloat));  // unwritten slots show
}

template <typename T>
at::Tensor fwd_t(at::Tensor x, std::vector<at::Tensor> w, at::Tensor pad, at::Tensor om,
                 int64_t trunc_len, int64_t chunk, bool allow_vec) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), h = w[3].size(1);
  at::Tensor y = at::empty_like(x);
  const int64_t NC = cdiv(L, chunk);
  at::Tensor carry = nans({B, NC, h, D}, x);
  FwdParams p{x.data_ptr(), x.stride(0), x.stride(1), y.data_ptr(), y.stride(0), y.stride(1),
              bp(pad), fp(w[0]), fp(w[1]), fp(w[2]), fp(w[3]), fp(om), mp(carry),
              B, L, D, h, trunc_len, chunk};
  const bool vec2 = allow_vec && D % 2 == 0 && rows_vec2<T>(p.x, x.stride(0), x.stride(1), B, L) &&
                    rows_vec2<T>(p.y, y.stride(0), y.stride(1), B, L);
  with_tiling(h, vec2, [&](auto hh, auto vv) {
    constexpr int HH = decltype(hh)::value, VV = decltype(vv)::value;
    const int64_t nb = cdiv(D, static_cast<int64_t>(kThreads) * VV), tiles = B * NC * nb;
    if (NC > 1) {
      launch(tiles, kThreads, [&] { ema_fwd_kernel<T, HH, VV, false>(p, NC, nb); });
      launch(cdiv(B * h * D, kCarryThreads), kCarryThreads, [&] { ema_fwd_carry_kernel(p, NC); });
    }
    launch(tiles, kThreads, [&] { ema_fwd_kernel<T, HH, VV, true>(p, NC, nb); });
  });
  return y;
}

template <typename T>
std::vector<at::Tensor> bwd_t(at::Tensor dy, at::Tensor x, std::vector<at::Tensor> w,
                              at::Tensor pad, at::Tensor om, int64_t trunc_len, int64_t chunk,
                              bool allow_vec) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), h = w[3].size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t NC = cdiv(L, chunk);
  at::Tensor cz = nans({B, NC, h, D}, x), czr = nans({B, NC, h, D}, x);
  at::Tensor pg = nans({B * NC, h, D}, x), pr = nans({B * NC, h, D}, x);
  at::Tensor pom = om.defined() ? nans({B * NC, D}, x) : at::Tensor();
  std::vector<at::Tensor> g;
  for (int i = 0; i < 4; ++i) g.push_back(nans({D, h}, x));
  at::Tensor gom = om.defined() ? nans({D}, x) : at::zeros({0}, x.options().dtype(at::kFloat));
  BwdParams p{dy.data_ptr(), dy.stride(0), dy.stride(1), x.data_ptr(), x.stride(0), x.stride(1),
              dx.data_ptr(), dx.stride(0), dx.stride(1), bp(pad), fp(w[0]), fp(w[1]), fp(w[2]),
              fp(w[3]), fp(om), mp(cz), mp(czr), mp(pg), mp(pr), mp(pom), mp(g[0]), mp(g[1]),
              mp(g[2]), mp(g[3]), om.defined() ? mp(gom) : nullptr, B, L, D, h, trunc_len, chunk};
  const bool vec2 = allow_vec && D % 2 == 0 &&
                    rows_vec2<T>(p.dy, dy.stride(0), dy.stride(1), B, L) &&
                    rows_vec2<T>(p.x, x.stride(0), x.stride(1), B, L) &&
                    rows_vec2<T>(p.dx, dx.stride(0), dx.stride(1), B, L);
  with_tiling(h, vec2, [&](auto hh, auto vv) {
    constexpr int HH = decltype(hh)::value, VV = decltype(vv)::value;
    const int64_t nb = cdiv(D, static_cast<int64_t>(kThreads) * VV), tiles = B * NC * nb;
    if (NC > 1) {
      launch(tiles, kThreads, [&] { ema_bwd_kernel<T, HH, VV, false>(p, NC, nb); });
      launch(cdiv(B * h * D, kCarryThreads), kCarryThreads, [&] { ema_bwd_carry_kernel(p, NC); });
    }
    launch(tiles, kThreads, [&] { ema_bwd_kernel<T, HH, VV, true>(p, NC, nb); });
  });
  launch(cdiv(h * D, kCarryThreads), kCarryThreads, [&] { ema_bwd_reduce_kernel(p, B * NC); });
  return {dx, g[0].view({D, h, 1}), g[1].view({D, h, 1}), g[2].view({D, h, 1}), g[3], gom};
}

template <typename T>
std::vector<at::Tensor> step_t(at::Tensor x, at::Tensor st, std::vector<at::Tensor> w,
                               at::Tensor om) {
  const int64_t B = x.size(0), D = x.size(1), h = w[3].size(1);
  at::Tensor y = at::empty({B, D}, x.options()), ns = at::empty({B, D, h}, x.options());
  StepParams p{x.data_ptr(), st.defined() ? st.data_ptr() : nullptr,
               st.defined() && st.dim() == 3 ? D * h : 0, y.data_ptr(), ns.data_ptr(),
               fp(w[0]), fp(w[1]), fp(w[2]), fp(w[3]), fp(om), B, D, h};
  launch(cdiv(B * D, kCarryThreads), kCarryThreads, [&] { ema_step_kernel<T>(p); });
  return {y, ns};
}

#define EMU_DISPATCH(x, fn, ...)                                    \
  ((x).scalar_type() == at::kFloat  ? fn<float>(__VA_ARGS__)        \
   : (x).scalar_type() == at::kHalf ? fn<at::Half>(__VA_ARGS__)     \
                                    : fn<at::BFloat16>(__VA_ARGS__))

// w: damping, decay, expansion, projection as (D, h) fp32; truncation as trunc_len (Lk or 0).
at::Tensor emu_fwd(at::Tensor x, std::vector<at::Tensor> w, OptT pad, OptT om, int64_t trunc_len,
                   int64_t chunk, bool allow_vec) {
  return EMU_DISPATCH(x, fwd_t, x, w, opt(pad), opt(om), trunc_len, chunk, allow_vec);
}

std::vector<at::Tensor> emu_bwd(at::Tensor dy, at::Tensor x, std::vector<at::Tensor> w, OptT pad,
                                OptT om, int64_t trunc_len, int64_t chunk, bool allow_vec) {
  return EMU_DISPATCH(x, bwd_t, dy, x, w, opt(pad), opt(om), trunc_len, chunk, allow_vec);
}

std::vector<at::Tensor> emu_step(at::Tensor x, OptT st, std::vector<at::Tensor> w, OptT om) {
  return EMU_DISPATCH(x, step_t, x, opt(st), w, opt(om));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &emu_fwd);
  m.def("bwd", &emu_bwd);
  m.def("step", &emu_step);
}
"""


@needs_c
@pytest.mark.slow
def test_cuda_kernels_emulated_on_the_host_equal_the_cpu_kernels(tmp_path):
    import torch.utils.cpp_extension as cpp_ext

    why = _emulation_unavailable()
    if why is not None:
        pytest.skip(why)

    root = Path(__file__).resolve().parents[2] / "csrc"
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "sk_cuda.cuh").write_text(_EMU_STUB)
    (tmp_path / "emu.cpp").write_text(_EMU_CPP)
    emu = cpp_ext.load(
        "seqkern_ema_emulation",
        [str(tmp_path / "emu.cpp")],
        extra_include_paths=[str(tmp_path / "stub"), str(root), str(root / "include")],
        extra_cflags=["-O1", "-Wno-unknown-pragmas"],
        build_directory=str(tmp_path),
    )
    cases = [
        (2, 23, 17, 4, None, 4),
        (3, 300, 258, 3, 31, 64),
        (1, 40, 33, 1, 100, 1),
        (2, 50, 7, 5, 5, 7),
        (2, 129, 300, 16, None, 50),
        (1, 77, 256, 8, 9, 10),
        (2, 1, 10, 9, None, 1),
    ]
    seed = 0
    for (B, L, D, h, trunc, chunk), dtype, vec in itertools.product(
        cases, CUDA_DTYPES, (True, False)
    ):
        seed += 1
        x, params, om, mask, dy = make_ema_inputs(
            B,
            L,
            D,
            h,
            dtype=dtype,
            pad=seed % 3 != 0,
            omega=seed % 4 != 0,
            time_major=seed % 2 == 0,
            requires_grad=False,
            seed=seed,
        )
        p32 = [t.float().reshape(D, h).contiguous() for t in params]
        om32 = None if om is None else om.float()
        lk = trunc if trunc is not None and trunc < L else 0
        got = [emu.fwd(x, p32, mask, om32, lk, min(chunk, L), vec)]
        got += emu.bwd(dy, x, p32, mask, om32, lk, min(chunk, L), vec)
        want = [_ext.C.ema_fwd_cpu(x, *params, mask, om, trunc or 0, chunk)]
        want += _ext.C.ema_bwd_cpu(dy, x, *params, mask, om, trunc or 0, chunk)
        for g, w in zip(got, want):
            # The workspaces and outputs start as NaN: an unwritten slot would show.
            assert not torch.isnan(g).any()
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6, atol=1e-6)
    for dtype, kind in itertools.product(CUDA_DTYPES, ("batch", "shared", "none")):
        x, params, om, _, _ = make_ema_inputs(3, 1, 13, 5, dtype=dtype, requires_grad=False)
        x = x[:, 0].contiguous()
        state = _step_state(kind, 3, 13, 5, dtype, "cpu")
        p32 = [t.float().reshape(13, 5).contiguous() for t in params]
        got = emu.step(x, state, p32, om.float())
        want = _ext.C.ema_step_cpu(x, state, *params, om)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Regressions found by tests/fuzz/test_fuzz_chunk_ema.py


@pytest.mark.parametrize("entry", ["ema", "op"])
@pytest.mark.parametrize("B,L", [(2, 0), (0, 5), (0, 0)])
def test_ema_empty_on_the_reference_backend(B, L, entry):
    # ema_ref ran an FFT of length 0 (L = 0) or over no batch row (B = 0) and raised; the op
    # stages too. Now zeros and zero gradients, as the cpu kernels give, also for a NaN
    # parameter (an empty sum).
    x, params, om, _, _ = make_ema_inputs(2, 5, 4, 2)
    x = x.detach()[:B, :L].requires_grad_()
    with torch.no_grad():
        params[0][1, 0, 0] = float("nan")
    with use_backend("reference"):
        if entry == "ema":
            y = ema(x, *params, omega=om)
        else:
            y = EmaFunction.apply(x, *params, None, om, 0, 0)
        grads = torch.autograd.grad(y.sum(), [x, *params, om])
    assert y.shape == (B, L, 4) and not y.any()
    for g, t in zip(grads, [x, *params, om]):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize(
    "x_dtype,param_dtype,state_dtype",
    [
        (torch.float64, torch.float32, torch.float64),
        (torch.float32, torch.float16, None),
        (torch.float16, torch.float16, torch.float32),
    ],
    ids=str,
)
def test_ema_step_reference_promotes_mixed_dtypes(x_dtype, param_dtype, state_dtype):
    # ema_step_ref's einsum met a state of the promoted dtype and a projection of another and
    # raised ("expected scalar type Double but found Float"); the documented result is the
    # promoted dtype of x, the parameters and the state.
    B, D, h = 3, 5, 2
    x, params, om, _, _ = make_ema_inputs(B, 1, D, h, requires_grad=False, seed=4)
    x = x[:, 0]
    state = None if state_dtype is None else _step_state("batch", B, D, h, state_dtype, "cpu")
    want = x_dtype
    for dt in (param_dtype, state_dtype or param_dtype):
        want = torch.promote_types(want, dt)

    def run(dts):
        xs = x.to(dts[0])
        ps = [p.to(dts[1]) for p in params]
        s = None if state is None else state.to(dts[2])
        return _step_ref(xs, s, ps, om.to(dts[1]))

    with use_backend("reference"):
        y, s = ema_step(
            x.to(x_dtype),
            None if state is None else state,
            *[p.to(param_dtype) for p in params],
            omega=om.to(param_dtype),
        )
    assert y.dtype == s.dtype == want
    oracle = run([torch.float64] * 3)
    for g, o in zip((y, s), oracle):
        assert_close_to_oracle(g, o, g, name="step")  # the reference itself: only the NaN/shape


@needs_c
@pytest.mark.parametrize("L", [1, 9])
def test_ema_nan_at_the_last_step_does_not_reach_ddecay(L):
    # The last step's state never meets q, so dL/ddecay does not involve x there; the kernel's
    # R = sum xm zr took NaN * 0 (zr = 0 at the last step) and gave ddecay NaN.
    from seqkern.reference.ema import ema_scan_ref

    x, params, om, _, dy = make_ema_inputs(2, L, 6, 2, seed=3)
    x = x.detach().clone()
    x[1, L - 1, 2] = float("nan")
    x.requires_grad_()
    with use_backend("cpu"):
        y = EmaFunction.apply(x, *params, None, om, 0, 4)
        got = grads_of(y, [x, *params, om], dy)
    inputs64 = upcast([x, *params, om])
    y64, _ = ema_scan_ref(inputs64[0], *inputs64[1:5])
    y64 = y64 + inputs64[0] * inputs64[5]
    oracle = torch.autograd.grad(y64, inputs64, dy.to(torch.float64), allow_unused=True)
    oracle = [torch.zeros_like(t) if o is None else o for o, t in zip(oracle, inputs64)]
    names = ["dx", "ddamping", "ddecay", "dexpansion", "dprojection", "domega"]
    for name, g, o in zip(names, got, oracle):
        assert torch.equal(g.isnan(), o.isnan()), name
    assert not got[2].isnan().any() and got[1].isnan().any()


def test_reference_op_stage_sums_domega_like_autograd():
    # The reference's written-out backward (the op stage: torch.compile, direct op calls) summed
    # dy * x for domega in x's dtype (bf16 products); autograd through x * omega with a float32
    # omega multiplies in float32.
    x, params, om, mask, dy = make_ema_inputs(4, 300, 6, 2, dtype=torch.bfloat16, pad=True)
    params = [p.detach().float().requires_grad_() for p in params]
    om = om.detach().float().requires_grad_()
    leaves = [x, *params, om]
    with use_backend("reference"):
        y = EmaFunction.apply(x, *params, mask, om, 0, 0)
        got = grads_of(y, leaves, dy)[-1]
        y_e = ema(x, *params, pad_mask=mask, omega=om)
        want = grads_of(y_e, leaves, dy)[-1]
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_reference_op_stage_float64_gradients(seed):
    # For float64 x the op stage's correlations ran in float32 in another order than autograd
    # through the forward's float32 FFT, up to 4x its rounding (dx 3.8e-8 against a bound of
    # 2.0e-8); they now run in float64.
    x, params, om, mask, dy = make_ema_inputs(
        1, 25, 2, 4, dtype=torch.float64, pad=True, time_major=True, seed=seed
    )
    leaves = _leaves(x, params, om)
    with use_backend("reference"):
        y = EmaFunction.apply(x, *params, mask, om, 0, 7)
        got = (y, *grads_of(y, leaves, dy))
    inputs64 = upcast(leaves)
    y64 = _ref_forward(inputs64[0], inputs64[1:5], inputs64[5], mask, None, torch.float64)
    oracle = (y64, *grads_of(y64, inputs64, dy))
    inputs_dt = upcast(leaves)
    y_dt = _ref_forward(inputs_dt[0], inputs_dt[1:5], inputs_dt[5], mask, None, torch.float32)
    ref = (y_dt, *grads_of(y_dt, inputs_dt, dy))
    names = ["y", "dx", "ddamping", "ddecay", "dexpansion", "dprojection", "domega"]
    for name, g, o, r in zip(names, got, oracle, ref):
        assert_close_to_oracle(g, o, r, name=name)
