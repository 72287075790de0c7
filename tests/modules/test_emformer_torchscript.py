"""TorchScript: seqkern's Emformer and ConvEmformer script as torchaudio's do, alone and inside
the torchaudio models that hold them after `seqkern.swap` (Emformer RNN-T, RNNTBeamSearch,
EmformerHuBERT).

Each scripted module goes through a save / load round trip, as a deployment does, and is held
to the eager seqkern module (which runs its kernels: on this CPU the fused ConvEmformer step)
and to the eager upstream module, for `forward` and for `infer` state by state, in float32 and
float64. A scripted seqkern module runs the reference path (see seqkern/modules/emformer.py).
"""

import copy
import io
import warnings

import pytest
import torch
from torch.testing import assert_close

import seqkern
from seqkern.modules import emformer as sk

D = 24
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = [torch.float32, torch.float64]

CONFIGS = [
    pytest.param(False, dict(num_heads=3, segment_length=4, left_context_length=3,
                             right_context_length=2, max_memory_size=3), id="emf-lc3-r2-m3"),
    pytest.param(False, dict(num_heads=4, segment_length=5, left_context_length=0,
                             right_context_length=0, max_memory_size=0, tanh_on_mem=True,
                             activation="gelu"), id="emf-lc0-r0-m0-tanh"),
    pytest.param(True, dict(num_heads=3, segment_length=4, kernel_size=3, left_context_length=3,
                            right_context_length=2, max_memory_size=3), id="conv-k3-lc3-r2-m3"),
    pytest.param(True, dict(num_heads=4, segment_length=5, kernel_size=4, left_context_length=0,
                            right_context_length=1, max_memory_size=0, tanh_on_mem=True,
                            ffn_activation="gelu", conv_activation="relu"),
                 id="conv-k4-lc0-r1-m0-tanh"),
]  # fmt: skip


def _script(module):
    """torch.jit.script, then a save / load round trip."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _perturb(module, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def _pair(up, conv, kwargs, dtype):
    """(upstream, seqkern) with the same perturbed weights, in eval mode and `dtype`."""
    kwargs = dict(input_dim=D, ffn_dim=16, num_layers=2, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvEmformer's 2.8 deprecation warnings
        ref = (up.conv_emformer.ConvEmformer if conv else up.emformer.Emformer)(**kwargs)
    # 0.05: weights off the init but activations O(1), as tests/modules' fused-step test, so
    # float32 compares rounding of O(1) values (the fused step sums in its own order)
    _perturb(ref, scale=0.05)
    ours = (sk.ConvEmformer if conv else sk.Emformer)(**kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype).eval(), ours.to(dtype).eval()


def _assert_nested_close(got, want, tol, what):
    if isinstance(want, torch.Tensor):
        assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
        return
    assert len(got) == len(want), f"{what}: {len(got)} entries, want {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_nested_close(g, w, tol, f"{what}[{i}]")


def _windows(kwargs, dtype, batch=3, n=4, seed=1):
    """n (window, lengths) pairs; the last two ragged (every row partial in the last)."""
    s, r = kwargs["segment_length"], kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n):
        x = torch.randn(batch, s + r, D, generator=gen, dtype=dtype)
        lengths = torch.full((batch,), s + r, dtype=torch.long)
        if c == n - 2:
            lengths[1:] = torch.tensor([max(s + r - 2, 1), max(r, 1)])
        if c == n - 1:
            lengths = torch.tensor([s + r - 1, max(s + r - 3, 1), max(r, 1)])
        out.append((x, lengths))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv, kwargs", CONFIGS)
def test_scripted_equals_eager_equals_upstream(torchaudio_upstream, conv, kwargs, dtype):
    ref, ours = _pair(torchaudio_upstream, conv, kwargs, dtype)
    scripted = _script(ours)
    tol = TOL[dtype]
    r = kwargs["right_context_length"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 13 + r, D, generator=gen, dtype=dtype)
    lengths = torch.tensor([13, 10, 7])
    want = ref(x, lengths)
    _assert_nested_close(ours(x, lengths), want, tol, "eager forward")
    _assert_nested_close(scripted(x, lengths), want, tol, "scripted forward")

    states = {"upstream": None, "eager": None, "scripted": None}
    with torch.no_grad():  # inference: the eager ConvEmformer runs its fused C++ step here
        for step, (xw, lw) in enumerate(_windows(kwargs, dtype)):
            y_up, l_up, states["upstream"] = ref.infer(xw, lw, states["upstream"])
            for name, model in (("eager", ours), ("scripted", scripted)):
                y, l, states[name] = model.infer(xw, lw, states[name])
                _assert_nested_close(y, y_up, tol, f"{name} infer {step}: output")
                assert torch.equal(l, l_up), f"{name} infer {step}: lengths"
                _assert_nested_close(states[name], states["upstream"], tol, f"{name} states")


def test_scripted_module_keeps_upstream_helpers(torchaudio_upstream):
    """The helpers torchaudio's models call from TorchScript (EmformerHuBERT) compile."""
    _, ours = _pair(torchaudio_upstream, False, CONFIGS[0].values[1], torch.float32)

    class Caller(torch.nn.Module):
        def __init__(self, emformer):
            super().__init__()
            self.emformer = emformer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            utterance = x[: x.size(0) - self.emformer.right_context_length]
            return self.emformer._gen_attention_mask(utterance).sum() + (
                self.emformer._gen_right_context(x).sum()
            )

    x = torch.randn(15, 2, D)
    caller = Caller(ours)
    assert_close(_script(caller)(x), caller(x))


