"""Streaming inference per segment: torchaudio's (Conv)Emformer before and after `seqkern.swap`.

    python benchmarks/emformer_stream.py [--out DIR] [--model conv|emformer] [--batch 1] ...
    python benchmarks/emformer_stream.py --tiny       # a small model, seconds, any machine
    python benchmarks/emformer_stream.py --device cuda --batch 256 --input-dim 512 --heads 8 \
        --ffn 2048 --layers 20                        # the issue's base configuration on a GPU

The default is the CPU target of the Emformer issue: a ConvEmformer with input_dim 256,
6 layers, segments of 16 frames, and the base configuration's other proportions (4 heads of
64, ffn 1024, left context 32, right context 4, memory 4, kernel 8), at batch 1. Each round
streams `--segments` consecutive segments (each call gets segment + right-context frames and the
previous call's states, from no state) through upstream torchaudio 2.8.0 and through the
swapped copy, in interleaved rounds; reported: the median time per segment of each, and the
median over rounds of upstream / seqkern. Outputs and every state tensor are compared first.

`--cpu-weights bf16` adds a third model to the same rounds, swapped with
`cpu_weights="bf16"` (bfloat16 copies of the Linear weights, float32 arithmetic), and reports
its time against both and its error against upstream's float32 outputs and states over the
whole stream (`max_abs_diff_bf16`; the outputs are LayerNorm outputs, of order 1).

Upstream comes from torchaudio 2.8.0's pure-Python sources (`python tests/upstream/fetch.py`
puts them under .upstream/; tests/conftest.py loads them without torchaudio's compiled part).
On a GPU both models run there (timed with a synchronisation after each round, so a segment's
time is its GPU time plus whatever host work cannot overlap it). Writes
`<out>/<device-slug>/emformer_stream-<model>-b<batch>[-<threads>thread][-tiny].json`.
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
from seqkern.bench import _commit, _versions, device_name, slug

ROOT = Path(__file__).resolve().parents[1]


def upstream_classes():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TORCHAUDIO_DIR, _load_torchaudio_sources

    if not (TORCHAUDIO_DIR / "torchaudio" / "models" / "emformer.py").exists():
        raise SystemExit(
            f"torchaudio 2.8.0 sources missing ({TORCHAUDIO_DIR}): run tests/upstream/fetch.py"
        )
    _load_torchaudio_sources()
    return (
        sys.modules["torchaudio.models.emformer"].Emformer,
        sys.modules["torchaudio.prototype.models.conv_emformer"].ConvEmformer,
    )


def build(args):
    """torchaudio 2.8.0's Emformer or ConvEmformer from the CLI's sizes (dropout 0), seeded
    without touching the global RNG; in eval mode. Returns (model, its constructor kwargs)."""
    emformer, conv_emformer = upstream_classes()
    cfg = dict(
        input_dim=args.input_dim,
        num_heads=args.heads,
        ffn_dim=args.ffn,
        num_layers=args.layers,
        segment_length=args.segment,
        dropout=0.0,
        left_context_length=args.left_context,
        right_context_length=args.right_context,
        max_memory_size=args.memory,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if args.model == "conv":
            cfg["kernel_size"] = args.kernel
            model = conv_emformer(**cfg)
        else:
            model = emformer(**cfg)
    return model.eval(), cfg


def stream(model, windows, lengths):
    states, outs = None, []
    for x in windows:
        y, _, states = model.infer(x, lengths, states)
        outs.append(y)
    out = torch.cat(outs, 1)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, states


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--model", choices=("conv", "emformer"), default="conv")
    p.add_argument("--input-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--left-context", type=int, default=32)
    p.add_argument("--right-context", type=int, default=4)
    p.add_argument("--memory", type=int, default=4)
    p.add_argument("--kernel", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--segments", type=int, default=40, help="segments streamed per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model, 8 segments")
    p.add_argument(
        "--cpu-weights", choices=("bf16",), default=None,
        help="also time seqkern.swap(..., cpu_weights=...) in the same rounds",
    )  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.input_dim, args.ffn, args.layers, args.segments, args.rounds = 64, 128, 2, 8, 3
    device = torch.device(args.device)

    upstream, cfg = build(args)
    upstream = upstream.to(device)
    ours = seqkern.swap(copy.deepcopy(upstream))
    models = {"upstream": upstream, "seqkern": ours}
    if args.cpu_weights:
        models[f"seqkern-{args.cpu_weights}"] = seqkern.swap(
            copy.deepcopy(upstream), cpu_weights=args.cpu_weights
        )
    gen = torch.Generator().manual_seed(1)
    width = args.segment + args.right_context
    windows = [
        torch.randn(args.batch, width, args.input_dim, generator=gen).to(device)
        for _ in range(args.segments)
    ]
    lengths = torch.full((args.batch,), width, device=device)

    def diffs(model):
        got, got_states = stream(model, windows, lengths)
        states = max(
            max_diff(a, b) for sa, sb in zip(got_states, want_states) for a, b in zip(sa, sb)
        )
        return max_diff(got, want), states

    with torch.inference_mode():
        want, want_states = stream(upstream, windows, lengths)
        errors = {k: diffs(m) for k, m in models.items() if k != "upstream"}
        out_diff, state_diff = errors["seqkern"]
        times = {k: [] for k in models}
        for i in range(args.rounds):
            order = list(models.items())
            for name, model in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                stream(model, windows, lengths)
                times[name].append((time.perf_counter() - start) * 1e3 / args.segments)

    def ratio_of(a, b):
        r = [x / y for x, y in zip(times[a], times[b])]
        return statistics.median(r), min(r), max(r)

    ratio = ratio_of("upstream", "seqkern")[0]
    ms = {k: statistics.median(v) for k, v in times.items()}
    extra = {}
    if args.cpu_weights:
        low = f"seqkern-{args.cpu_weights}"
        extra = {
            f"ratio_vs_{low}": {k: ratio_of(k, low) for k in ("upstream", "seqkern")},
            f"max_abs_diff_{args.cpu_weights}": dict(zip(("output", "states"), errors[low])),
            "output_abs_max": float(want.abs().max()),
        }

    name = device_name(device)
    threads = torch.get_num_threads()
    print(f"{args.model} emformer {cfg}, batch {args.batch}, {name}, {threads} threads")
    print(f"max |seqkern - upstream|: output {out_diff:.2e}, states {state_diff:.2e}")
    for k in models:
        print(f"{k:12s} {ms[k]:8.3f} ms per segment")
    print(f"upstream / seqkern: {ratio:.2f}x (median of {args.rounds} interleaved rounds)")
    for key, value in extra.items():
        print(f"{key}: {value}")

    result = {
        "device": name,
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "config": cfg,
        "batch": args.batch,
        "device_type": device.type,
        "segments": args.segments,
        "rounds": args.rounds,
        "ms_per_segment": ms,
        "ms_per_segment_rounds": times,
        "speedup": ratio,
        "max_abs_diff": {"output": out_diff, "states": state_diff},
        **extra,
    }
    out = Path(args.out) / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.model}-b{args.batch}" + (f"-{args.threads}thread" if args.threads else "")
    if (args.input_dim, args.layers) != (256, 6):  # not the default size: say which
        tag += f"-{args.input_dim}x{args.layers}"
    tag += f"-{args.cpu_weights}w" if args.cpu_weights else ""
    path = out / f"emformer_stream{tag}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    ok = out_diff < 1e-3 and state_diff < 1e-3
    if not ok:
        print("FAILED: seqkern and upstream disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
