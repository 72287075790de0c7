"""relbias_attention: the Triton kernel against the float64 oracle, forward and every gradient.

Runs in the Triton interpreter on CPU (small shapes) under use_backend("triton"), so a reference
fallback cannot hide; the cuda tier repeats it on the GPU at BEATs sizes.
"""

import math

import pytest
import torch

from seqkern import BackendError, use_backend
from seqkern.ops.relbias import relbias_attention
from seqkern.reference.relbias import relbias_attention_ref
from seqkern.testing import assert_close_to_oracle, assert_poisoned_grad_close_to_oracle

# (B, H, T, S, hd, bias form, gate, attn_mask, padding)
CPU_CASES = [
    (1, 1, 1, 1, 16, "rel", True, False, False),  # T = 1
    (2, 3, 21, 21, 24, "rel", True, True, True),  # T off the block, odd head dim, ragged
    (2, 2, 17, 17, 32, "dense", True, False, True),
    (1, 2, 9, 23, 16, "rel", False, False, True),  # S != T (cross / cached keys)
    (2, 2, 19, 19, 16, "none", False, True, False),
    (3, 2, 33, 33, 64, "rel", True, False, True),
    # long reductions (B * T >= 4096), tiny tiles so that the interpreter stays quick:
    # d rel_bias of each offset sums gate * dS over every batch row and its diagonal (the kernel
    # adds them one by one by atomics): 256 rows x 16 = 4096 terms on the main diagonal
    (256, 1, 16, 16, 16, "rel", True, True, False),
    # dgate and dq sum over S = 4096 keys per query row (256 key tiles, one program)
    (1, 1, 16, 4096, 16, "rel", True, True, True),
    # dK and dV sum over T = 4096 queries per key (256 query tiles, one program per key tile)
    (1, 1, 4096, 16, 16, "dense", True, False, False),
]
CUDA_CASES = [
    (2, 12, 500, 500, 64, "rel", True, False, True),
    (1, 12, 1500, 1500, 64, "rel", True, False, True),
    (2, 8, 333, 333, 128, "dense", True, True, True),
    (4, 4, 77, 77, 32, "rel", False, True, True),
]


def _make(B, H, T, S, hd, form, use_gate, use_am, use_pad, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # time-major storage, as the module hands them over: (L, B, H, hd) permuted to (B, H, L, hd)
    q = rnd(T, B, H, hd).permute(1, 2, 0, 3)
    k = rnd(S, B, H, hd).permute(1, 2, 0, 3)
    v = rnd(S, B, H, hd).permute(1, 2, 0, 3)
    extra = {}
    if form == "rel":
        extra["rel_bias"] = rnd(H, T + S - 1)
    elif form == "dense":
        extra["bias"] = rnd(1, H, T, S)
    if use_gate and form != "none":
        extra["gate"] = 0.5 + torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64) * 1.5
    tensors = {"q": q, "k": k, "v": v, **extra}
    tensors = {n: t.to(device=device, dtype=dtype) for n, t in tensors.items()}
    for t in tensors.values():
        t.requires_grad_()
    masks = {}
    if use_am:
        masks["attn_mask"] = (0.5 * rnd(T, S)).to(device=device, dtype=dtype)
    if use_pad:
        lengths = torch.tensor([S - 3 * b for b in range(B)]).clamp(min=1)
        masks["key_padding_mask"] = (torch.arange(S)[None] >= lengths[:, None]).to(device)
    dout = rnd(B, H, T, hd).to(device=device, dtype=dtype)
    return tensors, masks, dout


def _run(tensors, masks, dout, scale, backend):
    """The op on `backend`, or (backend=None) autograd through relbias_attention_ref: the
    oracle, independent of every backend's hand-written backward."""
    names = list(tensors)
    args = (tensors["q"], tensors["k"], tensors["v"], scale)
    kwargs = dict(
        bias=tensors.get("bias"),
        gate=tensors.get("gate"),
        rel_bias=tensors.get("rel_bias"),
        **masks,
    )
    if backend is None:
        out, _ = relbias_attention_ref(*args, **kwargs)
        grads = torch.autograd.grad(out, [tensors[n] for n in names], dout)
    else:
        # the backward op picks its backend when it runs: keep it inside the block
        with use_backend(backend):
            out, _ = relbias_attention(*args, **kwargs)
            grads = torch.autograd.grad(out, [tensors[n] for n in names], dout)
    return out, dict(zip(names, grads, strict=True))


