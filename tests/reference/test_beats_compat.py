"""BeatsMultiheadAttention against ESPnet 202506's MultiheadAttention (the real module)."""

import pytest
import torch

from seqkern.modules.beats import BeatsMultiheadAttention


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add noise to every parameter: never compare at upstream's (degenerate) init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_pair(espnet_upstream, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    up = espnet_upstream.beats.MultiheadAttention(**kwargs).to(dtype)
    perturb_(up, seed)
    ours = BeatsMultiheadAttention(**kwargs).to(dtype)
    ours.load_state_dict(up.state_dict(), strict=True)
    up.eval(), ours.eval()
    return up, ours


CONFIGS = [
    dict(embed_dim=24, num_heads=4, self_attention=True),
    dict(
        embed_dim=24,
        num_heads=3,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=40,
    ),
    dict(
        embed_dim=32,
        num_heads=4,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=32,
        max_distance=64,
        gru_rel_pos=True,
    ),
    dict(embed_dim=24, num_heads=2, kdim=12, vdim=20, bias=False, rescale_init=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("need_head_weights", [False, True])
def test_forward_and_grads_match_upstream(espnet_upstream, cfg, need_head_weights):
    up, ours = make_pair(espnet_upstream, **cfg)
    T, S, B = 7, 7 if cfg.get("self_attention") else 9, 3
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(T, B, cfg["embed_dim"], generator=gen, dtype=torch.float64)
    key = torch.randn(S, B, cfg.get("kdim") or cfg["embed_dim"], generator=gen, dtype=torch.float64)
    value = torch.randn(
        S, B, cfg.get("vdim") or cfg["embed_dim"], generator=gen, dtype=torch.float64
    )
    if cfg.get("self_attention"):
        key = value = query
    lengths = torch.tensor([S, S - 2, S - 4])  # ragged batch
    kpm = torch.arange(S)[None, :] >= lengths[:, None]
    attn_mask = 0.3 * torch.randn(T, S, generator=gen, dtype=torch.float64)

    outs = []
    for m in (up, ours):
        q = query.clone().requires_grad_()
        args = (
            q,
            key if not cfg.get("self_attention") else q,
            value if not cfg.get("self_attention") else q,
        )
        attn, w, pb = m(
            *args, key_padding_mask=kpm, attn_mask=attn_mask, need_head_weights=need_head_weights
        )
        loss = (attn * torch.linspace(-1, 1, attn.numel(), dtype=attn.dtype).view_as(attn)).sum()
        grads = torch.autograd.grad(loss, [q, *m.parameters()])
        outs.append((attn, w, pb, grads))
    (a0, w0, pb0, g0), (a1, w1, pb1, g1) = outs
    torch.testing.assert_close(a1, a0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-10)
    if pb0 is None:
        assert pb1 is None
    else:
        torch.testing.assert_close(pb1, pb0, rtol=0, atol=0)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_position_bias_passthrough_and_before_softmax(espnet_upstream):
    cfg = dict(
        embed_dim=24,
        num_heads=3,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=40,
        gru_rel_pos=True,
    )
    up, ours = make_pair(espnet_upstream, seed=3, **cfg)
    x = torch.randn(6, 2, 24, dtype=torch.float64)
    _, _, pb = up(x, x, x)
    a0, _, pb0 = up(x, x, x, position_bias=pb * 1.5)
    a1, _, pb1 = ours(x, x, x, position_bias=pb * 1.5)
    torch.testing.assert_close(a1, a0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pb1, pb0)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    w0, v0, p0 = up(x, x, x, key_padding_mask=kpm, before_softmax=True)
    w1, v1, p1 = ours(x, x, x, key_padding_mask=kpm, before_softmax=True)
    for a, b in ((w0, w1), (v0, v1), (p0, p1)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_state_dict_roundtrip_both_ways(espnet_upstream):
    cfg = dict(
        embed_dim=16,
        num_heads=2,
        self_attention=True,
        has_relative_attention_bias=True,
        gru_rel_pos=True,
        add_bias_kv=True,
    )
    up = espnet_upstream.beats.MultiheadAttention(**cfg)
    ours = BeatsMultiheadAttention(**cfg)
    assert list(ours.state_dict()) == list(up.state_dict())
    for k, t in up.state_dict().items():
        assert ours.state_dict()[k].shape == t.shape, k
    perturb_(ours, 5)
    up.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(up.state_dict(), strict=True)


def test_incremental_decoding_matches_upstream_with_fairseq_shim(espnet_upstream):
    """Upstream needs fairseq's state helpers bound on; with them, frame-by-frame decoding
    must agree with ours, and both must equal the full forward with a causal additive mask."""
    cfg = dict(embed_dim=24, num_heads=4, self_attention=True)
    up, ours = make_pair(espnet_upstream, seed=4, **cfg)
    ours_state, up_state = {}, {}
    up.get_incremental_state = lambda st, key: st.get(f"up.{key}")
    up.set_incremental_state = lambda st, key, val: st.__setitem__(f"up.{key}", val) or st
    T = 5
    x = torch.randn(T, 2, 24, dtype=torch.float64)
    causal = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), diagonal=1)
    full, _, _ = ours(x, x, x, attn_mask=causal)
    for t in range(T):
        xt = x[t : t + 1]
        a_up, _, _ = up(xt, xt, xt, incremental_state=up_state)
        a_ours, _, _ = ours(xt, xt, xt, incremental_state=ours_state)
        torch.testing.assert_close(a_ours, a_up, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a_ours, full[t : t + 1], rtol=1e-10, atol=1e-10)


def test_incremental_with_relative_bias_equals_full_forward(espnet_upstream):
    # Upstream raises here (bias sized without the cache offset); seqkern follows the intent.
    cfg = dict(
        embed_dim=24,
        num_heads=3,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=40,
        gru_rel_pos=True,
    )
    _, ours = make_pair(espnet_upstream, seed=6, **cfg)
    T = 6
    x = torch.randn(T, 2, 24, dtype=torch.float64)
    causal = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), diagonal=1)
    full, _, _ = ours(x, x, x, attn_mask=causal)
    state = {}
    steps = [
        ours(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state)[0] for t in range(T)
    ]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-10, atol=1e-10)


