"""AdaLN: every backend against the float64 oracle, forward and every gradient."""

import os

import pytest
import torch

import seqkern
from seqkern import BackendError, adaln, adaln_ref, use_backend
from seqkern.testing import assert_close_to_oracle, grads_of, make_adaln_inputs, upcast

# (B, T, D, per_token): T = 1, odd D, T and D off every block size, D = 1, a large row.
CPU_SHAPES = [
    (1, 1, 8, False),
    (2, 1, 33, True),
    (3, 19, 67, False),
    (3, 19, 67, True),
    (2, 37, 128, False),
    (4, 5, 1, False),
    (1, 70, 300, False),
    (2, 9, 1030, True),
    (1, 4000, 8, False),  # a long sequence: the per-batch dgamma sums 4000 rows
    # long reductions, past 4096, so an accumulation-order weakness shows on any CPU:
    (1, 4100, 16, False),  # dgamma and dbeta sum 4100 rows (strided x)
    (1, 3, 4100, True),  # mean, variance and the two row sums of dx over D = 4100
    (2, 2, 8192, False),  # over D = 8192, the Triton kernel's widest tile
]
# The cuda tier: real speech sizes (VALL-E NAR: D = 1024, ~1000 codec frames), plus odd ones.
CUDA_SHAPES = [
    (8, 1000, 1024, False),
    (4, 1500, 1024, True),
    (16, 333, 512, False),
    (3, 77, 4100, False),
    (2, 50, 8000, False),
    (2, 40, 8190, True),
    (1, 1, 67, True),
]

KERNEL_BACKENDS = {"cpu": ["reference", "cpu", "triton"], "cuda": ["reference", "cuda", "triton"]}


def _dtypes(device: str, backend: str) -> list[torch.dtype]:
    dts = [torch.float32, torch.float16, torch.bfloat16]
    if device == "cpu" and backend == "triton":
        dts.remove(torch.bfloat16)  # the Triton interpreter has no bfloat16
    if device == "cpu" and backend in ("reference", "cpu"):
        dts.append(torch.float64)
    return dts


def _cases():
    for device, shapes in (("cpu", CPU_SHAPES), ("cuda", CUDA_SHAPES)):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for backend in KERNEL_BACKENDS[device]:
            for dtype in _dtypes(device, backend):
                for i, (B, T, D, per_token) in enumerate(shapes):
                    noncontig = i % 2 == 1
                    yield pytest.param(
                        device,
                        backend,
                        dtype,
                        B,
                        T,
                        D,
                        per_token,
                        noncontig,
                        id=f"{device}-{backend}-{str(dtype)[6:]}-B{B}T{T}D{D}"
                        f"{'-tok' if per_token else ''}{'-strided' if noncontig else ''}",
                        marks=marks,
                    )


