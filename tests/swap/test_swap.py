"""seqkern.swap on real upstream models: same outputs, same Parameter objects, same keys."""

import pytest
import torch
from torch import nn

import seqkern
from seqkern.modules.beats import BeatsMultiheadAttention
from seqkern.modules.valle import ValleNARDecoder


def test_swap_beats_encoder_keeps_output_and_state_dict(small_beats_encoder):
    enc = small_beats_encoder()
    wav = torch.randn(2, 4000)
    ilens = torch.tensor([4000, 3200])
    with torch.no_grad():
        want = enc(wav, ilens)
    keys = list(enc.state_dict())
    params = {n: p for n, p in enc.named_parameters(remove_duplicate=False)}

    out = seqkern.swap(enc)
    assert out is enc
    mhas = [m for m in enc.modules() if isinstance(m, BeatsMultiheadAttention)]
    assert len(mhas) == 2
    assert not any(type(m).__name__ == "MultiheadAttention" for m in enc.modules())
    assert list(enc.state_dict()) == keys
    for n, p in enc.named_parameters(remove_duplicate=False):
        assert p is params[n], f"{n} is not the original Parameter"
    # layer 0's bias table is still shared by every layer
    tables = {id(m.relative_attention_bias.weight) for m in mhas}
    assert len(tables) == 1
    with torch.no_grad():
        got = enc(wav, ilens)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1])

    seqkern.unswap(enc)
    assert not any(isinstance(m, BeatsMultiheadAttention) for m in enc.modules())
    with torch.no_grad():
        torch.testing.assert_close(enc(wav, ilens)[0], want[0], rtol=0, atol=0)


def test_swap_beats_training_step_matches(small_beats_encoder):
    enc = small_beats_encoder()
    wav, ilens = torch.randn(2, 3000), torch.tensor([3000, 2500])
    grads = []
    for swapped in (False, True):
        if swapped:
            seqkern.swap(enc)
        enc.zero_grad()
        enc(wav, ilens)[0].pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_swap_valle_inside_a_container(espnet_upstream):
    valle = espnet_upstream.valle

    def layer(n_state, n_head, cross=False, causal=False):
        return valle.ResidualAttentionBlockAdaLM(n_state, n_head, cross)

    model = nn.ModuleDict(
        {"nar": valle.ValleNARDecoder(4, 32, 16, 2, 2, causal=False, layer_class=layer)}
    )
    model["nar"].mask = None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, level = torch.randn(1, 9, 16), torch.tensor([2])
    want = model["nar"](x, level)
    seqkern.swap(model)
    assert isinstance(model["nar"], ValleNARDecoder)
    torch.testing.assert_close(model["nar"](x, level), want, rtol=1e-5, atol=1e-5)


def test_swap_backend_argument_and_nothing_to_swap(espnet_upstream):
    mha = espnet_upstream.beats.MultiheadAttention(16, 2, self_attention=True)
    x = torch.randn(5, 2, 16)
    ref = seqkern.swap(mha, backend="reference")  # the root itself is swapped and returned
    assert isinstance(ref, BeatsMultiheadAttention)
    ref(x, x, x)
    strict = seqkern.swap(
        espnet_upstream.beats.MultiheadAttention(16, 2, self_attention=True), backend="triton"
    )
    with pytest.raises(seqkern.BackendError, match="relbias_attention"):
        strict(x, x, x)
    with pytest.warns(UserWarning, match="nothing to swap"):
        plain = nn.Linear(3, 3)
        assert seqkern.swap(plain) is plain
    with pytest.raises(ValueError, match="unknown backend"):
        seqkern.swap(plain, backend="gpu")


