"""End to end: VALL-E's 12-layer NAR decoder, a training step and a forward, against upstream.

    python benchmarks/valle_decoder.py [--out DIR] [--batch 16] [--length 1024] [--rounds 5]
    python benchmarks/valle_decoder.py --tiny          # a small decoder, seconds, any machine

Builds `seqkern.modules.valle.ValleNARDecoder(n_level=7, n_ctx=length, n_state=1024,
n_head=16, n_layer=12, causal=False)` (ValleLM's NAR configuration) with well-conditioned
random weights (`seqkern.bench.valle.condition_weights_`), in bfloat16 on a GPU (`--dtype`)
and float32 on the CPU, and times, on x (batch, length, 1024), level (batch,) and a ragged
(batch, 1, 1, length) bool key padding mask (True = may attend):

* train: forward, then the gradients of every parameter and of x for a random dy (the
  autograd part of a training step; no optimizer);
* forward: the forward under torch.no_grad.

Providers, all on the same Parameters:

* seqkern:  the seqkern decoder, auto backends (seqkern AdaLN and attention kernels);
* upstream: an eager plain-PyTorch transcription of ESPnet 202506's decoder with per-sample
  semantics (`seqkern.bench.valle.upstream_decoder`): three projections, SDPA, F.layer_norm
  without affine times gamma plus beta;
* compile:  torch.compile of that transcription, whole decoder (compile time reported apart);
* parts:    the "sum of the best parts": the same decoder with seqkern.adaln for the norms,
  one fused QKV GEMM, SDPA and cuBLAS GEMMs (`seqkern.bench.valle.parts_block`).

Before timing, every provider's forward is compared with the seqkern decoder under
`seqkern.use_backend("reference")` and with the upstream transcription (same dtype), and with
a float64 copy of the decoder on the reference backend (the oracle); the reference backend's
own error in the same dtype is the yardstick. Timing runs in interleaved rounds (a machine
whose speed drifts affects every provider alike); the medians over rounds are reported,
speedups as the median over rounds of baseline_ms / seqkern_ms. Writes
`<out>/<device-slug>/valle_decoder[-tiny].json`.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import seqkern
from seqkern.bench import _commit, _peak_mem_mb, _versions, device_name, slug, time_ms
from seqkern.bench.core import _raise_recompile_limit
from seqkern.bench.valle import condition_weights_, key_padding_mask, upstream_decoder
from seqkern.modules.valle import ValleNARDecoder
from seqkern.testing import max_abs_error

N_LEVEL = 7  # ValleLM: nq - 1 NAR levels for 8 codebooks
PROVIDERS = ("seqkern", "upstream", "compile", "parts")
BASELINES = ("upstream", "compile", "parts")


def build(args, device: torch.device, dtype: torch.dtype) -> ValleNARDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ValleNARDecoder(
            N_LEVEL, args.length, args.n_state, args.n_head, args.n_layer, causal=False
        )
    condition_weights_(model, seed=1)
    return model.to(device=device, dtype=dtype)


def flops(args, direction: str) -> int:
    """GEMMs 24 B T D^2 and attention 4 B T^2 D per layer; a training step is 3x a forward."""
    B, T, D = args.batch, args.length, args.n_state
    fwd = args.n_layer * (24 * B * T * D * D + 4 * B * T * T * D)
    return fwd if direction == "forward" else 3 * fwd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--n-state", type=int, default=1024)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the torch.compile provider (auto: off for --tiny on CPU, where inductor's C++ "
        "build takes longer than the run)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide decoder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.length, args.n_state, args.n_head, args.n_layer = 3, 40, 64, 4, 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_compile = args.compile == "on" or (
        args.compile == "auto" and not (args.tiny and device.type == "cpu")
    )
    providers = [p for p in PROVIDERS if use_compile or p != "compile"]

    model = build(args, device, dtype)
    params = dict(model.named_parameters())
    B, T, D, H = args.batch, args.length, args.n_state, args.n_head
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, D, generator=gen).to(device, dtype).requires_grad_()
    level = torch.randint(0, N_LEVEL, (B,), generator=gen).to(device)
    mask = key_padding_mask(B, T, device)
    dy = torch.randn(B, T, D, generator=gen).to(device, dtype)
    diff = [x, *params.values()]

    _raise_recompile_limit()
    compiled = torch.compile(upstream_decoder, dynamic=False) if use_compile else None
    forwards = {
        "seqkern": lambda: model(x, level, mask=mask),
        "upstream": lambda: upstream_decoder(x, level, params, H, args.n_layer, False, mask),
        "compile": lambda: compiled(x, level, params, H, args.n_layer, False, mask),
        "parts": lambda: upstream_decoder(
            x, level, params, H, args.n_layer, False, mask, parts=True
        ),
    }

    def workloads(fwd) -> dict:
        def forward():
            with torch.no_grad():
                return fwd()

        def train():
            return torch.autograd.grad(fwd(), diff, dy)

        return {"train": train, "forward": forward}

    work = {p: workloads(forwards[p]) for p in providers}

    # --- agreement, before any timing (also the compile provider's first calls) -------------
    with torch.no_grad():
        oracle_model = copy.deepcopy(model).to(torch.float64)
        with seqkern.use_backend("reference"):
            oracle = oracle_model(x.detach().double(), level, mask=mask)
            ref_same = model(x, level, mask=mask)
        del oracle_model
        upstream_same = forwards["upstream"]()
    compile_s = {}
    outputs = {}
    for p in providers:
        t0 = time.perf_counter()
        with torch.no_grad():
            outputs[p] = work[p]["forward"]()
        if p == "compile":
            compile_s["forward"] = time.perf_counter() - t0
    ref_err = max_abs_error(ref_same, oracle)
    check = {}
    for p, y in outputs.items():
        err = max_abs_error(y, oracle)
        check[p] = {
            "max_abs_diff_vs_reference": max_abs_error(y, ref_same),
            "max_abs_diff_vs_upstream": max_abs_error(y, upstream_same),
            "max_abs_err_vs_float64": err,
            # a broken kernel is off by O(1); rounding in this dtype by a few ref_err
            "ok": bool(torch.isfinite(y).all()) and err <= 10 * ref_err + 1e-5,
        }
    del outputs, ref_same, upstream_same

    # --- timing ------------------------------------------------------------------------------
    quick = args.tiny
    for p in providers:  # warm up: compile the training graph, first-call allocations
        t0 = time.perf_counter()
        work[p]["train"]()
        if p == "compile":
            compile_s["train"] = time.perf_counter() - t0
        for _ in range(2):
            work[p]["train"]()
            work[p]["forward"]()
    rounds = 1 if args.tiny else args.rounds
    times = {p: {w: [] for w in ("train", "forward")} for p in providers}
    for _ in range(rounds):
        for p in providers:
            for w, fn in work[p].items():
                times[p][w].append(time_ms(fn, device, quick=quick))
    ms = {p: {w: statistics.median(v) for w, v in tw.items()} for p, tw in times.items()}
    speedup = {
        b: {
            w: statistics.median(a / s for a, s in zip(times[b][w], times["seqkern"][w]))
            for w in ("train", "forward")
        }
        for b in BASELINES
        if b in providers
    }
    tflops = {
        p: {w: flops(args, w) / (v * 1e-3) / 1e12 for w, v in tw.items()} for p, tw in ms.items()
    }
    peak_mb = {p: {w: _peak_mem_mb(fn, device) for w, fn in work[p].items()} for p in providers}

    result = {
        "device": device_name(device),
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "model": (
            f"ValleNARDecoder n_level={N_LEVEL}, n_ctx={T}, n_state={D}, n_head={H}, "
            f"n_layer={args.n_layer}, causal=False"
        ),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": B,
        "length": T,
        "mask": "(B, 1, 1, T) bool key padding, ragged",
        "rounds": rounds,
        "ms": ms,  # median over rounds, per provider and workload
        "tflops": tflops,  # effective: counted GEMM + attention FLOPs / ms
        "peak_mem_mb": peak_mb,
        "speedup": speedup,  # median over rounds of baseline ms / seqkern ms
        "compile_s": compile_s,  # first-call seconds of the compile provider
        "reference_err_vs_float64": ref_err,
        "check": check,
    }
    out_dir = Path(args.out) / slug(result["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("valle_decoder-tiny.json" if args.tiny else "valle_decoder.json")
    path.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{result['model']}; B={B}, T={T}, {result['dtype']}, {result['device']}")
    head = f"{'provider':<10}{'workload':<10}{'ms':>11}{'TFLOP/s':>10}{'peak MB':>10}"
    head += "".join(f"{'vs ' + b:>14}" for b in speedup)
    print(head)
    for p in providers:
        for w in ("train", "forward"):
            line = f"{p:<10}{w:<10}{ms[p][w]:>11.3f}{tflops[p][w]:>10.2f}"
            line += f"{'-' if peak_mb[p][w] is None else format(peak_mb[p][w], '.0f'):>10}"
            if p == "seqkern":
                line += "".join(f"{format(speedup[b][w], '.2f') + 'x':>14}" for b in speedup)
            print(line)
    print(f"reference backend, {result['dtype']}: max abs err vs float64 {ref_err:.2e}")
    for p, c in check.items():
        print(
            f"{p:<10} max abs diff vs reference {c['max_abs_diff_vs_reference']:.2e}, "
            f"vs upstream {c['max_abs_diff_vs_upstream']:.2e}, "
            f"err vs float64 {c['max_abs_err_vs_float64']:.2e}{'' if c['ok'] else '  NOT OK'}"
        )
    if compile_s:
        print("compile: " + ", ".join(f"{w} {s:.1f} s" for w, s in compile_s.items()))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(c["ok"] for c in check.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
