"""Emformer.infer and ConvEmformer.infer on the fused C++ layer steps against the op-by-op
path, state by state.

The op-by-op path (use_backend("reference") turns the fused step off) is proven against
torchaudio in tests/reference; here the fused step must give the same outputs and the same
state lists (every tensor, shapes included) over several segments, for B = 1 and ragged
B > 1 (also segments where every row is partial, which move upstream's left-context keys),
with and without right context, memory and left context, each activation, tanh on the memory,
float64, and an input_dim off the GEMM kernel's 16-wide steps; float32 runs both
with the AVX-512 skinny GEMM (where the CPU has it) and with BLAS.
"""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from seqkern import _ext, use_backend
from seqkern.modules.emformer import ConvEmformer, ConvEmformerLayer, Emformer, EmformerLayer

CONFIGS = [
    # (B, R, M, LC, ffn activation, conv activation, tanh_on_mem, dtype, input_dim)
    (1, 2, 3, 8, "relu", "silu", False, torch.float32, 32),
    (3, 2, 3, 8, "gelu", "relu", False, torch.float32, 32),  # ragged lengths: key padding
    (2, 0, 0, 6, "silu", "gelu", True, torch.float32, 32),  # no right context, no memory
    (1, 1, 2, 0, "relu", "silu", True, torch.float32, 32),  # no left context
    (1, 3, 2, 5, "gelu", "silu", False, torch.float32, 36),  # K = 36 and 72: tails mod 16
    (3, 2, 1, 5, "relu", "silu", False, torch.float64, 32),
]


@pytest.fixture(params=["skinny", "blas"])
def gemm(request):
    """The fused step's GEMMs on the AVX-512 skinny kernel, or on BLAS (its fallback)."""
    if request.param == "skinny" and not C.skinny_gemm_available():
        pytest.skip("no AVX-512F on this CPU: the skinny GEMM is not used here")
    before = C.skinny_gemm_set_enabled(request.param == "skinny")
    yield request.param
    C.skinny_gemm_set_enabled(before)


C = _ext.C


KINDS = ["conv", "plain"]


def _model(R, M, LC, ffn_act, conv_act, tanh, dtype, D=32, kind="conv"):
    """A 2-layer ConvEmformer, or (kind "plain") an Emformer (which has no conv activation)."""
    torch.manual_seed(0)
    common = dict(
        segment_length=4,
        left_context_length=LC,
        right_context_length=R,
        max_memory_size=M,
        tanh_on_mem=tanh,
    )
    if kind == "conv":
        model = ConvEmformer(
            D, 4, 2 * D, 2, kernel_size=3, ffn_activation=ffn_act, conv_activation=conv_act,
            **common,
        )  # fmt: skip
    else:
        model = Emformer(D, 4, 2 * D, 2, activation=ffn_act, **common)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,R,M,LC,ffn_act,conv_act,tanh,dtype,D", CONFIGS)
