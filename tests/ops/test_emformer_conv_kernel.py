"""emformer_segment_conv: ConvEmformer's depthwise conv, the Triton kernels against the oracle.

The reference backend (`emformer_segment_conv_ref`) is first proven equal to what
`ConvolutionModule.forward` computes between pre_conv and post_conv. Then, under
`use_backend("triton")` (no fallback: a reference run would raise BackendError) in the Triton
interpreter, the kernels' y and the gradients of z, weight, bias and cache are compared with the
float64 reference (`assert_close_to_oracle`, the reference in the test dtype setting the bound),
fp32 and fp16, over shapes chosen to break index arithmetic; `torch.empty` is poisoned with NaN
so an output element the kernels skip is caught.
"""

import math

import pytest
import torch
from seqkern._triton import emformer_conv as C
from torch import nn

from seqkern import BackendError, use_backend
from seqkern.modules.emformer import ConvolutionModule
from seqkern.ops.emformer_conv import (
    emformer_segment_conv,
    emformer_segment_conv_ref,
    segment_conv_backend,
)
from seqkern.testing import assert_close_to_oracle, assert_poisoned_grad_close_to_oracle

NAMES = ("z", "weight", "bias", "cache")


class Case:
    """A conv problem: B, D, kernel size k, segment length s, right context R, U frames.

    n: rc blocks (default ceil(U / s), the module's training layout; 0 when R = 0).
    cache: a (B, D, k - 1) cache, else None (training). bias: a bias, else None.
    layout: "contig"; "strided" (z: unit-stride column slice of a wider NaN-filled buffer,
    cache: the last k - 1 frames of a NaN-filled (B, D, k - 1 + 5) buffer, as the module's new
    state is; weight transposed storage; bias every other entry of a NaN-filled buffer);
    "bmajor" (z: (B, T, D) storage seen time-major; cache: (B, k - 1, D) storage seen
    (B, D, k - 1)); "every_other" (z: every other column,
    a non-unit last stride: the op copies it; bias one value expanded, stride 0).
    """

    def __init__(self, name, B, D, k, s, R, U, n=None, cache=True, bias=True, layout="contig"):
        self.name, self.B, self.D, self.k, self.s, self.R, self.U = name, B, D, k, s, R, U
        self.n = 0 if R == 0 else (math.ceil(U / s) if n is None else n)
        self.cache, self.bias, self.layout = cache, bias, layout

    @property
    def T(self):
        return self.n * self.R + self.U

    def kwargs(self):
        return dict(utterance_length=self.U, segment_length=self.s, right_context=self.R)

    def __repr__(self):
        return (
            f"{self.name}-B{self.B}-D{self.D}-k{self.k}-s{self.s}-R{self.R}-U{self.U}-n{self.n}"
            f"-cache{self.cache}-{self.layout}"
        )


