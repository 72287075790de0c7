"""Bad input to the BEATs, MEGA and VALL-E modules raises a Python exception that names the
argument and what was expected (README item 11), instead of torch's own error from deep inside
("mat1 and mat2 shapes cannot be multiplied", an index error, a reshape) or a silently wrong
result. And what upstream accepts (float64 modules, dtype promotion, autocast) still runs.

Each case: the module file, a builder, a call on the built module, the exception and a pattern
of its message. The checks are attribute reads at the modules' forward entries; the few that
need a value (token ids out of range) are caught where torch raises them, on the CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from seqkern.modules.beats import BeatsMultiheadAttention
from seqkern.modules.mega import MEGADecoder
from seqkern.modules.valle import AdaLN, MultiHeadAttention, ValleNARDecoder, install_kv_cache_hook

E, VOCAB, D = 16, 11, 24


@functools.cache
def _beats(kind: str = "self"):
    torch.manual_seed(0)
    if kind == "self":
        m = BeatsMultiheadAttention(
            E, 2, self_attention=True, has_relative_attention_bias=True, gru_rel_pos=True
        )
    elif kind == "cross":
        m = BeatsMultiheadAttention(E, 2, kdim=8, vdim=12)
    else:
        m = BeatsMultiheadAttention(E, 2, kdim=8, vdim=8, encoder_decoder_attention=True)
    return m.eval()


@functools.cache
def _mega():
    torch.manual_seed(0)
    return MEGADecoder(
        VOCAB, block_size=16, linear_size=24, qk_size=8, v_size=12, num_heads=2, num_blocks=2,
        max_positions=40,
    ).eval()  # fmt: skip


@functools.cache
def _valle(causal: bool = False):
    torch.manual_seed(0)
    return ValleNARDecoder(5, 40, D, 3, 2, causal=causal).eval()


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _labels(*shape):
    return torch.randint(1, VOCAB, shape)


def _states(batch: int = 2):
    dec = _mega()
    return dec.create_batch_states([dec.init_state()] * batch)


def _edit(states, **changes):
    """The states with each block's dict updated by `changes` (name -> fn(old tensor))."""
    return [{**s, **{k: fn(s[k]) for k, fn in changes.items()}} for s in states]


q = _x(5, 2, E)
k8, v12 = _x(7, 2, 8), _x(7, 2, 12)

BEATS_CASES = {
    "query rank": (lambda: _beats()(_x(5, E), None, None), ValueError, r"query must be \(T, B"),
    "query features": (lambda: _beats()(_x(5, 2, E + 1), None, None), ValueError, "query must"),
    "query int": (
        lambda: _beats()(q.long(), None, None),
        TypeError,
        "query must have the module's dtype torch.float32, got torch.int64",
    ),
    "query float64 on a float32 module": (
        lambda: _beats()(q.double(), None, None),
        TypeError,
        "query must have the module's dtype",
    ),
    "query device": (
        lambda: _beats()(q.to("meta"), None, None),
        ValueError,
        "query must be on the module's device",
    ),
    "key batch": (lambda: _beats("cross")(q, _x(7, 3, 8), v12), ValueError, "key must be"),
    "key kdim": (
        lambda: _beats("cross")(q, _x(7, 2, 9), v12),
        ValueError,
        "key must have kdim = 8",
    ),
    "key float64": (lambda: _beats("cross")(q, k8.double(), v12), TypeError, "key must have"),
    "key device": (lambda: _beats("cross")(q, k8.to("meta"), v12), ValueError, "key must be on"),
    "value vdim": (
        lambda: _beats("cross")(q, k8, _x(7, 2, 9)),
        ValueError,
        "value must have vdim = 12",
    ),
    "value length": (
        lambda: _beats("cross")(q, k8, _x(6, 2, 12)),
        ValueError,
        r"value must be \(S, B, vdim\) = \(7, 2, 12\)",
    ),
    "value batch": (lambda: _beats("cross")(q, k8, _x(7, 3, 12)), ValueError, "value must be"),
    "value rank": (lambda: _beats("cross")(q, k8, _x(7, 24)), ValueError, "value must be"),
    "value int": (lambda: _beats("cross")(q, k8, v12.long()), TypeError, "value must have"),
    "enc-dec key missing": (
        lambda: _beats("encdec")(q, None, None),
        ValueError,
        "key is required",
    ),
    "key_padding_mask batch": (
        lambda: _beats()(q, q, q, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool)),
        ValueError,
        "key_padding_mask must be",
    ),
    "position_bias shape": (
        lambda: _beats()(q, q, q, position_bias=torch.zeros(3, 5, 5)),
        ValueError,
        r"position_bias must be \(B \* H, T, S\) = \(4, 5, S\)",
    ),
    "incremental_state of another batch": (
        lambda: _beats_incremental(batch_first=2, batch_then=3),
        ValueError,
        "incremental_state holds keys of batch 2, query has batch 3",
    ),
}


