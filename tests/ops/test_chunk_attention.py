"""chunk_attention: the Triton kernel against the float64 oracle, forward and every gradient.

Runs in the Triton interpreter on CPU (small shapes, V tiles of 64) under use_backend("triton"),
so a reference fallback cannot hide; the cuda tier repeats it on the GPU at MEGA sizes, in bf16
too. Inputs are time-major buffers seen through transposes, as the MEGA module passes them.
"""

import pytest
import torch

from seqkern import BackendError, use_backend
from seqkern.ops.chunk import chunk_attention
from seqkern.reference.chunk import chunk_attention_ref
from seqkern.testing import assert_close_to_oracle, assert_result_close_to_oracle


class Case:
    """One shape: (B, Lq, Lk, K, V, chunk_size, causal, bias form, padding, layout).

    bias form: "rel" (per-offset vector) or "dense" (the block's matrix).
    padding: None; "ragged" (right padding, a different length per row); "chunk" (random
    padding, batch row 0 has an all-padding chunk (unmasked, upstream's rule) and batch row 1 a
    chunk whose first key is padding (its first query sees nothing)); "row" (batch row 0 is all
    padding, the others ragged).
    layout: "time" (transposes of (L, B, dim) buffers) or "strided" (every other column of a
    wider buffer: last-dim stride 2). fp32: run in float32 only.
    """

    def __init__(self, B, Lq, Lk, K, V, chunk, causal, form, pad=None, layout="time", fp32=False):
        self.B, self.Lq, self.Lk, self.K, self.V = B, Lq, Lk, K, V
        self.chunk, self.causal, self.form, self.pad, self.layout = chunk, causal, form, pad, layout
        self.fp32_only = fp32  # a slow interpreter case: once is enough

    def block(self):
        if 0 < self.chunk < self.Lk and self.Lq == self.Lk:
            return self.chunk, self.chunk
        return self.Lq, self.Lk

    def __repr__(self):
        return (
            f"B{self.B}-q{self.Lq}-k{self.Lk}-K{self.K}-V{self.V}-c{self.chunk}-"
            f"{'causal' if self.causal else 'full'}-{self.form}-{self.pad}-{self.layout}"
        )


CPU_CASES = [
    Case(1, 1, 1, 8, 20, -1, True, "rel"),  # L = 1
    Case(2, 21, 21, 32, 200, -1, True, "rel", "ragged"),  # L off every tile, V over 4 tiles
    Case(2, 15, 15, 8, 40, 3, True, "dense", "chunk"),
    Case(2, 20, 20, 32, 24, 5, True, "rel", "chunk", "strided"),
    Case(3, 32, 32, 64, 70, 16, True, "rel", "row"),
    Case(2, 80, 80, 8, 24, 40, True, "dense", "chunk"),
    Case(2, 80, 80, 8, 24, 40, True, "rel", "ragged"),
    Case(3, 1, 1, 32, 64, -1, False, "rel"),  # decoding steps: Lq = 1, Lk = 1, 7, 70
    Case(3, 1, 7, 32, 64, -1, False, "dense"),
    Case(2, 1, 70, 32, 130, -1, False, "rel"),
    Case(2, 9, 23, 32, 50, -1, False, "dense", "ragged"),  # Lq < Lk, not causal
    Case(2, 9, 23, 8, 50, -1, True, "rel", "row"),  # Lq < Lk, bottom-right causal
    Case(2, 12, 5, 8, 20, -1, True, "rel"),  # Lq > Lk causal: the first queries see nothing
    Case(2, 19, 19, 64, 1024, -1, False, "rel", "ragged", fp32=True),  # V = 1024 once
    # long reductions (B * T >= 4096), fp32 only (each ~13 s in the interpreter): the per-offset
    # bias gradient sums dS over all 256 chunks and their diagonals (16 x 16 x 16 = 4096 terms on
    # the main diagonal: per-program tile sums, then 256 workspace rows)
    Case(16, 256, 256, 16, 16, 16, True, "rel", fp32=True),
    # dK and dV sum over Lq = 4096 queries per key (one program per key tile, 256 query tiles)
    Case(1, 4096, 16, 16, 16, -1, False, "rel", fp32=True),
]
CUDA_CASES = [
    Case(8, 256, 256, 128, 1024, 64, True, "rel", "chunk"),
    Case(4, 500, 500, 128, 1024, -1, True, "rel", "ragged"),
    Case(4, 333, 333, 64, 1024, 128, True, "dense", "row"),
    Case(16, 1, 300, 128, 1024, -1, False, "rel"),
    Case(2, 200, 200, 256, 2048, -1, True, "dense", "ragged"),
    Case(3, 90, 90, 256, 200, 30, False, "rel", "chunk", "strided"),
]


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _view(gen, case, L, dim):
    """A (B, L, dim) float64 view laid out as `case.layout` says."""
    if case.layout == "time":
        return _rnd(gen, L, case.B, dim).transpose(0, 1)
    return _rnd(gen, case.B, L, 2 * dim)[..., ::2]