CASES = [
    Case("ragged_U", 2, 40, 4, 4, 2, 13),  # U not a multiple of s, D not a power of two
    Case("s_lt_P", 1, 36, 6, 2, 3, 9, layout="strided"),  # prefix frames read by 3 blocks
    Case("k1", 2, 16, 1, 3, 2, 7),  # k - 1 = 0: empty cache, no prefix
    Case("R0", 2, 24, 3, 4, 0, 10, layout="bmajor"),  # no rc rows
    Case("U_lt_P", 2, 20, 5, 4, 2, 2),  # the prefix reaches into the cache
    Case("T1", 1, 16, 3, 4, 0, 1),  # T = U = 1
    Case("T1_no_cache", 1, 16, 3, 4, 0, 1, cache=False),
    Case("training", 3, 40, 5, 4, 1, 11, cache=False, layout="strided"),  # cache None = zeros
    Case("tiles", 2, 72, 4, 4, 3, 20, layout="every_other"),  # several row and channel tiles
    Case("infer", 2, 36, 4, 4, 2, 4, layout="strided"),  # one segment: U = s, R rows, a cache
    Case("extra_blocks", 1, 16, 4, 2, 2, 5, n=4, bias=False),  # blocks past ceil(U/s) end at U
    Case("s_gt_U", 2, 16, 3, 8, 2, 5, cache=False, layout="bmajor"),  # one short segment
    # Long reductions: dweight and dbias are sums over every (batch element, row) pair, B * T
    # terms (well past 4096 in real training), which the cases above keep under ~300. These
    # make them > 4096 with one channel tile (D = 16) so the interpreter stays quick: a long
    # utterance with a cache (dweight over 4 * (32 rc + 3 cache + 1000 frames) inputs) ...
    Case("long_dw_utt", 4, 16, 4, 64, 2, 1000, layout="strided"),  # B * T = 4128
    # ... and many short training utterances (dbias over 16 * 270 outputs)
    Case("long_dw_batch", 16, 16, 3, 16, 2, 240, cache=False, layout="bmajor"),  # B * T = 4320
]


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors: an element the kernels skip shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _inputs(case, gen):
    """float64 (z, weight, bias, cache) in the case's layout (None where absent), and dy."""
    T, B, D, k, P = case.T, case.B, case.D, case.k, case.k - 1
    weight = 0.5 * _rnd(gen, D, 1, k)
    cache = _rnd(gen, B, D, P) if case.cache else None
    if case.layout == "strided":
        buf = torch.full((T, B, 2 * D + 3), math.nan, dtype=torch.float64)
        z = buf[..., 2 : 2 + D]
        z.copy_(_rnd(gen, T, B, D))
        weight = weight.reshape(D, k).t().contiguous().t().unsqueeze(1)  # (k, D) storage
        if cache is not None:
            cbuf = torch.full((B, D, P + 5), math.nan, dtype=torch.float64)
            cbuf[:, :, 5:] = cache
            cache = cbuf[:, :, 5:]
    elif case.layout == "bmajor":
        z = _rnd(gen, B, T, D).transpose(0, 1)
        if cache is not None:
            cache = cache.transpose(1, 2).contiguous().transpose(1, 2)
    elif case.layout == "every_other":
        z = _rnd(gen, T, B, 2 * D)[..., ::2]
    else:
        z = _rnd(gen, T, B, D)
    bias = _rnd(gen, D) if case.bias else None
    if bias is not None and case.layout == "strided":  # every other entry of a NaN buffer
        bbuf = torch.full((2 * D,), math.nan, dtype=torch.float64)
        bbuf[1::2] = bias
        bias = bbuf[1::2]
    elif bias is not None and case.layout == "every_other":  # one value broadcast: stride 0
        bias = bias[:1].expand(D)
    return dict(z=z, weight=weight, bias=bias, cache=cache), _rnd(gen, T, B, D)


def _cast(t, dtype, device="cpu"):
    """t in dtype on device, same strides (the whole base buffer is converted), a leaf."""
    if t is None:
        return None
    base = t._base if t._base is not None else t
    base = base.to(device=device, dtype=dtype)
    return torch.as_strided(base, t.shape, t.stride(), t.storage_offset()).requires_grad_()


def _run(case, st, dy, backend):
    """y and the gradients {name: grad} of the inputs that require grad, on `backend`."""
    leaves = {name: t for name, t in st.items() if t is not None and t.requires_grad}
    with use_backend(backend):
        y = emformer_segment_conv(*(st[n] for n in NAMES), **case.kwargs())
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads))


def _check_case(case, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed + 7 * case.T + case.D)
    st64, dy64 = _inputs(case, gen)
    st = {n: _cast(t, dtype, device) for n, t in st64.items()}
    dy = dy64.to(device=device, dtype=dtype)
    assert st["z"].stride() == st64["z"].stride()  # the layout survives the cast
    with use_backend("triton"):
        assert segment_conv_backend(st["z"]) == "triton"
    got, got_grads = _run(case, st, dy, "triton")
    oracle, oracle_grads = _run(
        case, {n: _cast(t, torch.float64, device) for n, t in st.items()}, dy.double(), "reference"
    )
    ref, ref_grads = _run(
        case, {n: _cast(t, dtype, device) for n, t in st.items()}, dy, "reference"
    )
    assert got.shape == (case.T, case.B, case.D) and got.dtype == dtype and got.is_contiguous()
    assert_close_to_oracle(got, oracle, ref, name="y")
    for name, g in got_grads.items():
        assert g.shape == st[name].shape and g.dtype == dtype, name
        assert_close_to_oracle(g, oracle_grads[name], ref_grads[name], name=f"d{name}")
    return st, dy, got, got_grads


