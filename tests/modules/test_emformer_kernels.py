"""Emformer and ConvEmformer on the Triton segment-attention kernel (Triton interpreter).

Under `use_backend("triton", "cpu")` the attention can only run on the kernel (a reference
fallback would raise BackendError), so these tests prove the module's kernel path: per-stream
projections, device key lengths, whole right-aligned state buffers with `past_length`, and the
sync-free left-context state update. Compared against the float64 oracle (the same model in
float64 under the reference backend) with `assert_close_to_oracle`, the reference backend in
the test dtype setting the tolerance: training outputs and the gradients of the input and of
every parameter; streaming `infer` segment by segment (outputs and every state tensor).
"""

import copy
import math

import pytest
import torch

import seqkern.modules.emformer as sk
from seqkern import backends
from seqkern.ops import emformer as ops
from seqkern.testing import assert_close_to_oracle

D, H, FFN, LAYERS, S = 32, 2, 32, 2, 4
KERNEL = ("triton", "cpu")

# (R, LC, M): right context 0, max memory 0 and left context 0 each appear once.
CONFIGS = {"R2-LC3-M2": (2, 3, 2), "R0-LC4-M0": (0, 4, 0), "R1-LC0-M3": (1, 0, 3)}
# fp32 for every configuration; fp16 (slow in the interpreter) for the one with everything on.
CASES = [
    (kind, cfg, dtype)
    for kind in ("emformer", "conv")
    for cfg in CONFIGS
    for dtype in (torch.float32, torch.float16)
    if dtype == torch.float32 or cfg == "R2-LC3-M2"
]


def _model(kind, cfg, seed=0):
    R, LC, M = CONFIGS[cfg]
    torch.manual_seed(seed)
    common = dict(left_context_length=LC, right_context_length=R, max_memory_size=M)
    if kind == "emformer":
        return sk.Emformer(D, H, FFN, LAYERS, S, tanh_on_mem=True, **common)
    return sk.ConvEmformer(D, H, FFN, LAYERS, S, kernel_size=3, **common)


def _run_forward(model, x, lengths, dout, names):
    x = x.detach().clone().requires_grad_()
    out, out_lengths = model(x, lengths)
    grads = torch.autograd.grad(out, [x] + [p for _, p in names(model)], dout)
    return out, out_lengths, grads


def _named(model):
    return list(model.named_parameters())


@pytest.mark.parametrize("kind,cfg,dtype", CASES, ids=str)
def test_training_forward_and_gradients(kind, cfg, dtype):
    R = CONFIGS[cfg][0]
    model = _model(kind, cfg)
    gen = torch.Generator().manual_seed(1)
    U = 10  # not a multiple of the segment length
    cases = [
        (torch.randn(1, U + R, D, generator=gen), torch.tensor([U])),
        (torch.randn(3, U + R, D, generator=gen), torch.tensor([U, 7, 2])),  # ragged
    ]
    for x, lengths in cases:
        dout = torch.randn(x.size(0), U, D, generator=gen)
        with backends.use_backend("reference"):
            oracle = _run_forward(copy.deepcopy(model).double(), x.double(), lengths,
                                  dout.double(), _named)  # fmt: skip
            ref = _run_forward(copy.deepcopy(model).to(dtype), x.to(dtype), lengths,
                               dout.to(dtype), _named)  # fmt: skip
        with backends.use_backend(*KERNEL):
            got = _run_forward(copy.deepcopy(model).to(dtype), x.to(dtype), lengths,
                               dout.to(dtype), _named)  # fmt: skip
        tag = f"B{x.size(0)}"
        assert_close_to_oracle(got[0], oracle[0], ref[0], name=f"{tag} output")
        assert torch.equal(got[1], lengths)
        names = ["input"] + [n for n, _ in _named(model)]
        for name, g, o, r in zip(names, got[2], oracle[2], ref[2]):
            assert_close_to_oracle(g, o, r, name=f"{tag} grad of {name}")