def _padding(case, gen):
    B, Lk = case.B, case.Lk
    if case.pad is None:
        return None
    if case.pad == "ragged":
        lengths = torch.tensor([Lk - 3 * b for b in range(B)]).clamp(min=1)
        return torch.arange(Lk)[None] >= lengths[:, None]
    if case.pad == "row":
        lengths = torch.tensor([0] + [Lk - 2 * b for b in range(1, B)]).clamp(min=0)
        return torch.arange(Lk)[None] >= lengths[:, None]
    assert case.pad == "chunk"
    c = case.block()[1]
    pad = torch.rand(B, Lk, generator=gen) < 0.3
    pad[:, 0] = False
    pad[0, c : 2 * c] = True  # an all-padding chunk: left unmasked
    pad[1, c] = True  # a chunk starting with padding: its first (causal) query sees nothing
    return pad


def _make(case, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    lq, lk = case.block()
    q = _view(gen, case, case.Lq, case.K)
    k = _view(gen, case, case.Lk, case.K)
    v = _view(gen, case, case.Lk, case.V)
    bias = 0.5 * _rnd(gen, lq + lk - 1) if case.form == "rel" else 0.5 * _rnd(gen, lq, lk)
    tensors = {"q": q, "k": k, "v": v, "bias": bias}
    tensors = {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in tensors.items()}
    pad = _padding(case, gen)
    if pad is not None:
        pad = pad.to(device)
    dout = _rnd(gen, case.B, case.Lq, case.V).to(device=device, dtype=dtype)
    return tensors, pad, dout


def _run(tensors, pad, dout, case, backend):
    """The op on `backend`, or (backend=None) autograd through chunk_attention_ref, the oracle."""
    args = [tensors[n] for n in ("q", "k", "v", "bias")]
    kwargs = dict(key_padding_mask=pad, chunk_size=case.chunk, causal=case.causal)
    if backend is None:
        out = chunk_attention_ref(*args, **kwargs)
        grads = torch.autograd.grad(out, args, dout)
    else:
        # the backward op picks its backend when it runs: inside the block, or auto mode would
        # send these CPU tensors to the reference
        with use_backend(backend):
            out = chunk_attention(*args, **kwargs)
            grads = torch.autograd.grad(out, args, dout)
    return out, dict(zip(tensors, grads, strict=True))


def _cases():
    for device, cases in (("cpu", CPU_CASES), ("cuda", CUDA_CASES)):
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in dtypes:
            for case in cases:
                if case.fp32_only and dtype != torch.float32:
                    continue
                yield pytest.param(
                    device, dtype, case, id=f"{device}-{str(dtype)[6:]}-{case}", marks=marks
                )


def _detached(tensors, dtype):
    return {n: t.detach().to(dtype).requires_grad_() for n, t in tensors.items()}


def _check_backend(backend, device, dtype, case):
    """`backend`'s forward and every gradient against the float64 oracle, within twice the
    reference's own error in `dtype` (plus the floor)."""
    seed = case.B * 1000 + case.Lq * 10 + case.K + case.V
    tensors, pad, dout = _make(case, dtype, device, seed)
    out, grads = _run(tensors, pad, dout, case, backend)
    oracle, oracle_grads = _run(_detached(tensors, torch.float64), pad, dout.double(), case, None)
    ref, ref_grads = _run(_detached(tensors, dtype), pad, dout, case, None)
    assert out.dtype == dtype
    assert_close_to_oracle(out, oracle, ref, name="out")
    for n in grads:
        assert grads[n].shape == tensors[n].shape and grads[n].dtype == dtype, n
        assert_close_to_oracle(grads[n], oracle_grads[n], ref_grads[n], name=f"d{n}")


@pytest.mark.parametrize("device,dtype,case", list(_cases()))
def test_triton_matches_oracle(device, dtype, case):
    _check_backend("triton", device, dtype, case)


# The cpu backend: every CPU case, plus long causal blocks that its query tiles (128 rows) split.
CPU_BACKEND_CASES = CPU_CASES + [
    Case(2, 300, 300, 8, 24, -1, True, "rel", "ragged"),  # 3 query tiles, the last partial
    Case(2, 260, 300, 8, 24, -1, True, "dense", "row"),  # Lq < Lk: tiles end-aligned to keys
    Case(2, 256, 256, 16, 16, 128, True, "rel", "chunk"),  # chunked: one tile per chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CPU_BACKEND_CASES, ids=repr)
def test_cpu_backend_matches_oracle(case, dtype):
    _check_backend("cpu", "cpu", dtype, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CPU_CASES[2], CPU_CASES[4], CPU_CASES[12]], ids=repr)
def test_reference_backend_stages(case, dtype):
    """The reference backend: the oracle forward, and a hand-written backward that must equal
    autograd through the oracle in the same dtype (float32 softmax included)."""
    tensors, pad, dout = _make(case, dtype, "cpu", seed=1)
    out, grads = _run(tensors, pad, dout, case, "reference")
    want, want_grads = _run(_detached(tensors, dtype), pad, dout, case, None)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], **tol)