def _cases():
    for device, cases in (("cpu", CPU_CASES), ("cuda", CUDA_CASES)):
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in dtypes:
            for i, case in enumerate(cases):
                yield pytest.param(
                    device, dtype, case, id=f"{device}-{str(dtype)[6:]}-{i}", marks=marks
                )


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("device,dtype,case", list(_cases()))
def test_backend_matches_oracle(device, dtype, case, backend):
    B, H, T, S, hd, form, use_gate, use_am, use_pad = case
    tensors, masks, dout = _make(*case, dtype=dtype, device=device, seed=sum(case[:5]))
    scale = hd**-0.5
    out, grads = _run(tensors, masks, dout, scale, backend)

    def detached(dt):
        return {n: t.detach().to(dt).requires_grad_() for n, t in tensors.items()}

    t64 = detached(torch.float64)
    m64 = {n: (m.double() if m.is_floating_point() else m) for n, m in masks.items()}
    oracle, oracle_grads = _run(t64, m64, dout.double(), scale, None)
    tdt = detached(dtype)
    ref, ref_grads = _run(tdt, masks, dout, scale, None)
    assert_close_to_oracle(out, oracle, ref, name="out")
    for n in grads:
        assert grads[n].shape == tensors[n].shape, n
        assert_close_to_oracle(grads[n], oracle_grads[n], ref_grads[n], name=f"d{n}")


