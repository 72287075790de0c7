"""A training step of torchaudio's (Conv)Emformer, forward + backward, before and after swap.

    python benchmarks/emformer_train.py [--model emformer|conv] [--device cuda|cpu]
        [--dtype bf16|fp16|fp32] [--batch 32] [--seconds 10] [--rounds 5] [--steps 3]
        [--no-compile] [--no-compile-seqkern] [--compile-backend inductor] [--tiny] [--out DIR]
    python benchmarks/emformer_train.py --tiny --device cpu --no-compile   # seconds, any machine

(--input-dim, --heads, --ffn, --layers, --segment, --left-context, --right-context, --memory
and --kernel change the model; --tiny is input_dim 64, 4 heads, ffn 128, 2 layers, B = 3, 2 s.
On the CPU, inductor's first compilation of the two compile providers takes about a minute on
a small machine: --no-compile, or --compile-backend aot_eager to check the compile path only.)

The default is the Emformer issue's base configuration: input_dim 512, 8 heads, ffn 2048,
20 layers, segments of 16 frames, left context 32, right context 4, memory 4 (ConvEmformer:
the same and kernel_size 8), on B = 32 utterances of up to 10 s at 40 ms frames (250 frames;
as `Emformer.forward` expects, the input carries right_context_length more frames after them).
The lengths are ragged: a fixed-seed draw between 60% and 100% of the maximum, the first
utterance at the maximum; frames past an utterance's length (the appended right context of
the longest one too) are zero, as in a padded batch.

A step is the forward in train mode (dropout 0, so every provider computes the same function),
loss = sum(output.float() * g) for a fixed random g that is zero on the padded frames, and the
gradients of the input and of every parameter (torch.autograd.grad: no optimizer, no .grad
accumulation). Providers, all from the same weights, in --dtype (default bfloat16 on a GPU,
float32 on the CPU):

* upstream:        torchaudio 2.8.0's module, eager (from the pure-Python sources under
                   .upstream/, loaded as benchmarks/emformer_stream.py does);
* compile:         torch.compile(upstream) (--no-compile skips it; a failure is reported in the
                   JSON, not fatal);
* seqkern:         seqkern.swap(copy.deepcopy(upstream));
* seqkern_compile: torch.compile of the seqkern model (skipped with --no-compile or
                   --no-compile-seqkern; a failure is reported, not fatal).

Before timing, every provider's output, input gradient and parameter gradients are compared
with upstream eager's, per tensor: the max abs difference and the max relative error (that
over the upstream tensor's max magnitude), against a tolerance of 2e-2 in bfloat16, 1e-2 in
float16 and 1e-3 in float32. The oracle is upstream in float32 (float64 for a float32 run) on
the same rounded weights and input: a tensor beyond the tolerance still passes when its own
relative error against the oracle is within twice upstream's (or within the tolerance), since
low-precision rounding flips some ReLU gates and moves some gradients by more than the
tolerance in upstream itself. seqkern (or seqkern_compile) failing makes the run exit 1; the
compile provider's check is reported only.

Timing: the first step of a compile provider (its compilation) is reported apart; after two
warm-up steps per provider, --rounds interleaved rounds of --steps steps each, CUDA-synchronised
(perf_counter around the round). Reported: the median ms per step of each provider, frames per
second (valid frames / step time), the median over rounds of provider ms / seqkern ms, and on
CUDA the peak memory of one step over what was allocated before it. Writes
`<out>/<device-slug>/emformer_train-<model>[-tiny].json`.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import seqkern
from seqkern.bench import _commit, _peak_mem_mb, _versions, device_name, slug
from seqkern.bench.core import _raise_recompile_limit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emformer_stream  # noqa: E402

FRAME_MS = 40
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# max |got - want| / max |want| per tensor, against upstream eager in the same dtype
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3}
PROVIDERS = ("upstream", "compile", "seqkern", "seqkern_compile")
MUST_PASS = ("seqkern", "seqkern_compile")


def build(args, device: torch.device, dtype: torch.dtype):
    model, cfg = emformer_stream.build(args)  # the same construction as the streaming benchmark
    return model.to(device=device, dtype=dtype).train(), cfg


def batch(args, device: torch.device, dtype: torch.dtype):
    """x (B, T + R, D) zero past each length, lengths (B,), g (B, T, D) float32 zero past them."""
    B, D, R = args.batch, args.input_dim, args.right_context
    T = round(args.seconds * 1000 / FRAME_MS)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(math.ceil(0.6 * T), T + 1, (B,), generator=gen)
    lengths[0] = T
    x = torch.randn(B, T + R, D, generator=gen)
    x *= (torch.arange(T + R)[None, :] < lengths[:, None])[..., None]
    g = torch.randn(B, T, D, generator=gen)
    g *= (torch.arange(T)[None, :] < lengths[:, None])[..., None]
    return x.to(device, dtype), lengths.to(device), g.to(device), T


def make_step(model, x, lengths, g, params: list[torch.Tensor]):
    """One training step: (output, [grad x, *grad params])."""
    x = x.detach().requires_grad_()
    wrt = [x, *params]

    def step():
        y, _ = model(x, lengths)
        loss = (y.to(g.dtype) * g).sum()
        grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        return y.detach(), grads

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that over want's max magnitude)."""
    if not got.numel():
        return 0.0, 0.0
    diff = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    return diff, diff / scale if scale > 0 else diff