@pytest.mark.parametrize("case", [CPU_CASES[2], CPU_CASES[4], CPU_CASES[12]], ids=repr)
def test_lse_agrees_between_backends(case):
    """Both backends save the same statistic, so a backward may run on another backend than
    its forward (e.g. a forward inside use_backend(...), the backward outside)."""
    tensors, pad, _ = _make(case, torch.float32, "cpu", seed=2)
    args = [tensors[n].detach() for n in ("q", "k", "v", "bias")]
    lses = {}
    for backend in ("reference", "triton", "cpu"):
        with use_backend(backend):
            _, lses[backend] = torch.ops.seqkern.chunk_attention(
                *args, pad, case.chunk, case.causal, case.K**-0.5
            )
    torch.testing.assert_close(lses["triton"], lses["reference"])
    torch.testing.assert_close(lses["cpu"], lses["reference"])
    assert torch.isinf(lses["triton"]).any() == torch.isinf(lses["reference"]).any()


def test_rows_without_keys_give_zero_with_finite_grads():
    q = torch.randn(2, 8, 16, requires_grad=True)
    k = torch.randn(2, 8, 16, requires_grad=True)
    v = torch.randn(2, 8, 80, requires_grad=True)
    rel = torch.randn(7, requires_grad=True)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 4] = True  # the first key of the second chunk: its first query sees nothing
    with use_backend("triton"):
        out = chunk_attention(q, k, v, rel, key_padding_mask=pad, chunk_size=4)
        late = chunk_attention(q, k[:, :3], v[:, :3], torch.randn(10))  # queries 0..4 see none
        grads = torch.autograd.grad(out.sum() + late.sum(), (q, k, v, rel))
    assert not out[0, 4].any() and out[0, 5].abs().sum() > 0
    assert not late[:, :5].any() and late[:, 5:].abs().amin(-1).gt(0).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_mega_simple_bias_slices():
    """MEGA's RelativePositionBias(M): bias[i, j] = w[M - 1 + j - i]. The per-offset vector
    rel = w[M - lk : M + lq - 1] gives the same attention as the dense matrix: square chunks,
    the whole sequence, and a decoding step (the last row of upstream's lk x lk matrix)."""
    M = 16
    w = torch.randn(2 * M - 1)

    def dense(lq, lk):
        i = torch.arange(lk - lq, lk)[:, None]
        return w[M - 1 + torch.arange(lk)[None, :] - i]

    q, k, v = torch.randn(2, 12, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 24)
    for qs, ks, vs, lq, lk, chunk, causal in (
        (q, k, v, 4, 4, 4, True),  # chunks of 4
        (q, k, v, 12, 12, -1, True),  # the whole sequence
        (q[:, 6:7], k[:, :7], v[:, :7], 1, 7, -1, False),  # a step: 1 query, 7 keys
    ):
        with use_backend("triton"):
            got = chunk_attention(
                qs, ks, vs, w[M - lk : M + lq - 1], chunk_size=chunk, causal=causal
            )
        want = chunk_attention_ref(qs, ks, vs, dense(lq, lk), chunk_size=chunk, causal=causal)
        torch.testing.assert_close(got, want)