def test_fully_padded_row_gives_zero_with_finite_grads():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 6, 16, requires_grad=True)
    v = torch.randn(1, 2, 6, 16, requires_grad=True)
    rel = torch.randn(2, 10, requires_grad=True)
    kpm = torch.ones(1, 6, dtype=torch.bool)
    with use_backend("triton"):
        out, _ = relbias_attention(q, k, v, 0.25, rel_bias=rel, key_padding_mask=kpm)
        grads = torch.autograd.grad(out.sum(), (q, k, v, rel))
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", ["need_weights", "dropout"])
def test_rows_without_keys_on_the_reference_path(path):
    """need_weights=True and dropout run the reference directly: an all -inf attn_mask row and
    an all-padded sample give 0 there too, and the gradients (of the bias table and the gate
    as well) stay finite, not NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=gen, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 9, generator=gen, requires_grad=True)
    gate = torch.rand(2, 2, 5, 1, generator=gen, requires_grad=True)
    attn_mask = torch.zeros(5, 5)
    attn_mask[2] = -math.inf  # query 2 sees no key
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # sample 1 is all padding
    kwargs = {"need_weights": True} if path == "need_weights" else {"dropout_p": 0.2}
    torch.manual_seed(0)
    out, probs = relbias_attention(
        q, k, v, 0.25, rel_bias=rel, gate=gate, attn_mask=attn_mask, key_padding_mask=kpm, **kwargs
    )
    grads = torch.autograd.grad(out.sum(), (q, k, v, rel, gate))
    assert not out[1].any() and not out[0, :, 2].any() and out[0, :, 3].abs().sum() > 0
    if probs is not None:
        assert not probs[1].any() and not probs[0, :, 2].any()
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("S,spread", [(1, 1.0), (13, 40.0)], ids=["one_key", "saturated"])
def test_row_gradients_sum_to_zero(backend, S, spread):
    """With one key dS is exactly 0, and with logits in the hundreds the softmax saturates:
    the gate's and the bias's gradients are sums of dS and must not pick up delta = do . out's
    rounding (fp32, the rule's bound is near the reference's own error)."""
    gen = torch.Generator().manual_seed(5)
    B, H, T, hd = 2, 2, 7, 64
    q64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64) * spread
    k64 = torch.randn(B, H, S, hd, generator=gen, dtype=torch.float64)
    v64 = torch.randn(B, H, S, hd, generator=gen, dtype=torch.float64) * 30
    rel64 = torch.randn(H, T + S - 1, generator=gen, dtype=torch.float64) * 10
    gate64 = torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64)
    dout64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in (q64, k64, v64, rel64, gate64)]
        out, _ = op(*leaves[:3], hd**-0.5, rel_bias=leaves[3], gate=leaves[4])
        return [out, *torch.autograd.grad(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(torch.float32, relbias_attention)
    oracle = run(torch.float64, relbias_attention_ref)
    ref = run(torch.float32, relbias_attention_ref)
    names = ["out", "dq", "dk", "dv", "drel", "dgate"]
    for name, g, o, r in zip(names, got, oracle, ref, strict=True):
        assert_close_to_oracle(g, o, r, name=name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_strided_inputs_and_nan_rows(backend):
    """q, k and v with a strided last dim are read by value (the kernel copies them, it does not
    decline); a NaN query row gives NaN in that row's output and dq, and in dk and dv only where
    the oracle has it (hidden logits pass no gradient, so only dS^T q's 0 * NaN reaches them);
    a NaN in a padded key counts for nothing."""
    gen = torch.Generator().manual_seed(11)
    B, H, T, S, hd = 2, 2, 7, 9, 16
    q64, k64, v64 = (
        torch.randn(B, H, L, 2 * hd, generator=gen, dtype=torch.float64) for L in (T, S, S)
    )
    q64[0, 1, 3, 4] = math.nan  # one query row
    k64[1, 0, 2, 6] = math.nan  # a padded key of sample 1
    rel64 = torch.randn(H, T + S - 1, generator=gen, dtype=torch.float64)
    gate64 = torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, 2] = True
    kpm[0, 5] = True
    dout64 = torch.randn(B, H, T, hd, generator=gen, dtype=torch.float64)

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in (q64, k64, v64, rel64, gate64)]
        q, k, v = (t[..., ::2] for t in leaves[:3])
        out, _ = op(q, k, v, hd**-0.5, rel_bias=leaves[3], gate=leaves[4], key_padding_mask=kpm)
        return [out, *torch.autograd.grad(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(torch.float32, relbias_attention)
    oracle = run(torch.float64, relbias_attention_ref)
    assert oracle[0][0, 1, 3].isnan().all() and not oracle[0][1].isnan().any()
    assert not oracle[2][1].isnan().any()  # the NaN in a padded key reaches nothing
    ref = run(torch.float32, relbias_attention_ref)
    assert_close_to_oracle(got[0], oracle[0], ref[0], name="out")
    for name, g, o, r in zip(["dq", "dk", "dv", "drel", "dgate"], got[1:], oracle[1:], ref[1:]):
        assert_poisoned_grad_close_to_oracle(g, o, r, name=name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_an_inf_key_every_query_hides_passes_no_gradient(backend):
    """+Inf in one element of key 2 where every query's element is negative: that logit is -inf
    in every row, so key 2 gets no gradient (dk, dv 0). The Triton backward made them NaN from
    the query rows past T of its tile (zero-filled: 0 * Inf)."""
    gen = torch.Generator().manual_seed(12)
    q64, k64, v64 = (
        torch.randn(1, 2, L, 16, generator=gen, dtype=torch.float64) for L in (3, 5, 5)
    )
    q64[..., 3] = -q64[..., 3].abs() - 0.1
    k64[:, :, 2, 3] = math.inf
    rel64 = torch.randn(2, 3 + 5 - 1, generator=gen, dtype=torch.float64)
    dout64 = torch.randn(1, 2, 3, 16, generator=gen, dtype=torch.float64)

    def run(dt, op):
        leaves = [t.to(dt).requires_grad_() for t in (q64, k64, v64, rel64)]
        out, _ = op(*leaves[:3], 0.25, rel_bias=leaves[3])
        return [out, *torch.autograd.grad(out, leaves, dout64.to(dt))]

    with use_backend(backend):
        got = run(torch.float32, relbias_attention)
    oracle, ref = (
        run(torch.float64, relbias_attention_ref),
        run(torch.float32, relbias_attention_ref),
    )
    assert oracle[2][:, :, 2].eq(0).all() and oracle[3][:, :, 2].eq(0).all()
    assert_close_to_oracle(got[0], oracle[0], ref[0], name="out")
    for name, g, o, r in zip(["dq", "dk", "dv", "drel"], got[1:], oracle[1:], ref[1:], strict=True):
        assert_poisoned_grad_close_to_oracle(g, o, r, name=name)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"q": torch.ones(1, 2, 4, 16, dtype=torch.long)}, ValueError, "q must be floating"),
        ({"v": torch.randn(1, 2, 6, 8)}, ValueError, "share the head dim"),
        ({"k": torch.randn(1, 2, 6, 8)}, ValueError, "share the head dim"),
        ({"gate": torch.rand(1, 2, 4)}, ValueError, "gate must be"),
        ({"gate": torch.rand(1, 2, 4, 2)}, ValueError, "gate must be"),
        ({"bias": torch.randn(2, 4, 5)}, ValueError, "bias .* not broadcastable"),
        ({"bias": torch.ones(2, 4, 6, dtype=torch.long)}, ValueError, "bias must be floating"),
        ({"attn_mask": torch.ones(4, 6, dtype=torch.bool)}, ValueError, "attn_mask must be"),
        ({"key_padding_mask": torch.zeros(1, 6)}, ValueError, "key_padding_mask must be bool"),
        ({"scale": "0.25"}, TypeError, "scale must be a float"),
        ({"q": torch.randn(2, 4, 16)}, ValueError, r"\(B, H, L, hd\)"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_raise_clear_errors(change, error, match, backend):
    args = {
        "q": torch.randn(1, 2, 4, 16),
        "k": torch.randn(1, 2, 6, 16),
        "v": torch.randn(1, 2, 6, 16),
        "scale": 0.25,
    }
    args.update(change)
    with use_backend(backend), pytest.raises(error, match=match):
        relbias_attention(**args)


def test_triton_declines_what_it_cannot_do_and_says_why():
    q = k = v = torch.randn(1, 2, 4, 16)
    with use_backend("triton"), pytest.raises(BackendError, match="need_weights"):
        relbias_attention(q, k, v, 0.25, need_weights=True)
    with use_backend("triton"), pytest.raises(BackendError, match="dropout"):
        relbias_attention(q, k, v, 0.25, dropout_p=0.1)
    with use_backend("triton"), pytest.raises(BackendError, match="float64"):
        relbias_attention(q.double(), k.double(), v.double(), 0.25)


def test_beats_module_on_triton_matches_reference():
    """The whole module (gate from grep_linear, bias from the bucket table) on the kernel."""
    from seqkern.modules.beats import BeatsMultiheadAttention

    torch.manual_seed(0)
    m = BeatsMultiheadAttention(
        32,
        2,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=16,
        max_distance=24,
        gru_rel_pos=True,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(27, 3, 32)
    kpm = torch.arange(27)[None] >= torch.tensor([27, 20, 9])[:, None]
    results = []
    for backend in ("reference", "triton"):
        xi = x.clone().requires_grad_()
        with use_backend(backend):
            attn, _, pb = m(xi, xi, xi, key_padding_mask=kpm, need_weights=False)
            grads = torch.autograd.grad(attn.pow(2).sum(), [xi, *m.parameters()])
        results.append((attn, pb, grads))
    (a0, pb0, g0), (a1, pb1, g1) = results
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pb1, pb0)
    for x0, x1 in zip(g0, g1, strict=True):
        torch.testing.assert_close(x1, x0, rtol=1e-4, atol=1e-4)


def _beats_layer(seed, **kw):
    from seqkern.modules.beats import BeatsMultiheadAttention

    torch.manual_seed(seed)
    m = BeatsMultiheadAttention(
        64, 4, self_attention=True, num_buckets=16, max_distance=40, gru_rel_pos=True, **kw
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_position_bias_handle_never_materialises_on_the_triton_path():
    """Layer 0 computes the bias, layer 1 reuses it (as BEATs does): with the kernel, nothing of
    B * H * T * S elements is ever allocated, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from seqkern.ops.relbias import RelativePositionBias

    B, T = 2, 64
    layer0 = _beats_layer(0, has_relative_attention_bias=True)
    layer1 = _beats_layer(1)
    layer1.relative_attention_bias = layer0.relative_attention_bias  # shared, as BEATs does
    x = torch.randn(T, B, 64, requires_grad=True)
    kpm = torch.arange(T)[None] >= torch.tensor([T, 40])[:, None]

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # in-place ops allocate nothing (the interpreter's own byte-storage copies are
            # copy_ / set_); count every tensor an op creates
            if not func.__name__.split(".")[0].endswith("_"):
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        LargestAllocation.largest = max(LargestAllocation.largest, t.numel())
            return out

    def run(backend):
        with use_backend(backend):
            h, _, pb = layer0(x, x, x, key_padding_mask=kpm, need_weights=False)
            y, _, pb1 = layer1(h, h, h, key_padding_mask=kpm, need_weights=False, position_bias=pb)
        return y, pb, pb1

    with LargestAllocation(), use_backend("triton"):
        y, pb, pb1 = run("triton")
        grads = torch.autograd.grad(y.pow(2).sum(), [x, layer0.relative_attention_bias.weight])
    assert isinstance(pb, RelativePositionBias) and pb1 is pb
    assert LargestAllocation.largest < B * 4 * T * T, LargestAllocation.largest
    y_ref, _, _ = run("reference")
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum(), [x, layer0.relative_attention_bias.weight])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_position_bias_handle_is_an_ordinary_tensor_to_other_consumers(espnet_upstream):
    layer0 = _beats_layer(2, has_relative_attention_bias=True)
    x = torch.randn(9, 2, 64)
    _, _, pb = layer0(x, x, x)
    dense = pb.materialize()
    assert pb.shape == dense.shape == (2 * 4, 9, 9) and pb.dtype == dense.dtype
    torch.testing.assert_close(pb * 2.0, dense * 2.0)  # any torch op materialises
    up = espnet_upstream.beats.MultiheadAttention(64, 4, self_attention=True, gru_rel_pos=True)
    up.eval()
    a_handle, _, _ = up(x, x, x, position_bias=pb)
    a_dense, _, _ = up(x, x, x, position_bias=dense)
    torch.testing.assert_close(a_handle, a_dense)
    table = layer0.relative_attention_bias.weight
    (g,) = torch.autograd.grad(up(x, x, x, position_bias=pb)[0].sum(), table)
    assert g.abs().sum() > 0  # the gradient reaches the bucket table through the handle


