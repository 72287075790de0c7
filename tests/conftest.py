"""Test tiers, and the upstream fixtures.

Default run (no GPU): reference, C++ CPU ops, Triton kernels in the interpreter (set here,
before anything imports triton), the nvcc compile check, packaging. Tests marked `cuda` skip
themselves without a GPU and, on a GPU machine (`pytest -m cuda`), run the same comparisons on
the device at real sizes.
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton decides interpreter-or-compiler when a kernel is decorated, so this must be set
    # before seqkern._triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    # Accuracy must not depend on the CPU, so every run says which one it ran on.
    from seqkern import _ext

    info = importlib.import_module("seqkern.info")  # the module; seqkern.info is a function

    features = info.cpu_features() or {}
    isa = " ".join(label for label, on in features.items() if on) or "unknown"
    clone = _ext.C.cpu_dispatch()["multiversion_clone"] if _ext.C is not None else "no _C"
    return [
        f"CPU: {info.cpu_model()}, {os.cpu_count()} logical cores",
        f"CPU ISA: {isa}; seqkern C++ clone: {clone}",
    ]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (the cuda tier runs in benchmarks/gpu_check.sh)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Upstream modules for the compat and swap tests: ESPnet 202506 and torchaudio 2.8.0's pure-Python
# files. `python tests/upstream/fetch.py` puts them in place (the README's test command runs it).
# Under CI a missing upstream fails the run: a compat check that silently skips proves nothing.
ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = Path(os.environ.get("SEQKERN_UPSTREAM_DIR", ROOT / ".upstream"))
TORCHAUDIO_DIR = UPSTREAM_DIR / "torchaudio-2.8.0"


def _missing(what: str):
    msg = f"{what} is not available: run `python tests/upstream/fetch.py`"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _load_torchaudio_sources() -> None:
    """torchaudio 2.8.0's pure-Python files, importable (seqkern.bench.upstream does it)."""
    from seqkern.bench.upstream import load_torchaudio_sources

    load_torchaudio_sources(TORCHAUDIO_DIR)


@pytest.fixture(scope="session")
def torchaudio_upstream():
    """Namespace with torchaudio 2.8.0's Emformer, ConvEmformer, Emformer RNN-T (with
    RNNTBeamSearch) and EmformerHuBERT modules."""
    if not (TORCHAUDIO_DIR / "torchaudio" / "models" / "emformer.py").exists():
        _missing(f"torchaudio 2.8.0 sources ({TORCHAUDIO_DIR})")
    _load_torchaudio_sources()
    return types.SimpleNamespace(
        emformer=sys.modules["torchaudio.models.emformer"],
        conv_emformer=sys.modules["torchaudio.prototype.models.conv_emformer"],
        rnnt=sys.modules["torchaudio.models.rnnt"],
        rnnt_decoder=sys.modules["torchaudio.models.rnnt_decoder"],
        emformer_hubert=sys.modules["torchaudio.prototype.models._emformer_hubert"],
    )


@pytest.fixture
def small_emformer_rnnt(torchaudio_upstream):
    """make(dtype) -> a small torchaudio Emformer RNN-T (segment 4, right context 2, time
    reduction 2, left context 3, memory 2, tanh on the memory), weights moved off the init,
    in eval mode. Streaming chunks are 4 + 2 input frames."""

    def make(dtype=torch.float32):
        torch.manual_seed(0)
        rnnt = torchaudio_upstream.rnnt.emformer_rnnt_model(
            input_dim=20,
            encoding_dim=16,
            num_symbols=11,
            segment_length=4,
            right_context_length=2,
            time_reduction_input_dim=24,
            time_reduction_stride=2,
            transformer_num_heads=3,
            transformer_ffn_dim=32,
            transformer_num_layers=2,
            transformer_dropout=0.0,
            transformer_activation="gelu",
            transformer_left_context_length=3,
            transformer_max_memory_size=2,
            transformer_weight_init_scale_strategy="depthwise",
            transformer_tanh_on_mem=True,
            symbol_embedding_dim=12,
            num_lstm_layers=1,
            lstm_layer_norm=True,
            lstm_layer_norm_epsilon=1e-5,
            lstm_dropout=0.0,
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in rnnt.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        return rnnt.to(dtype).eval()

    return make


@pytest.fixture(scope="session")
def espnet_upstream(torchaudio_upstream):
    """Namespace with the ESPnet 202506 modules seqkern mirrors (beats needs torchaudio)."""
    if importlib.util.find_spec("espnet2") is None:
        _missing("espnet 202506")
    return types.SimpleNamespace(
        valle=importlib.import_module("espnet2.speechlm.module.valle"),
        transformer=importlib.import_module("espnet2.speechlm.module.transformer"),
        net_utils=importlib.import_module("espnet2.speechlm.net_utils"),
        beats=importlib.import_module("espnet2.asr.encoder.beats_encoder"),
        mega_decoder=importlib.import_module("espnet2.asr_transducer.decoder.mega_decoder"),
        beam_search=importlib.import_module("espnet2.asr_transducer.beam_search_transducer"),
        state_spaces_base=importlib.import_module("espnet2.asr.state_spaces.base"),
    )


@pytest.fixture
def small_beats_encoder(espnet_upstream):
    """A random 2-layer ESPnet BeatsEncoder (relative bias with the GRU gate, no dropout), its
    weights moved away from the init so the bias and gate paths matter. Call it with the
    encoder width (a multiple of its 4 heads)."""

    def make(embed_dim: int = 32):
        cfg = dict(
            encoder_layers=2,
            encoder_embed_dim=embed_dim,
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
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return enc.eval()

    return make