def _chunks(batch, R, n, gen):
    """n (window, lengths) pairs. For B > 1 the one before last is ragged with max(lengths) =
    s + R, the last with max(lengths) = R + 2 < s + R (upstream's offset padding mask, and
    the left context inserted after utterance keys: the lc state update must follow it)."""
    out = []
    for c in range(n):
        x = torch.randn(batch, S + R, D, generator=gen)
        lengths = torch.full((batch,), S + R, dtype=torch.long)
        if c == n - 2 and batch > 1:
            lengths = torch.tensor([S + R, 2, R + 1])[:batch]
        if c == n - 1 and batch > 1:
            lengths = torch.tensor([R + 1, R + 2, 1])[:batch]
        out.append((x, lengths))
    return out


def _stream(model, chunks, dtype):
    """Outputs, output lengths and states of each infer call, feeding back its own states."""
    model = copy.deepcopy(model).to(dtype)
    states, results = None, []
    with torch.enable_grad():  # keeps ConvEmformer off its fused CPU step (needs no autograd)
        for x, lengths in chunks:
            y, out_lengths, states = model.infer(x.to(dtype), lengths, states)
            results.append((y.detach(), out_lengths, [[t.detach() for t in s] for s in states]))
    return results


@pytest.mark.parametrize("kind,cfg,dtype", CASES, ids=str)
def test_infer_segment_by_segment(kind, cfg, dtype):
    R = CONFIGS[cfg][0]
    model = _model(kind, cfg).eval()
    gen = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        chunks = _chunks(batch, R, 3, gen)
        with backends.use_backend("reference"):
            oracle = _stream(model, chunks, torch.float64)
            ref = _stream(model, chunks, dtype)
        with backends.use_backend(*KERNEL):
            got = _stream(model, chunks, dtype)
        for step, (g, o, r) in enumerate(zip(got, oracle, ref)):
            tag = f"B{batch} step {step}"
            assert_close_to_oracle(g[0], o[0], r[0], name=f"{tag} output")
            assert torch.equal(g[1], o[1]), tag
            for layer, (gs, os_, rs) in enumerate(zip(g[2], o[2], r[2])):
                assert len(gs) == len(os_)
                for i, (a, b, c) in enumerate(zip(gs, os_, rs)):
                    name = f"{tag} state[{layer}][{i}]"
                    assert a.shape == b.shape, name
                    if not a.is_floating_point():
                        assert torch.equal(a, b), name
                    elif a.numel():
                        assert_close_to_oracle(a, b, c, name=name)


def test_no_fallback_and_unsupported_inputs_raise():
    """Only the kernel allowed: float64 and training dropout name their reason, no fallback."""
    model = _model("emformer", "R2-LC3-M2")
    x, lengths = torch.randn(2, 10, D), torch.tensor([8, 5])
    with backends.use_backend(*KERNEL), pytest.raises(backends.BackendError, match="float64"):
        model.double()(x.double(), lengths)
    model = sk.Emformer(D, H, FFN, 1, S, dropout=0.1, right_context_length=2).float().train()
    with backends.use_backend(*KERNEL), pytest.raises(backends.BackendError, match="dropout"):
        model(x, lengths)
    with backends.use_backend(*KERNEL):  # eval mode: dropout is off, the kernel runs
        model.eval()(x, lengths)


def test_op_reference_equals_kernel_on_streams():
    """emformer_segment_attention itself: the triton backend against its reference backend
    (infer mode with past_length and key lengths)."""
    gen = torch.Generator().manual_seed(4)

    def rnd(rows):
        return torch.randn(rows, 2, D, generator=gen)

    st = dict(q_rc=rnd(1), q_utt=rnd(S), q_sum=rnd(1), k_mem=rnd(3), k_rc=rnd(1), k_lc=rnd(5))
    st.update(k_utt=rnd(S), v_mem=rnd(3), v_rc=rnd(1), v_lc=rnd(5), v_utt=rnd(S))
    kw = dict(num_heads=H, segment_length=S, right_context=1, left_context=5, max_memory=3)
    kw.update(key_lengths=torch.tensor([9, 7], dtype=torch.int32))
    kw.update(past_length=torch.tensor([[6, 6]], dtype=torch.int32))
    outs = {}
    for backend in ("reference", "triton"):
        with backends.use_backend(backend):
            outs[backend] = ops.emformer_segment_attention(*st.values(), **kw)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past_length is for infer"):
        training = {**st, "k_mem": None, "k_lc": None, "v_mem": None, "v_lc": None}
        ops.emformer_segment_attention(*training.values(), **kw)


