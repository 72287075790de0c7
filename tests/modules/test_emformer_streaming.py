"""Emformer / ConvEmformer streaming: segment-by-segment `infer` (and `step`) equals `forward`.

Upstream defines both paths and they agree (verified to < 1e-4 in fp32) when every window is
full: B = 1 or equal lengths, U a multiple of segment_length. They agree only to fp32 precision
even in float64: upstream's attention casts the logits to fp32 (`.float()`, a downcast for
float64) before the softmax, and the two paths attend over different (masked) key sets.
Also: the SequenceModule side (`default_state`, `step`), and the errors for bad input.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from seqkern.modules.emformer import ConvEmformer, Emformer
from seqkern.modules.sequence import SequenceModule

D = 24
TIGHT = dict(rtol=1e-5, atol=2e-6)  # fp32 softmax inside, see above

CONFIGS = [
    pytest.param(False, dict(num_heads=3, segment_length=4, left_context_length=3,
                             right_context_length=2, max_memory_size=3), id="emf-lc3-r2-m3"),
    pytest.param(False, dict(num_heads=4, segment_length=5, left_context_length=0,
                             right_context_length=1, max_memory_size=0), id="emf-lc0-r1-m0"),
    pytest.param(False, dict(num_heads=3, segment_length=4, left_context_length=8,
                             right_context_length=0, max_memory_size=1, tanh_on_mem=True),
                 id="emf-lc8-r0-m1-tanh"),
    pytest.param(True, dict(num_heads=3, segment_length=4, kernel_size=3, left_context_length=3,
                            right_context_length=2, max_memory_size=3), id="conv-k3-lc3-r2-m3"),
    pytest.param(True, dict(num_heads=4, segment_length=5, kernel_size=4, left_context_length=0,
                            right_context_length=0, max_memory_size=2), id="conv-k4-lc0-r0-m2"),
    pytest.param(True, dict(num_heads=3, segment_length=4, kernel_size=1, left_context_length=2,
                            right_context_length=1, max_memory_size=0), id="conv-k1"),
]  # fmt: skip


def _model(conv, kwargs, num_layers=2, seed=0):
    torch.manual_seed(seed)
    model = (ConvEmformer if conv else Emformer)(D, ffn_dim=16, num_layers=num_layers, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def _windows(x, s, r):
    """Segment windows of x (B, U + R, D): window i = frames [i*s, i*s + s + R)."""
    u = x.size(1) - r
    return [x[:, i * s : i * s + s + r] for i in range(u // s)]


@pytest.mark.parametrize("conv, kwargs", CONFIGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_infer_equals_forward(conv, kwargs, batch):
    model = _model(conv, kwargs)
    s, r = kwargs["segment_length"], kwargs["right_context_length"]
    u = 4 * s
    x = torch.randn(batch, u + r, D, dtype=torch.float64)
    full, lengths = model(x, torch.full((batch,), u))
    states, outs = None, []
    for w in _windows(x, s, r):
        y, out_lengths, states = model.infer(w, torch.full((batch,), s + r), states)
        assert_close(out_lengths, torch.full((batch,), s))
        outs.append(y)
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)
    assert_close(lengths, torch.full((batch,), u))


@pytest.mark.parametrize("conv, kwargs", [CONFIGS[0], CONFIGS[3]])
def test_step_equals_forward_and_default_state(conv, kwargs):
    model = _model(conv, kwargs)
    assert isinstance(model, SequenceModule)
    assert model.d_model == model.d_output == D
    s, r = kwargs["segment_length"], kwargs["right_context_length"]
    x = torch.randn(2, 3 * s + r, D, dtype=torch.float64)
    full, _ = model(x, torch.full((2,), 3 * s))

    state = model.default_state(2)
    assert len(state) == len(model.emformer_layers)
    for layer_state in state:
        assert len(layer_state) == (5 if conv else 4)
        mem, lc_k, lc_v, past = layer_state[:4]
        assert mem.shape == (kwargs["max_memory_size"], 2, D) and mem.dtype == torch.float32
        assert lc_k.shape == lc_v.shape == (kwargs["left_context_length"], 2, D)
        assert past.shape == (1, 2) and past.dtype == torch.int32
        if conv:
            assert layer_state[4].shape == (2, D, kwargs["kernel_size"] - 1)
        assert all(not t.any() for t in layer_state)

    outs = []
    for w in _windows(x, s, r):
        y, state = model.step(w, state)
        outs.append(y)
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)
    assert int(state[0][3][0, 0]) == 3 * s

    # default_state gives exactly what infer builds for states=None.
    w = x[:, : s + r]
    lengths = torch.full((2,), s + r)
    y0, _, s0 = model.infer(w, lengths, None)
    y1, _, s1 = model.infer(w, lengths, model.default_state(2))
    assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(s0, s1):
        for ta, tb in zip(a, b):
            assert_close(tb, ta, rtol=0, atol=0)


def test_step_does_not_mutate_the_state():
    """A state can be stepped from twice (e.g. to branch); the same input gives the same output."""
    model = _model(False, dict(num_heads=3, segment_length=4, left_context_length=3,
                               right_context_length=1, max_memory_size=2))  # fmt: skip
    x = torch.randn(1, 5, D, dtype=torch.float64)
    _, state = model.step(x)
    snapshot = [[t.clone() for t in layer] for layer in state]
    ids = [[id(t) for t in layer] for layer in state]
    y1, _ = model.step(x, state)
    y2, _ = model.step(x, state)
    assert_close(y1, y2, rtol=0, atol=0)
    assert [[id(t) for t in layer] for layer in state] == ids
    for a, b in zip(state, snapshot):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_streaming_fp32_close_to_forward():
    model = _model(True, dict(num_heads=3, segment_length=4, kernel_size=3,
                              left_context_length=3, right_context_length=2,
                              max_memory_size=3)).float()  # fmt: skip
    x = torch.randn(1, 18, D)
    full, _ = model(x, torch.tensor([16]))
    states, outs = None, []
    for w in _windows(x, 4, 2):
        y, _, states = model.infer(w, torch.tensor([6]), states)
        outs.append(y)
    assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)
    assert all(t.dtype in (torch.float32, torch.int32) for layer in states for t in layer)


@pytest.mark.parametrize("conv", [False, True])
def test_low_precision_infer(conv):
    """bf16 streaming runs (upstream crashes) and tracks fp32; states stay in bf16."""
    kwargs = dict(num_heads=3, segment_length=4, left_context_length=3, right_context_length=1,
                  max_memory_size=2)  # fmt: skip
    if conv:
        kwargs["kernel_size"] = 3
    model = _model(conv, kwargs).float()
    low = _model(conv, kwargs).to(torch.bfloat16)
    x = torch.randn(2, 13, D)
    s32 = s16 = None
    for w in _windows(x, 4, 1):
        y32, _, s32 = model.infer(w, torch.tensor([5, 5]), s32)
        y16, _, s16 = low.infer(w.to(torch.bfloat16), torch.tensor([5, 5]), s16)
        assert y16.dtype == torch.bfloat16
        rel_rms = (y16.float() - y32).norm() / y32.norm()
        assert rel_rms < 0.03, rel_rms
    for layer in s16:
        assert [t.dtype for t in layer[:3]] == [torch.bfloat16] * 3
        assert layer[3].dtype == torch.int32


def test_streaming_check_can_fail():
    """Dropping the left-context state breaks equality: the comparison above is not vacuous."""
    kwargs = dict(num_heads=3, segment_length=4, left_context_length=3, right_context_length=2,
                  max_memory_size=0)  # fmt: skip
    model = _model(False, kwargs)
    x = torch.randn(1, 14, D, dtype=torch.float64)
    full, _ = model(x, torch.tensor([12]))
    states, outs = None, []
    for w in _windows(x, 4, 2):
        y, _, states = model.infer(w, torch.tensor([6]), states)
        states = [[layer[0], torch.zeros_like(layer[1]), *layer[2:]] for layer in states]
        outs.append(y)
    with pytest.raises(AssertionError):
        assert_close(torch.cat(outs, dim=1), full, **TIGHT)


def test_bad_input_errors():
    model = Emformer(D, 3, 16, 2, 4, right_context_length=1)
    with pytest.raises(ValueError, match="expected size of 5 for dimension 1"):
        model.infer(torch.randn(2, 6, D), torch.tensor([6, 6]))
    with pytest.raises(ValueError, match="input_dim"):
        model.infer(torch.randn(2, 5, D + 1), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="lengths"):
        model.infer(torch.randn(2, 5, D), torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 9, D), torch.tensor([[8, 8]]))
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(9, D), torch.tensor([8]))
    with pytest.raises(ValueError, match="right_context_length"):
        model(torch.randn(2, 1, D), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.ones(2, 9, D, dtype=torch.long), torch.tensor([8, 8]))
    _, _, states = model.infer(torch.randn(2, 5, D), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="one state per layer"):
        model.infer(torch.randn(2, 5, D), torch.tensor([5, 5]), states[:1])
    with pytest.raises(ValueError, match=r"states\[0\]"):
        model.infer(torch.randn(2, 5, D), torch.tensor([5, 5]), [states[0][:3], states[1]])
    with pytest.raises(ValueError, match="past length"):
        model.infer(torch.randn(3, 5, D), torch.tensor([5, 5, 5]), states)
    with pytest.raises(ValueError, match="one batch size"):
        model.default_state(2, 3)


def test_constructor_errors():
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        Emformer(D, 5, 16, 1, 4)
    with pytest.raises(ValueError, match="Unsupported activation"):
        Emformer(D, 3, 16, 1, 4, activation="tanh")
    with pytest.raises(ValueError, match="Unsupported activation"):
        ConvEmformer(D, 3, 16, 1, 4, 3, conv_activation="tanh")
    with pytest.raises(ValueError, match="weight_init_scale_strategy"):
        Emformer(D, 3, 16, 1, 4, weight_init_scale_strategy="bogus")