def _beats_incremental(batch_first: int, batch_then: int):
    m, state = _beats("cross"), {}
    m(_x(1, batch_first, E), _x(1, batch_first, 8), _x(1, batch_first, 12), incremental_state=state)
    return m(
        _x(1, batch_then, E), _x(1, batch_then, 8), _x(1, batch_then, 12), incremental_state=state
    )


MEGA_CASES = {
    "forward labels rank 1": (lambda: _mega()(_labels(5)), ValueError, r"labels must be \(B, L\)"),
    "forward labels rank 3": (lambda: _mega()(_labels(2, 5, 1)), ValueError, "labels must be"),
    "forward labels empty": (lambda: _mega()(_labels(2, 0)), ValueError, "L >= 1"),
    "forward labels float": (
        lambda: _mega()(_labels(2, 5).float()),
        TypeError,
        "labels must be integer token ids",
    ),
    "forward labels bool": (lambda: _mega()(_labels(2, 5).bool()), TypeError, "labels must be"),
    "forward labels device": (
        lambda: _mega()(_labels(2, 5).to("meta")),
        ValueError,
        "labels must be on the decoder's device",
    ),
    "forward labels out of range": (
        lambda: _mega()(_labels(2, 5) + VOCAB),
        IndexError,
        r"labels must be token ids in \[0, vocab_size = 11\)",
    ),
    "inference labels rank": (
        lambda: _mega().inference(_labels(2), _states()),
        ValueError,
        r"labels must be \(B, 1\)",
    ),
    "inference labels float": (
        lambda: _mega().inference(_labels(2, 1).float(), _states()),
        TypeError,
        "labels must be integer",
    ),
    "inference labels out of range": (
        lambda: _mega().inference(_labels(2, 1) - VOCAB, _states()),
        IndexError,
        "labels must be token ids",
    ),
    "inference states short": (  # used to run one block of two, silently
        lambda: _mega().inference(_labels(2, 1), _states()[:1]),
        ValueError,
        r"states must hold one state per block \(2\), got 1",
    ),
    "MEGA block x features": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 15)),
        ValueError,
        r"MEGA: x must be \(L, B, 16\)",
    ),
    "MEGA block x rank": (lambda: _mega().mega_blocks[0][0](_x(2, 16)), ValueError, "x must be"),
    "MEGA block x float64": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 16).double()),
        TypeError,
        "x must have the module's dtype",
    ),
    "MEGA block x int": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 16).long()),
        TypeError,
        "x must have",
    ),
    "MEGA block x device": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 16).to("meta")),
        ValueError,
        "x must be on the module's device",
    ),
    "MEGA block mask rank": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 16), mask=torch.zeros(2, 5, dtype=torch.bool)),
        ValueError,
        r"mask must be \(B, 1, L\) = \(2, 1, 5\)",
    ),
    "MEGA block mask float": (
        lambda: _mega().mega_blocks[0][0](_x(5, 2, 16), mask=torch.zeros(2, 1, 5)),
        TypeError,
        "mask must be a bool tensor",
    ),
    "EMA x features": (
        lambda: _mega().mega_blocks[0][0].multihead_damped_ema(_x(5, 2, 15)),
        ValueError,
        r"MultiHeadDampedEMA: x must be \(L, B, 16\)",
    ),
    "EMA step x features": (
        lambda: _mega().mega_blocks[0][0].multihead_damped_ema.step(_x(2, 15)),
        ValueError,
        r"x must be \(B, 16\)",
    ),
    "FFN x features": (
        lambda: _mega().mega_blocks[0][1](_x(5, 2, 15)),
        ValueError,
        r"NormalizedPositionwiseFeedForward: x must be \(\.\.\., 16\)",
    ),
    "FFN x float64": (
        lambda: _mega().mega_blocks[0][1](_x(5, 2, 16).double()),
        TypeError,
        "x must have the module's dtype",
    ),
}

