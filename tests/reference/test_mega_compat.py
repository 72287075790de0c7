"""seqkern's MEGADecoder against ESPnet 202506's, on perturbed weights.

Upstream's init is degenerate (zero biases, zero pad embedding, LayerNorm eps 1e-12 amplifying
rounding noise), so every parameter gets noise first. Most comparisons run in float64 (the
EMA FFT and the softmax still run in float32 on both sides, in the same order).
"""

from __future__ import annotations

import copy

import pytest
import torch

from seqkern.modules.mega import MEGADecoder

VOCAB = 11
SMALL = dict(
    vocab_size=VOCAB,
    block_size=24,
    linear_size=28,
    qk_size=8,
    v_size=20,
    num_heads=2,
    num_blocks=2,
    max_positions=40,
)

CONFIGS = {
    "full-simple": dict(),
    "full-rotary-trunc": dict(rel_pos_bias_type="rotary", truncation_length=3, num_heads=3),
    "chunk5-simple": dict(chunk_size=5),
    "chunk4-rotary-rms": dict(
        chunk_size=4,
        rel_pos_bias_type="rotary",
        normalization_type="rms_norm",
        activation_type="smish",
    ),
    "chunk6-scale-mish": dict(
        chunk_size=6, normalization_type="scale_norm", activation_type="mish", num_heads=3
    ),
    "full-basic-ftswish": dict(
        normalization_type="basic_norm", activation_type="ftswish", truncation_length=4
    ),
    "full-rmspartial-eswish": dict(
        normalization_type="rms_norm",
        normalization_args={"partial": 0.5},
        activation_type="swish",
        activation_args={"swish_beta": 1.5},
    ),
    "full-layer-leaky-pad3": dict(
        activation_type="leaky_relu", normalization_args={"eps": 1e-5}, embed_pad=3
    ),
    "chunk7-tanh-hardtanh": dict(chunk_size=7, activation_type="hardtanh"),
    "full-selu-identity": dict(activation_type="selu", rel_pos_bias_type="rotary"),
    "chunk3-relu-identity": dict(chunk_size=3, activation_type="identity"),
}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("_pe"):
                b.zero_()  # upstream leaves it uninitialised


def make_pair(espnet_upstream, dtype=torch.float64, seed=0, **overrides):
    """(upstream, seqkern) decoders with the same perturbed weights (loaded both ways)."""
    args = {**SMALL, **overrides}
    up = espnet_upstream.mega_decoder.MEGADecoder(**args).to(dtype)
    _perturb(up, seed)
    ours = MEGADecoder(**args).to(dtype)
    assert list(ours.state_dict()) == list(up.state_dict())
    for k, v in up.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    ours.load_state_dict(up.state_dict(), strict=True)
    # ... and back: a fresh upstream loads seqkern's state_dict.
    back = espnet_upstream.mega_decoder.MEGADecoder(**args).to(dtype)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, up.state_dict()[k], rtol=0, atol=0)
    return up, ours


def make_labels(batch, length, pad, seed=0, lengths=None):
    """Transducer-style inputs: pad (blank) at position 0, real labels != pad, ragged tails."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB - 1, (batch, length), generator=g)
    labels = labels + (labels >= pad).long()  # skip the pad id
    labels[:, 0] = pad
    for b, n in enumerate(lengths or []):
        labels[b, n:] = pad
    return labels


def _close(a, b, tol, name=""):
    assert a.shape == b.shape, name
    assert torch.isfinite(a).all(), name
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"{name}: max err {err:.3e} > {tol:.1e} * {scale:.2f}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_param_grads(espnet_upstream, name):
    up, ours = make_pair(espnet_upstream, **CONFIGS[name])
    pad = up.pad_idx
    labels = make_labels(3, 13, pad, lengths=[13, 9, 6])
    out_up, out = up(labels), ours(labels)
    _close(out, out_up, 1e-10, "forward")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out_up * w).sum().backward()
    (out * w).sum().backward()
    grads_up = dict(up.named_parameters())
    for pname, p in ours.named_parameters():
        gu = grads_up[pname].grad
        if gu is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        _close(p.grad, gu, 1e-9, pname)


@pytest.mark.parametrize("length", [1, 4, 5, 11])
def test_forward_short_and_exact_chunks(espnet_upstream, length):
    up, ours = make_pair(espnet_upstream, chunk_size=5, seed=3)
    labels = make_labels(2, length, 0, seed=length)
    _close(ours(labels), up(labels), 1e-10, "forward")


def test_forward_float32(espnet_upstream):
    up, ours = make_pair(espnet_upstream, dtype=torch.float32, chunk_size=4, truncation_length=5)
    labels = make_labels(2, 10, 0, lengths=[10, 7])
    _close(ours(labels), up(labels), 1e-5, "forward fp32")


def test_midsequence_pad_nan_upstream_zero_ours(espnet_upstream):
    """A chunk starting with the pad id: upstream's first row is fully masked (NaN)."""
    up, ours = make_pair(espnet_upstream, chunk_size=4, seed=5)
    labels = make_labels(1, 8, 0)
    labels[0, 4] = 0
    assert torch.isnan(up(labels)).any()
    out = ours(labels)
    assert torch.isfinite(out).all()
    _close(out[:, :4], up(labels)[:, :4], 1e-10, "chunk before the NaN")