@pytest.mark.parametrize("infer", [False, True], ids=["training", "infer"])
@pytest.mark.parametrize("where", ["v_utt", "v_mem", "k_utt", "q_utt"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_pattern_equals_the_reference(infer, where, value):
    """A NaN or Inf in one frame gives the same NaN/Inf entries on both backends (upstream's:
    the dense probabilities-times-values product carries a value's 0 * NaN to every query row,
    while a query or key reaches only the logits it is in), and finite entries agree. Training
    mode has 4 segments, so the kernel skips key tiles; infer mode also has a poisoned memory
    row that past_length leaves out."""
    U = 16 if not infer else S
    gen = torch.Generator().manual_seed(21)

    def rnd(rows):
        return torch.randn(rows, 2, D, generator=gen)

    if infer:
        st = dict(q_rc=rnd(1), q_utt=rnd(U), q_sum=rnd(1), k_mem=rnd(3), k_rc=rnd(1))
        st.update(k_lc=rnd(5), k_utt=rnd(U), v_mem=rnd(3), v_rc=rnd(1), v_lc=rnd(5), v_utt=rnd(U))
        kw = dict(past_length=torch.tensor([[6, 6]], dtype=torch.int32))  # 2 of 3 memory rows
        st["v_mem"][0, 1, 3] = math.nan  # outside the valid rows: no key
    else:
        st = dict(q_rc=rnd(4), q_utt=rnd(U), q_sum=rnd(4), k_mem=rnd(3), k_rc=rnd(4), k_lc=None)
        st.update(k_utt=rnd(U), v_mem=rnd(3), v_rc=rnd(4), v_lc=None, v_utt=rnd(U))
        kw = {}
    st[where][-1, 0, 5] = value  # a frame of the last segment (training: past the first tile)
    kw.update(num_heads=H, segment_length=S, right_context=1, left_context=0, max_memory=3)
    outs = {}
    for backend in ("reference", "triton"):
        with backends.use_backend(backend):
            outs[backend] = ops.emformer_segment_attention(*st.values(), **kw)
    got, want = outs["triton"], outs["reference"]
    assert not want.isfinite().all()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def _op_args(infer: bool, seed: int = 5):
    """Streams and the op's scalar arguments: infer (lc given, past_length) or training (U = 6
    over 2 segments of S = 4: 2 rc blocks of 1 row, 1 memory row, 2 summary rows)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(rows):
        return torch.randn(rows, 2, D, generator=gen)

    if infer:
        st = [rnd(1), rnd(S), rnd(1), rnd(3), rnd(1), rnd(5), rnd(S), rnd(3), rnd(1), rnd(5)]
        st.append(rnd(S))
        extra = [torch.tensor([9, 7], dtype=torch.int32), torch.tensor([[6, 6]], dtype=torch.int32)]
    else:
        st = [rnd(2), rnd(6), rnd(2), rnd(1), rnd(2), None, rnd(6), rnd(1), rnd(2), None, rnd(6)]
        extra = [torch.tensor([9, 6], dtype=torch.int32), None]
    return st, extra + [H, S, 1, 5, 3, -1e8, (D // H) ** -0.5]


@pytest.mark.parametrize("infer", [False, True], ids=["training", "infer"])
def test_library_ops_opcheck(infer):
    """The Triton kernels' torch.library ops: schema, fake (shapes, dtypes, strides) and
    autograd registration, in training and in infer mode."""
    streams, rest = _op_args(infer)
    with backends.use_backend("triton"):
        out, lse = torch.ops.seqkern.emformer_segment_attention(*streams, *rest)
        assert lse.shape == (2, H, out.size(0)) and lse.dtype == torch.float32
        torch.library.opcheck(torch.ops.seqkern.emformer_segment_attention.default,
                              (*streams, *rest))  # fmt: skip
        dout = torch.randn_like(out)
        bwd_args = (dout, *streams, out, lse, *rest)
        grads = torch.ops.seqkern.emformer_segment_attention_bwd(*bwd_args)
        for g, t in zip(grads, streams, strict=True):
            assert g.shape == ((0,) if t is None else t.shape)
        torch.library.opcheck(torch.ops.seqkern.emformer_segment_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_training(backend):
    """emformer_segment_attention under torch.compile(fullgraph=True) (the backend chosen
    when the graph is traced): the same output and stream gradients as eager."""
    streams, rest = _op_args(False)
    streams = [None if t is None else t.requires_grad_() for t in streams]
    kw = dict(num_heads=H, segment_length=S, right_context=1, left_context=5, max_memory=3)
    kw["key_lengths"] = rest[0]

    def f(*st):
        return ops.emformer_segment_attention(*st, **kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t for t in streams if t is not None]
    with backends.use_backend(backend):
        want = f(*streams)
        dout = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, leaves, dout)
        got = compiled(*streams)
        got_grads = torch.autograd.grad(got, leaves, dout)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_conv_module_runs_the_segment_conv_kernel(monkeypatch):
    """Under the kernel backends ConvEmformer's depthwise conv is the emformer_segment_conv
    op on its triton backend, in training and in infer (no silent cat/Conv1d path)."""
    from seqkern.ops import emformer_conv

    calls = []
    original = sk.emformer_segment_conv

    def spy(z, *args, **kwargs):
        calls.append(emformer_conv.segment_conv_backend(z))
        return original(z, *args, **kwargs)

    monkeypatch.setattr(sk, "emformer_segment_conv", spy)
    model = _model("conv", "R2-LC3-M2")
    x, lengths = torch.randn(2, 10 + 2, D), torch.tensor([10, 7])
    with backends.use_backend(*KERNEL):
        model(x, lengths)
        assert calls == ["triton"] * LAYERS
        _stream(model, _chunks(2, 2, 2, torch.Generator().manual_seed(0)), torch.float32)
    assert calls == ["triton"] * (3 * LAYERS)
    model(x, lengths)  # auto mode on CPU: the reference code, not the op
    assert len(calls) == 3 * LAYERS


@pytest.mark.parametrize("with_cache", [False, True], ids=["training", "infer"])
def test_conv_module_under_autocast(with_cache, monkeypatch):
    """Under autocast (fp16 on the CPU; the interpreter has no bf16) z is fp16 while the conv
    weights and the state stay fp32: the kernel path casts them as nn.Conv1d's autocast does,
    and gives the reference path's output, gradients and new cache (dtype included)."""
    torch.manual_seed(3)
    conv = sk.ConvolutionModule(D, S, 2, 3)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    U = S if with_cache else 10
    gen = torch.Generator().manual_seed(5)
    utt = torch.randn(U, 2, D, generator=gen)
    rc = torch.randn((1 if with_cache else 3) * 2, 2, D, generator=gen)
    state = torch.randn(2, D, 2, generator=gen) if with_cache else None
    calls, original = [], sk.emformer_segment_conv
    monkeypatch.setattr(
        sk, "emformer_segment_conv", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    results = {}
    for backend in ("reference", "triton"):
        model = copy.deepcopy(conv)
        with backends.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            out_utt, out_rc, cache = model(utt, rc, state)
            loss = out_utt.float().square().sum() + out_rc.float().square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[backend] = (out_utt, out_rc, cache, grads)
    assert calls == [1]  # the triton run took the kernel path
    ref, got = results["reference"], results["triton"]
    for a, b in zip(got[:3], ref[:3], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
    for a, b in zip(got[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
