"""seqkern's Emformer / ConvEmformer against torchaudio 2.8.0's own code.

Weights are perturbed before every comparison (upstream's init can hide mistakes: e.g. zero
biases), then shared both ways with strict=True. Compared: forward outputs and lengths, the
gradients of the input and of every parameter, and streaming `infer` chunk by chunk, every
tensor of every layer's state included. float64 with near-exact tolerances; fp32 with 1e-5.
The last tests check that the comparisons themselves catch a deliberately wrong module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from seqkern import backends
from seqkern.modules import emformer as sk
from seqkern.modules.sequence import SequenceModule
from seqkern.ops import emformer as emformer_ops
from seqkern.reference.emformer import emformer_attention_ref

D = 24
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (conv, kwargs): odd head counts, segment lengths, contexts, memory sizes and activations.
CONFIGS = [
    pytest.param(False, dict(num_heads=3, segment_length=4, left_context_length=3,
                             right_context_length=2, max_memory_size=3), id="emf-lc3-r2-m3"),
    pytest.param(False, dict(num_heads=4, segment_length=5, left_context_length=0,
                             right_context_length=1, max_memory_size=0, tanh_on_mem=True,
                             activation="gelu"), id="emf-lc0-r1-m0-tanh"),
    pytest.param(False, dict(num_heads=3, segment_length=4, left_context_length=3,
                             right_context_length=0, max_memory_size=3, tanh_on_mem=True,
                             activation="silu"), id="emf-lc3-r0-m3-tanh"),
    pytest.param(False, dict(num_heads=4, segment_length=5, left_context_length=0,
                             right_context_length=0, max_memory_size=0), id="emf-lc0-r0-m0"),
    pytest.param(True, dict(num_heads=3, segment_length=4, kernel_size=3, left_context_length=3,
                            right_context_length=2, max_memory_size=3), id="conv-k3-lc3-r2-m3"),
    pytest.param(True, dict(num_heads=4, segment_length=5, kernel_size=4, left_context_length=0,
                            right_context_length=1, max_memory_size=0, tanh_on_mem=True,
                            ffn_activation="gelu", conv_activation="relu"),
                 id="conv-k4-lc0-r1-m0-tanh"),
    pytest.param(True, dict(num_heads=3, segment_length=4, kernel_size=2, left_context_length=3,
                            right_context_length=0, max_memory_size=3, conv_activation="gelu"),
                 id="conv-k2-lc3-r0-m3"),
]  # fmt: skip


def _upstream_cls(up, conv):
    return up.conv_emformer.ConvEmformer if conv else up.emformer.Emformer


def _full_kwargs(kwargs, num_layers=2):
    return dict(input_dim=D, ffn_dim=16, num_layers=num_layers, **kwargs)


def _build_upstream(up, conv, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvEmformer's 2.8 deprecation warnings
        return _upstream_cls(up, conv)(**kwargs)


def _pair(up, conv, kwargs, dtype=torch.float64, seed=0):
    """(upstream, seqkern) in eval mode, with the same perturbed weights."""
    kwargs = _full_kwargs(kwargs)
    ref = _build_upstream(up, conv, kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ours = (sk.ConvEmformer if conv else sk.Emformer)(**kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype).eval(), ours.to(dtype).eval()


def _assert_same_params(ref, ours):
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


def _compare_forward(ref, ours, x, lengths, tol, check_grads=True):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, la = ref(xa, lengths)
    yb, lb = ours(xb, lengths)
    assert_close(yb, ya, **tol)
    assert_close(lb, la, rtol=0, atol=0)
    if not check_grads:
        return
    w = torch.randn(ya.shape, dtype=ya.dtype, generator=torch.Generator().manual_seed(5))
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert_close(xb.grad, xa.grad, **tol)
    named_b = dict(ours.named_parameters())
    for name, pa in ref.named_parameters():
        pb = named_b[name]
        assert pa.grad is not None and pb.grad is not None, name
        assert_close(pb.grad, pa.grad, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


def _compare_states(sa, sb, tol):
    assert len(sa) == len(sb)
    for layer, (la, lb) in enumerate(zip(sa, sb)):
        assert len(la) == len(lb), f"layer {layer}: state lengths differ"
        for i, (ta, tb) in enumerate(zip(la, lb)):
            assert_close(tb, ta, **tol, msg=lambda m, li=layer, k=i: f"state[{li}][{k}]: {m}")


def _chunks(batch, conv_kwargs, n, dtype, seed):
    """n (window, lengths) pairs with ragged lengths; the last chunk is partial for some rows."""
    s, r = conv_kwargs["segment_length"], conv_kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n):
        x = torch.randn(batch, s + r, D, generator=gen, dtype=dtype)
        lengths = torch.full((batch,), s + r, dtype=torch.long)
        if c == n - 2:  # ragged, max(lengths) == s + r
            lengths[1:] = torch.tensor([max(s + r - 2, 1), max(r, 1)])[: batch - 1]
        if c == n - 1:  # every row partial: upstream's left-context insertion point moves
            lengths = torch.tensor([s + r - 1, max(s + r - 3, 1), max(r, 1)])[:batch]
        out.append((x, lengths))
    return out


def _compare_infer(ref, ours, kwargs, dtype, tol, batch=3, n=4, seed=1):
    sa = sb = None
    for x, lengths in _chunks(batch, kwargs, n, dtype, seed):
        ya, la, sa = ref.infer(x, lengths, sa)
        yb, lb, sb = ours.infer(x, lengths, sb)
        assert_close(yb, ya, **tol)
        assert_close(lb, la, rtol=0, atol=0)
        _compare_states(sa, sb, tol)


# --- constructors and state_dict --------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["depthwise", "constant", None])
@pytest.mark.parametrize("conv", [False, True])
def test_state_dict_and_seeded_init_match(torchaudio_upstream, conv, strategy):
    kwargs = _full_kwargs(dict(num_heads=3, segment_length=4, right_context_length=1,
                               max_memory_size=2, weight_init_scale_strategy=strategy),
                          num_layers=3)  # fmt: skip
    if conv:
        kwargs["kernel_size"] = 3
    torch.manual_seed(123)
    ref = _build_upstream(torchaudio_upstream, conv, kwargs)
    torch.manual_seed(123)
    ours = (sk.ConvEmformer if conv else sk.Emformer)(**kwargs)
    # Same keys, shapes, order and (submodules created in upstream's order) the same init.
    _assert_same_params(ref, ours)
    assert list(ours.buffers()) == []
    # Both directions load strictly.
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_signatures_match_upstream(torchaudio_upstream):
    import inspect

    up_conv = torchaudio_upstream.conv_emformer.ConvEmformer.__init__
    up_conv = getattr(up_conv, "__wrapped__", up_conv)
    pairs = [
        (torchaudio_upstream.emformer.Emformer.__init__, sk.Emformer.__init__),
        (up_conv, sk.ConvEmformer.__init__),
        (torchaudio_upstream.emformer.Emformer.forward, sk.Emformer.forward),
        (torchaudio_upstream.emformer.Emformer.infer, sk.Emformer.infer),
    ]
    for a, b in pairs:
        pa = [(p.name, p.default) for p in inspect.signature(a).parameters.values()]
        pb = [(p.name, p.default) for p in inspect.signature(b).parameters.values()]
        assert pa == pb, (a, b)


def test_conv_emformer_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.ConvEmformer(D, 3, 16, 1, 4, 3)


# --- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv, kwargs", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_grads_match(torchaudio_upstream, conv, kwargs, dtype):
    ref, ours = _pair(torchaudio_upstream, conv, kwargs, dtype)
    r = kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(2)
    u = 13  # a multiple of neither segment length
    x = torch.randn(3, u + r, D, generator=gen, dtype=dtype)
    _compare_forward(ref, ours, x, torch.tensor([u, 9, 11]), TOL[dtype])


@pytest.mark.parametrize("conv, kwargs", CONFIGS[:1] + CONFIGS[4:5])
def test_forward_short_batch_and_single(torchaudio_upstream, conv, kwargs):
    """max(lengths) < U (upstream's offset padding mask), float lengths, B = 1 (no mask)."""
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    r = kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11 + r, D, generator=gen, dtype=torch.float64)
    _compare_forward(ref, ours, x, torch.tensor([8, 5, 7]), TOL[torch.float64])
    _compare_forward(ref, ours, x, torch.tensor([11.0, 6.0, 9.0]), TOL[torch.float64], False)
    _compare_forward(ref, ours, x[:1], torch.tensor([4]), TOL[torch.float64])
    # U shorter than one segment.
    _compare_forward(ref, ours, x[:, : 2 + r], torch.tensor([2, 1, 2]), TOL[torch.float64])


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_each_activation(torchaudio_upstream, activation):
    base = dict(num_heads=3, segment_length=4, left_context_length=2, right_context_length=1,
                max_memory_size=2)  # fmt: skip
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lengths = torch.tensor([9, 7])
    for conv, extra in [
        (False, dict(activation=activation)),
        (True, dict(kernel_size=3, ffn_activation=activation)),
        (True, dict(kernel_size=3, conv_activation=activation)),
    ]:
        ref, ours = _pair(torchaudio_upstream, conv, {**base, **extra})
        _compare_forward(ref, ours, x, lengths, TOL[torch.float64], check_grads=False)


