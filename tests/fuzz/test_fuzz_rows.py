"""Property-based tests: adaln and linear_rows (the row-wise ops) on random inputs inside their
support.

adaln: rows (B x T) from 0, feature dims D at both ends of each backend's range (0 and 1 up to
the Triton kernel's MAX_DIM) and odd ones, every documented gamma/beta form ((B, D), (B, 1, D),
(B, T, D)), each tensor argument (x, gamma, beta and the incoming gradient) contiguous,
transposed, strided or expanded (stride 0), NaN and Inf placed at random. linear_rows: rows from
0 (past the cpu kernel's 8), K and N from 0, x, weight and bias in the same layouts, NaN and
Inf. Every backend's output and every gradient are held to seqkern.testing's rule against the
float64 oracle; where a NaN or Inf is placed, the NaN pattern of the output must be the
oracle's and the gradients must carry NaN exactly where the poisoned value reaches. (The cpu
linear_rows kernel is inference only: it is run without gradients, and must decline, not
answer, when one is needed.)

CI runs a fixed, derandomised profile ("ci", a bounded example count: well under a minute); a
developer runs more with `HYPOTHESIS_PROFILE=dev pytest tests/fuzz` (2,000 examples a test).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqkern import BackendError, use_backend  # noqa: E402
from seqkern.ops.adaln import adaln  # noqa: E402
from seqkern.ops.linear import linear_rows  # noqa: E402
from seqkern.reference.adaln import adaln_ref  # noqa: E402
from seqkern.testing import (  # noqa: E402
    assert_result_close_to_oracle,
    poison_,
)

# Feature dims each backend supports: 0 and 1, odd ones, one past a power of two, and the top
# of the Triton kernel's range (triton_kernels/adaln.py MAX_DIM; cpu and reference have none).
ADALN_DIMS = {
    "reference": [0, 1, 2, 7, 67, 1025, 16384],
    "cpu": [0, 1, 2, 7, 67, 1025, 16384],
    "triton": [0, 1, 2, 7, 67, 1025, 16384],
}
DTYPES = {
    "reference": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],  # the interpreter has no bfloat16
}
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
X_LAYOUTS = LAYOUTS + ["feature_major"]  # (B, D, T) storage: the row itself is strided


def _rand(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _stored(shape, layout, gen, expand_dim=0, make=_rand):
    """(leaf, view): a float64 leaf and a view of it with `shape` and `layout`.

    transposed: dims 0 and 1 swapped in storage; feature_major: the last dim moved first in
    storage (the row is strided); strided: every other element of the last dim; expanded: dim
    `expand_dim` broadcast from size 1 (stride 0)."""
    shape = tuple(shape)
    n = len(shape)
    if layout == "transposed" and n >= 2:
        leaf = make((shape[1], shape[0], *shape[2:]), gen)
        return leaf, lambda t: t.transpose(0, 1)
    if layout == "feature_major" and n >= 2:
        leaf = make((shape[-1], *shape[:-1]), gen)
        return leaf, lambda t: t.permute(*range(1, n), 0)
    if layout == "strided" and n >= 1:
        leaf = make((*shape[:-1], 2 * shape[-1]), gen)
        return leaf, lambda t: t[..., ::2]
    if layout == "expanded" and n >= 1:
        d = expand_dim % n
        leaf = make((*shape[:d], 1, *shape[d + 1 :]), gen)
        return leaf, lambda t: t.expand(shape)
    return make(shape, gen), lambda t: t


def _poison(leaf, kind, gen) -> bool:
    """Put one NaN (kind "nan") or +-Inf ("inf") at a random place of a float64 leaf; False when
    the leaf is empty (nothing poisoned)."""
    if leaf is None or not leaf.numel():
        return False
    value = (
        math.nan if kind == "nan" else math.inf * (1 if torch.rand(1, generator=gen) < 0.5 else -1)
    )
    return poison_(leaf, value, gen)


def _as_viewed(views, grads):
    """Each leaf's gradient seen through its argument's view: the argument's own layout, so the
    poisoned rule's slices are the rows the op reduces over (a transposed leaf's last dim is
    not), and an expanded argument shows its summed gradient in every broadcast place."""
    return [view(g) for view, g in zip(views, grads, strict=True)]


@st.composite
def adaln_problems(draw, backend):
    """(B, T, D, dtype, gamma form, layouts of x / gamma / beta / dy, poison) for `backend`."""
    B = draw(st.integers(0, 3))
    T = draw(st.integers(0, 19))
    D = draw(st.sampled_from(ADALN_DIMS[backend]))
    if D > 2048:  # a wide row: a few of them (the interpreter runs one program per row)
        B, T = min(B, 2), min(T, 3)
    dtype = draw(st.sampled_from(DTYPES[backend]))
    form = draw(st.sampled_from(["bd", "b1d", "btd"]))
    layouts = (
        draw(st.sampled_from(X_LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
    )
    poison = draw(
        st.sampled_from([None, None, None, "nan_x", "inf_x", "nan_g", "inf_g", "nan_b", "inf_b"])
    )
    return B, T, D, dtype, form, layouts, poison


def _adaln_x(shape, gen):
    # a non-zero mean and a spread per row, so the normalisation has work to do
    return _rand(shape, gen) * (0.5 + _rand(shape[:-1] + (1,), gen).abs()) + _rand(
        shape[:-1] + (1,), gen
    )


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@given(data=st.data())
def test_adaln_fuzz(backend, data):
    B, T, D, dtype, form, layouts, poison = data.draw(adaln_problems(backend))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mod_shape = {"bd": (B, D), "b1d": (B, 1, D), "btd": (B, T, D)}[form]
    # expanded: x over T (one row repeated), gamma/beta over B (one modulation shared) or, for
    # the per-frame form, over T; dy over B and T (what `y.sum()` hands back, stride 0)
    x64, x_view = _stored((B, T, D), layouts[0], gen, expand_dim=1, make=_adaln_x)
    g_dim = 1 if form == "btd" else 0
    g64, g_view = _stored(
        mod_shape, layouts[1], gen, expand_dim=g_dim, make=lambda s, g: 1 + 0.5 * _rand(s, g)
    )
    b64, b_view = _stored(
        mod_shape, layouts[2], gen, expand_dim=g_dim, make=lambda s, g: 0.5 * _rand(s, g)
    )
    dy64, dy_view = _stored((B, T, D), layouts[3], gen, expand_dim=1)
    poisoned = False
    if poison is not None:
        kind, which = poison.split("_")
        poisoned = _poison({"x": x64, "g": g64, "b": b64}[which], kind, gen)
    # the oracle sees the values the kernel sees: the inputs rounded to `dtype`, up-cast (with
    # bfloat16 a row of D = 2 can round to two equal values: LayerNorm 0, times an Inf gamma NaN)
    leaves64 = [t.to(dtype).double() for t in (x64, g64, b64)]
    dy64 = dy64.to(dtype).double()
    views = [x_view, g_view, b_view]

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in leaves64]
        x, gamma, beta = (v(t) for v, t in zip(views, leaves, strict=True))
        y = op(x, gamma, beta)
        grads = torch.autograd.grad(y, leaves, dy_view(dy64.to(dt)))
        return [y, *_as_viewed(views, grads)]

    with use_backend(backend):
        got = run(dtype, adaln)
    oracle = run(torch.float64, adaln_ref)
    ref = run(dtype, adaln_ref)
    assert got[0].shape == (B, T, D) and got[0].dtype == dtype
    for name, g, o, r in zip(["y", "dx", "dgamma", "dbeta"], got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poisoned, gradient=name.startswith("d")
        )


# ---------------------------------------------------------------------------------------------
# linear_rows

LINEAR_DIMS = [0, 1, 3, 8, 17, 64, 257, 1031]  # K and N: empty, one, odd, the 8-wide blocks
LINEAR_DTYPES = {
    "reference": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cpu": [torch.float64, torch.float32],
}
MAX_ROWS = {"reference": 12, "cpu": 8}  # the cpu kernel's limit (seqkern._C small_linear_max_rows)


@st.composite
def linear_problems(draw, backend):
    """(x shape, N, dtype, bias, layouts of x / weight / bias, poison) for `backend`."""
    M = draw(st.integers(0, MAX_ROWS[backend]))
    K = draw(st.sampled_from(LINEAR_DIMS))
    N = draw(st.sampled_from(LINEAR_DIMS))
    # the reference is F.linear: x may be (K,) or (..., K) too; the cpu kernel takes (M, K)
    lead = draw(st.sampled_from([(M,), (), (2, M)])) if backend == "reference" else (M,)
    dtype = draw(st.sampled_from(LINEAR_DTYPES[backend]))
    bias = draw(st.booleans())
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    poison = draw(
        st.sampled_from([None, None, "nan_x", "inf_x", "nan_w", "inf_w", "nan_b", "inf_b"])
    )
    return (*lead, K), N, dtype, bias, layouts, poison


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@given(data=st.data())
def test_linear_rows_fuzz(backend, data):
    x_shape, N, dtype, has_bias, layouts, poison = data.draw(linear_problems(backend))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    K = x_shape[-1]
    # expanded: x one row over M, weight one column over K (stride 0 along the reduction)
    x64, x_view = _stored(x_shape, layouts[0], gen, expand_dim=0)
    w64, w_view = _stored((N, K), layouts[1], gen, expand_dim=1)
    b64, b_view = _stored((N,), layouts[2], gen) if has_bias else (None, None)
    poisoned = False
    if poison is not None:
        kind, which = poison.split("_")
        poisoned = _poison({"x": x64, "w": w64, "b": b64}[which], kind, gen)
    leaves64 = [t.to(dtype).double() for t in (x64, w64, b64) if t is not None]  # (as adaln)
    views = [v for v in (x_view, w_view, b_view) if v is not None]
    out_shape = (*x_shape[:-1], N)
    dout64 = _rand(out_shape, gen).to(dtype).double()

    def args(leaves):
        x, w, *b = (v(t) for v, t in zip(views, leaves, strict=True))
        return x, w, (b[0] if b else None)

    def run(dt, op, grad=True):
        leaves = [t.to(dt).requires_grad_(grad) for t in leaves64]
        with torch.set_grad_enabled(grad):
            out = op(*args(leaves))
        if not grad:
            return [out]
        return [out, *_as_viewed(views, torch.autograd.grad(out, leaves, dout64.to(dt)))]

    F = torch.nn.functional.linear
    names = ["out", "dx", "dweight", "dbias"][: 1 + len(leaves64)]
    with use_backend(backend):
        if backend == "cpu":  # inference only: without gradients it runs, with them it declines
            got = run(dtype, linear_rows, grad=False)
            with pytest.raises(BackendError, match="gradient"):
                run(dtype, linear_rows)
        else:
            got = run(dtype, linear_rows)
    oracle = run(torch.float64, F, grad=backend != "cpu")
    ref = run(dtype, F, grad=backend != "cpu")
    assert got[0].shape == out_shape and got[0].dtype == dtype
    for name, g, o, r in zip(names, got, oracle, ref):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poisoned, gradient=name.startswith("d")
        )
