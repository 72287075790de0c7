"""seqkern.swap on real upstream models: same outputs, same Parameter objects, same keys."""

import pytest
import torch
from torch import nn

import seqkern
from seqkern.modules.beats import BeatsMultiheadAttention
from seqkern.modules.valle import ValleNARDecoder


def _beats_encoder(espnet_upstream):
    cfg = dict(
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        embed_dim=16,
        conv_pos=16,
        conv_pos_groups=4,
        relative_position_embedding=True,
        num_buckets=32,
        max_distance=64,
        gru_rel_pos=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        dropout_input=0.0,
        encoder_layerdrop=0.0,
    )
    torch.manual_seed(0)
    enc = espnet_upstream.beats.BeatsEncoder(input_size=1, beats_config=cfg)
    with torch.no_grad():  # away from the init, so the bias and gate paths matter
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return enc.eval()


def test_swap_beats_encoder_keeps_output_and_state_dict(espnet_upstream):
    enc = _beats_encoder(espnet_upstream)
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


def test_swap_beats_training_step_matches(espnet_upstream):
    enc = _beats_encoder(espnet_upstream)
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