def test_no_grad_step_skips_autograd_and_backward_is_deterministic():
    case = Case(2, 17, 17, 16, 40, -1, True, "rel", "ragged")
    tensors, pad, dout = _make(case, torch.float32, "cpu", seed=5)
    with torch.no_grad(), use_backend("triton"):
        out = chunk_attention(*tensors.values(), key_padding_mask=pad)
    assert out.grad_fn is None
    _, first = _run(tensors, pad, dout, case, "triton")
    _, second = _run(tensors, pad, dout, case, "triton")
    for n in first:
        assert torch.equal(first[n], second[n]), n


def test_triton_declines_what_it_cannot_do_and_says_why():
    q = torch.randn(1, 4, 16)
    bias = torch.randn(4, 4)
    with use_backend("triton"), pytest.raises(BackendError, match="dropout"):
        chunk_attention(q, q, q, bias, dropout_p=0.1, training=True)
    with use_backend("triton"):  # dropout outside training is a no-op: runs the kernel
        torch.testing.assert_close(
            chunk_attention(q, q, q, bias, dropout_p=0.1), chunk_attention_ref(q, q, q, bias)
        )
    with use_backend("triton"), pytest.raises(BackendError, match="float64"):
        chunk_attention(q.double(), q.double(), q.double(), bias.double())
    with use_backend("triton"), pytest.raises(BackendError, match="share one dtype"):
        chunk_attention(q, q, q, bias.half())
    big = torch.randn(1, 4, 300)
    with use_backend("triton"), pytest.raises(BackendError, match="qk size 300"):
        chunk_attention(big, big, q, bias)
    with use_backend("triton", "reference"):  # the fallback order still works
        assert chunk_attention(big, big, q, bias).shape == (1, 4, 16)


@pytest.mark.parametrize(
    "bias_shape,kwargs,match",
    [
        ((6, 5), {}, r"bias must be the \(6, 6\) matrix or its per-offset vector \(11,\)"),
        ((10,), {}, r"per-offset vector \(11,\)"),
        ((11,), {"chunk_size": 3}, r"\(3, 3\) matrix or its per-offset vector \(5,\)"),
        ((1, 11), {}, "bias must be"),
        ((6, 6), {"chunk_size": 4}, "chunk_size 4 must divide the length 6"),
        ((6, 6), {"key_padding_mask": torch.zeros(2, 6)}, "key_padding_mask must be a bool"),
        ((6, 6), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, r"\(B, Lk\)"),
        ((6, 6), {"dropout_p": 1.5}, "dropout_p"),
    ],
)
def test_bad_inputs_raise_clear_errors(bias_shape, kwargs, match):
    q = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=match):
        chunk_attention(q, q, q, torch.zeros(bias_shape), **kwargs)


def test_bad_tensors_raise_clear_errors():
    q = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="k must have q's dtype"):
        chunk_attention(q, q.double(), q, torch.zeros(6, 6))
    with pytest.raises(ValueError, match="K must be at least 1"):
        chunk_attention(q[..., :0], q[..., :0], q, torch.zeros(6, 6))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("B,Lq,Lk", [(2, 0, 0), (0, 5, 5), (2, 3, 0)])