def _poisoned_runs(case, st64, dy64):
    """(triton, oracle, fp32 reference) runs, each (y, grads), of float64 inputs that hold a
    NaN or Inf: the kernel and the reference in float32, the oracle on the inputs as they are."""
    st = {n: _cast(t, torch.float32) for n, t in st64.items()}
    got = _run(case, st, dy64.float(), "triton")
    oracle = _run(case, {n: _cast(t, torch.float64) for n, t in st64.items()}, dy64, "reference")
    return got, oracle, _run(case, st, dy64.float(), "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernel_matches_oracle(case, dtype):
    _check_case(case, dtype)


# ---------------------------------------------------------------------------------------------
# The reference is the module's math


MODULE_CASES = [
    Case("base_like", 2, 24, 8, 4, 2, 13),
    Case("s_lt_P", 1, 16, 6, 2, 3, 9, cache=False),
    Case("k1", 2, 16, 1, 3, 2, 7),
    Case("R0", 2, 16, 3, 4, 0, 10),
    Case("U_lt_P", 2, 16, 5, 4, 2, 2),
    Case("infer", 3, 16, 4, 4, 1, 4),
    Case("T1", 1, 8, 3, 4, 0, 1, cache=False),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=repr)
def test_reference_is_the_module_conv(case):
    """ConvolutionModule.forward with pre_conv = identity and post_conv replaced by a probe:
    the probe sees exactly the op's y (reference backend), bit for bit."""
    torch.manual_seed(0)
    mod = ConvolutionModule(case.D, case.s, case.R, case.k).double()
    with torch.no_grad():
        mod.conv.weight.normal_()
        mod.conv.bias.normal_()
    seen = {}

    class Probe(nn.Module):
        def forward(self, y):
            seen["y"] = y
            return torch.zeros_like(y)

    mod.pre_conv, mod.post_conv = nn.Identity(), Probe()
    gen = torch.Generator().manual_seed(case.U)
    z = _rnd(gen, case.T, case.B, case.D)
    cache = _rnd(gen, case.B, case.D, case.k - 1) if case.cache else None
    n_rc = case.n * case.R
    mod(z[n_rc:], z[:n_rc], cache)
    weight, bias = mod.conv.weight.detach(), mod.conv.bias.detach()
    got = emformer_segment_conv_ref(z, weight, bias, cache, case.U, case.s, case.R)
    assert torch.equal(got, seen["y"])
    with use_backend("reference"):
        assert segment_conv_backend(z) == "reference"
        assert torch.equal(emformer_segment_conv(z, weight, bias, cache, **case.kwargs()), got)


# ---------------------------------------------------------------------------------------------
# NaN stays where it is read


@pytest.mark.parametrize("where", ["utterance_frame", "rc_row", "cache"])
def test_nan_reaches_only_its_readers(where):
    """One NaN input element: y is NaN exactly where the float64 reference is (the outputs that
    read it, several rc blocks for an utterance frame when s < k - 1); the gradients' NaN
    patterns (dweight's taps that read it) equal the reference's too."""
    case = Case("nan", 2, 20, 6, 2, 2, 9)  # P = 5, s = 2: frame 4 is in blocks 2, 3, 4
    gen = torch.Generator().manual_seed(11)
    st64, dy64 = _inputs(case, gen)
    n_rc = case.n * case.R
    if where == "utterance_frame":
        st64["z"][n_rc + 4, 1, 3] = math.nan
    elif where == "rc_row":
        st64["z"][2 * case.R + 1, 1, 3] = math.nan
    else:
        st64["cache"][1, 3, 2] = math.nan
    st = {n: _cast(t, torch.float32) for n, t in st64.items()}
    got, got_grads = _run(case, st, dy64.float(), "triton")
    oracle, oracle_grads = _run(
        case, {n: _cast(t, torch.float64) for n, t in st64.items()}, dy64, "reference"
    )
    nan = oracle.isnan()
    assert nan.any() and torch.equal(got.isnan(), nan)
    assert nan.sum() == nan[:, 1, 3].sum()  # only batch 1, channel 3
    if where == "utterance_frame":  # utterance outputs 4..8 and rc rows of blocks 2, 3, 4
        rows = nan[:, 1, 3].nonzero().flatten().tolist()
        assert rows == [4, 5, 6, 7, 8] + [n_rc + u for u in range(4, 9)]
    ref, ref_grads = _run(case, st, dy64.float(), "reference")
    assert_close_to_oracle(got, oracle, ref, name="y")
    for name, g in got_grads.items():
        assert_close_to_oracle(g, oracle_grads[name], ref_grads[name], name=f"d{name}")
    assert got_grads["weight"].isnan().any()
    assert not got_grads["z"].isnan().any() and not got_grads["bias"].isnan().any()


# ---------------------------------------------------------------------------------------------
# Arguments, backends, determinism


def _good(**change):
    B, D, k, U, s, R = 2, 8, 3, 5, 2, 2
    args = dict(
        z=torch.randn(3 * R + U, B, D),
        weight=torch.randn(D, 1, k),
        bias=torch.randn(D),
        cache=torch.randn(B, D, k - 1),
        utterance_length=U,
        segment_length=s,
        right_context=R,
    )
    args.update(change)
    return args


def _call(args):
    args = dict(args)
    tensors = [args.pop(n) for n in NAMES]
    return emformer_segment_conv(*tensors, **args)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=torch.randn(11, 2 * 8)), "z must be \\(n\\*R \\+ U, B, D\\)"),
        (dict(z=torch.zeros(11, 2, 8, dtype=torch.int32)), "floating-point"),
        (dict(z=torch.randn(12, 2, 8)), "n \\* R \\+ U rows"),
        (dict(z=torch.randn(4, 2, 8)), "n \\* R \\+ U rows"),
        (dict(right_context=0), "n \\* R \\+ U rows"),
        (dict(utterance_length=0), "utterance_length must be an int >= 1"),
        (dict(segment_length=0), "segment_length must be an int >= 1"),
        (dict(right_context=-1), "right_context must be an int >= 0"),
        (dict(utterance_length=5.0), "utterance_length must be an int"),
        (dict(weight=torch.randn(8, 3)), "weight must be the depthwise Conv1d weight"),
        (dict(weight=torch.randn(8, 2, 3)), "weight must be the depthwise Conv1d weight"),
        (dict(weight=torch.randn(8, 1, 0), cache=None), "kernel size k >= 1"),
        (dict(bias=torch.randn(7)), "bias must be \\(D,\\)"),
        (dict(cache=torch.randn(2, 8, 3)), "cache must be \\(B, D, k - 1\\) = \\(2, 8, 2\\)"),
        (dict(weight=torch.randn(8, 1, 3, dtype=torch.float64)), "weight must have z's dtype"),
        (dict(cache=torch.randn(2, 8, 2, dtype=torch.float16)), "cache must have z's dtype"),
        (dict(bias=torch.randn(8, device="meta")), "bias must be on z's device"),
        (dict(cache=torch.randn(2, 8, 2, device="meta")), "cache must be on z's device"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_arguments_raise_clear_errors(change, match, backend):
    """On every backend, before dispatch."""
    with use_backend(backend), pytest.raises(ValueError, match=match):
        _call(_good(**change))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=[[1.0]]), "z must be a tensor, got list"),
        (dict(weight=None), "weight must be the depthwise Conv1d weight .* got NoneType"),
        (dict(bias=[1.0] * 8), "bias must be \\(D,\\) = \\(8,\\) or None, got list"),
        (dict(cache="c"), "cache must be .* or None, got str"),
        (dict(weight=torch.zeros(8, 1, 3, dtype=torch.int64)), "weight must have z's dtype"),
        (dict(bias=torch.zeros(8, dtype=torch.int32)), "bias must have z's dtype"),
        (dict(cache=torch.randn(3, 8, 2)), "cache must be \\(B, D, k - 1\\) = \\(2, 8, 2\\)"),
        (dict(weight=torch.randn(8, 1, 3, device="meta")), "weight must be on z's device"),
        (dict(utterance_length=True), "utterance_length must be an int >= 1, got True"),
        (dict(segment_length=None), "segment_length must be an int >= 1, got None"),
    ],
)
def test_bad_types_raise_clear_errors(change, match, backend):
    with use_backend(backend), pytest.raises(ValueError, match=match):
        _call(_good(**change))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("B,D", [(0, 8), (2, 0), (0, 0)])
