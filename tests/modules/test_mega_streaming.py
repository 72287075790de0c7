"""MEGA streaming: step-by-step equals full sequence where upstream defines them equal, the EMA
step and scan against the full EMA, the SequenceModule interface, input checks, and no NaN."""

from __future__ import annotations

import pytest
import torch

from seqkern import backends
from seqkern.modules.mega import (
    MEGA,
    MEGADecoder,
    MultiHeadDampedEMA,
    RelativePositionBias,
    get_activation,
    get_normalization,
)
from seqkern.modules.sequence import SequenceModule
from seqkern.ops.chunk import chunk_attention
from seqkern.ops.ema import ema, ema_step
from seqkern.reference.chunk import chunk_attention_ref
from seqkern.reference.ema import ema_ref, ema_scan_ref, ema_step_ref
from seqkern.testing import rel_rms_error

D, H = 12, 3


def _ema_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    damping, decay, expansion = (torch.randn(D, H, 1, generator=g, dtype=dtype) for _ in range(3))
    return damping, decay, expansion, torch.randn(D, H, generator=g, dtype=dtype)


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_ops_registered_with_reference():
    for op in ("ema", "ema_step", "chunk_attention"):
        assert "reference" in backends.kernels(op)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    params = _ema_params()
    with backends.use_backend("reference"):
        torch.testing.assert_close(ema(x, *params), ema_ref(x, *params), rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_ema_scan_equals_full(length):
    params = _ema_params(length)
    x = torch.randn(2, length, D, dtype=torch.float64)
    scan, _ = ema_scan_ref(x, *params)
    full64 = ema_ref(x, *params, fft_dtype=torch.float64)
    assert rel_rms_error(full64, scan) < 1e-12
    full = ema(x, *params)  # upstream's float32 FFT
    assert full.dtype == torch.float64
    assert rel_rms_error(full, scan) < 1e-5


def test_ema_truncation_and_pad_mask():
    params = _ema_params(1)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    trunc = 3
    from seqkern.reference.ema import ema_kernel_ref

    k = ema_kernel_ref(*params, trunc)  # (D, trunc)
    xm = x.masked_fill(pad.unsqueeze(-1), 0.0)
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(min(trunc, t + 1)):
            want[:, t] += k[:, j] * xm[:, t - j]
    got = ema(x, *params, pad_mask=pad, truncation=trunc)
    assert rel_rms_error(got, want) < 1e-5
    # a truncation longer than the sequence changes nothing
    torch.testing.assert_close(ema(x, *params, truncation=50), ema(x, *params))


def test_ema_step_broadcast_state_and_grad():
    params = [p.requires_grad_() for p in _ema_params(2)]
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(D, H, dtype=torch.float64)
    y2, n2 = ema_step(x, s2, *params)
    y3, n3 = ema_step(x, s2.expand(3, D, H), *params)
    torch.testing.assert_close(y2, y3)
    torch.testing.assert_close(n2, n3)
    assert n2.shape == (3, D, H)
    assert torch.autograd.gradcheck(lambda *a: ema_step_ref(a[0], s2, *a[1:]), (x, *params))


def test_ema_module_sequence_interface():
    mod = MultiHeadDampedEMA(D, num_heads=H, activation=torch.nn.SiLU()).double()
    _perturb(mod)
    assert isinstance(mod, SequenceModule)
    assert mod.d_model == mod.d_output == D and mod.d_state == D * H
    st = mod.default_state(2)
    assert st.shape == (2, D, H) and not st.any()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    full, none = mod(x.transpose(0, 1))  # upstream's time-major forward
    assert none is None
    ys = []
    for t in range(10):
        y, st = mod.step(x[:, t], st)
        ys.append(y)
    assert rel_rms_error(torch.stack(ys, 1), full.transpose(0, 1)) < 1e-5
    assert mod.state_to_tensor(st).shape == (2, D * H)
    # the upstream-style step through forward(state=...) gives the same
    y1, s1 = mod(x[:, :1].transpose(0, 1), state={"ema_state": None})
    torch.testing.assert_close(y1[0], mod.step(x[:, 0], None)[0])


def test_ema_step_not_stale_after_load():
    """Upstream caches the step coefficients; seqkern recomputes them (no stale cache)."""
    a = MultiHeadDampedEMA(D, num_heads=H).double()
    b = MultiHeadDampedEMA(D, num_heads=H).double()
    _perturb(b, 5)
    x = torch.randn(2, D, dtype=torch.float64)
    a.step(x)  # would fill a cache upstream
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a.step(x)[0], b.step(x)[0])


DEC = dict(vocab_size=9, block_size=16, linear_size=20, qk_size=6, v_size=10, num_blocks=2)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_heads=2),
        dict(num_heads=3, rel_pos_bias_type="rotary", normalization_type="rms_norm"),
        dict(num_heads=1, activation_type="mish", normalization_type="scale_norm"),
    ],
)
def test_decoder_step_equals_forward(kw):
    """chunk_size -1 and an empty (None) initial key/value: streaming == forward (spec 2.4)."""
    dec = MEGADecoder(**DEC, **kw).double().eval()
    _perturb(dec, 3)
    labels = torch.randint(1, 9, (3, 11))
    labels[:, 0] = 0
    full = dec(labels)
    state = dec.default_state(3)
    outs = []
    for t in range(labels.shape[1]):
        out, state = dec.step(labels[:, t], state)
        outs.append(out)
    assert rel_rms_error(torch.stack(outs, 1), full) < 1e-5
    assert state[0]["prev_key"].shape == (3, 11, DEC["qk_size"])
    # state=None means default_state
    torch.testing.assert_close(dec.step(labels[:, 0])[0], outs[0])