def test_fused_step_matches_the_ops_state_by_state(
    gemm, kind, B, R, M, LC, ffn_act, conv_act, tanh, dtype, D
):
    model = _model(R, M, LC, ffn_act, conv_act, tanh, dtype, D, kind)
    gen = torch.Generator().manual_seed(1)
    fused = ops = None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for step in range(7):
        x = torch.randn(B, 4 + R, D, generator=gen).to(dtype)
        lengths = torch.tensor([4 + R - (b % 3) for b in range(B)])  # ragged when B > 1
        if step in (3, 4):  # every row partial (B = 1 too): upstream moves the left context
            lengths -= 1
        with torch.no_grad():
            y_fused, len_fused, fused = model.infer(x, lengths, fused)
            with use_backend("reference"):
                y_ops, len_ops, ops = model.infer(x, lengths, ops)
        torch.testing.assert_close(y_fused, y_ops, **tol)
        assert torch.equal(len_fused, len_ops)
        for layer_fused, layer_ops in zip(fused, ops, strict=True):
            assert len(layer_fused) == len(layer_ops) == (5 if kind == "conv" else 4)
            for a, b in zip(layer_fused, layer_ops, strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype, (step, a.shape, b.shape)
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_step_is_taken_only_where_it_applies(monkeypatch, kind):
    calls = []
    layer_cls = ConvEmformerLayer if kind == "conv" else EmformerLayer
    original = layer_cls._fused_infer

    def spy(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(layer_cls, "_fused_infer", spy)
    model = _model(2, 3, 8, "relu", "silu", False, torch.float32, kind=kind)
    x, lengths = torch.randn(1, 6, 32), torch.tensor([6])
    with torch.no_grad():
        model.infer(x, lengths)
    assert len(calls) == 2  # both layers
    model.infer(x, lengths)  # autograd through the parameters: the ops
    with torch.no_grad(), use_backend("reference"):
        model.infer(x, lengths)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.infer(x, lengths)  # autocast: the ops, in its dtypes
    with torch.no_grad():
        layer = model.emformer_layers[0]
        slot = layer.ffn0.module if kind == "conv" else layer.pos_ff
        slot[2] = torch.nn.GELU(approximate="tanh")
        model.infer(x, lengths)  # layer 0: an activation the step does not have
    assert len(calls) == 3
    # a computed weight (a parametrization) is not a Parameter the step can take: the ops,
    # and their output is the parametrised layer's
    layer = model.emformer_layers[1]
    parametrize.register_parametrization(layer.attention.out_proj, "weight", _Doubled())
    with torch.no_grad():
        y, _, _ = model.infer(x, lengths)
        with use_backend("reference"):
            want, _, _ = model.infer(x, lengths)
    assert len(calls) == 3
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.fixture(params=["packed", "widened"])
def bf16_path(request):
    """cpu_weights="bf16" on the CPU's matrix units (packed, x rounded too), or widened to
    float32 in the skinny GEMM / BLAS."""
    if request.param == "packed" and not C.bf16_packed_available():
        pytest.skip("no packed bfloat16 GEMM on this CPU / torch build")
    before = C.bf16_packed_set_enabled(request.param == "packed")
    yield request.param
    C.bf16_packed_set_enabled(before)


def _round_input(module, args):
    return (args[0].bfloat16().float(), *args[1:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,R,M,LC,ffn_act,conv_act,tanh,dtype,D", CONFIGS[:5])
def test_bf16_weights_are_the_ops_on_the_rounded_weights(
    gemm, bf16_path, kind, B, R, M, LC, ffn_act, conv_act, tanh, dtype, D
):
    """cpu_weights="bf16": the step reads bfloat16 copies of the Linear weights and
    accumulates in float32, so it matches the float32 ops on a model whose Linear weights were
    rounded to bfloat16 (and, on the packed path, whose Linears round their input to bfloat16
    too), state by state, at float32's tolerance, and leaves the model's own weights as they
    were. A weight written in place is read anew."""
    model = _model(R, M, LC, ffn_act, conv_act, tanh, dtype, D, kind)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    if bf16_path == "packed":
        for m in rounded.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(_round_input)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.emformer_layers:
        layer._cpu_weights = "bf16"
    gen = torch.Generator().manual_seed(3)
    fused = ops = full = None
    tol = dict(rtol=1e-5, atol=1e-5)
    for step in range(5):
        if step == 3:  # an in-place update (an optimizer step, load_state_dict) of one weight
            with torch.no_grad():
                w = model.emformer_layers[1].attention.out_proj.weight
                w.mul_(1.5)
                rounded.emformer_layers[1].attention.out_proj.weight.copy_(w.bfloat16().float())
                before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(B, 4 + R, D, generator=gen)
        lengths = torch.tensor([4 + R - (b % 3) for b in range(B)])
        with torch.no_grad():
            y, _, fused = model.infer(x, lengths, fused)
            with use_backend("reference"):
                want, _, ops = rounded.infer(x, lengths, ops)
                y32, _, full = model.infer(x, lengths, full)
        for a, b in [(y, want), *zip(sum(fused, []), sum(ops, []), strict=True)]:
            if bf16_path == "widened":
                torch.testing.assert_close(a, b, **tol)
            else:
                # On the packed path a float32-level difference between the two paths' inputs
                # to a Linear (~1e-7) can move an x value across a bfloat16 rounding boundary,
                # one bfloat16 step (2^-8 of it) that neither path has wrong: so each element
                # is within such a step's effect, and the typical element within float32's
                # tolerance (tests/ops/test_bf16_linear.py proves the kernel tightly)
                if a.is_floating_point() and a.numel():
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
                    assert (a - b).abs().median() <= 1e-5
                else:
                    assert torch.equal(a, b)
        # the rounding is really there: float32 weights give a visibly different output
        assert (y - y32).abs().max() > 1e-4
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight
