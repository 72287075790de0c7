"""The skinny GEMM (csrc/linear/skinny_gemm_cpu.cpp) against BLAS on a streaming step's Linears.

    python benchmarks/skinny_gemm.py [--out DIR] [--threads N]

A ConvEmformer layer streaming at batch 1 multiplies ~21 rows by each weight. Timed: y = x W^T
+ b for the products of a layer at input_dim 256 (ffn 1024) and 512 (ffn 2048), by
torch.nn.functional.linear (BLAS) and by seqkern's AVX-512 kernel, with the weight warm (the
same weight every call) and cold (cycling through 48 MB of weights, more than this machine's
last-level cache, as a 6-layer model does each segment). Reported: microseconds per product
(median of rounds), GFLOP/s and the weight's read rate. Writes
`<out>/<device-slug>/skinny_gemm[-<threads>thread].json`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqkern import _ext
from seqkern.bench import _commit, _versions, device_name, slug

SHAPES = [(21, 256, 1024), (21, 1024, 256), (21, 256, 256), (21, 512, 2048), (21, 2048, 512)]
COLD_BYTES = 48 << 20


def time_per_call(fn, weights, calls: int, rounds: int) -> float:
    """Median over rounds of the mean time of `calls` products, cycling through `weights`."""
    for w in weights:
        fn(w)
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            fn(weights[i % len(weights)])
        per_round.append((time.perf_counter() - start) / calls)
    return statistics.median(per_round)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    C = _ext.C
    if not (hasattr(C, "skinny_gemm_available") and C.skinny_gemm_available()):
        print("the skinny GEMM needs AVX-512F; this CPU takes BLAS")
        return 0
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, generator=gen)
        b = torch.randn(n, generator=gen)
        count = max(2, COLD_BYTES // (4 * n * k))
        weights = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(count)]
        want = F.linear(x, weights[0], b)
        err = float((C.skinny_linear_cpu(x, weights[0], b) - want).abs().max())
        flop = 2 * m * n * k
        row = {"m": m, "k": k, "n": n, "max_abs_diff": err}
        for name, fn in (
            ("blas", lambda w, x=x, b=b: F.linear(x, w, b)),
            ("skinny", lambda w, x=x, b=b: C.skinny_linear_cpu(x, w, b)),
        ):
            for temp, ws in (("warm", weights[:1]), ("cold", weights)):
                calls = 4 * len(weights) if temp == "cold" else 64
                t = time_per_call(fn, ws, calls, args.rounds)
                row[f"{name}_{temp}_us"] = t * 1e6
                row[f"{name}_{temp}_gflops"] = flop / t / 1e9
                row[f"{name}_{temp}_weight_gbs"] = 4 * n * k / t / 1e9
        rows.append(row)
        print(
            f"{m:3d} x {k:4d} x {n:4d}: "
            + "  ".join(
                f"{nm} {tp} {row[f'{nm}_{tp}_us']:7.1f} us "
                f"({row[f'{nm}_{tp}_gflops']:5.1f} GFLOP/s)"
                for nm in ("blas", "skinny")
                for tp in ("warm", "cold")
            )
        )
    name = device_name(torch.device("cpu"))
    result = {
        "device": name,
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "cold_bytes": COLD_BYTES,
        "rows": rows,
    }
    out = Path(args.out) / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"skinny_gemm{f'-{args.threads}thread' if args.threads else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
