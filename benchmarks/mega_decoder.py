"""End to end: an ESPnet MEGADecoder before and after `seqkern.swap`, forward and streaming.

    python benchmarks/mega_decoder.py [--out DIR] [--batch 4] [--length 512] [--block-size 256]
    python benchmarks/mega_decoder.py --tiny          # a small decoder, seconds, any machine

Builds a randomly initialised MEGADecoder (block_size 256, the other arguments upstream's
defaults: linear 1024, qk 128, v 1024, 4 EMA heads, 4 blocks, full context), then in one run:

* forward: `decoder(labels)` on (batch, length) labels, upstream then swapped;
* streaming: the decoder's part of a transducer beam search, per step and beam size: batch the
  hypotheses' states (`create_batch_states`), `inference` on the last labels, split the states
  back per hypothesis (`select_state`), for `--steps` steps from `init_state`;

checks that the outputs agree and writes `<out>/<device-slug>/mega_decoder[-tiny].json`. On a
GPU it also reports the step latency per layer (per MEGA block + FFN).

Needs ESPnet 202506 importable (`python tests/upstream/fetch.py` installs it).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import torch

import seqkern
from seqkern.bench import _commit, _versions, device_name, slug, time_ms


def build(args, device):
    from espnet2.asr_transducer.decoder.mega_decoder import MEGADecoder

    torch.manual_seed(0)
    cfg = dict(block_size=args.block_size, chunk_size=args.chunk_size)
    if args.tiny:
        cfg.update(linear_size=64, qk_size=16, v_size=64, num_blocks=2)
    dec = MEGADecoder(args.vocab, **cfg).to(device).eval()
    with torch.no_grad():  # upstream initialises biases to zero: make every term count
        for p in dec.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dec.set_device(device)
    return dec, cfg


def stream(dec, beam: int, steps: int, device) -> tuple[list[torch.Tensor], callable]:
    """The decoder side of `steps` beam-search steps with `beam` hypotheses."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(1, dec.vocab_size, (steps, beam), generator=gen).tolist()

    def run():
        states = [dec.init_state() for _ in range(beam)]
        outs = []
        for t in range(steps):
            batch = dec.create_batch_states(states)
            lab = torch.tensor([[labels[t][i]] for i in range(beam)], device=device)
            out, batch = dec.inference(lab, batch)
            states = [dec.select_state(batch, i) for i in range(beam)]
            outs.append(out)
        return outs

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=-1)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--beams", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--tiny", action="store_true", help="a 2-block 64-wide decoder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.block_size, args.length, args.steps = 32, 40, 6

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dec, cfg = build(args, device)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(1, args.vocab, (args.batch, args.length), generator=gen).to(device)
    labels[:, 0] = 0  # the transducer's leading blank
    labels[-1, int(args.length * 0.75) :] = 0  # one ragged (right-padded) row

    def workloads(model) -> dict:
        def forward():
            with torch.no_grad():
                return model(labels)

        work = {"forward_ms": (forward, 1)}
        for beam in args.beams:
            run = stream(model, beam, args.steps, device)
            work[f"stream_beam{beam}_step_ms"] = (run, args.steps)
        return work

    def outputs(work) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            fwd = work["forward_ms"][0]().float()
            streamed = {
                b: torch.stack([o.float() for o in work[f"stream_beam{b}_step_ms"][0]()])
                for b in args.beams
            }
        return fwd, streamed

    upstream = copy.deepcopy(dec)
    swapped = seqkern.swap(dec)  # the decoder is the root: swap returns its replacement
    assert type(swapped).__module__.startswith("seqkern"), type(swapped)
    up_work, sk_work = workloads(upstream), workloads(swapped)
    want_fwd, want_stream = outputs(up_work)
    got_fwd, got_stream = outputs(sk_work)
    # Interleaved rounds: a machine whose speed drifts affects both sides alike; each round's
    # ratio is taken, and the medians reported.
    rounds = 1 if args.tiny else args.rounds
    times = {side: {k: [] for k in up_work} for side in ("upstream", "seqkern")}
    with torch.no_grad():
        for _ in range(rounds):
            for side, work in (("upstream", up_work), ("seqkern", sk_work)):
                for key, (fn, per) in work.items():
                    times[side][key].append(time_ms(fn, device, quick=args.tiny) / per)
    up = {k: statistics.median(v) for k, v in times["upstream"].items()}
    sk = {k: statistics.median(v) for k, v in times["seqkern"].items()}
    ratios = {
        k: statistics.median(a / b for a, b in zip(times["upstream"][k], times["seqkern"][k]))
        for k in up
    }
    dec = swapped

    valid = labels != 0
    valid[:, 0] = True
    result = {
        "device": device_name(device),
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "model": "MEGADecoder " + ", ".join(f"{k}={v}" for k, v in cfg.items()),
        "batch": args.batch,
        "length": args.length,
        "steps": args.steps,
        "upstream_ms": up,
        "seqkern_ms": sk,
        "rounds": rounds,
        "speedup": ratios,  # median over rounds of upstream_ms / seqkern_ms
        "max_abs_diff_forward": float((got_fwd - want_fwd)[valid].abs().max()),
        "max_abs_diff_stream": max(
            float((got_stream[b] - want_stream[b]).abs().max()) for b in args.beams
        ),
        "num_blocks": len(dec.mega_blocks),
    }
    if device.type == "cuda":
        result["seqkern_step_us_per_layer"] = {
            k: 1e3 * v / result["num_blocks"] for k, v in sk.items() if k.startswith("stream")
        }
    out_dir = Path(args.out) / slug(result["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("mega_decoder-tiny.json" if args.tiny else "mega_decoder.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