def test_empty_sequences(backend, B, Lq, Lk):
    """No query, no key or no batch: out 0 of the right shape, gradients 0 (the reference
    used to fail in a reshape)."""
    q = torch.randn(B, Lq, 4, requires_grad=True)
    k = torch.randn(B, Lk, 4, requires_grad=True)
    v = torch.randn(B, Lk, 6, requires_grad=True)
    bias = torch.zeros(Lq, Lk, requires_grad=True)
    with use_backend(backend):
        out = chunk_attention(q, k, v, bias, causal=False)
        grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=True)
    assert out.shape == (B, Lq, 6) and not out.any()
    for g, t in zip(grads, (q, k, v, bias), strict=True):
        assert g is None or (g.shape == t.shape and not g.any())


OPCHECK_CASES = [
    Case(2, 10, 10, 16, 24, 5, True, "rel", "chunk", "strided"),
    Case(2, 9, 9, 8, 20, -1, True, "dense", "ragged"),
    Case(2, 1, 9, 16, 20, -1, False, "rel"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=repr)
def test_chunk_attention_opcheck(backend, case):
    tensors, pad, dout = _make(case, torch.float32, "cpu", seed=3)
    t = [tensors[n].detach() for n in ("q", "k", "v", "bias")]
    args = (*t, pad, case.chunk, case.causal, 0.3)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.seqkern.chunk_attention.default, args)
        out, lse = torch.ops.seqkern.chunk_attention(*args)
        for bias_grad in (True, False):
            bwd_args = (dout, *t[:3], out, lse, t[3], pad, case.chunk, case.causal, 0.3, bias_grad)
            torch.library.opcheck(torch.ops.seqkern.chunk_attention_bwd.default, bwd_args)


def test_chunk_attention_torch_compile_fullgraph():
    case = Case(2, 20, 20, 16, 40, 5, True, "rel", "chunk")
    tensors, pad, dout = _make(case, torch.float32, "cpu", seed=4)

    def block(q, k, v, rel, pad):
        return chunk_attention(q * 1.5, k, v, rel, key_padding_mask=pad, chunk_size=5).relu()

    inputs = list(tensors.values())
    compiled = torch.compile(block, fullgraph=True)
    for backend in ("reference", "triton"):
        with use_backend(backend):
            got = compiled(*inputs, pad)
            got_grads = torch.autograd.grad(got, inputs, dout)
            want = block(*inputs, pad)
            want_grads = torch.autograd.grad(want, inputs, dout)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# Regressions found by tests/fuzz/test_fuzz_chunk_ema.py


def _grads_vs_oracle(backend, dtype, q, k, v, bias, poisoned=False, **kwargs):
    """`backend`'s out and gradients against autograd through the oracle in float64, under
    seqkern.testing's rule (the poisoned rule for gradients when an input holds NaN)."""

    def run(dt, op):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, bias)]
        out = op(*leaves, **kwargs)
        dout = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
        return [out, *torch.autograd.grad(out, leaves, dout.to(dt))]

    with use_backend(backend):
        got = run(dtype, chunk_attention)
    oracle = run(torch.float64, chunk_attention_ref)
    ref = run(dtype, chunk_attention_ref)
    for name, g, o, r in zip(["out", "dq", "dk", "dv", "dbias"], got, oracle, ref, strict=True):
        assert_result_close_to_oracle(g, o, r, name=name, poisoned=poisoned, gradient=name != "out")