def test_swapped_beats_encoder_on_triton_matches_upstream(small_beats_encoder):
    """A real (random) ESPnet BeatsEncoder, swapped onto the kernel: same output, and inside its
    transformer nothing of B * H * T * T elements is allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import seqkern

    enc = small_beats_encoder(64)
    wav, ilens = torch.randn(2, 32000), torch.tensor([32000, 24000])
    with torch.no_grad():
        want = enc(wav, ilens)[0]
    seqkern.swap(enc, backend="triton")

    transformer = next(m for m in enc.modules() if hasattr(m, "layers"))
    recording = {"on": False, "largest": 0}
    transformer.register_forward_pre_hook(lambda *_: recording.update(on=True))
    transformer.register_forward_hook(lambda *_: recording.update(on=False))

    class LargestInside(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if recording["on"] and not func.__name__.split(".")[0].endswith("_"):
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        recording["largest"] = max(recording["largest"], t.numel())
            return out

    with torch.no_grad(), LargestInside():
        got = enc(wav, ilens)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    T = got.shape[1]
    assert recording["largest"] > 0
    assert recording["largest"] < 2 * 4 * T * T // 4, (recording["largest"], T)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("form", ["rel", "dense", "none"])
def test_relbias_opcheck(backend, form):
    tensors, masks, dout = _make(
        2, 2, 11, 11, 16, form, True, True, True, torch.float32, "cpu", seed=3
    )
    t = {n: x.detach() for n, x in tensors.items()}
    args = (
        t["q"],
        t["k"],
        t["v"],
        0.25,
        t.get("rel_bias"),
        t.get("bias"),
        t.get("gate"),
        masks.get("attn_mask"),
        masks.get("key_padding_mask"),
    )
    with use_backend(backend):
        torch.library.opcheck(torch.ops.seqkern.relbias_attention.default, args)
        out, lse = torch.ops.seqkern.relbias_attention(*args)
        bwd_args = (dout, *args[:3], out, lse, *args[3:], form != "none")
        torch.library.opcheck(torch.ops.seqkern.relbias_attention_bwd.default, bwd_args)


def test_relbias_torch_compile_fullgraph():
    tensors, masks, dout = _make(
        2, 2, 13, 13, 16, "rel", True, False, True, torch.float32, "cpu", seed=4
    )

    def block(q, k, v, rel, gate, kpm):
        out, _ = relbias_attention(
            q * 1.5, k, v, 0.25, gate=gate, rel_bias=rel, key_padding_mask=kpm
        )
        return out.relu()

    names = ["q", "k", "v", "rel_bias", "gate"]
    inputs = [tensors[n] for n in names]
    compiled = torch.compile(block, fullgraph=True)
    kpm = masks["key_padding_mask"]
    for backend in ("reference", "triton"):
        with use_backend(backend):
            got = compiled(*inputs, kpm)
            got_grads = torch.autograd.grad(got, inputs, dout)
            want = block(*inputs, kpm)
            want_grads = torch.autograd.grad(want, inputs, dout)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)