def check(got, want, oracle, names: list[str], tol: float) -> dict:
    """Per-tensor agreement of (output, grads) with upstream eager's and with the oracle's."""
    tensors = ["output", "grad_input", *(f"grad:{n}" for n in names)]
    flat = [[out, *grads] for out, grads in (got, want, oracle)]
    rows = {}
    for name, a, b, o in zip(tensors, *flat, strict=True):
        diff, rel = compare(a, b)
        err, up = compare(a, o)[1], compare(b, o)[1]
        ok = math.isfinite(rel) and (rel <= tol or err <= max(2 * up, tol))
        rows[name] = {
            "max_abs_diff": diff,
            "max_rel_err": rel,
            "rel_err_vs_oracle": err,
            "upstream_rel_err_vs_oracle": up,
            "ok": ok,
        }
    params = [k for k in rows if k.startswith("grad:")]
    worst = max(params, key=lambda k: rows[k]["max_rel_err"])
    worst_o = max(rows, key=lambda k: rows[k]["rel_err_vs_oracle"])
    failed = [k for k, v in rows.items() if not v["ok"]]
    return {
        "output": rows["output"],
        "grad_input": rows["grad_input"],
        "grad_params_worst": {"name": worst[5:], **rows[worst]},
        "worst_vs_oracle": {"name": worst_o, **rows[worst_o]},
        "failed": failed,
        "ok": not failed,
    }


