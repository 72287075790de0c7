"""`seqkern bench` times every kernel backend that can run on the device: on a GPU the cuda and
triton kernels, on a CPU the cpu kernels (never the Triton interpreter)."""

import torch

from seqkern import backends
from seqkern.bench import SPECS, _seqkern_providers


def _labels(op, device, monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    return sorted(p.label for p in _seqkern_providers(SPECS[op], torch.device(device)))


def test_gpu_runs_get_cuda_and_triton_rows(monkeypatch):
    assert _labels("adaln", "cuda", monkeypatch) == ["seqkern[cuda]", "seqkern[triton]"]
    for op in (
        "attention",
        "relbias_attention",
        "chunk_attention",
        "emformer_segment_attention",
        "emformer_segment_conv",
    ):
        assert "seqkern[triton]" in _labels(op, "cuda", monkeypatch), op
    assert _labels("ema", "cuda", monkeypatch) == ["seqkern[cuda]"]


def test_cpu_runs_get_cpu_rows_only(monkeypatch):
    assert _labels("adaln", "cpu", monkeypatch) == ["seqkern[cpu]"]
    assert _labels("attention", "cpu", monkeypatch) == ["seqkern[cpu]"]
    assert _labels("relbias_attention", "cpu", monkeypatch) == []
