"""Property-based tests: attention and relbias_attention on random inputs inside their support.

Shapes from 0 (T, S, B), head dims at both ends of each backend's range, masks of every
documented form, inputs contiguous, time-major, strided or expanded (stride 0), NaN and Inf
placed at random. Every backend's output and gradients are held to seqkern.testing's rule
against the float64 oracle; where a NaN or Inf is placed, the NaN pattern of the output must be
the oracle's and the gradients must carry NaN exactly where the poisoned value reaches.

CI runs a fixed, derandomised profile ("ci", a bounded example count: about a minute); a
developer runs more with `HYPOTHESIS_PROFILE=dev pytest tests/fuzz` (2,000 examples a test).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqkern import use_backend  # noqa: E402
from seqkern.ops.attention import attention  # noqa: E402
from seqkern.ops.relbias import relbias_attention  # noqa: E402
from seqkern.reference.attention import attention_ref  # noqa: E402
from seqkern.reference.relbias import relbias_attention_ref  # noqa: E402
from seqkern.testing import (  # noqa: E402
    assert_result_close_to_oracle,
    grads_or_zeros,
    poison_,
)

# head dims each backend supports: both ends of its range, and an odd one inside
HEAD_DIMS = {"reference": [1, 7, 64], "cpu": [1, 7, 64], "triton": [16, 24, 128]}
DTYPES = {
    "reference": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],  # the interpreter has no bfloat16
}


@st.composite
def problems(draw, backend):
    """(B, H, T, S, hd, dtype, causal, mask spec, layout, poison) for `backend`."""
    B = draw(st.integers(0, 2))
    H = draw(st.integers(1, 3))
    T = draw(st.integers(0, 19))
    S = draw(st.integers(0, 19))
    hd = draw(st.sampled_from(HEAD_DIMS[backend]))
    dtype = draw(st.sampled_from(DTYPES[backend]))
    causal = draw(st.booleans())
    mask_dims = draw(st.sampled_from([None, (1,), (0, 1), (1, 2), (0, 2), (0, 1, 2), (2,)]))
    mask_kind = draw(st.sampled_from(["bool", "additive"]))
    layout = draw(st.sampled_from(["contiguous", "time_major", "strided", "expanded"]))
    poison = draw(st.sampled_from([None, None, "nan_q", "inf_q", "nan_k", "inf_k", "nan_v"]))
    return B, H, T, S, hd, dtype, causal, (mask_dims, mask_kind), layout, poison


def _mask(spec, B, H, T, S, gen):
    """A mask over the dims of (B, H, T, S) that `spec` keeps, the others broadcast (size 1
    or absent, both documented forms)."""
    dims, kind = spec
    if dims is None:
        return None
    full = (B, H, T, S)
    shape = [full[d] if d in dims or d == 3 else 1 for d in range(4)]
    shape = shape[min(dims + (3,)) :] if len(dims) < 3 and 0 not in dims else shape
    keep = torch.rand(shape, generator=gen) < 0.75
    if kind == "bool":
        return keep
    return torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(~keep, -math.inf)


def _leaves(B, H, T, S, hd, layout, gen):
    """float64 leaves (what gradients are taken of) and the q, k, v views built from them."""
    if layout == "expanded":  # k and v one head broadcast over H: stride 0
        q = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, 1, S, hd, generator=gen, dtype=torch.float64) for _ in range(2))
        return [q, k, v]
    if layout == "time_major":
        return [torch.randn(B, L, H, hd, generator=gen, dtype=torch.float64) for L in (T, S, S)]
    if layout == "strided":
        return [torch.randn(B, H, L, 2 * hd, generator=gen, dtype=torch.float64) for L in (T, S, S)]
    return [torch.randn(B, H, L, hd, generator=gen, dtype=torch.float64) for L in (T, S, S)]


def _views(leaves, H, layout):
    q, k, v = leaves
    if layout == "expanded":
        return q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)
    if layout == "time_major":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout == "strided":
        return q[..., ::2], k[..., ::2], v[..., ::2]
    return q, k, v


def _poison(leaves, poison, gen):
    if poison is None:
        return
    name, value = poison.split("_")[1], math.nan if poison.startswith("nan") else math.inf
    poison_(leaves["qkv".index(name)], value, gen)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@given(data=st.data())
def test_attention_fuzz(backend, data):
    B, H, T, S, hd, dtype, causal, mspec, layout, poison = data.draw(problems(backend))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    leaves64 = _leaves(B, H, T, S, hd, layout, gen)
    _poison(leaves64, poison, gen)
    mask64 = _mask(mspec, B, H, T, S, gen)
    dout64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in leaves64]
        mask = mask64 if mask64 is None or mask64.dtype == torch.bool else mask64.to(dt)
        out = op(*_views(leaves, H, layout), mask=mask, causal=causal)
        return [out, *grads_or_zeros(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(dtype, attention)
    oracle = run(torch.float64, attention_ref)
    ref = run(dtype, attention_ref)
    assert got[0].shape == (B, H, T, hd) and got[0].dtype == dtype
    for name, g, o, r in zip(["out", "dq", "dk", "dv"], got, oracle, ref, strict=True):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poison is not None, gradient=name.startswith("d")
        )


@pytest.mark.parametrize("backend", ["reference", "triton"])
@given(data=st.data())
def test_relbias_attention_fuzz(backend, data):
    B, H, T, S, hd, dtype, _, _, layout, poison = data.draw(problems(backend))
    B, T, S = max(B, 1), max(T, 1), max(S, 1)  # upstream never sees empty sequences
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    leaves64 = _leaves(B, H, T, S, hd, layout, gen)
    _poison(leaves64, poison if poison in (None, "nan_q", "nan_k") else None, gen)
    rel64 = torch.randn(H, T + S - 1, generator=gen, dtype=torch.float64)
    gate64 = torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64)
    kpm = torch.rand(B, S, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    dout64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)
    scale = hd**-0.5

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in (*leaves64, rel64, gate64)]
        q, k, v = _views(leaves[:3], H, layout)
        out, _ = op(q, k, v, scale, rel_bias=leaves[3], gate=leaves[4], key_padding_mask=kpm)
        return [out, *grads_or_zeros(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(dtype, relbias_attention)
    oracle = run(torch.float64, relbias_attention_ref)
    ref = run(dtype, relbias_attention_ref)
    for name, g, o, r in zip(["out", "dq", "dk", "dv", "drel", "dgate"], got, oracle, ref):
        assert_result_close_to_oracle(
            g, o, r, name=name, poisoned=poison is not None, gradient=name.startswith("d")
        )