def _stream(dec, labels, states):
    outs, all_states = [], []
    for t in range(labels.shape[1]):
        out, states = dec.inference(labels[:, t : t + 1], states)
        outs.append(out)
        all_states.append(states)
    return torch.cat(outs, dim=1), all_states


def _compare_states(s_ours, s_up, tol):
    assert len(s_ours) == len(s_up)
    for blk, (a, b) in enumerate(zip(s_ours, s_up)):
        assert list(a) == list(b), "state dict key order"
        for key in b:
            if b[key] is None:
                assert a[key] is None
            else:
                _close(a[key], b[key], tol, f"block {blk} {key}")


@pytest.mark.parametrize(
    "name",
    [
        "full-simple",
        "full-rotary-trunc",
        "chunk5-simple",
        "chunk4-rotary-rms",
        "chunk3-relu-identity",
    ],
)
def test_inference_from_init_state(espnet_upstream, name):
    up, ours = make_pair(espnet_upstream, seed=7, **CONFIGS[name])
    labels = make_labels(1, 12, up.pad_idx, seed=2)
    out_up, st_up = _stream(up, labels, up.init_state())
    out, st = _stream(ours, labels, ours.init_state())
    _close(out, out_up, 1e-10, "inference")
    for a, b in zip(st, st_up):
        _compare_states(a, b, 1e-10)


def test_init_select_create_batch_states(espnet_upstream):
    up, ours = make_pair(espnet_upstream, chunk_size=5, seed=11)
    _compare_states(ours.init_state(4), up.init_state(4), 0)
    # three hypotheses with different histories -> different key lengths
    hist = [[0, 3], [0, 5, 6, 7], [0, 2, 9, 4, 1, 8]]
    per_hyp_up, per_hyp = [], []
    for h in hist:
        lab = torch.tensor([h])
        per_hyp_up.append(up.select_state(_stream(up, lab, up.init_state())[1][-1], 0))
        per_hyp.append(ours.select_state(_stream(ours, lab, ours.init_state())[1][-1], 0))
        _compare_states(per_hyp[-1], per_hyp_up[-1], 1e-10)
    for blk in range(ours.num_blocks):
        assert per_hyp[-1][blk]["prev_key"].dim() == 2
    batch_up = up.create_batch_states(per_hyp_up)
    batch = ours.create_batch_states(per_hyp)
    # upstream builds the stacked keys in CPU float32; ours keeps the states' dtype
    _compare_states(batch, batch_up, 1e-6)
    stacked = ours.stack_qk_states([s[0]["prev_key"] for s in per_hyp], ours.mega_att_k_size)
    lens = [s[0]["prev_key"].shape[0] for s in per_hyp]
    assert lens == [3, 1, 3]  # 1 + 2; 1 + 4 = a chunk -> keep 1; 1 + 6 -> 1 at 5, then 3
    assert stacked.dtype == torch.float64 and stacked.shape == (3, 3, 8)
    assert not stacked[1, :2].any() and stacked[1, 2].any()  # left padding with zeros
    # one batched step on the stacked states
    lab = torch.tensor([[4], [1], [6]])
    out_up, new_up = up.inference(lab, batch_up)
    out, new = ours.inference(lab, batch)
    _compare_states(new, new_up, 1e-6)
    _close(out, out_up, 1e-6, "batched inference")
    for i in range(3):
        _compare_states(ours.select_state(new, i), up.select_state(new_up, i), 1e-6)