@pytest.mark.parametrize("R", [0, 2])
def test_empty_batch_or_channels(backend, B, D, R):
    """No batch element or no channel: an empty y and zero gradients on every backend (the
    reference used to fail in a reshape(-1, 0, ...) or in F.conv1d(groups=0))."""
    U, k = 5, 3
    z = torch.randn(3 * R + U, B, D, requires_grad=True)
    w, b = torch.randn(D, 1, k, requires_grad=True), torch.randn(D, requires_grad=True)
    cache = torch.randn(B, D, k - 1, requires_grad=True)
    with use_backend(backend):
        y = emformer_segment_conv(z, w, b, cache, utterance_length=U, segment_length=2,
                                  right_context=R)  # fmt: skip
        grads = torch.autograd.grad(y.sum(), (z, w, b, cache))
    assert y.shape == z.shape
    for g, t in zip(grads, (z, w, b, cache)):
        assert g.shape == t.shape and not g.any()


def test_one_channel_with_any_last_stride():
    """D = 1: a z with a last stride of 7 is 'contiguous' to torch (the op's copy keeps the
    stride), and the kernel, which reads one channel, used to refuse it."""
    z = torch.randn(11, 2, 1).as_strided((11, 2, 1), (2, 1, 7))  # contiguous, last stride 7
    assert z.is_contiguous() and z.stride(-1) == 7
    w, b = torch.randn(1, 1, 3), torch.randn(1)
    args = dict(utterance_length=5, segment_length=2, right_context=2)
    with use_backend("triton"):
        got = emformer_segment_conv(z, w, b, None, **args)
    torch.testing.assert_close(got, emformer_segment_conv_ref(z, w, b, None, *args.values()))