# -- torchaudio models holding an Emformer, swapped ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swapped_emformer_rnnt_scripts(small_emformer_rnnt, dtype):
    ref = small_emformer_rnnt(dtype)
    ours = seqkern.swap(copy.deepcopy(ref))
    assert isinstance(ours.transcriber.transformer, sk.Emformer)
    scripted = _script(ours)
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 28, 20, generator=gen, dtype=dtype)
    lengths = torch.tensor([28, 22])
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    tlens = torch.tensor([5, 4])
    want = ref(feats, lengths, targets, tlens)
    for name, model in (("eager", ours), ("scripted", scripted)):
        _assert_nested_close(model(feats, lengths, targets, tlens), want, tol, name)

    # streaming: 4 + 2 input frames a chunk (the Emformer sees 2 + 1 after the time reduction)
    states = {"upstream": None, "eager": None, "scripted": None}
    with torch.no_grad():
        for step in range(4):
            chunk = torch.randn(2, 6, 20, generator=gen, dtype=dtype)
            chunk_lengths = torch.tensor([6, 6 if step < 2 else 4])
            y_up, l_up, states["upstream"] = ref.transcribe_streaming(
                chunk, chunk_lengths, states["upstream"]
            )
            for name, model in (("eager", ours), ("scripted", scripted)):
                y, l, states[name] = model.transcribe_streaming(chunk, chunk_lengths, states[name])
                _assert_nested_close(y, y_up, tol, f"{name} transcribe_streaming {step}")
                assert torch.equal(l, l_up)
                _assert_nested_close(states[name], states["upstream"], tol, f"{name} states")


def test_swapped_rnnt_beam_search_scripts(torchaudio_upstream, small_emformer_rnnt):
    """RNNTBeamSearch over the swapped RNN-T, eager and scripted, decodes as upstream's: the
    same hypotheses (tokens, scores) after streaming a few segments."""
    beam_search = torchaudio_upstream.rnnt_decoder.RNNTBeamSearch
    ref = small_emformer_rnnt(torch.float32)
    ours = seqkern.swap(copy.deepcopy(ref))
    decoders = {
        "upstream": beam_search(ref, blank=10),
        "eager": beam_search(ours, blank=10),
        "scripted": _script(beam_search(ours, blank=10)),
    }
    gen = torch.Generator().manual_seed(4)
    chunks = [torch.randn(6, 20, generator=gen) for _ in range(4)]
    results = {}
    with torch.no_grad():
        for name, decoder in decoders.items():
            state, hypos = None, None
            for chunk in chunks:
                hypos, state = decoder.infer(chunk, torch.tensor([6]), 3, state, hypos)
            results[name] = hypos
    want = results.pop("upstream")
    assert len(want) == 3 and any(len(h[0]) > 1 for h in want)  # it decoded tokens
    for name, hypos in results.items():
        assert [h[0] for h in hypos] == [h[0] for h in want], name
        assert_close(torch.tensor([h[3] for h in hypos]), torch.tensor([h[3] for h in want]))


def _hubert(up, dtype):
    torch.manual_seed(0)
    model = up.emformer_hubert.emformer_hubert_model(
        extractor_input_dim=20,
        extractor_output_dim=D // 2,  # the time reduction stacks 2 frames: D
        extractor_use_bias=True,
        extractor_stride=2,
        encoder_input_dim=D,
        encoder_output_dim=16,
        encoder_num_heads=3,
        encoder_ffn_dim=32,
        encoder_num_layers=3,
        encoder_segment_length=4,
        encoder_left_context_length=3,
        encoder_right_context_length=2,
        encoder_dropout=0.0,
        encoder_activation="gelu",
        encoder_max_memory_size=2,
        encoder_weight_init_scale_strategy="depthwise",
        encoder_tanh_on_mem=True,
        aux_num_out=None,
    )
    return _perturb(model, scale=0.05).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swapped_emformer_hubert_extract_features(torchaudio_upstream, dtype):
    """EmformerHuBERT runs Emformer's layers itself from `_gen_right_context` and
    `_gen_attention_mask`: after swap its public methods work, eager and scripted."""
    ref = _hubert(torchaudio_upstream, dtype)
    ours = seqkern.swap(copy.deepcopy(ref))
    assert isinstance(ours.encoder.emformer, sk.Emformer)
    scripted = _script(ours)
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 30, 20, generator=gen, dtype=dtype)
    lengths = torch.tensor([30, 24])
    tol = TOL[dtype]
    want = ref.extract_features(feats, lengths)
    for name, model in (("eager", ours), ("scripted", scripted)):
        _assert_nested_close(model.extract_features(feats, lengths), want, tol, name)
        _assert_nested_close(model.extract_features(feats, lengths, 2)[0], want[0][:2], tol, name)
        _assert_nested_close(model(feats, lengths), ref(feats, lengths), tol, name)
