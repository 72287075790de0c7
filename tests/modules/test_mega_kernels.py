"""The MEGA decoder on seqkern's kernels against the same decoder on the reference backend.

Kernels: the C++ CPU EMA (`ema`, `ema_step`), the Triton chunked attention (interpreter) and the
C++ few-row Linear of a step (`linear_rows`). `use_backend("triton", "cpu")` admits only those,
so a missing kernel raises instead of falling back. Checked: forward, the gradient of every
parameter, streaming inference state by state, and beam-search batch scoring. The yardstick is
the float64 reference (the oracle) and the float32 reference's own error against it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from seqkern import backends
from seqkern.modules.mega import MEGADecoder
from seqkern.testing import assert_close_to_oracle

KERNELS = ("triton", "cpu")
SMALL = dict(block_size=16, linear_size=24, qk_size=8, v_size=40, num_heads=2, num_blocks=2)
CONFIGS = {
    "full-simple": dict(),
    "chunk4-simple": dict(chunk_size=4),
    "chunk5-rotary-trunc": dict(chunk_size=5, rel_pos_bias_type="rotary", truncation_length=3),
    "full-rotary-rms": dict(rel_pos_bias_type="rotary", normalization_type="rms_norm"),
}


def _decoders(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    dec = MEGADecoder(13, **SMALL, **config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in dec.parameters():  # upstream zero-initialises biases: make every term count
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    dec64 = copy.deepcopy(dec).double()
    return dec, dec64


def _labels(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 13, (batch, length), generator=g)
    labels[:, 0] = 0  # the transducer's leading blank
    for b in range(1, batch):  # ragged right padding
        labels[b, length - 2 * b :] = 0
    return labels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_every_gradient(name):
    dec, dec64 = _decoders(CONFIGS[name])
    labels = _labels(3, 11, seed=2)  # 11: not a multiple of the chunk (padded and cropped)
    dy = torch.randn(3, 11, SMALL["block_size"], dtype=torch.float64)

    def run(model, backend):
        model.zero_grad(set_to_none=True)
        with backends.use_backend(*backend):
            out = model(labels)
            out.backward(dy.to(out.dtype))
        return out, {n: p.grad for n, p in model.named_parameters()}

    oracle, oracle_g = run(dec64, ("reference",))
    ref, ref_g = run(copy.deepcopy(dec), ("reference",))
    got, got_g = run(dec, KERNELS)
    assert_close_to_oracle(got, oracle, ref, name=f"{name} forward")
    for pname, g in got_g.items():
        if oracle_g[pname] is None:
            assert g is None, pname
            continue
        assert_close_to_oracle(g, oracle_g[pname], ref_g[pname], name=f"{name} d{pname}")


@pytest.mark.parametrize("name", ["full-simple", "chunk4-simple", "full-rotary-rms"])
def test_streaming_state_by_state(name):
    dec, dec64 = _decoders(CONFIGS[name], seed=3)
    labels = _labels(3, 9, seed=4)[:, :9]
    # init_state is one hypothesis' state; batch three of them, as the beam search does
    states = {
        "oracle": dec64.create_batch_states([dec64.init_state()] * 3),
        "ref": dec.create_batch_states([dec.init_state()] * 3),
        "got": dec.create_batch_states([dec.init_state()] * 3),
    }
    with torch.no_grad():
        for t in range(labels.shape[1]):
            step = labels[:, t : t + 1]
            outs = {}
            with backends.use_backend("reference"):
                outs["oracle"], states["oracle"] = dec64.inference(step, states["oracle"])
                outs["ref"], states["ref"] = dec.inference(step, states["ref"])
            with backends.use_backend(*KERNELS):
                outs["got"], states["got"] = dec.inference(step, states["got"])
            assert_close_to_oracle(outs["got"], outs["oracle"], outs["ref"], name=f"step {t}")
            for b, (sg, so, sr) in enumerate(
                zip(states["got"], states["oracle"], states["ref"], strict=True)
            ):
                assert list(sg) == list(so), "state dict keys and order"
                for key in sg:
                    assert_close_to_oracle(
                        sg[key], so[key], sr[key], name=f"step {t} block {b} {key}"
                    )


class _Hyp:
    def __init__(self, yseq, dec_state):
        self.yseq, self.dec_state = yseq, dec_state


@pytest.mark.parametrize("chunk_size", [-1, 3])
def test_batch_score_of_uneven_hypotheses(chunk_size):
    """What the transducer beam search calls: hypotheses of different lengths, batched (keys
    left-padded with zeros, as upstream), scored, split back."""
    dec, dec64 = _decoders(dict(chunk_size=chunk_size), seed=5)

    def hyps_for(model, backend):
        hyps = []
        with torch.no_grad(), backends.use_backend(*backend):
            for i, n in enumerate((1, 3, 4, 6)):  # different key lengths per hypothesis
                state = model.init_state()
                seq = [0] + [(i + j) % 12 + 1 for j in range(n)]
                for lab in seq[:-1]:  # batch of one, split back: what the beam search does
                    batch = model.create_batch_states([state])
                    _, batch = model.inference(torch.tensor([[lab]]), batch)
                    state = model.select_state(batch, 0)
                hyps.append(_Hyp(seq, state))
            out, states = model.batch_score(hyps)
            rows = [model.select_state(states, i) for i in range(len(hyps))]
        return out, rows

    oracle, oracle_rows = hyps_for(dec64, ("reference",))
    ref, ref_rows = hyps_for(dec, ("reference",))
    got, got_rows = hyps_for(dec, KERNELS)
    assert_close_to_oracle(got, oracle, ref, name="batch_score")
    for i in range(len(got_rows)):
        for b in range(len(got_rows[i])):
            for key, value in got_rows[i][b].items():
                assert_close_to_oracle(
                    value, oracle_rows[i][b][key], ref_rows[i][b][key], name=f"hyp {i} {key}"
                )


def test_fused_cpu_step_is_taken_exactly_where_it_applies():
    """The fused C++ step runs for the default block (SiLU, LayerNorm, simple bias) in float32
    inference with the cpu backend allowed; the streaming tests above compare its results."""
    dec, dec64 = _decoders(dict(), seed=7)
    mega = dec.mega_blocks[0][0]
    state = dec.create_batch_states([dec.init_state()] * 2)[0]
    x = torch.randn(1, 2, SMALL["block_size"])
    with torch.no_grad():
        assert mega._fused_step_ok(x, state)
        with backends.use_backend(*KERNELS):
            assert mega._fused_step_ok(x, state)
        with backends.use_backend("reference"):
            assert not mega._fused_step_ok(x, state)
        assert not mega._fused_step_ok(x.double(), state)
        assert not mega._fused_step_ok(torch.randn(1, 9, SMALL["block_size"]), state)
    assert not mega._fused_step_ok(x, state)  # grad mode with trainable parameters
    rotary, _ = _decoders(CONFIGS["full-rotary-rms"], seed=7)
    with torch.no_grad():
        assert not rotary.mega_blocks[0][0]._fused_step_ok(x, state)


@pytest.mark.parametrize("chunk_size", [-1, 3])
def test_fused_cpu_step_over_many_steps(chunk_size):
    """Twelve steps (past chunk boundaries) from upstream's init_state: the fused step's outputs
    and states against the float64 reference, with the float32 reference as the yardstick."""
    dec, dec64 = _decoders(dict(chunk_size=chunk_size), seed=8)
    labels = _labels(4, 12, seed=9)
    runs = {
        "got": (dec, KERNELS),
        "ref": (copy.deepcopy(dec), ("reference",)),
        "oracle": (dec64, ("reference",)),
    }
    states = {k: m.create_batch_states([m.init_state()] * 4) for k, (m, _) in runs.items()}
    with torch.no_grad():
        for t in range(labels.shape[1]):
            outs = {}
            for k, (model, backend) in runs.items():
                with backends.use_backend(*backend):
                    outs[k], states[k] = model.inference(labels[:, t : t + 1], states[k])
            assert_close_to_oracle(outs["got"], outs["oracle"], outs["ref"], name=f"step {t}")
            for b in range(len(states["got"])):
                for key in ("prev_key", "prev_value", "ema_state"):
                    assert_close_to_oracle(
                        states["got"][b][key],
                        states["oracle"][b][key],
                        states["ref"][b][key],
                        name=f"step {t} block {b} {key}",
                    )
