"""The fused Emformer steps' Linear (csrc/emformer/conv_emformer_step_cpu.cpp `linear`) on
bfloat16 weights (seqkern.swap's cpu_weights="bf16") against the float64 oracle on the same
rounded values:

* packed for the CPU's matrix units (csrc/linear/bf16_linear_cpu.cpp: AMX or AVX512-BF16
  through oneDNN's micro-kernel): x is rounded to bfloat16 as well, the products of two
  bfloat16 values are exact in float32 and accumulate in float32, so the result is the
  oracle's on (bf16(x), bf16(W)) to float32 summation error;
* (n, k) for the AVX-512 skinny GEMM / BLAS: x stays float32 (tests/ops/test_skinny_gemm.py
  proves the kernel bit for bit; here the step's dispatch).

Shapes: one row, rows beyond one 32-row chunk, a streaming batch's 320, k odd (padded to the
micro-kernel's pairs), n off the 64-column panels; bias, each activation, residual, alpha; NaN.
"""

import pytest
import torch
import torch.nn.functional as F

from seqkern import _ext
from seqkern.testing import assert_close_to_oracle

C = _ext.C
ACTS = {0: lambda v: v, 1: torch.relu, 2: F.gelu, 3: F.silu}
packed_only = pytest.mark.skipif(
    not C.bf16_packed_available(),
    reason="no packed bfloat16 GEMM on this CPU / torch build (AMX or AVX512-BF16 via oneDNN)",
)
SHAPES = [(1, 2, 1), (5, 33, 9), (21, 256, 1024), (33, 250, 130), (320, 64, 64), (21, 1024, 256)]


def _inputs(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return x, w, torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)


def _oracle(x, w, b, act, r, alpha):
    y = alpha * ACTS[act](x.double() @ w.double().t() + b.double())
    return y if r is None else r.double() + y


@packed_only
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("act", [0, 2, 3])
def test_packed_is_the_oracle_on_rounded_x_and_weight(m, k, n, act):
    x, w, b, r = _inputs(m, k, n, 13 * m + k + n + act)
    packed = C.pack_bf16_linear_weight(w)
    assert packed.dtype == torch.bfloat16 and packed.dim() == 3
    xr, wr = x.bfloat16().float(), w.bfloat16().float()
    for res, alpha in ((r, 0.5), (None, 1.0)):
        got = C.emformer_linear_cpu(x, packed, b, act, res, alpha)
        assert got.shape == (m, n) and got.dtype == torch.float32
        ref = alpha * ACTS[act](F.linear(xr, wr, b)) + (0 if res is None else res)
        assert_close_to_oracle(got, _oracle(xr, wr, b, act, res, alpha), ref, name="packed")


@packed_only
def test_packed_reads_strided_rows_and_keeps_nan_in_its_row():
    base = torch.randn(7, 80)
    x = base[:, 3:51]  # rows 80 apart
    x[4, 10] = float("nan")
    w, b = torch.randn(20, 48), torch.randn(20)
    got = C.emformer_linear_cpu(x, C.pack_bf16_linear_weight(w), b)
    assert torch.isnan(got[4]).all()
    keep = torch.arange(7) != 4
    want = F.linear(x[keep].bfloat16().float(), w.bfloat16().float(), b)
    torch.testing.assert_close(got[keep], want, rtol=1e-5, atol=1e-5)


@packed_only
def test_packed_rejects_what_does_not_fit():
    packed = C.pack_bf16_linear_weight(torch.randn(70, 16))  # two panels: n in 65..128
    with pytest.raises(RuntimeError, match="do not fit"):
        C.emformer_linear_cpu(torch.randn(2, 18), packed, torch.randn(70))
    with pytest.raises(RuntimeError, match="do not fit"):
        C.emformer_linear_cpu(torch.randn(2, 16), packed, torch.randn(64))
    with pytest.raises(RuntimeError, match="pack_bf16_weight"):
        C.emformer_linear_cpu(torch.randn(2, 16), packed.float(), torch.randn(70))


@pytest.mark.parametrize("m, k, n", [(5, 33, 9), (21, 256, 1024), (320, 64, 64)])
def test_unpacked_bf16_weight_is_float32_arithmetic_on_its_values(m, k, n):
    """An (n, k) bfloat16 weight: the skinny GEMM up to 96 rows, BLAS beyond, both on the
    widened weight with x in float32."""
    x, w, b, r = _inputs(m, k, n, m + 2 * k + n)
    wb = w.bfloat16()
    got = C.emformer_linear_cpu(x, wb, b, 1, r, -2.0)
    ref = -2.0 * torch.relu(F.linear(x, wb.float(), b)) + r
    assert_close_to_oracle(got, _oracle(x, wb.float(), b, 1, r, -2.0), ref, name="bf16 weight")


def test_linear_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="bfloat16 for float32"):
        C.emformer_linear_cpu(torch.randn(2, 8).double(), torch.randn(4, 8).bfloat16(),
                              torch.randn(4).double())  # fmt: skip
    with pytest.raises(RuntimeError, match="weight must be"):
        C.emformer_linear_cpu(torch.randn(2, 8), torch.randn(4, 7), torch.randn(4))
    with pytest.raises(RuntimeError, match="bias"):
        C.emformer_linear_cpu(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))