# state errors, run with and without gradients: the fused C++ step takes inference
MEGA_STATE_CASES = {
    "labels batch 3, states batch 2": (
        lambda: _mega().inference(_labels(3, 1), _states(2)),
        ValueError,
        r"state\['ema_state'\] must be \(B, D, h\) = \(3, 16, 2\)",
    ),
    "labels batch 2, init_state (batch 1)": (
        lambda: _mega().inference(_labels(2, 1), _mega().init_state()),
        ValueError,
        r"state\['prev_key'\] must be \(B, Lk, K\) = \(2, Lk, 8\), got \(1, 1, 8\)",
    ),
    "prev_key size": (
        lambda: _mega().inference(_labels(2, 1), _edit(_states(), prev_key=lambda t: _x(2, 1, 9))),
        ValueError,
        r"state\['prev_key'\] must be",
    ),
    "prev_value size": (
        lambda: _mega().inference(
            _labels(2, 1), _edit(_states(), prev_value=lambda t: _x(2, 1, 13))
        ),
        ValueError,
        r"state\['prev_value'\] must be \(B, Lk, V\) = \(2, 1, 12\)",
    ),
    "prev_value length": (
        lambda: _mega().inference(
            _labels(2, 1), _edit(_states(), prev_value=lambda t: _x(2, 3, 12))
        ),
        ValueError,
        r"state\['prev_value'\] must be",
    ),
    "prev_key without prev_value": (
        lambda: _mega().inference(_labels(2, 1), _edit(_states(), prev_value=lambda t: None)),
        ValueError,
        "go together",
    ),
    "ema_state size": (
        lambda: _mega().inference(
            _labels(2, 1), _edit(_states(), ema_state=lambda t: _x(2, 15, 2))
        ),
        ValueError,
        r"state\['ema_state'\] must be",
    ),
    "ema_state float64": (
        lambda: _mega().inference(_labels(2, 1), _edit(_states(), ema_state=lambda t: t.double())),
        TypeError,
        r"state\['ema_state'\] must have the module's dtype",
    ),
    "ema_state device": (
        lambda: _mega().inference(
            _labels(2, 1), _edit(_states(), ema_state=lambda t: t.to("meta"))
        ),
        ValueError,
        r"state\['ema_state'\] must be on",
    ),
    "step state of another batch": (
        lambda: _mega().step(_labels(2), _mega().default_state(3)),
        ValueError,
        r"state\['ema_state'\] must be \(B, D, h\) = \(2, 16, 2\)",
    ),
    "step labels float": (
        lambda: _mega().step(_labels(2).float()),
        TypeError,
        "labels must be integer",
    ),
}

xv, level = _x(2, 7, D), torch.tensor([0, 3])

VALLE_CASES = {
    "x rank": (lambda: _valle()(xv[0], level), ValueError, r"x must be \(B, T, 24\)"),
    "x features": (lambda: _valle()(_x(2, 7, D + 1), level), ValueError, "x must be"),
    "x int": (
        lambda: _valle()(xv.long(), level),
        TypeError,
        "x must be a floating-point tensor",
    ),
    "x device": (lambda: _valle()(xv.to("meta"), level), ValueError, "x must be on"),
    "level float": (
        lambda: _valle()(xv, level.float()),
        TypeError,
        "level must be an integer tensor",
    ),
    "level batch": (lambda: _valle()(xv, torch.tensor([0, 1, 2])), ValueError, "level must be"),
    "level device": (lambda: _valle()(xv, level.to("meta")), ValueError, "level must be on"),
    "level out of range": (
        lambda: _valle()(xv, level + 5),
        IndexError,
        r"level must be in \[0, n_level = 5\)",
    ),
    "mask batch": (
        lambda: _valle()(xv, level, mask=torch.ones(3, 1, 1, 7, dtype=torch.bool)),
        ValueError,
        "mask",
    ),
    "kv_cache of another batch": (
        lambda: _valle_kv(batch_first=2, batch_then=1),
        ValueError,
        "kv_cache holds",
    ),
    "AdaLN level_emb features": (
        lambda: AdaLN(D)(xv, _x(2, D + 1)),
        ValueError,
        r"AdaLN: level_emb must be \(B, D\) or \(B, T, D\)",
    ),
    "AdaLN level_emb batch": (lambda: AdaLN(D)(xv, _x(3, D)), ValueError, "level_emb must be"),
    "AdaLN level_emb float64": (
        lambda: AdaLN(D)(xv, _x(2, D).double()),
        TypeError,
        "level_emb must have the module's dtype",
    ),
    "AdaLN x features": (lambda: AdaLN(D)(_x(2, 7, D + 1), _x(2, D)), ValueError, "AdaLN: x must"),
    "AdaLN x int": (lambda: AdaLN(D)(xv.long(), _x(2, D)), TypeError, "x must be a floating"),
    "AdaLN x device": (lambda: AdaLN(D)(xv.to("meta"), _x(2, D)), ValueError, "x must be on"),
    "attention x features": (
        lambda: MultiHeadAttention(D, 3)(_x(2, 7, D + 1)),
        ValueError,
        r"MultiHeadAttention: x must be \(B, T, 24\)",
    ),
    "attention x rank": (lambda: MultiHeadAttention(D, 3)(xv[0]), ValueError, "x must be"),
    "attention x int": (lambda: MultiHeadAttention(D, 3)(xv.long()), TypeError, "x must be"),
    "attention x device": (
        lambda: MultiHeadAttention(D, 3)(xv.to("meta")),
        ValueError,
        "x must be on",
    ),
    "attention xa features": (
        lambda: MultiHeadAttention(D, 3)(xv, _x(2, 5, D + 1)),
        ValueError,
        r"xa must be \(B, S, D\)",
    ),
    "attention xa batch": (
        lambda: MultiHeadAttention(D, 3)(xv, _x(3, 5, D)),
        ValueError,
        "xa must be",
    ),
    "attention xa dtype": (
        lambda: MultiHeadAttention(D, 3)(xv, _x(2, 5, D).double()),
        TypeError,
        "xa must have x's dtype",
    ),
}