def test_nan_weight_reaches_only_the_inputs_its_tap_reads():
    """A NaN in tap j of the weight (no cache: zeros before the utterance): dz is NaN exactly
    where the float64 reference has it, the frames read at tap j; the kernel used to add
    w[j] * 0 (NaN) for the last frames, which no output reads at tap j."""
    case = Case("nan_w", 1, 16, 3, 4, 0, 20, cache=False)
    gen = torch.Generator().manual_seed(3088)
    st64, dy64 = _inputs(case, gen)
    st64["weight"][4, 0, 0] = math.nan
    (got, got_grads), (oracle, oracle_grads), (ref, ref_grads) = _poisoned_runs(case, st64, dy64)
    assert_close_to_oracle(got, oracle, ref, name="y")
    assert oracle_grads["z"].isnan().any() and not oracle_grads["z"][-2:].isnan().any()
    for name, g in got_grads.items():
        assert_close_to_oracle(g, oracle_grads[name], ref_grads[name], name=f"d{name}")


def test_backend_choice_and_refusals():
    args = _good()
    assert segment_conv_backend(args["z"]) == "reference"  # auto keeps CPU off the interpreter
    with use_backend("triton"):
        assert segment_conv_backend(args["z"]) == "triton"
        with pytest.raises(BackendError, match="float64"):
            _call({k: v.double() if torch.is_tensor(v) else v for k, v in args.items()})
        with pytest.raises(BackendError, match="needs CUDA tensors"):
            segment_conv_backend(torch.randn(3, 2, 8, device="meta"))
    with use_backend("triton", "reference"):  # falls back where allowed
        assert segment_conv_backend(args["z"].double()) == "reference"


