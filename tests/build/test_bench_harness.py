"""`seqkern bench`'s harness: providers timed side by side in interleaved rounds, ratios taken
round by round (median, min, max), the headline table, run names that do not overwrite."""

import torch

from seqkern import bench


def test_rounds_interleave_and_alternate_the_order(monkeypatch):
    calls = []

    def fake_round(fn, device, quick, share=1.0, **kw):
        calls.append(fn())
        return 1.0, 5

    monkeypatch.setattr(bench, "time_round", fake_round)
    out = bench.time_rounds([lambda: "a", lambda: "b", lambda: "c"], torch.device("cpu"), True)
    n = bench.ROUNDS_QUICK
    assert calls[:6] == ["a", "b", "c", "c", "b", "a"] and len(calls) == 3 * n
    assert out == [([1.0] * n, 5 * n)] * 3


def test_rounds_run_each_fn_under_its_backend(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "time_round", lambda fn, *a, **k: (fn(), 1))
    from seqkern.backends import allowed_backends

    fns = [lambda: seen.append(allowed_backends()) or 1.0] * 2
    bench.time_rounds(fns, torch.device("cpu"), True, ["reference", None])
    assert seen[0] == ("reference",) and seen[1] != ("reference",)


def _row(provider, round_ms, backend=None):
    return dict(
        op="op", case="c", dtype="float32", direction="fwd", provider=provider, backend=backend,
        ms=bench._median(round_ms), round_ms=round_ms, gbps=1.0, tflops=0.1, peak_mem_mb=None,
        max_err=0.0, ref_err_same_dtype=0.0,
    )  # fmt: skip


def test_ratios_are_per_round_medians_with_their_range():
    rows = [
        _row("seqkern", [1.0, 2.0, 1.0], "cpu"),
        _row("upstream", [3.0, 2.0, 2.5]),  # per round: 3.0, 1.0, 2.5
    ]
    bench._add_ratios(rows)
    assert rows[0]["ratio_vs"] == {"upstream": 2.5}
    assert rows[0]["ratio_range"] == {"upstream": (1.0, 3.0)}
    text = bench.table(rows)
    assert "2.50x (1.00-3.00)" in text and "headline" in text
    assert "peak MB" not in text.splitlines()[0] and "not measured on this device: peak MB" in text


def test_default_run_names_carry_the_time(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: [])
    monkeypatch.setattr(bench, "_versions", lambda: {})
    assert bench.main(["--quick", "--ops", "adaln", "--out", str(tmp_path), "--no-progress"]) == 0
    (written,) = list(tmp_path.glob("*/*.json"))
    assert written.name.startswith("quick-") and written.name.endswith("Z.json")


def test_ops_without_a_cpu_kernel_say_why():
    cpu = torch.device("cpu")
    why = bench.no_seqkern_row_reason(bench.SPECS["relbias_attention"], cpu)
    assert why.startswith("relbias_attention has no seqkern kernel for cpu") and "triton" in why
    assert bench.no_seqkern_row_reason(bench.SPECS["adaln"], cpu) is None
