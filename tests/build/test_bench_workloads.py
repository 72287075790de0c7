"""`seqkern bench`'s CPU model workloads: outputs checked before timing, ratios taken round by
round, the budget naming what it leaves out, the default CPU run, and the README's CPU table
being the committed JSON's."""

import json
import re
from pathlib import Path

import pytest
import torch

from seqkern import bench
from seqkern.bench import workloads as W

ROOT = Path(__file__).resolve().parents[2]


def _fake(monkeypatch, calls, skipped=None, setup_s=None):
    def setup(allowed):
        run = W.Run("fake upstream", dict(calls), skipped=dict(skipped or {}))
        for peer in ("compile", "ort"):
            if peer in calls or peer in (setup_s or {}):
                allowed(peer)
        run.setup_s.update(setup_s or {})
        return run

    wl = W.Workload("fake", "a fake workload", "step", setup)
    monkeypatch.setitem(W.BY_NAME, "fake", wl)


def test_ratios_are_per_round_and_disagreeing_peers_are_not_timed(monkeypatch):
    one = torch.ones(3)
    _fake(
        monkeypatch,
        {
            "seqkern": lambda: one,
            "upstream": lambda: one,
            "compile": lambda: one + 1e-7,
            "ort": lambda: one + 1.0,  # wrong: an error, never timed
        },
    )
    per_round = {
        "seqkern": [1.0, 2.0, 1.0],
        "upstream": [3.0, 2.0, 4.0],
        "compile": [1.0, 4.0, 2.0],
    }

    def fake_rounds(fns, device, quick, kernel_backends=None, rounds=None, **kw):
        assert len(fns) == 3  # seqkern, upstream, compile
        return [(per_round[p], 3) for p in ("seqkern", "upstream", "compile")]

    monkeypatch.setattr(bench, "time_rounds", fake_rounds)
    rows = W.run(["fake"], budget_s=None, progress=False)
    by = {r["provider"]: r for r in rows}
    assert by["ort"]["error"].startswith("differs from upstream by 1.00e+00")
    assert "ms" not in by["ort"]
    assert by["ort-nospin"]["skipped"] == "not available"
    assert by["compile"]["max_err"] == pytest.approx(1e-7, rel=0.2)
    seq = by["seqkern"]
    assert seq["ratio_vs"]["upstream"] == pytest.approx(3.0)  # median of 3, 1, 4
    assert seq["ratio_range"]["upstream"] == (1.0, 4.0)
    assert seq["ratio_vs"]["compile"] == pytest.approx(2.0)  # median of 1, 2, 2
    text = W.table(rows)
    assert "3.00x (1.00-4.00)" in text and "fake ort: ERROR differs" in text


def test_budget_leaves_peers_out_and_says_so(monkeypatch):
    one = torch.ones(1)
    _fake(monkeypatch, {"seqkern": lambda: one, "upstream": lambda: one}, setup_s={"compile": 0})
    monkeypatch.setattr(bench, "time_rounds", lambda fns, *a, **k: [([1.0], 1)] * len(fns))
    rows = W.run(["fake"], budget_s=W.RESERVE_S + 1.0, progress=False)
    by = {r["provider"]: r for r in rows}
    assert "left out by the" in by["compile"]["skipped"]
    assert "--budget 0" in by["compile"]["skipped"]
    rows = W.run(["fake"], budget_s=W.RESERVE_S - 1.0, progress=False)
    assert rows == [
        dict(
            workload="fake",
            title="a fake workload",
            unit="step",
            provider=None,
            skipped=f"left out by the {W.RESERVE_S - 1.0:.0f} s budget",
        )
    ]


def test_max_diff_walks_nested_outputs():
    a = (torch.zeros(2), [[torch.ones(1), torch.zeros(0)]], {"k": torch.ones(2)})
    b = (torch.zeros(2), [[torch.ones(1) * 3, torch.zeros(0)]], {"k": torch.ones(2)})
    assert W.max_diff(a, b) == 2.0
    with pytest.raises(ValueError, match="output tensors"):
        W.max_diff((torch.zeros(1),), (torch.zeros(1), torch.zeros(1)))


@pytest.fixture
def tiny_emformer(monkeypatch, torchaudio_upstream):
    monkeypatch.setitem(
        W.EMFORMER_SIZES, "tiny", dict(input_dim=32, num_heads=2, ffn_dim=48, num_layers=2)
    )
    for kind in ("emformer", "conv_emformer"):
        monkeypatch.setitem(
            W.BY_NAME,
            f"{kind}-tiny-b2",
            W.Workload(f"{kind}-tiny-b2", "tiny", "segment", W._emformer_setup(kind, "tiny", 2)),
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["emformer", "conv_emformer"])
def test_emformer_workload_every_peer_agrees_with_upstream(tiny_emformer, kind):
    """The real setup at a tiny size: seqkern, torch.compile and ONNX Runtime (the exported
    per-segment graph with its state list flattened) all give upstream's output and states."""
    pytest.importorskip("onnxruntime")
    rows = W.run([f"{kind}-tiny-b2"], budget_s=None, progress=False, rounds=1)
    by = {r["provider"]: r for r in rows}
    assert by["upstream"]["label"].startswith("torchaudio")
    for p in ("seqkern", "compile", "ort", "ort-nospin"):
        assert "error" not in by[p] and "skipped" not in by[p], by[p]
        assert by[p]["max_err"] <= 1e-5, by[p]
        assert by[p]["ms"] > 0
    assert set(by["seqkern"]["ratio_vs"]) == {"upstream", "compile", "ort", "ort-nospin"}


def test_workload_states_are_not_consumed(tiny_emformer):
    """upstream's infer rewrites the state lists it is given: each call must get a fresh copy,
    or a later call (a later round) computes a different segment."""
    run = W.BY_NAME["conv_emformer-tiny-b2"].setup(lambda peer: False)
    first = run.calls["upstream"]()
    assert W.max_diff(run.calls["upstream"](), first) == 0.0
    assert W.max_diff(run.calls["seqkern"](), first) <= 1e-5


def test_default_cpu_run_is_the_workloads(monkeypatch, tmp_path):
    rows = [
        dict(
            workload="w",
            title="t",
            unit="step",
            provider="seqkern",
            ms=1.0,
            round_ms=[1.0],
            ratio_vs={"upstream": 2.0},
            ratio_range={"upstream": (1.5, 2.5)},
        ),
        dict(
            workload="w",
            title="t",
            unit="step",
            provider="upstream",
            ms=2.0,
            round_ms=[2.0],
            label="eager",
        ),
    ]
    seen = {}

    def fake_run(names, budget, progress=True):
        seen.update(names=names, budget=budget)
        return rows

    monkeypatch.setattr(W, "run", fake_run)
    monkeypatch.setattr(bench, "_versions", lambda: {})
    assert bench.main(["--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    assert seen == {"names": list(W.BY_NAME), "budget": 165.0}
    (written,) = tmp_path.rglob("cpu-*.json")
    data = json.loads(written.read_text())
    assert data["kind"] == "workloads" and data["threads"] == torch.get_num_threads()
    assert data["rows"] == json.loads(json.dumps(rows))


def test_readme_cpu_table_is_the_committed_json():
    """The README's workload table is `seqkern bench --markdown` of the JSON it names."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- workloads: (\S+) -->\n(.*?)<!-- /workloads -->", readme, re.S)
    assert m, "README has no <!-- workloads: FILE --> table"
    data = json.loads((ROOT / m.group(1)).read_text())
    assert m.group(2).strip() == W.markdown(data).strip()