def test_score_and_batch_score(espnet_upstream):
    up, ours = make_pair(espnet_upstream, dtype=torch.float32, seed=13)
    Hyp = espnet_upstream.beam_search.Hypothesis
    out_up, st_up = up.score([0], up.init_state(1))
    out, st = ours.score([0], ours.init_state(1))
    assert out.shape == (1, ours.output_size)
    _close(out, out_up, 1e-6, "score")
    _compare_states(st, st_up, 1e-6)
    out2_up, st2_up = up.score([0, 4], st_up)
    out2, st2 = ours.score([0, 4], st)
    _close(out2, out2_up, 1e-6, "score 2")
    assert "0_4" in ours.score_cache
    again, st_again = ours.score([0, 4], st)  # memoised: the same objects
    assert again.data_ptr() == out2.data_ptr() and st_again is st2
    hyps_up = [
        Hyp(score=0.0, yseq=[0], dec_state=up.init_state(1)),
        Hyp(score=0.0, yseq=[0, 4], dec_state=up.select_state(st2_up, 0)),
    ]
    hyps = [
        Hyp(score=0.0, yseq=[0], dec_state=ours.init_state(1)),
        Hyp(score=0.0, yseq=[0, 4], dec_state=ours.select_state(st2, 0)),
    ]
    bo_up, bs_up = up.batch_score(hyps_up)
    bo, bs = ours.batch_score(hyps)
    assert bo.shape == (2, ours.output_size)
    _close(bo, bo_up, 1e-6, "batch_score")
    _compare_states(bs, bs_up, 1e-6)


@pytest.mark.parametrize("search_type", ["default", "maes", "tsd", "alsd"])
@pytest.mark.parametrize("chunk_size", [-1, 3])
def test_beam_search_end_to_end(espnet_upstream, search_type, chunk_size):
    from espnet2.asr_transducer.joint_network import JointNetwork

    up, ours = make_pair(espnet_upstream, dtype=torch.float32, seed=17, chunk_size=chunk_size)
    torch.manual_seed(0)
    joint = JointNetwork(VOCAB, 12, SMALL["block_size"], joint_space_size=16)
    _perturb(joint, 19)
    with torch.no_grad():
        # make blank rarer (longer hypotheses, chunk boundaries); the default search, which
        # expands until blank wins, stays quick only with the plain joint
        joint.lin_out.bias[0] -= 0.0 if search_type == "default" else 4.0
    enc = torch.randn(6, 12)
    kw = dict(beam_size=3, search_type=search_type, nbest=3)
    if search_type == "maes":
        kw.update(expansion_beta=1)
    bs = espnet_upstream.beam_search.BeamSearchTransducer
    with torch.no_grad():
        hyps_up = bs(up, copy.deepcopy(joint), **kw)(enc)
        hyps = bs(ours, copy.deepcopy(joint), **kw)(enc)
    assert len(hyps) == len(hyps_up) > 0
    if search_type != "default":
        assert max(len(h.yseq) for h in hyps) >= 3  # 3 decoder steps: past a chunk of 3
    for a, b in zip(hyps, hyps_up):
        assert a.yseq == b.yseq
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)


def test_set_device_and_attributes(espnet_upstream):
    up, ours = make_pair(espnet_upstream)
    for attr in (
        "vocab_size",
        "output_size",
        "chunk_size",
        "mega_num_heads",
        "mega_att_k_size",
        "mega_att_v_size",
        "mega_ema_size",
        "mega_ema_num_heads",
        "pad_idx",
        "num_blocks",
        "device",
    ):
        assert getattr(ours, attr) == getattr(up, attr), attr
    ours.set_device(torch.device("cpu"))
    assert ours.device == torch.device("cpu")