def test_add_zero_attn_matches_upstream_without_bias(espnet_upstream):
    cfg = dict(embed_dim=24, num_heads=4, self_attention=True, add_zero_attn=True)
    up, ours = make_pair(espnet_upstream, seed=7, **cfg)
    x = torch.randn(5, 2, 24, dtype=torch.float64)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    a0, w0, _ = up(x, x, x, key_padding_mask=kpm)
    a1, w1, _ = ours(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(a1, a0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-10)


def test_fully_padded_row_is_zero_not_nan(espnet_upstream):
    cfg = dict(embed_dim=16, num_heads=2, self_attention=True)
    up, ours = make_pair(espnet_upstream, seed=8, **cfg)
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    kpm = torch.tensor([[False] * 4, [True] * 4])
    a_up, _, _ = up(x, x, x, key_padding_mask=kpm)
    a, w, _ = ours(x, x, x, key_padding_mask=kpm)
    assert torch.isnan(a_up[:, 1]).all()  # upstream: NaN
    torch.testing.assert_close(a[:, 1], ours.out_proj.bias.expand(4, 16))  # zero attention
    torch.testing.assert_close(a[:, 0], a_up[:, 0])
    assert torch.equal(w[1], torch.zeros_like(w[1]))


def test_fp16_close_to_upstream(espnet_upstream):
    cfg = dict(
        embed_dim=32,
        num_heads=4,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=40,
    )
    up, ours = make_pair(espnet_upstream, seed=9, dtype=torch.float32, **cfg)
    x = torch.randn(9, 2, 32)
    a0, _, _ = up(x, x, x)
    a1, _, _ = ours(x, x, x)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    m = BeatsMultiheadAttention(16, 2, self_attention=True)
    with pytest.raises(ValueError, match="query must be"):
        m(torch.randn(4, 16), None, None)
    with pytest.raises(NotImplementedError, match="q_noise"):
        BeatsMultiheadAttention(16, 2, q_noise=0.1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (320, 1280), (16, 20), (10, 9)])
def test_bucket_function_matches_upstream_far_past_max_distance(
    espnet_upstream, num_buckets, max_distance
):
    from seqkern.reference.relbias import relative_position_bucket

    up = espnet_upstream.beats.MultiheadAttention(
        8,
        2,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    rel = torch.arange(-3 * max_distance - 7, 3 * max_distance + 8)
    want = up._relative_positions_bucket(rel, bidirectional=True)
    got = relative_position_bucket(rel, num_buckets, max_distance)
    assert torch.equal(got, want)


def test_long_sequence_bias_matches_upstream(espnet_upstream):
    cfg = dict(
        embed_dim=16,
        num_heads=2,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=20,
    )
    up, ours = make_pair(espnet_upstream, seed=11, **cfg)
    x = torch.randn(60, 1, 16, dtype=torch.float64)
    a0, _, pb0 = up(x, x, x)
    a1, _, pb1 = ours(x, x, x)
    torch.testing.assert_close(pb1, pb0, rtol=0, atol=0)
    torch.testing.assert_close(a1, a0, rtol=1e-10, atol=1e-10)