def _valle_kv(batch_first: int, batch_then: int):
    m = _valle(causal=True)
    cache, hooks = install_kv_cache_hook(m, None)
    try:
        m(_x(batch_first, 3, D), torch.zeros(batch_first, dtype=torch.long), kv_cache=cache)
        return m(_x(batch_then, 1, D), torch.zeros(batch_then, dtype=torch.long), kv_cache=cache)
    finally:
        for h in hooks:
            h.remove()


def _params(cases, module):
    return [pytest.param(*case, id=f"{module}: {name}") for name, case in cases.items()]


@pytest.mark.parametrize(
    "call, error, match",
    _params(BEATS_CASES, "beats") + _params(MEGA_CASES, "mega") + _params(VALLE_CASES, "valle"),
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("call, error, match", _params(MEGA_STATE_CASES, "mega"))
def test_bad_decoder_state_names_the_argument(call, error, match, grad):
    with torch.set_grad_enabled(grad), pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# What upstream accepts still runs


def test_beats_float64_module_and_a_float64_attn_mask():
    m64 = BeatsMultiheadAttention(E, 2, self_attention=True).double().eval()
    assert m64(q.double(), None, None)[0].dtype == torch.float64
    # upstream adds attn_mask to the logits in place: a float64 mask works on float32 logits
    mask = torch.randn(5, 5)
    want = _beats()(q, q, q, attn_mask=mask)[0]
    got = _beats()(q, q, q, attn_mask=mask.double())[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_mega_float64_decoder_and_int32_labels():
    dec = _mega()
    labels = _labels(2, 5)
    torch.testing.assert_close(dec(labels.int()), dec(labels))
    dec64 = MEGADecoder(
        VOCAB, block_size=16, linear_size=24, qk_size=8, v_size=12, num_heads=2, num_blocks=2,
        max_positions=40,
    ).double()  # fmt: skip
    assert dec64(labels).dtype == torch.float64
    out, _ = dec64.inference(labels[:1, :1], dec64.init_state())
    assert out.dtype == torch.float64


def test_valle_promotes_like_upstream_and_takes_empty_inputs():
    m = _valle()
    assert m(xv.double(), level).dtype == torch.float64
    assert m(xv.half(), level).dtype == torch.float32
    # T = 0 or B = 0 used to fail in a reshape (`view(B, T, H, -1)` of no elements)
    assert m(xv[:, :0], level).shape == (2, 0, D)
    assert m(xv[:0], level[:0]).shape == (0, 7, D)


def test_mega_under_autocast_matches_upstream(espnet_upstream):
    """Upstream's decoder runs under CPU autocast (bfloat16); seqkern's failed in the attention
    (q and k float32, v bfloat16) and in the one-step Linear (linear_rows got bf16 x and fp32
    weights)."""
    torch.manual_seed(3)
    args = dict(
        vocab_size=VOCAB, block_size=16, linear_size=24, qk_size=8, v_size=12, num_heads=2,
        num_blocks=2, max_positions=40,
    )  # fmt: skip
    up = espnet_upstream.mega_decoder.MEGADecoder(**args).eval()
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = MEGADecoder(**args).eval()
    ours.load_state_dict(up.state_dict())
    labels = torch.tensor([[0, 3, 4, 5, 2], [0, 1, 7, 7, 9]])
    for grad in (True, False):  # (without gradients the C++ step could run: not in autocast)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(labels), up(labels), rtol=0.05, atol=0.05)
            s_up, s_ours = up.init_state(), ours.init_state()
            for t in range(3):
                y_up, s_up = up.inference(labels[:1, t : t + 1], s_up)
                y_ours, s_ours = ours.inference(labels[:1, t : t + 1], s_ours)
                assert y_ours.dtype == y_up.dtype
                torch.testing.assert_close(y_ours, y_up, rtol=0.05, atol=0.05)
