"""End to end: an ESPnet BeatsEncoder forward before and after `seqkern.swap`.

    python benchmarks/beats_encoder.py [--out DIR] [--seconds 10] [--batch 4] [--dtype bfloat16]
    python benchmarks/beats_encoder.py --tiny          # a 2-layer model, seconds, any machine

Builds a randomly initialised BeatsEncoder (BEATs iter3 shape: 12 layers, 768 wide, 12 heads,
relative position bias with the GRU gate), times its forward on `--seconds` of audio, swaps it
to seqkern in place (same Parameter objects), times it again in the same run, checks the
outputs agree, and writes `<out>/<device-slug>/beats_encoder[-tiny].json`.

Needs ESPnet 202506 and torchaudio importable (`python tests/upstream/fetch.py` brings ESPnet;
on a machine without network, install the carried wheels first).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

import seqkern
from seqkern.bench import _commit, _versions, device_name, slug, time_ms


def build(tiny: bool):
    from seqkern.bench.upstream import espnet_class

    found = espnet_class("espnet2.asr.encoder.beats_encoder", "BeatsEncoder")  # (+ torchaudio)
    if found is None:
        raise SystemExit("ESPnet's BeatsEncoder cannot be imported: run tests/upstream/fetch.py")
    BeatsEncoder = found[0]  # noqa: N806 - upstream's class

    from seqkern.bench.workloads import BEATS_BASE

    cfg = dict(BEATS_BASE)
    if tiny:  # a 2-layer, 64-wide smoke test of the same structure
        cfg.update(
            encoder_layers=2,
            encoder_embed_dim=64,
            encoder_ffn_embed_dim=128,
            encoder_attention_heads=4,
            embed_dim=16,
            conv_pos=16,
            conv_pos_groups=4,
            max_distance=800,
        )
    torch.manual_seed(0)
    return BeatsEncoder(input_size=1, beats_config=cfg).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", help="autocast dtype on GPU")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 64 wide: a smoke test")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = 1.0 if args.tiny else args.seconds
    batch = 2 if args.tiny else args.batch
    enc = build(args.tiny).to(device)
    wav = torch.randn(batch, int(16000 * seconds), device=device)
    ilens = torch.full((batch,), wav.shape[1], device=device)
    ilens[-1] = int(wav.shape[1] * 0.8)  # ragged
    use_amp = device.type == "cuda" and args.dtype != "float32"
    amp_dtype = getattr(torch, args.dtype)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            return enc(wav, ilens)[0]

    def measure() -> tuple[float, float | None]:
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = time_ms(forward, device, quick=args.tiny)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        return ms, peak

    want = forward().float()
    up_ms, up_peak = measure()
    seqkern.swap(enc)
    got = forward().float()
    sk_ms, sk_peak = measure()
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    result = {
        "device": device_name(device),
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "BeatsEncoder tiny" if args.tiny else "BeatsEncoder 12x768, 12 heads",
        "audio_seconds": seconds,
        "batch": batch,
        "dtype": args.dtype if use_amp else "float32",
        "upstream_ms": up_ms,
        "seqkern_ms": sk_ms,
        "speedup": up_ms / sk_ms,
        "upstream_peak_mb": up_peak,
        "seqkern_peak_mb": sk_peak,
        "max_abs_diff": err,
        "max_abs_output": scale,
        "attention_backend": sorted(
            {
                seqkern.backends.select("relbias_attention", t, t, t, 0.0, False).backend
                for t in [torch.zeros(1, 1, 1, 16, device=device)]
            }
        ),
    }
    out_dir = Path(args.out) / slug(result["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("beats_encoder-tiny.json" if args.tiny else "beats_encoder.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