def _dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters

        stats = {
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
        counters.clear()  # the next compile provider counts its own
        return stats
    except Exception:  # internal API: informative only
        return {}


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--model", choices=("emformer", "conv"), default="emformer")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="longest utterance (40 ms frames)")
    p.add_argument("--input-dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--left-context", type=int, default=32)
    p.add_argument("--right-context", type=int, default=4)
    p.add_argument("--memory", type=int, default=4)
    p.add_argument("--kernel", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 3)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile providers")
    p.add_argument(
        "--no-compile-seqkern", action="store_true", help="no torch.compile of the seqkern model"
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: a quick CPU smoke test of the compile path)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="64 wide, 4 heads, 2 layers, B=3, 2 s")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.input_dim, args.heads, args.ffn, args.layers = 64, 4, 128, 2
        args.batch, args.seconds = 3, 2.0
    rounds = args.rounds or (3 if args.tiny else 5)
    steps = args.steps or (2 if args.tiny else 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = TOLERANCE[dtype]

    upstream, cfg = build(args, device, dtype)
    ours = seqkern.swap(copy.deepcopy(upstream))
    names = [n for n, _ in upstream.named_parameters()]
    ours_names = [n for n, _ in ours.named_parameters()]
    if sorted(names) != sorted(ours_names):
        raise SystemExit(f"swap changed the parameter names: {set(names) ^ set(ours_names)}")
    up_params = dict(upstream.named_parameters())
    our_params = dict(ours.named_parameters())
    x, lengths, g, T = batch(args, device, dtype)
    valid_frames = int(lengths.sum())

    models = {"upstream": upstream, "seqkern": ours}
    errors: dict[str, str] = {}
    if not args.no_compile:
        _raise_recompile_limit()
        compile_kw = dict(dynamic=False, backend=args.compile_backend)
        models["compile"] = torch.compile(upstream, **compile_kw)
        if not args.no_compile_seqkern:
            models["seqkern_compile"] = torch.compile(ours, **compile_kw)
    providers = [p for p in PROVIDERS if p in models]
    steps_fn = {
        p: make_step(
            models[p],
            x,
            lengths,
            g,
            [(our_params if p.startswith("seqkern") else up_params)[n] for n in names],
        )
        for p in providers
    }

    # --- agreement, before any timing (also the compile providers' compilation) -------------
    odtype = torch.float64 if dtype == torch.float32 else torch.float32
    oname = str(odtype).replace("torch.", "")
    oracle_model = copy.deepcopy(upstream).to(odtype)
    o_params = dict(oracle_model.named_parameters())
    o_step = make_step(
        oracle_model, x.to(odtype), lengths, g.to(odtype), [o_params[n] for n in names]
    )
    oracle = o_step()
    del oracle_model, o_params, o_step
    results, compile_s, dynamo = {}, {}, {}
    for p in providers:
        t0 = time.perf_counter()
        try:
            results[p] = steps_fn[p]()
            _sync(device)
        except Exception as e:
            if p not in ("compile", "seqkern_compile"):
                raise
            errors[p] = _error(e)
            continue
        if p in ("compile", "seqkern_compile"):
            compile_s[p] = time.perf_counter() - t0
            dynamo[p] = _dynamo_stats()
    providers = [p for p in providers if p in results]
    want = results["upstream"]
    checks = {p: check(results[p], want, oracle, names, tol) for p in PROVIDERS if p in results}
    del results, want, oracle

    # --- timing ------------------------------------------------------------------------------
    for p in list(providers):
        try:
            for _ in range(2):
                steps_fn[p]()
            _sync(device)
        except Exception as e:  # a compile provider that breaks after its first step
            if p not in ("compile", "seqkern_compile"):
                raise
            errors[p] = _error(e)
            providers.remove(p)
    times: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_fn[p]()
            _sync(device)
            times[p].append((time.perf_counter() - t0) * 1e3 / steps)
    ms = {p: statistics.median(v) for p, v in times.items()}
    speedup = {
        p: statistics.median(a / s for a, s in zip(times[p], times["seqkern"]))
        for p in providers
        if p != "seqkern"
    }
    frames_per_s = {p: valid_frames / (v * 1e-3) for p, v in ms.items()}
    peak_mb = {}
    for p in providers:
        peak_mb[p] = _peak_mem_mb(steps_fn[p], device)

    name = device_name(device)
    dname = str(dtype).replace("torch.", "")
    result = {
        "device": name,
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "upstream": "torchaudio 2.8.0 " + ("ConvEmformer" if args.model == "conv" else "Emformer"),
        "config": cfg,
        "dtype": dname,
        "device_type": device.type,
        "batch": args.batch,
        "frames": T,  # longest utterance; the input has right_context_length more
        "frame_ms": FRAME_MS,
        "lengths": lengths.tolist(),
        "valid_frames": valid_frames,
        "step": "train-mode forward, sum(output.float() * g) over valid frames, "
        "torch.autograd.grad of the input and every parameter",
        "rounds": rounds,
        "steps_per_round": steps,
        "ms_per_step": ms,  # median over rounds
        "ms_per_step_rounds": times,
        "frames_per_s": frames_per_s,  # valid frames / median step time
        "speedup": speedup,  # median over rounds of provider ms / seqkern ms
        "peak_mem_mb": peak_mb,  # one step, over what was allocated before it (cuda only)
        "compile_backend": None if args.no_compile else args.compile_backend,
        "compile_s": compile_s,  # first step (compilation included) of each compile provider
        "dynamo": dynamo,
        "compile_errors": errors,
        "tolerance_rel": tol,
        "oracle_dtype": oname,
        "check": checks,
    }
    out = Path(args.out) / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"emformer_train-{args.model}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")

    print(
        f"{result['upstream']} {cfg}; B={args.batch}, T={T}+{args.right_context}, "
        f"{valid_frames} valid frames, {dname}, {name}"
    )
    print(f"{'provider':<16}{'ms/step':>10}{'frames/s':>12}{'peak MB':>10}{'/ seqkern':>11}")
    for p in providers:
        mem = "-" if peak_mb[p] is None else f"{peak_mb[p]:.0f}"
        ratio = f"{speedup[p]:.2f}x" if p in speedup else ""
        print(f"{p:<16}{ms[p]:>10.2f}{frames_per_s[p]:>12.0f}{mem:>10}{ratio:>11}")
    for p, c in checks.items():
        o = c["worst_vs_oracle"]
        line = f"check {p:<16} "
        if p != "upstream":
            w = c["grad_params_worst"]
            line += (
                f"vs upstream: output {c['output']['max_rel_err']:.1e}, "
                f"grad input {c['grad_input']['max_rel_err']:.1e}, "
                f"worst param grad {w['max_rel_err']:.1e} ({w['name']}); "
            )
        line += f"worst vs {oname} {o['rel_err_vs_oracle']:.1e} ({o['name'].removeprefix('grad:')})"
        print(line + ("" if c["ok"] else f"  NOT OK: {', '.join(c['failed'][:5])}"))
    if compile_s:
        times_s = ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items())
        print(f"compile ({args.compile_backend}), first step: {times_s}")
    for p, e in errors.items():
        print(f"{p} FAILED, left out: {e}")
    print(f"wrote {path}")
    ok = all(checks[p]["ok"] for p in MUST_PASS if p in checks)
    if not ok:
        print("FAILED: seqkern and upstream disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
