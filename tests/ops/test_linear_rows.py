"""linear_rows (the few-row Linear of a decoding step): the C++ CPU kernel against the float64
oracle, which is torch.nn.functional.linear."""

import pytest
import torch

from seqkern import BackendError, use_backend
from seqkern.ops.linear import linear_rows
from seqkern.testing import assert_close_to_oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "m, k, n, bias, noncontig",
    [
        (1, 1, 1, True, False),
        (1, 256, 1664, True, False),
        (2, 33, 7, False, True),
        (3, 1024, 256, True, True),  # the 4-row groups' remainder
        (4, 67, 130, True, False),
        (5, 19, 3, False, False),
        (8, 300, 65, True, True),
    ],
)
def test_cpu_matches_oracle(dtype, m, k, n, bias, noncontig):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    xd, wd = x.to(dtype), w.to(dtype)
    if noncontig:  # the same values as a transposed view and a strided view
        xd = xd.t().contiguous().t()
        wd = torch.stack([wd, torch.zeros_like(wd)], dim=-1)[..., 0]
        assert not wd.is_contiguous() and torch.equal(wd, w.to(dtype))
    bd = None if b is None else b.to(dtype)
    ref = torch.nn.functional.linear(xd, wd, bd)
    with torch.no_grad(), use_backend("cpu"):
        got = linear_rows(xd, wd, bd)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close_to_oracle(got, want, ref, name="linear_rows")


def test_nan_stays_visible():
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with torch.no_grad(), use_backend("cpu"):
        y = linear_rows(x, torch.randn(5, 16), torch.randn(5))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def test_declines_what_it_cannot_run():
    w = torch.randn(4, 8)
    with use_backend("cpu"):
        with pytest.raises(BackendError, match="rows"):
            linear_rows(torch.randn(9, 8), w)
        with pytest.raises(BackendError, match="dtype"):
            linear_rows(torch.randn(2, 8).half(), w.half())
        with pytest.raises(BackendError, match="gradient"):
            linear_rows(torch.randn(2, 8), w.requires_grad_())


def test_auto_falls_back_with_gradients():
    x = torch.randn(3, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 5)
    linear_rows(x, lin.weight, lin.bias).sum().backward()  # the reference runs: differentiable
    assert x.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(2, 8), torch.randn(4, 9)), ValueError, "weight must be"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "bias must be"),
        ((torch.randn(2, 8), torch.randn(8)), ValueError, "weight must be"),
        ((torch.ones(2, 8, dtype=torch.long),) * 2, ValueError, "x must be floating"),
        ((torch.randn(2, 8), torch.randn(4, 8).double()), ValueError, "weight must have x's"),
        ((torch.randn(2, 8), [[1.0] * 8]), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, error, match, backend):
    """On every backend (the reference would raise torch's own shape error, or compute int64
    silently), before dispatch."""
    with torch.no_grad(), use_backend(backend), pytest.raises(error, match=match):
        linear_rows(*args)