def test_triton_reads_a_transposed_key_padding_mask():
    # A (B, Lk) mask seen through a transpose (a time-major (Lk, B) buffer) was read as if
    # contiguous: every output row of the block wrong (max error ~3 on these inputs).
    gen = torch.Generator().manual_seed(0)
    q, k = _rnd(gen, 2, 7, 7), _rnd(gen, 2, 5, 7)
    v, rel = _rnd(gen, 2, 5, 130), _rnd(gen, 11)
    pad = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    for causal in (True, False):
        _grads_vs_oracle(
            "triton",
            torch.float32,
            q,
            k,
            v,
            rel,
            key_padding_mask=pad.T.contiguous().T,
            causal=causal,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_gradients_of_rows_with_few_keys(dtype):
    # Lq > Lk, causal: the last rows see one or two keys. delta = dO . O from the output rounded
    # to its dtype left an error in dS that the oracle's softmax backward does not have (dQ
    # 7.2e-3 against a bound of 2.3e-3 in fp16, 7.6e-6 against 2.0e-6 in fp32); delta and the
    # row norm now come from the kernel's own p and dp.
    seed, scaling = (1, 1.7) if dtype == torch.float16 else (0, 3.0)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _rnd(gen, 2, 7, 16), _rnd(gen, 2, 2, 16), _rnd(gen, 2, 2, 65)
    bias = 0.5 * _rnd(gen, 7, 2)
    _grads_vs_oracle("triton", dtype, q, k, v, bias, causal=True, scaling=scaling)


def test_triton_hidden_keys_pass_no_gradient_from_a_nan_row():
    # A NaN in a visible value makes every row's dP and delta NaN; a padded key's logit is
    # hidden, so (as autograd through the oracle's masked_fill) its dK stays 0, not 0 * NaN.
    gen = torch.Generator().manual_seed(2)
    q, k, v, rel = _rnd(gen, 1, 6, 16), _rnd(gen, 1, 6, 16), _rnd(gen, 1, 6, 20), _rnd(gen, 11)
    v[0, 1, 3] = float("nan")
    pad = torch.tensor([[False, False, False, False, True, True]])
    _grads_vs_oracle(
        "triton", torch.float32, q, k, v, rel, poisoned=True, key_padding_mask=pad, causal=False
    )


def test_cpu_backend_float64_softmax_is_the_oracles():
    # The op's softmax runs in float32 (documented, upstream's); the cpu backend's one-pass
    # forward computed it in float64 for float64 inputs and differed from the oracle by the
    # float32 rounding (5e-8 against a bound of 1e-12).
    gen = torch.Generator().manual_seed(3)
    q, k, v, bias = _rnd(gen, 2, 8, 4), _rnd(gen, 2, 8, 4), _rnd(gen, 2, 8, 3), _rnd(gen, 2, 2)
    _grads_vs_oracle("cpu", torch.float64, q, k, v, bias, chunk_size=2, causal=False)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_row_whose_logits_are_all_minus_inf_sees_no_key(backend):
    # A -inf bias row: every logit of query 1 is -inf by value. As a masked row it gives 0 and
    # passes no gradient, on every backend; the oracle gave NaN, triton 0, cpu NaN without a
    # key padding mask and 0 with one.
    gen = torch.Generator().manual_seed(4)
    q, k, v, bias = _rnd(gen, 2, 4, 16), _rnd(gen, 2, 4, 16), _rnd(gen, 2, 4, 20), _rnd(gen, 4, 4)
    bias[1] = float("-inf")
    for kpm in (None, torch.tensor([[False, False, False, True], [False] * 4])):
        _grads_vs_oracle(
            backend, torch.float32, q, k, v, bias, poisoned=True, key_padding_mask=kpm,
            causal=False,
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_an_inf_key_every_query_hides_passes_no_gradient(backend):
    # +Inf in one element of key 2 where every query's element is negative: that logit is -inf
    # in every row, so key 2 gets no gradient. The Triton backward made its dK NaN from the
    # query rows past Lq of its tile (zero-filled: 0 * Inf).
    gen = torch.Generator().manual_seed(5)
    q, k, v, bias = _rnd(gen, 1, 3, 24), _rnd(gen, 1, 5, 24), _rnd(gen, 1, 5, 20), _rnd(gen, 3, 5)
    q[..., 3] = -q[..., 3].abs() - 0.1
    k[0, 2, 3] = float("inf")
    _grads_vs_oracle(backend, torch.float32, q, k, v, bias, poisoned=True, causal=False)