def test_launchers_check_their_arguments():
    args = _good()
    z, w, b, c = (args[n] for n in NAMES)
    lengths = (5, 2, 2)
    with pytest.raises(ValueError, match="unit last stride"):
        C.segment_conv_fwd(torch.randn(11, 2, 16)[..., ::2], w, b, c, *lengths)
    with pytest.raises(ValueError, match="n \\* R \\+ U rows"):
        C.segment_conv_fwd(z, w, b, c, 5, 2, 4)
    with pytest.raises(ValueError, match="dy must be"):
        C.segment_conv_bwd(torch.randn(10, 2, 8), z, w, c, *lengths)
    with pytest.raises(ValueError, match="dy must have a unit last stride"):
        C.segment_conv_bwd(torch.randn(11, 2, 16)[..., ::2], z, w, c, *lengths)


def test_backward_is_deterministic_and_respects_needs_grad():
    case = CASES[1]
    gen = torch.Generator().manual_seed(2)
    st64, dy64 = _inputs(case, gen)
    st = {n: _cast(t, torch.float32) for n, t in st64.items()}
    dy = dy64.float()
    first = C.segment_conv_bwd(dy, st["z"], st["weight"], st["cache"], case.U, case.s, case.R)
    second = C.segment_conv_bwd(dy, st["z"], st["weight"], st["cache"], case.U, case.s, case.R)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    frozen = {n: (t.detach() if n != "z" else t) for n, t in st.items()}
    _, grads = _run(case, frozen, dy, "triton")
    assert set(grads) == {"z"}
    torch.testing.assert_close(grads["z"], first[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The GPU tier: ConvEmformer base (D 512, k 8, s 16, R 4, U 250, B 4)


CUDA_CASES = [
    Case("base_training", 4, 512, 8, 16, 4, 250, cache=False),
    Case("base_cache", 4, 512, 8, 16, 4, 250, layout="bmajor"),
    Case("base_infer", 4, 512, 8, 16, 4, 16, layout="strided"),
]


def _device_tier(case, dtype, device):
    """The oracle comparison of every output and gradient, and a repeated backward that must
    be bit-identical (no atomics)."""
    st, dy, _, grads = _check_case(case, dtype, device)
    _, again = _run(case, st, dy, "triton")
    for name, g in grads.items():
        assert torch.equal(g, again[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=repr)
def test_cuda_kernel_matches_oracle(case, dtype):
    _device_tier(case, dtype, "cuda")


def test_device_tier_logic_on_cpu():
    """The cuda tier's own code path, at a small size in the interpreter."""
    _device_tier(Case("base_small", 2, 40, 8, 16, 4, 37, layout="bmajor"), torch.float16, "cpu")


def test_inf_weight_gives_the_references_nan():
    """An Inf tap: a cache frame that the utterance and an rc block both read at that tap gets
    w * dy_a + w * dy_b in the reference (two convolutions), +Inf - Inf = NaN when the dy have
    opposite signs; the kernel used to form w * (dy_a + dy_b), an Inf. D = 1, so every
    gradient entry is its own slice and the NaN must be there."""
    case = Case("inf_w", 2, 1, 5, 1, 3, 8, n=1)  # block 0's window: cache frames -3 .. -1
    gen = torch.Generator().manual_seed(4)
    st64, dy64 = _inputs(case, gen)
    st64["weight"][0, 0, 1] = math.inf
    (got, got_grads), (oracle, oracle_grads), (ref, ref_grads) = _poisoned_runs(case, st64, dy64)
    assert oracle_grads["z"].isnan().any() and oracle_grads["cache"].isnan().any()
    assert_close_to_oracle(got, oracle, ref, name="y")
    for name, g in got_grads.items():
        assert_poisoned_grad_close_to_oracle(
            g, oracle_grads[name], ref_grads[name], name=f"d{name}"
        )