@pytest.mark.parametrize("device,backend,dtype,B,T,D,per_token,noncontig", list(_cases()))
def test_adaln_matches_oracle(device, backend, dtype, B, T, D, per_token, noncontig):
    x, gamma, beta, dy = make_adaln_inputs(
        B,
        T,
        D,
        dtype=dtype,
        device=device,
        per_token=per_token,
        noncontiguous=noncontig,
        seed=B * 1000 + T * 10 + D,
    )
    with use_backend(backend):
        y = adaln(x, gamma, beta)
        got = (y, *grads_of(y, (x, gamma, beta), dy))

    inputs64 = upcast((x, gamma, beta))
    y64 = adaln_ref(*inputs64)
    oracle = (y64, *grads_of(y64, inputs64, dy.to(torch.float64)))
    inputs_dt = upcast((x, gamma, beta), dtype)
    y_dt = adaln_ref(*inputs_dt)
    ref = (y_dt, *grads_of(y_dt, inputs_dt, dy))

    for name, g, o, r in zip(("y", "dx", "dgamma", "dbeta"), got, oracle, ref, strict=True):
        assert g.dtype == dtype and g.shape == o.shape, name
        assert_close_to_oracle(g, o, r, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_adaln_nan_stays_visible(backend):
    x, gamma, beta, dy = make_adaln_inputs(2, 5, 16, requires_grad=False)
    x[1, 3, 7] = float("nan")
    with use_backend(backend):
        y = adaln(x, gamma, beta)
    bad = torch.zeros(2, 5, dtype=torch.bool)
    bad[1, 3] = True
    assert torch.isnan(y[bad]).all(), "a NaN input row must give a NaN output row"
    assert torch.isfinite(y[~bad]).all(), "NaN leaked into other rows"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_adaln_gamma_b1d_and_empty(backend):
    x, gamma, beta, dy = make_adaln_inputs(3, 4, 24)
    with use_backend(backend):
        y = adaln(x, gamma.unsqueeze(1), beta.unsqueeze(1))
        torch.testing.assert_close(y, adaln_ref(x, gamma, beta), atol=1e-5, rtol=1e-5)
        (g1,) = torch.autograd.grad(adaln(x, gamma.unsqueeze(1), beta.unsqueeze(1)).sum(), gamma)
        (g2,) = torch.autograd.grad(adaln_ref(x, gamma, beta).sum(), gamma)
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-5)
        empty = torch.randn(2, 0, 8, requires_grad=True)
        g, b = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
        out = adaln(empty, g, b)
        assert out.shape == (2, 0, 8)
        dg, db = torch.autograd.grad(out.sum(), (g, b))
        assert torch.equal(dg, torch.zeros_like(g)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("D,seed", [(2, 321), (2, 326), (3, 249)])
@pytest.mark.parametrize(
    "backend", ["reference", "triton", "cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
)
def test_adaln_dx_of_rows_far_from_zero(backend, D, seed):
    # Narrow rows far from 0 (|mean| >> spread): the saved fp32 mean is rounded, and centring x
    # on it alone shifts every xhat alike; dx, a difference of near-equal terms, amplified that
    # by rstd to several times the fp32 reference's error (found by tests/fuzz/test_fuzz_rows;
    # the seeds are draws where that showed: 2 to 15 times the bound; centred twice, < 0.1).
    T = 8
    gen = torch.Generator().manual_seed(seed)
    spread = 0.05 + torch.rand(1, T, 1, generator=gen, dtype=torch.float64)
    x = 4 * torch.randn(1, T, 1, generator=gen, dtype=torch.float64) + spread * torch.randn(
        1, T, D, generator=gen, dtype=torch.float64
    )
    gamma = 1 + 0.5 * torch.randn(1, D, generator=gen, dtype=torch.float64)
    beta = torch.zeros(1, D, dtype=torch.float64)
    dy = torch.randn(1, T, D, generator=gen, dtype=torch.float64)
    x, gamma, dy = (t.float().double() for t in (x, gamma, dy))  # exact in fp32
    x64 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(adaln_ref(x64, gamma, beta), x64, dy)
    x32 = x.float().requires_grad_()
    (ref,) = torch.autograd.grad(adaln_ref(x32, gamma.float(), beta.float()), x32, dy.float())
    dev = "cuda" if backend == "cuda" else "cpu"
    x32 = x.float().to(dev).requires_grad_()
    with use_backend(backend):
        y = adaln(x32, gamma.float().to(dev), beta.float().to(dev))
        (got,) = torch.autograd.grad(y, x32, dy.float().to(dev))
    assert_close_to_oracle(got, want, ref, name=f"{backend} dx")


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_adaln_zero_width_rows(backend, per_token):
    # D = 0 (torch's layer_norm takes it): an empty output and empty gradients on every
    # backend. The Triton launchers used to build a 0-wide tile and fail inside the kernel.
    x = torch.randn(2, 3, 0, requires_grad=True)
    shape = (2, 3, 0) if per_token else (2, 0)
    g, b = (torch.randn(shape, requires_grad=True) for _ in range(2))
    with use_backend(backend):
        y = adaln(x, g, b)
        grads = torch.autograd.grad(y, (x, g, b), torch.randn(2, 3, 0))
    assert y.shape == (2, 3, 0)
    assert [t.shape for t in grads] == [x.shape, g.shape, b.shape]


@pytest.mark.parametrize(
    "x_shape,g_shape,b_shape,dtypes,match",
    [
        ((2, 3), (2, 3), (2, 3), None, "x must be"),
        ((2, 3, 4), (2, 5), (2, 5), None, "gamma must be"),
        ((2, 3, 4), (2, 4), (3, 4), None, "beta must be"),
        ((2, 3, 4), (2, 4), (2, 3, 4), None, "same shape"),
        (
            (2, 3, 4),
            (2, 4),
            (2, 4),
            (torch.float32, torch.float64, torch.float32),
            "gamma must have",
        ),
        (
            (2, 3, 4),
            (2, 4),
            (2, 4),
            (torch.float32, torch.float32, torch.float16),
            "beta must have",
        ),
        ((2, 3, 4), (2, 4), (2, 4), (torch.int64, torch.int64, torch.int64), "floating-point"),
    ],
)
def test_adaln_bad_input_names_the_argument(x_shape, g_shape, b_shape, dtypes, match):
    dx, dg, db = dtypes or (torch.float32,) * 3
    args = [torch.ones(s, dtype=d) for s, d in ((x_shape, dx), (g_shape, dg), (b_shape, db))]
    with pytest.raises(ValueError, match=match):
        adaln(*args)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(2, 3, 4), [[1.0] * 4] * 2, torch.randn(2, 4)), TypeError, "gamma must be a"),
        ((torch.randn(2, 3, 4), torch.randn(2, 4), None), TypeError, "beta must be a"),
        (([[[1.0]]], torch.randn(1, 1), torch.randn(1, 1)), TypeError, "x must be a"),
        ((torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), "1e-5"), TypeError, "eps"),
        ((torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), None), TypeError, "eps"),
        ((torch.randn(3, 4),) * 3, ValueError, r"x must be \(B, T, D\)"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 5)), ValueError, "gamma"),
        ((torch.randn(2, 3, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4)), ValueError, "gamma"),
        (
            (torch.ones(2, 3, 4, dtype=torch.int32), torch.randn(2, 4), torch.randn(2, 4)),
            ValueError,
            "x must be a floating-point",
        ),
        (
            (torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4, device="meta")),
            ValueError,
            "beta must be on",
        ),
        (
            (torch.randn(2, 3, 4, device="meta"), torch.randn(2, 4), torch.randn(2, 4)),
            ValueError,
            "gamma must be on x's device meta",
        ),
    ],
)
def test_adaln_bad_input_raises_before_dispatch_on_every_backend(args, error, match, backend):
    """As linear_rows: named, on every backend, before any kernel (the eps used to reach the
    torch.library schema and come back as its RuntimeError)."""
    with use_backend(backend), pytest.raises(error, match=match):
        adaln(*args)