def test_decoder_init_state_differs_from_forward():
    """Upstream's init_state seeds a zero key/value: decoding from it is not forward."""
    dec = MEGADecoder(**DEC).double()
    _perturb(dec, 4)
    labels = torch.tensor([[0, 3, 5, 2]])
    st = dec.init_state()
    outs = []
    for t in range(4):
        o, st = dec.inference(labels[:, t : t + 1], st)
        outs.append(o)
    assert st[0]["prev_key"].shape == (1, 5, DEC["qk_size"])
    assert (torch.cat(outs, 1) - dec(labels)).abs().max() > 1e-6


def test_chunk_state_keeps_last_key():
    dec = MEGADecoder(**DEC, chunk_size=3).double()
    _perturb(dec, 6)
    st = dec.init_state()
    lengths = []
    for lab in [1, 2, 3, 4, 5]:
        _, st = dec.inference(torch.tensor([[lab]]), st)
        lengths.append(st[0]["prev_key"].shape[1])
    assert lengths == [2, 1, 2, 1, 2]  # 1 dummy + 2 = a chunk -> keep the last key


def test_fully_masked_row_is_zero_not_nan():
    q, k = torch.randn(2, 8, 4, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    v = torch.randn(2, 8, 5, requires_grad=True)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 4] = True  # the first key of the second chunk: its first query sees nothing
    out = chunk_attention(q, k, v, torch.zeros(4, 4), key_padding_mask=pad, chunk_size=4)
    assert torch.isfinite(out).all()
    assert not out[0, 4].any() and out[0, 5].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # an all-padding chunk is left unmasked (upstream's rule), so it is not zero
    pad2 = torch.zeros(2, 8, dtype=torch.bool)
    pad2[1, 4:] = True
    out2 = chunk_attention_ref(q, k, v, torch.zeros(4, 4), pad2, chunk_size=4)
    out3 = chunk_attention_ref(q, k, v, torch.zeros(4, 4), None, chunk_size=4)
    torch.testing.assert_close(out2, out3)
    # the decoder: a pad id at the start of a chunk gives NaN upstream, finite here
    dec = MEGADecoder(**DEC, chunk_size=4).double()
    _perturb(dec, 8)
    labels = torch.tensor([[0, 3, 4, 5, 0, 6, 7, 8]])
    assert torch.isfinite(dec(labels)).all()


def test_chunk_attention_block_diagonal_and_step_alignment():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    v, bias = torch.randn(1, 6, 3, generator=g), torch.randn(3, 3, generator=g)
    out = chunk_attention(q, k, v, bias, chunk_size=3)
    second = chunk_attention(q[:, 3:], k[:, 3:], v[:, 3:], bias)
    torch.testing.assert_close(out[:, 3:], second)
    # a single query against all keys = the last row of the causal full attention
    full_bias = torch.randn(6, 6, generator=g)
    full = chunk_attention(q, k, v, full_bias)
    last = chunk_attention(q[:, -1:], k, v, full_bias[-1:])
    torch.testing.assert_close(last, full[:, -1:])


def _raises(match, fn, *a, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*a, **kw)


def test_bad_inputs():
    p = _ema_params()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    _raises("x must be", ema, x[0], *p)
    _raises("damping", ema, x, p[0][:, :2], *p[1:])
    _raises("projection", ema, x, *p[:3], p[3][:5])
    _raises("pad_mask", ema, x, *p, pad_mask=torch.zeros(2, 5))
    _raises("pad_mask", ema, x, *p, pad_mask=torch.zeros(2, 4, dtype=torch.bool))
    _raises("truncation", ema, x, *p, truncation=0)
    _raises("x must be", ema, torch.ones(2, 5, D, dtype=torch.long), *p)
    _raises("x must be", ema_step, x, None, *p)
    _raises("state", ema_step, x[:, 0], torch.zeros(3, D, H, dtype=torch.float64), *p)
    q = torch.randn(2, 6, 4)
    _raises("bias", chunk_attention, q, q, q, torch.zeros(6, 5))
    _raises("bias", chunk_attention, q, q, q, torch.zeros(6, 6), chunk_size=3)
    _raises("chunk_size", chunk_attention, q, q, q, torch.zeros(4, 4), chunk_size=4)
    _raises("key_padding_mask", chunk_attention, q, q, q, torch.zeros(6, 6), torch.zeros(2, 5))
    _raises("v must be", chunk_attention, q, q, q[:, :5], torch.zeros(6, 6))
    _raises("k must be", chunk_attention, q, q[..., :3], q, torch.zeros(6, 6))
    _raises("rel_pos_bias_type", MEGA, 8, rel_pos_bias_type="alibi")
    _raises("normalization_type", get_normalization, "batch_norm")
    _raises("activation_type", get_activation, "gelu")
    _raises("too long", RelativePositionBias(4), 5)
    _raises(
        "even qk_size",
        MEGADecoder(5, 8, 8, 5, 8, num_blocks=1, rel_pos_bias_type="rotary"),
        torch.tensor([[0, 1]]),
    )
    _raises("labels must be", MEGADecoder(5, 8, 8, 4, 8, num_blocks=1).step, torch.tensor([[1]]))