@pytest.mark.parametrize("conv", [False, True])
def test_training_dropout_matches_with_same_seed(torchaudio_upstream, conv):
    """Dropout draws happen in upstream's order, so a seeded training step is identical."""
    kwargs = dict(num_heads=3, segment_length=4, left_context_length=2, right_context_length=1,
                  max_memory_size=2, dropout=0.3)  # fmt: skip
    if conv:
        kwargs["kernel_size"] = 3
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    ref.train(), ours.train()
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.manual_seed(7)
    ya, _ = ref(x, torch.tensor([10, 8]))
    torch.manual_seed(7)
    yb, _ = ours(x, torch.tensor([10, 8]))
    assert_close(yb, ya, **TOL[torch.float64])


# --- streaming infer ----------------------------------------------------------------------------


@pytest.mark.parametrize("conv, kwargs", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infer_state_by_state(torchaudio_upstream, conv, kwargs, dtype):
    ref, ours = _pair(torchaudio_upstream, conv, kwargs, dtype)
    _compare_infer(ref, ours, kwargs, dtype, TOL[dtype])


@pytest.mark.parametrize("conv, kwargs", CONFIGS[:1] + CONFIGS[4:5])
def test_infer_under_autocast(torchaudio_upstream, conv, kwargs):
    """fp32 models streamed under CPU bf16 autocast: upstream's fp32 states promote its keys
    and its bmm casts them back; seqkern's infer follows (it raised a dtype error before),
    states and their dtypes included."""
    ref, ours = _pair(torchaudio_upstream, conv, kwargs, torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _compare_infer(ref, ours, kwargs, torch.float32, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("conv, kwargs", CONFIGS[:1] + CONFIGS[4:5])
def test_infer_states_interchangeable(torchaudio_upstream, conv, kwargs):
    """seqkern's states feed upstream's infer and vice versa (same layout and meaning)."""
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    chunks = _chunks(2, kwargs, 3, torch.float64, seed=8)
    state = None
    for c, (x, lengths) in enumerate(chunks):
        model = ours if c % 2 == 0 else ref
        _, _, state = model.infer(x, lengths, state)
    sa = None
    for x, lengths in chunks:
        _, _, sa = ref.infer(x, lengths, sa)
    _compare_states(sa, state, TOL[torch.float64])


def test_infer_b1_and_float_lengths(torchaudio_upstream):
    conv, kwargs = False, dict(num_heads=3, segment_length=4, left_context_length=3,
                               right_context_length=2, max_memory_size=3)  # fmt: skip
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    _compare_infer(ref, ours, kwargs, torch.float64, TOL[torch.float64], batch=1, n=3)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    ya, la, _ = ref.infer(x, torch.tensor([6.0, 5.0]))
    yb, lb, _ = ours.infer(x, torch.tensor([6.0, 5.0]))
    assert_close(yb, ya, **TOL[torch.float64])
    assert_close(lb, la, rtol=0, atol=0)


# --- the op -------------------------------------------------------------------------------------


def test_attention_runs_through_the_op(monkeypatch):
    calls = []
    real = emformer_ops.emformer_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(emformer_ops, "emformer_attention", spy)
    model = sk.Emformer(D, 3, 16, 2, 4, right_context_length=1, max_memory_size=2).eval()
    model(torch.randn(2, 9, D), torch.tensor([8, 6]))
    model.infer(torch.randn(2, 5, D), torch.tensor([5, 5]))
    assert len(calls) == 4
    assert backends.kernels("emformer_attention")["reference"].fwd is emformer_attention_ref


def test_op_fully_masked_row_is_uniform_and_errors():
    q, k, v = torch.randn(3, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1] = True
    out = emformer_ops.emformer_attention(q, k, v, mask, None, 2)
    assert torch.isfinite(out).all()
    assert_close(out[1], v.mean(0), rtol=1e-6, atol=1e-6)  # -1e8, not -inf: uniform
    bad = [
        ((q[0], k, v, mask, None, 2), "query"),
        ((q, k[:, :1], v, mask, None, 2), "key"),
        ((q, k, v[:4], mask, None, 2), "value"),
        ((q, k, v.double(), mask, None, 2), "value"),
        ((q, k, v, mask.float(), None, 2), "attention_mask"),
        ((q, k, v, mask[:, :4], None, 2), "attention_mask"),
        ((q, k, v, mask, torch.zeros(2, 4, dtype=torch.bool), 2), "key_padding_mask"),
        ((q, k, v, mask, None, 3), "num_heads"),
    ]
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            emformer_ops.emformer_attention(*args)


# --- the comparisons can fail -------------------------------------------------------------------


def test_comparisons_catch_a_wrong_module(torchaudio_upstream, monkeypatch):
    conv, kwargs = False, dict(num_heads=3, segment_length=4, left_context_length=3,
                               right_context_length=2, max_memory_size=3)  # fmt: skip
    x = torch.randn(3, 15, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lengths = torch.tensor([13, 9, 11])
    tol = TOL[torch.float64]

    # A tiny weight change.
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    with torch.no_grad():
        ours.emformer_layers[1].pos_ff[4].bias[0] += 1e-6
    with pytest.raises(AssertionError):
        _compare_forward(ref, ours, x, lengths, tol)

    # A mask that lets segment 0 see one frame too many.
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    real_mask = sk._EmformerBase._attention_mask

    def leaky_mask(self, num_frames, device):
        m = real_mask(self, num_frames, device).clone()
        m[0, -1] = False
        return m

    monkeypatch.setattr(sk._EmformerBase, "_attention_mask", leaky_mask)
    with pytest.raises(AssertionError):
        _compare_forward(ref, ours, x, lengths, tol, check_grads=False)
    monkeypatch.undo()

    # -inf instead of -1e8 changes nothing in forward here, but clamping memory differently does.
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    for layer in ours.emformer_layers:
        layer.attention.tanh_on_mem = True
    with pytest.raises(AssertionError):
        _compare_forward(ref, ours, x, lengths, tol, check_grads=False)

    # A state that forgets the left context is caught state by state.
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    real_next = sk._StreamingLayerState._next_state

    def forgetful(self, state, next_k, next_v, num_frames, mems):
        new = real_next(self, state, next_k, next_v, num_frames, mems)
        new[2] = torch.zeros_like(new[2])
        return new

    monkeypatch.setattr(sk._StreamingLayerState, "_next_state", forgetful)
    with pytest.raises(AssertionError):
        _compare_infer(ref, ours, kwargs, torch.float64, tol, n=2)
    monkeypatch.undo()

    # A gradient-only difference (detached memory) is caught by the gradient check.
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    real_fwd = sk.EmformerLayer.forward

    def detached(self, utterance, lengths, right_context, mems, attention_mask):
        u, r, m = real_fwd(self, utterance, lengths, right_context, mems, attention_mask)
        return u, r, m.detach()

    monkeypatch.setattr(sk.EmformerLayer, "forward", detached)
    _compare_forward(ref, ours, x, lengths, tol, check_grads=False)  # outputs still agree
    with pytest.raises(AssertionError):
        _compare_forward(ref, ours, x, lengths, tol)


def test_is_a_sequence_module():
    model = sk.Emformer(D, 3, 16, 1, 4)
    assert isinstance(model, SequenceModule)
    assert model.d_model == model.d_output == D


@pytest.mark.parametrize("conv, kwargs", CONFIGS[:1])
def test_helpers_torchaudio_models_call(torchaudio_upstream, conv, kwargs):
    """torchaudio's EmformerHuBERT.extract_features calls `_gen_right_context` and
    `_gen_attention_mask` and then each layer with the dense mask: the same sequence on
    seqkern's module gives upstream's per-layer outputs."""
    ref, ours = _pair(torchaudio_upstream, conv, kwargs)
    r = kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(13 + r, 2, D, generator=gen, dtype=torch.float64)  # time-major
    lengths = torch.tensor([13, 10])

    def layer_outputs(model):
        right_context = model._gen_right_context(x)
        utterance = x[: x.size(0) - model.right_context_length]
        mask = model._gen_attention_mask(utterance)
        mems = model.memory_op(utterance.permute(1, 2, 0)).permute(2, 0, 1)[:-1]
        outs, output = [], utterance
        for layer in model.emformer_layers:
            output, right_context, mems = layer(output, lengths, right_context, mems, mask)
            outs.append(output)
        return [model._gen_right_context(x), mask, *outs]

    for want, got in zip(layer_outputs(ref), layer_outputs(ours), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