def test_adaln_wrong_device_names_the_argument():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="gamma must be on"):
        adaln(x, torch.randn(2, 4, device="meta"), torch.randn(2, 4))


def test_adaln_cpp_glue_checks_its_own_inputs():
    from seqkern import _ext

    if _ext.C is None:
        pytest.skip(f"seqkern._C not built: {_ext.C_ERROR}")
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="gamma must have shape"):
        _ext.C.adaln_fwd_cpu(x, torch.randn(2, 5), torch.randn(2, 5), 1e-5)
    with pytest.raises(RuntimeError, match="mean and rstd"):
        _ext.C.adaln_bwd_cpu(
            x, x, torch.randn(2, 4), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3)
        )


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    x, gamma, beta, _ = make_adaln_inputs(2, 3, 8, dtype=torch.float64)
    with use_backend("triton", "cuda"), pytest.raises(BackendError) as err:
        adaln(x, gamma, beta)
    msg = str(err.value)
    assert "allowed: triton, cuda" in msg and "triton:" in msg and "cuda:" in msg


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_adaln_opcheck(backend):
    x, gamma, beta, dy = make_adaln_inputs(2, 7, 40, requires_grad=False)
    with use_backend(backend):
        for g, b in ((gamma, beta), (gamma[:, None].expand(2, 7, 40).contiguous(),) * 2):
            torch.library.opcheck(torch.ops.seqkern.adaln.default, (x, g, b, 1e-5))
            y, mean, rstd = torch.ops.seqkern.adaln(x, g, b, 1e-5)
            torch.library.opcheck(torch.ops.seqkern.adaln_bwd.default, (dy, x, g, mean, rstd))


def test_adaln_torch_compile_fullgraph():
    backend = "cpu" if seqkern.backends.unavailable_reason("cpu") is None else "reference"
    x, gamma, beta, dy = make_adaln_inputs(2, 11, 48)

    def block(x, gamma, beta):
        return adaln(x * 2.0, gamma, beta).relu()

    compiled = torch.compile(block, fullgraph=True)
    with use_backend(backend):
        y = compiled(x, gamma, beta)
        got = grads_of(y, (x, gamma, beta), dy)
        y_eager = block(x, gamma, beta)
        want = grads_of(y_eager, (x, gamma, beta), dy)
    torch.testing.assert_close(y, y_eager)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_auto_keeps_cpu_tensors_off_the_interpreter(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    x, gamma, _, _ = make_adaln_inputs(2, 3, 8, requires_grad=False)
    chosen = seqkern.backends.select("adaln", x, gamma).backend
    expected = "cpu" if seqkern.backends.unavailable_reason("cpu") is None else "reference"
    assert chosen == expected
    with use_backend("triton"):
        assert seqkern.backends.select("adaln", x, gamma).backend == "triton"


def test_env_var_and_nesting(monkeypatch):
    x, gamma, _, _ = make_adaln_inputs(2, 3, 8, requires_grad=False)
    monkeypatch.setenv("SEQKERN_BACKEND", "reference")
    assert seqkern.backends.select("adaln", x, gamma).backend == "reference"
    with use_backend("triton"):  # the context manager wins over the environment
        assert seqkern.backends.select("adaln", x, gamma).backend == "triton"
        with use_backend():  # no names: auto
            assert seqkern.backends.select("adaln", x, gamma).backend != "triton"
        assert seqkern.backends.select("adaln", x, gamma).backend == "triton"
    monkeypatch.setenv("SEQKERN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SEQKERN_BACKEND"):
        seqkern.backends.select("adaln", x, gamma)
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("fast"):
            pass


@pytest.mark.cuda
def test_cuda_declines_rows_past_its_limit_and_auto_falls_to_triton():
    x, gamma, beta, _ = make_adaln_inputs(2, 3, 9000, device="cuda", requires_grad=False)
    with use_backend("cuda"), pytest.raises(BackendError, match="D = 9000"):
        adaln(x, gamma, beta)
    assert seqkern.backends.select("adaln", x, gamma).backend == "triton"


def test_interpreter_is_on_for_the_cpu_tier():
    # The Triton CPU tests above are only meaningful if the interpreter is really in use.
    if torch.cuda.is_available():
        pytest.skip("GPU machine: Triton runs compiled in the cuda tier")
    assert os.environ.get("TRITON_INTERPRET") == "1"
