"""The skinny float32 GEMM (csrc/linear/skinny_gemm_cpu.cpp, AVX-512) against the float64
oracle: residual + alpha * act(x W^T + b) over every row block (1..6 rows, and more), weight
rows not a multiple of its 4-row blocks, K tails of every length mod 16, strided x rows, each
activation, products large enough to be split across threads, and NaN.

Where the CPU has no AVX-512F the kernel does not exist and these tests skip; the fused
ConvEmformer step's tests run its callers both ways (tests/modules/test_conv_emformer_fused.py).
"""

import pytest
import torch
import torch.nn.functional as F

from seqkern import _ext
from seqkern.testing import assert_close_to_oracle

C = _ext.C
pytestmark = pytest.mark.skipif(
    not (hasattr(C, "skinny_gemm_available") and C.skinny_gemm_available()),
    reason="the skinny GEMM needs an x86-64 CPU with AVX-512F",
)

ACTS = {0: lambda v: v, 1: torch.relu, 2: F.gelu, 3: F.silu}


def _oracle(x, w, b, act, r, alpha):
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    y = alpha * ACTS[act](y)
    return y if r is None else r.double() + y


@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 1, 1),
        (2, 17, 3),  # one weight block, 3 of 4 rows real; K = 16 + 1
        (5, 31, 4),
        (6, 16, 5),
        (7, 33, 9),  # a 6-row block and a 1-row block
        (13, 250, 67),
        (21, 256, 1024),  # a ConvEmformer segment at input_dim 256: split across threads
        (21, 1024, 256),
        (64, 72, 130),
        # Long reductions: each output is a dot product over K, 16 lanes of K / 16 sequential
        # fmas folded once; at an FFN's width K >= 4096 (the cases above stop at 1024)
        pytest.param(21, 4096, 256, id="long_k-21-4096-256"),  # FFN out-projection, a segment
        pytest.param(5, 4105, 9, id="long_k-5-4105-9"),  # K tail 9, ragged weight block
        pytest.param(1, 16384, 6, id="long_k-1-16384-6"),  # one row, 1024 fmas a lane
    ],
)
@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_matches_oracle(m, k, n, act):
    gen = torch.Generator().manual_seed(7 * m + 3 * k + n + act)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen)
    r = torch.randn(m, n, generator=gen)
    for bias, res, alpha in ((b, r, 0.5), (None, None, 1.0), (b, None, -2.0)):
        got = C.skinny_linear_cpu(x, w, bias, act, res, alpha)
        ref = ACTS[act](F.linear(x, w, bias)) * alpha + (0 if res is None else res)  # torch fp32
        assert_close_to_oracle(got, _oracle(x, w, bias, act, res, alpha), ref, name="skinny")


@pytest.mark.parametrize(
    "m, k, n", [(1, 1, 1), (2, 17, 3), (7, 33, 9), (13, 250, 67), (21, 256, 1024), (5, 4105, 9)]
)
@pytest.mark.parametrize("act", [0, 2])
def test_bfloat16_weight_is_the_float32_kernel_on_its_widened_values(m, k, n, act):
    """A bfloat16 weight (seqkern.swap's cpu_weights="bf16") is widened exactly in registers:
    the result is bit for bit the float32 kernel's on w.bfloat16().float(), K tails included,
    and the float64 oracle's on those values."""
    gen = torch.Generator().manual_seed(11 * m + k + 5 * n + act)
    x = torch.randn(m, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    b, r = torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    got = C.skinny_linear_cpu(x, w, b, act, r, 0.5)
    assert got.dtype == torch.float32
    assert torch.equal(got, C.skinny_linear_cpu(x, w.float(), b, act, r, 0.5))
    ref = ACTS[act](F.linear(x, w.float(), b)) * 0.5 + r
    assert_close_to_oracle(got, _oracle(x, w.float(), b, act, r, 0.5), ref, name="bf16 weight")


def test_strided_rows_and_a_noncontiguous_weight():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(9, 80, generator=gen)
    x = base[:, 5:53]  # rows 80 apart, 48 columns
    w = torch.randn(48, 11, generator=gen).t()  # (11, 48) as a transposed view
    got = C.skinny_linear_cpu(x, w, None, 1)
    ref = torch.relu(F.linear(x, w))
    assert_close_to_oracle(got, _oracle(x, w, None, 1, None, 1.0), ref, name="strided")


def test_nan_stays_in_its_row():
    x = torch.randn(8, 40)
    x[6, 39] = float("nan")  # in the K tail of the second row block
    y = C.skinny_linear_cpu(x, torch.randn(10, 40), torch.randn(10), 0)
    assert torch.isnan(y[6]).all()
    assert torch.isfinite(y[torch.arange(8) != 6]).all()


def test_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="dtype|Float"):
        C.skinny_linear_cpu(torch.randn(2, 8).double(), torch.randn(4, 8).double())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        C.skinny_linear_cpu(torch.randn(2, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="weight must be"):
        C.skinny_linear_cpu(torch.randn(2, 8), torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="unit column stride"):
        C.skinny_linear_cpu(torch.randn(8, 2).t(), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="activation"):
        C.skinny_linear_cpu(torch.randn(2, 8), torch.randn(4, 8), None, 9)


def test_can_be_switched_off():
    assert C.skinny_gemm_set_enabled(False) is True
    try:
        assert not C.skinny_gemm_available()
        with pytest.raises(RuntimeError, match="unavailable"):
            C.skinny_linear_cpu(torch.randn(2, 8), torch.randn(4, 8))
    finally:
        C.skinny_gemm_set_enabled(True)
    assert C.skinny_gemm_available()