def test_swap_with_backend_survives_deepcopy_and_pickle(espnet_upstream):
    """A model swapped with backend= deep-copies (AveragedModel, EMA teachers) and pickles
    (torch.save of the whole model) into a model that runs its own weights, still pinned."""
    import copy
    import io

    mha = espnet_upstream.beats.MultiheadAttention(16, 2, self_attention=True)
    model = nn.Sequential(nn.Identity(), mha)
    seqkern.swap(model, backend="reference")
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        want = model[1](x, x, x)[0]
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.mul_(2.0)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (twin, loaded):
            assert m[1].forward.module is m[1] and m[1].forward.backend == ("reference",)
        with seqkern.use_backend("reference"):
            twin_want = BeatsMultiheadAttention.forward(twin[1], x, x, x)[0]
        torch.testing.assert_close(twin[1](x, x, x)[0], twin_want, rtol=0, atol=0)
        assert not torch.allclose(twin_want, want)
        torch.testing.assert_close(loaded[1](x, x, x)[0], want, rtol=0, atol=0)
        torch.testing.assert_close(model[1](x, x, x)[0], want, rtol=0, atol=0)


def _perturbed(module, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def test_swap_torchaudio_rnnt_emformer_transcriber(small_emformer_rnnt):
    from seqkern.modules.emformer import Emformer

    rnnt = small_emformer_rnnt()
    feats = torch.randn(2, 28, 20)
    lengths = torch.tensor([28, 22])
    targets = torch.randint(0, 11, (2, 5))
    tlens = torch.tensor([5, 4])
    want = rnnt(feats, lengths, targets, tlens)
    keys = list(rnnt.state_dict())
    seqkern.swap(rnnt)
    assert isinstance(rnnt.transcriber.transformer, Emformer)
    assert list(rnnt.state_dict()) == keys
    got = rnnt(feats, lengths, targets, tlens)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    # streaming through the swapped transcriber, as torchaudio's RNNTBeamSearch drives it
    # segment 4 + right context 2 input frames (the transcriber reduces time by 2 itself)
    chunk = torch.randn(2, 4 + 2, 20)
    seqkern.unswap(rnnt)
    want_out, want_len, want_state = rnnt.transcribe_streaming(chunk, torch.tensor([6, 6]), None)
    seqkern.swap(rnnt)
    out, out_len, state = rnnt.transcribe_streaming(chunk, torch.tensor([6, 6]), None)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, want_state, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_swap_conv_emformer(torchaudio_upstream):
    from seqkern.modules.emformer import ConvEmformer

    torch.manual_seed(0)
    with pytest.warns(Warning):  # torchaudio 2.8's deprecation notice
        up = torchaudio_upstream.conv_emformer.ConvEmformer(
            16,
            2,
            24,
            2,
            segment_length=4,
            kernel_size=3,
            ffn_activation="gelu",
            left_context_length=2,
            right_context_length=1,
            max_memory_size=2,
            conv_activation="relu",
        )
    _perturbed(up, seed=1)
    x, lengths = torch.randn(2, 13, 16), torch.tensor([12, 10])
    want = up(x, lengths)
    swapped = seqkern.swap(nn.Sequential(up))[0]
    assert isinstance(swapped, ConvEmformer)
    got = swapped(x, lengths)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_swap_cpu_weights_bf16(torchaudio_upstream):
    """cpu_weights="bf16" marks every (Conv)Emformer layer and nothing else: the Parameters
    and state_dict are the upstream ones, float32; streaming runs on bfloat16 Linear weights
    (so its output is close to upstream's but not equal); bad values and a model without
    Emformer layers are said."""
    from seqkern.modules.emformer import Emformer

    torch.manual_seed(0)
    up = torchaudio_upstream.emformer.Emformer(
        32, 4, 64, 2, segment_length=4, left_context_length=4, right_context_length=1,
        max_memory_size=2,
    )  # fmt: skip
    _perturbed(up, seed=2)
    up.eval()
    params = dict(up.named_parameters())
    sd = {k: v.clone() for k, v in up.state_dict().items()}
    x, lengths = torch.randn(1, 5, 32), torch.tensor([5])
    with torch.no_grad():
        want, _, _ = up.infer(x, lengths, None)
    ours = seqkern.swap(up, cpu_weights="bf16")
    assert isinstance(ours, Emformer)
    assert all(layer._cpu_weights == "bf16" for layer in ours.emformer_layers)
    assert dict(ours.named_parameters()) == params
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in sd.items()}
    with torch.no_grad():
        got, _, _ = ours.infer(x, lengths, None)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    err = (got - want).abs().max()
    assert 1e-5 < err < 5e-2, err  # the C++ extension is always built: the fused step ran
    with pytest.raises(ValueError, match="cpu_weights"):
        seqkern.swap(nn.Linear(3, 3), cpu_weights="int4")
    with pytest.warns(UserWarning, match="has none"):
        seqkern.swap(nn.Linear(3, 3), cpu_weights="bf16")


