"""ValleNARDecoder against ESPnet 202506's (the real module, with its two bugs worked around).

202506 cannot be built with its default layer_class and reads a never-assigned `self.mask`;
the harness passes a layer_class lambda and sets `model.mask`. Its `[0]` quirk broadcasts
batch row 0's attention over the batch, so B > 1 is compared against upstream run per sample
(seqkern follows the intended, per-sample semantics).
"""

import pytest
import torch

from seqkern.modules.valle import ValleNARDecoder, install_kv_cache_hook

D, H, L, NCTX, NLEVEL = 24, 3, 2, 40, 5


def perturb_(module, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def upstream_decoder(espnet_upstream, causal=False):
    valle = espnet_upstream.valle

    def layer(n_state, n_head, cross=False, causal=False):
        return valle.ResidualAttentionBlockAdaLM(n_state, n_head, cross)

    m = valle.ValleNARDecoder(NLEVEL, NCTX, D, H, L, causal=causal, layer_class=layer)
    m.mask = None
    return m


def make_pair(espnet_upstream, causal=False, seed=0):
    torch.manual_seed(seed)
    up = upstream_decoder(espnet_upstream).double()
    perturb_(up, seed)
    ours = ValleNARDecoder(NLEVEL, NCTX, D, H, L, causal=causal).double()
    ours.load_state_dict(up.state_dict(), strict=True)
    return up.eval(), ours.eval()


def test_state_dict_keys_shapes_and_order(espnet_upstream):
    up = upstream_decoder(espnet_upstream)
    ours = ValleNARDecoder(NLEVEL, NCTX, D, H, L)
    assert list(ours.state_dict()) == list(up.state_dict())
    for k, t in up.state_dict().items():
        assert ours.state_dict()[k].shape == t.shape, k
    perturb_(ours, 1)
    up.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("T", [1, 7, 13])
def test_forward_and_grads_per_sample(espnet_upstream, T):
    up, ours = make_pair(espnet_upstream, seed=T)
    B = 3
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    level = torch.tensor([0, 3, 4])
    y = ours(x, level)
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y * w).sum(), [x, *ours.parameters()])
    want_grads = [torch.zeros_like(g) for g in grads]
    for b in range(B):  # upstream is right only for B = 1
        xb = x[b : b + 1].detach().clone().requires_grad_()
        yb = up(xb, level[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], yb, rtol=1e-10, atol=1e-10)
        gb = torch.autograd.grad((yb * w[b : b + 1]).sum(), [xb, *up.parameters()])
        want_grads[0][b] = gb[0][0]
        for acc, g in zip(want_grads[1:], gb[1:], strict=True):
            acc += g
    for g, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-10)


def test_causal_equals_upstream_with_a_causal_mask(espnet_upstream):
    # 202506 never passes `causal` to its blocks; a tril bool mask gives the causal result.
    up, ours = make_pair(espnet_upstream, causal=True, seed=5)
    T = 9
    x = torch.randn(1, T, D, dtype=torch.float64)
    up.mask = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(
        ours(x, torch.tensor([2])), up(x, torch.tensor([2])), rtol=1e-10, atol=1e-10
    )


def test_mask_argument_equals_upstream_mask_attribute(espnet_upstream):
    up, ours = make_pair(espnet_upstream, seed=6)
    T = 8
    x = torch.randn(1, T, D, dtype=torch.float64)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    mask[..., 5:] = False  # the last 3 frames are padding
    up.mask = mask
    got = ours(x, torch.tensor([1]), mask=mask)
    torch.testing.assert_close(got, up(x, torch.tensor([1])), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not allowed when causal"):
        ValleNARDecoder(NLEVEL, NCTX, D, H, L, causal=True)(x.float(), torch.tensor([1]), mask=mask)


def test_kv_cache_frame_by_frame_matches_upstream(espnet_upstream):
    # Upstream decodes each sample with its own cache (its [0] quirk rules out B > 1).
    up, ours = make_pair(espnet_upstream, seed=7)
    T, B = 6, 2
    x = torch.randn(B, T, D, dtype=torch.float64)
    level = torch.tensor([1, 4])
    up_caches, up_hooks = [], []
    for _ in range(B):
        c, h = espnet_upstream.net_utils.install_kv_cache_hook(up, {})
        up_caches.append(c)
        up_hooks.append(h)
    cache, hooks = install_kv_cache_hook(ours, {})
    for t in range(T):
        got = ours(x[:, t : t + 1], level, kv_cache=cache)
        for b in range(B):
            for h in (h for hs in up_hooks for h in hs):  # only sample b's hooks active
                h.remove()
            up_caches[b], up_hooks[b] = espnet_upstream.net_utils.install_kv_cache_hook(
                up, up_caches[b]
            )
            want = up(x[b : b + 1, t : t + 1], level[b : b + 1], kv_cache=up_caches[b])
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-10, atol=1e-10)
    for h in [h for hs in up_hooks for h in hs] + hooks:
        h.remove()
    assert next(iter(cache.values())).shape == (B, T, D)


def test_causal_incremental_equals_full_forward(espnet_upstream):
    _, ours = make_pair(espnet_upstream, causal=True, seed=8)
    T = 7
    x = torch.randn(2, T, D, dtype=torch.float64)
    level = torch.tensor([0, 2])
    full = ours(x, level)
    cache, hooks = install_kv_cache_hook(ours, {})
    # chunks of 1, 2 and 4 frames: the bottom-right causal mask keeps them exact
    steps, t = [], 0
    for n in (1, 2, 4):
        steps.append(ours(x[:, t : t + n], level, kv_cache=cache))
        t += n
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_per_frame_levels_and_dtype_promotion(espnet_upstream):
    up, ours = make_pair(espnet_upstream, seed=9)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    level = torch.tensor([3, 1])
    torch.testing.assert_close(ours(x, level[:, None].expand(2, 5)), ours(x, level))
    up32, ours32 = up.float(), ours.float()
    xb = x.to(torch.bfloat16)
    got, want = ours32(xb[:1], level[:1]), up32(xb[:1], level[:1])
    assert got.dtype == want.dtype == torch.float32  # promotes like upstream
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bad_input(espnet_upstream):
    ours = ValleNARDecoder(NLEVEL, NCTX, D, H, L, causal=False)
    with pytest.raises(ValueError, match="exceed n_ctx"):
        ours(torch.randn(1, NCTX + 1, D), torch.tensor([0]))
    with pytest.raises(ValueError, match="level must be"):
        ours(torch.randn(2, 3, D), torch.tensor([0]))