MEGA_SMALL = dict(
    vocab_size=11,
    block_size=24,
    linear_size=28,
    qk_size=8,
    v_size=20,
    num_heads=2,
    num_blocks=2,
    max_positions=40,
)
MEGA_CONFIGS = [
    dict(),
    dict(
        chunk_size=4,
        rel_pos_bias_type="rotary",
        normalization_type="rms_norm",
        normalization_args={"partial": 0.5},
        activation_type="smish",
        activation_args={"smish_alpha": 1.5, "smish_beta": 0.7},
    ),
    dict(
        truncation_length=3,
        normalization_type="scale_norm",
        activation_type="ftswish",
        activation_args={"ftswish_threshold": -0.3, "ftswish_mean_shift": 0.1},
    ),
    dict(
        normalization_type="basic_norm",
        activation_type="hardtanh",
        activation_args={"hardtanh_min_val": -0.5, "hardtanh_max_val": 2.0},
        embed_pad=3,
    ),
    dict(
        activation_type="swish",
        activation_args={"swish_beta": 1.5},
        normalization_args={"eps": 1e-5},
        chunk_size=5,
    ),
    dict(activation_type="leaky_relu", activation_args={"leakyrelu_neg_slope": 0.2}),
    dict(activation_type="mish"),
]


@pytest.mark.parametrize("cfg", MEGA_CONFIGS, ids=range(len(MEGA_CONFIGS)))
def test_swap_mega_decoder_with_beam_search(espnet_upstream, cfg):
    import copy

    from espnet2.asr_transducer.joint_network import JointNetwork

    from seqkern.modules.mega import MEGADecoder

    torch.manual_seed(0)
    dec = _perturbed(espnet_upstream.mega_decoder.MEGADecoder(**MEGA_SMALL, **cfg), seed=2)
    joint = _perturbed(JointNetwork(11, 12, 24, joint_space_size=16), seed=3)
    model = nn.ModuleDict({"decoder": dec, "joint_network": joint})
    labels = torch.tensor([[0, 3, 5, 7, 2, 1, 9], [0, 4, 4, 1, 3, 0, 0]])
    enc = torch.randn(5, 12)
    bs = espnet_upstream.beam_search.BeamSearchTransducer
    with torch.no_grad():
        want = model["decoder"](labels)
        want_hyps = bs(
            model["decoder"],
            copy.deepcopy(joint),
            beam_size=3,
            nbest=3,
            search_type="maes",
            expansion_beta=1,
        )(enc)
    keys = list(model.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    seqkern.swap(model)
    assert isinstance(model["decoder"], MEGADecoder)
    assert list(model.state_dict()) == keys
    for n, p in model.named_parameters(remove_duplicate=False):
        assert p is params[n], n
    with torch.no_grad():
        torch.testing.assert_close(model["decoder"](labels), want, rtol=1e-5, atol=1e-5)
        hyps = bs(
            model["decoder"],
            copy.deepcopy(joint),
            beam_size=3,
            nbest=3,
            search_type="maes",
            expansion_beta=1,
        )(enc)
    assert [h.yseq for h in hyps] == [h.yseq for h in want_hyps]
    for a, b in zip(hyps, want_hyps, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
