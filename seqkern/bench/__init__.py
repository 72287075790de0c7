"""`seqkern bench`: time every op on every available backend against upstream and its peers.

For each registered op, at speech-sized shapes on the best device present, every available
seqkern backend and every baseline (the upstream-equivalent eager code, torch.compile of the
reference, and SDPA / FlexAttention for attention ops) is timed, checked against the float64
oracle, and reported with counted bytes and FLOPs, peak memory and the ratio to each baseline
measured in the same run. Results go to `<out>/<device-slug>/<run-name>.json` plus one PNG
plot per op.

GB/s and TFLOP/s use the op's *minimal* traffic and arithmetic (what an ideal fused kernel
must move and compute), the same count for every provider: they are effective rates, directly
comparable across providers and with the device's peak.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import seqkern
from seqkern import _ext, backends
from seqkern.bench import adaln as _adaln_spec
from seqkern.bench import emformer as _emformer_spec
from seqkern.bench import emformer_conv as _emformer_conv_spec
from seqkern.bench import mega as _mega_spec
from seqkern.bench import relbias as _relbias_spec
from seqkern.bench import valle as _valle_spec
from seqkern.bench import workloads as _workloads
from seqkern.bench.core import BASELINES, DIRECTIONS, Case, OpBench, Provider
from seqkern.testing import max_abs_error

SPECS: dict[str, OpBench] = {
    s.op: s
    for s in (
        _adaln_spec.SPEC,
        _relbias_spec.SPEC,
        _mega_spec.EMA,
        _mega_spec.CHUNK,
        _valle_spec.ATTENTION,
        _valle_spec.VALLE_BLOCK,
        _emformer_spec.SPEC,
        _emformer_conv_spec.SPEC,
    )
}

# --------------------------------------------------------------------------------------------
# Harness


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn() (already warmed up): one round of `time_round`."""
    return time_round(fn, device, quick)[0]


def time_round(
    fn: Callable[[], object],
    device: torch.device,
    quick: bool,
    share: float = 1.0,
    budget_s: float | None = None,
    min_calls: int = 5,
) -> tuple[float, int]:
    """(median milliseconds, iterations) of fn() (already warmed up), timed for `share` of the
    per-measurement budget (or for `budget_s` seconds): CUDA events through triton's do_bench
    on a GPU, perf_counter on a CPU (at least `min_calls` calls)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            warmup, rep = (25, 50) if quick else (100, 300)
            ms = do_bench(fn, warmup=warmup * share, rep=rep * share, return_mode="median")
            return float(ms), max(1, int(rep * share / max(float(ms), 1e-6)))
        except ImportError:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(max(5, int((20 if quick else 100) * share))):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2], len(times)
    budget = budget_s if budget_s is not None else (0.05 if quick else 0.5) * share
    times: list[float] = []
    t_end = time.perf_counter() + budget
    while len(times) < min_calls or (time.perf_counter() < t_end and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times), len(times)


def time_rounds(
    fns: list[Callable[[], object]],
    device: torch.device,
    quick: bool,
    kernel_backends: list[str | None] | None = None,
    rounds: int | None = None,
    round_s: float | None = None,
    min_calls: int = 5,
) -> list[tuple[list[float], int]]:
    """Each fn timed side by side in interleaved rounds: a round times every fn once in turn
    (the order reversed every other round), so the drift and bursts of a shared machine fall on
    all of them alike; fn i runs under use_backend(kernel_backends[i]) where that is given.
    -> per fn, (its per-round median ms, its total iterations). Ratios are then taken round by
    round (`_add_ratios`). `rounds`, `round_s` (seconds per fn per round) and `min_calls`
    override the op benchmark's defaults."""
    rounds = rounds or (ROUNDS_QUICK if quick else ROUNDS_FULL)
    names = kernel_backends or [None] * len(fns)
    per_round: list[list[float]] = [[] for _ in fns]
    iters = [0] * len(fns)
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            ctx = backends.use_backend(names[i]) if names[i] else _nullcontext()
            with ctx:
                ms, n = time_round(
                    fns[i], device, quick, 2.0 / rounds, budget_s=round_s, min_calls=min_calls
                )
            per_round[i].append(ms)
            iters[i] += n
    return list(zip(per_round, iters, strict=True))


ROUNDS_QUICK, ROUNDS_FULL = 3, 7


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _seqkern_providers(spec: OpBench, device: torch.device) -> list[Provider]:
    out = []
    if spec.op not in backends.registered_ops():
        return out  # a module benchmark (valle_block): its spec supplies its seqkern row
    for name in backends.BACKENDS:
        if name == "reference" or name not in backends.kernels(spec.op):
            continue  # the reference is the "upstream" baseline's arithmetic
        if backends.unavailable_reason(name) is not None:
            continue
        if name in ("triton", "cuda") and device.type != "cuda":
            continue  # (the Triton interpreter is a testing device, not a performance one)
        if name == "cpu" and device.type != "cpu":
            continue
        out.append(Provider("seqkern", spec.public, backend=name))
    return out


def no_seqkern_row_reason(spec: OpBench, device: torch.device) -> str | None:
    """Why `spec` gets no seqkern row on `device` (None when it gets one): the kernels the op
    has and why none of them is timed here."""
    if spec.op not in backends.registered_ops() or _seqkern_providers(spec, device):
        return None
    why = []
    for name in backends.kernels(spec.op):
        if name == "reference":
            continue
        reason = backends.unavailable_reason(name)
        if reason is None and name in ("triton", "cuda") and device.type != "cuda":
            reason = "needs a GPU (the Triton interpreter is for tests, not timing)"
        why.append(f"{name}: {reason or 'not for this device'}")
    kernels = "; ".join(why) or "only the reference (the upstream row) exists"
    return f"{spec.op} has no seqkern kernel for {device.type} ({kernels})"


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.bar = total, 0, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="seqkern bench", unit="run", file=sys.stderr)
            except ImportError:
                pass
        self.enabled = enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])
            self.bar.update(1)
        elif self.enabled:
            print(f"\r[{self.done}/{self.total}] {what[:70]:<70}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _run_provider(
    prov: Provider,
    spec: OpBench,
    case: Case,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    inputs: list[Tensor],
    dy: Tensor,
    oracle_y: Tensor,
    oracle_grads: tuple[Tensor, ...],
    ref_error: dict,
) -> list[dict]:
    rows = []
    ctx = backends.use_backend(prov.backend) if prov.backend else _nullcontext()
    with ctx:
        for direction in DIRECTIONS:
            row = dict(
                op=spec.op,
                case=case.name,
                dtype=str(dtype).replace("torch.", ""),
                direction=direction,
                provider=prov.provider,
                backend=prov.backend,
                ms=None,
                tflops=None,
                gbps=None,
                peak_mem_mb=None,
                max_err=None,
            )
            try:
                if direction == "fwd":

                    def fn():
                        with torch.no_grad():
                            return prov.fn(*inputs)

                    out = fn()
                    row["max_err"] = max_abs_error(out, oracle_y) if prov.exact else None
                else:
                    y = prov.fn(*inputs)
                    diff = [t for t in inputs if t.requires_grad]

                    def fn(y=y, diff=diff):
                        return torch.autograd.grad(
                            y, diff, dy, retain_graph=True, allow_unused=True
                        )

                    grads = fn()
                    if prov.exact:
                        row["max_err"] = max(
                            max_abs_error(g, o)
                            for g, o in zip(grads, oracle_grads)
                            if g is not None
                        )
                _sync(device)
                row["peak_mem_mb"] = _peak_mem_mb(fn, device)
                row["ref_err_same_dtype"] = ref_error[direction]
                row["_fn"] = fn  # timed by run(), side by side with the other providers
            except Exception as err:  # noqa: BLE001 - report, keep benchmarking the rest
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
    return rows


def _time_side_by_side(rows: list[dict], spec: OpBench, case: Case, dtype, device, quick):
    """Time the checked rows of one (case, dtype), each direction's providers interleaved, and
    fill ms (the median of the per-round medians), the rounds, iterations and rates."""
    for direction in DIRECTIONS:
        todo = [r for r in rows if r["direction"] == direction and "_fn" in r]
        timed = time_rounds([r["_fn"] for r in todo], device, quick, [r["backend"] for r in todo])
        for r, (per_round, iters) in zip(todo, timed, strict=True):
            r["round_ms"], r["iters"] = per_round, iters
            r["ms"] = _median(per_round)
            r["gbps"] = spec.bytes(case, dtype, direction) / (r["ms"] * 1e-3) / 1e9
            r["tflops"] = spec.flops(case, direction) / (r["ms"] * 1e-3) / 1e12
    for r in rows:
        r.pop("_fn", None)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _add_ratios(rows: list[dict]) -> None:
    """ratio_vs[b] = the median over rounds of ms(b) / ms(seqkern row) within each round, for
    each baseline b timed side by side with it; ratio_range[b] = (min, max) over the rounds."""
    key = lambda r: (r["op"], r["case"], r["dtype"], r["direction"])  # noqa: E731
    base = {}
    for r in rows:
        if r["provider"] in BASELINES and r["ms"]:
            base.setdefault(key(r), {})[r["provider"]] = r["round_ms"]
    for r in rows:
        if r["provider"] == "seqkern" and r["ms"]:
            per_round = {
                b: [t / s for t, s in zip(ts, r["round_ms"], strict=True)]
                for b, ts in base.get(key(r), {}).items()
            }
            r["ratio_vs"] = {b: _median(x) for b, x in per_round.items()}
            r["ratio_range"] = {b: (min(x), max(x)) for b, x in per_round.items()}


def run(
    ops: list[str],
    device: torch.device,
    quick: bool,
    dtypes: list[torch.dtype],
    progress: bool = True,
    explicit_dtypes: bool = False,
) -> list[dict]:
    plan = []
    for op in ops:
        spec = SPECS[op]
        provs = _seqkern_providers(spec, device) + spec.baselines(device, quick)
        op_dtypes = dtypes
        if spec.gpu_dtypes is not None and device.type == "cuda" and not explicit_dtypes:
            op_dtypes = list(spec.gpu_dtypes)
        for case in spec.cases(quick, device):
            for dtype in op_dtypes:
                plan.append((spec, case, dtype, provs))
    bar = _Progress(sum(len(p[3]) + 1 for p in plan), progress)
    rows: list[dict] = []
    for spec, case, dtype, provs in plan:
        inputs, dy = spec.make_inputs(case, dtype, device)  # float inputs require grad
        inputs64 = [
            t.detach().to(spec.oracle_dtype).requires_grad_() if t.requires_grad else t
            for t in inputs
        ]
        oracle_y = spec.oracle(*inputs64)
        oracle_grads = torch.autograd.grad(
            oracle_y, [t for t in inputs64 if t.requires_grad], dy.to(spec.oracle_dtype)
        )
        # The reference's own error in this dtype: the yardstick the tests use.
        y_dt = spec.oracle(*inputs)
        ref_grads = torch.autograd.grad(y_dt, [t for t in inputs if t.requires_grad], dy)
        ref_error = {
            "fwd": max_abs_error(y_dt, oracle_y),
            "bwd": max(max_abs_error(g, o) for g, o in zip(ref_grads, oracle_grads)),
        }
        del ref_grads
        del y_dt
        case_rows: list[dict] = []
        for prov in provs:
            case_rows += _run_provider(
                prov,
                spec,
                case,
                dtype,
                device,
                quick,
                inputs,
                dy,
                oracle_y,
                oracle_grads,
                ref_error,
            )
            bar.step(f"{spec.op} {case.name} {str(dtype)[6:]} {prov.label} (checked)")
        _time_side_by_side(case_rows, spec, case, dtype, device, quick)
        bar.step(f"{spec.op} {case.name} {str(dtype)[6:]} timed")
        rows += case_rows
        del inputs, inputs64, oracle_y, oracle_grads
    bar.close()
    _add_ratios(rows)
    return rows


# --------------------------------------------------------------------------------------------
# Output


def device_name(device: torch.device) -> str:
    """The GPU's name, or "CPU <model>" with the model's marketing marks dropped."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from seqkern.info import cpu_model

    return f"CPU {clean_cpu_model(cpu_model())}"


def clean_cpu_model(name: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz' -> 'Intel Xeon Platinum 8480+',
    'Intel(R) Xeon(R) Processor' -> 'Intel Xeon', 'AMD EPYC 9354 32-Core Processor' ->
    'AMD EPYC 9354': the result folders read as the machine, on either vendor."""
    name = re.sub(r"\((R|TM|tm|r)\)", " ", name)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b(\d+-Core\s+)?Processor\b", " ", name)
    name = re.sub(r"\bCPU\b", " ", name)
    return " ".join(name.split()) or "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio_cell(row: dict, baseline: str) -> str:
    """'2.41x (2.30-2.52)': the median ratio over the rounds and its min-max."""
    ratio = row.get("ratio_vs", {}).get(baseline)
    if ratio is None:
        return "-"
    lo, hi = row.get("ratio_range", {}).get(baseline, (ratio, ratio))
    return f"{ratio:.2f}x ({lo:.2f}-{hi:.2f})"


def _grid(head: list[str], body: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, under a rule."""
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    return lines + ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]


def _label(row: dict) -> str:
    return f"seqkern[{row['backend']}]" if row.get("backend") else row["provider"]


def table(rows: list[dict]) -> str:
    """Every row (timing, rates, errors), then the headline: each seqkern row against every
    baseline timed beside it, median ratio and its min-max over the rounds. A column with no
    value in any row (peak MB on a CPU: torch keeps no CPU allocator statistics) is left out
    and named below."""
    cols = [
        ("op", lambda r: r["op"]),
        ("case", lambda r: r["case"]),
        ("dtype", lambda r: r["dtype"]),
        ("dir", lambda r: r["direction"]),
        ("provider", _label),
        ("ms", lambda r: "ERROR" if r.get("error") else _fmt(r["ms"], ".4f")),
        ("GB/s", lambda r: _fmt(r["gbps"], ".1f")),
        ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3f")),
        ("peak MB", lambda r: _fmt(r["peak_mem_mb"], ".1f")),
        ("max err", lambda r: _fmt(r["max_err"], ".1e")),
        ("ref err", lambda r: _fmt(r.get("ref_err_same_dtype"), ".1e")),
    ]
    keys = {"peak MB": "peak_mem_mb"}
    empty = [h for h, _ in cols if h in keys and all(r.get(keys[h]) is None for r in rows)]
    cols = [(h, f) for h, f in cols if h not in empty]
    lines = _grid([h for h, _ in cols], [[f(r) for _, f in cols] for r in rows])
    if empty:
        lines.append(f"(not measured on this device: {', '.join(empty)})")
    present = [b for b in BASELINES if any(r["provider"] == b for r in rows)]
    seq = [r for r in rows if r["provider"] == "seqkern" and r.get("ms")]
    if present and seq:
        lines += ["", "headline: baseline ms / seqkern ms, median over the rounds (min-max)", ""]
        head = ["op", "case", "dtype", "dir", "seqkern", "ms"] + [f"vs {b}" for b in present]
        body = [
            [r["op"], r["case"], r["dtype"], r["direction"], _label(r), _fmt(r["ms"], ".4f")]
            + [_ratio_cell(r, b) for b in present]
            for r in seq
        ]
        lines += _grid(head, body)
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines.append("")
        lines += [
            f"ERROR {r['op']} {r['case']} {r['dtype']} {r['direction']} {r['provider']}: "
            f"{r['error']}"
            for r in errors
        ]
    return "\n".join(lines)


# One colour per provider in every plot: seqkern's backends in blues and greens, the baselines
# in greys and warm colours (matplotlib's tab10 entries)
COLORS = {
    "seqkern[cuda]": "#1f77b4",
    "seqkern[triton]": "#2ca02c",
    "seqkern[cpu]": "#17becf",
    "seqkern": "#1f77b4",
    "upstream": "#7f7f7f",
    "compile": "#ff7f0e",
    "sdpa": "#9467bd",
    "flex": "#d62728",
    "sdpa_nobias": "#8c564b",
    "parts": "#e377c2",
    "ort": "#bcbd22",
    "ort-nospin": "#dbdb8d",
}


def plot(rows: list[dict], op: str, path: Path, title: str, note: str | None = None) -> bool:
    """Effective GB/s per provider, one panel per direction, one colour per provider (COLORS)
    in every plot; `note` (e.g. why there is no seqkern bar) is printed under the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("seqkern bench: matplotlib is not installed; no plot written", file=sys.stderr)
        return False
    op_rows = [r for r in rows if r["op"] == op and r["gbps"]]
    if not op_rows:
        return False
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(6 * len(DIRECTIONS), 4.5), squeeze=False)
    labels = sorted({_label(r) for r in op_rows}, key=lambda s: (not s.startswith("seqkern"), s))
    for ax, direction in zip(axes[0], DIRECTIONS, strict=True):
        drows = [r for r in op_rows if r["direction"] == direction]
        groups = sorted({(r["case"], r["dtype"]) for r in drows})
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            vals = []
            for case, dtype in groups:
                match = [
                    r["gbps"]
                    for r in drows
                    if (r["case"], r["dtype"]) == (case, dtype) and _label(r) == label
                ]
                vals.append(match[0] if match else 0.0)
            ax.bar(
                [g + i * width for g in range(len(groups))],
                vals,
                width,
                label=label,
                color=COLORS.get(label, "#bcbd22"),
            )
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{d}" for c, d in groups], fontsize=7)
        ax.set_ylabel("effective GB/s (higher is better)")
        ax.set_title(f"{op} {direction}")
        ax.legend(fontsize=7)
    fig.suptitle(title if note is None else f"{title}\n{note}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "seqkern": seqkern.__version__,
        "cpu": _cpu_record(),
    }


def _cpu_record() -> dict:
    """The CPU the numbers came from: its model, ISA features and the code seqkern picked."""
    from seqkern.info import cpu_features, cpu_model

    record = {"model": cpu_model(), "isa": cpu_features()}
    if _ext.C is not None:
        record["dispatch"] = dict(_ext.C.cpu_dispatch())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqkern bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, seconds (the default on a machine without a GPU)",
    )
    parser.add_argument("--full", action="store_true", help="speech-sized shapes even on CPU")
    parser.add_argument(
        "--ops", nargs="*", default=None, help=f"ops to run (default: all of {', '.join(SPECS)})"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the best present)")
    parser.add_argument(
        "--dtypes", nargs="*", default=None, help="default: bfloat16 float32 on GPU, float32 on CPU"
    )
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument(
        "--run-name", default=None, help="file stem (default: quick-<UTC time> or full-<UTC time>)"
    )
    parser.add_argument(
        "--workloads",
        nargs="*",
        default=None,
        help="CPU model workloads to run (the default on a machine without a GPU, unless --quick, "
        f"--full or --ops is given; default: all of {', '.join(_workloads.BY_NAME)})",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=165.0,
        help="seconds for the workload run (165: with start-up, 3 minutes): peers whose setup no "
        "longer fits are left out and named (0: no limit)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch (and ORT) threads")
    parser.add_argument(
        "--markdown", metavar="JSON", default=None, help="print a workload run's JSON as Markdown"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.markdown:
        print(_workloads.markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    op_mode = args.quick or args.full or args.ops is not None
    if args.workloads is not None or (device.type == "cpu" and not op_mode):
        if device.type != "cpu":
            parser.error("the model workloads are CPU benchmarks (--device cpu)")
        return _workloads_main(args)
    quick = args.quick or (device.type == "cpu" and not args.full)
    ops = args.ops or list(SPECS)
    unknown = [o for o in ops if o not in SPECS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {list(SPECS)}")
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes]
    else:
        dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    # a rerun never overwrites an earlier one: the default name carries the UTC time
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_name = args.run_name or f"{'quick' if quick else 'full'}-{stamp}"

    dev_name = device_name(device)
    print(
        f"seqkern bench: {dev_name}, {torch.get_num_threads()} threads, "
        f"{'quick' if quick else 'full'} shapes, ops: {', '.join(ops)}",
        file=sys.stderr,
    )
    unbenched = [op for op in backends.registered_ops() if op not in SPECS]
    if unbenched and args.ops is None:
        print(
            f"seqkern bench: no benchmark yet for the reference-only ops {', '.join(unbenched)}",
            file=sys.stderr,
        )
    if quick and device.type == "cpu":
        print(
            "seqkern bench: torch.compile baseline skipped in --quick on CPU (inductor's C++ "
            "build takes longer than the run); use --full",
            file=sys.stderr,
        )
    for op in ops:
        reason = no_seqkern_row_reason(SPECS[op], device)
        if reason:
            print(f"seqkern bench: no seqkern row: {reason}", file=sys.stderr)
    rows = run(
        ops, device, quick, dtypes, progress=not args.no_progress, explicit_dtypes=bool(args.dtypes)
    )

    result = {
        "device": dev_name,
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "threads": torch.get_num_threads(),
        "rounds": ROUNDS_QUICK if quick else ROUNDS_FULL,
        "timing": "interleaved rounds: every provider of a (case, dtype, direction) once per "
        "round, order reversed every other round; ms = median of the per-round medians, "
        "ratio_vs = median of the per-round ratios, ratio_range = their min and max",
        "rows": rows,
    }
    out_dir = Path(args.out) / slug(dev_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{run_name}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"\nwrote {json_path}")
    for op in ops:
        png = out_dir / f"{run_name}-{op}.png"
        title = f"{op} on {dev_name} | torch {torch.__version__} | seqkern {result['commit']}"
        if plot(rows, op, png, title, note=no_seqkern_row_reason(SPECS[op], device)):
            print(f"wrote {png}")
    return 1 if any(r.get("error") for r in rows) else 0


def _workloads_main(args) -> int:
    """The default CPU run: the model workloads (seqkern.bench.workloads) against upstream,
    torch.compile and ONNX Runtime, the headline table, JSON and a plot of the ratios."""
    names = args.workloads or list(_workloads.BY_NAME)
    unknown = [n for n in names if n not in _workloads.BY_NAME]
    if unknown:
        raise SystemExit(
            f"seqkern bench: unknown workload(s) {unknown}; known: {list(_workloads.BY_NAME)}"
        )
    device = torch.device("cpu")
    dev_name = device_name(device)
    budget = args.budget or None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_name = args.run_name or f"cpu-{stamp}"
    print(
        f"seqkern bench: {dev_name}, {torch.get_num_threads()} threads, model workloads "
        f"({len(names)}), budget {f'{budget:.0f} s' if budget else 'none'}; "
        "--quick for the op microbenchmarks",
        file=sys.stderr,
    )
    start = time.perf_counter()
    rows = _workloads.run(names, budget, progress=not args.no_progress)
    wall = time.perf_counter() - start
    result = {
        "device": dev_name,
        **_versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": "workloads",
        "threads": torch.get_num_threads(),
        "rounds": _workloads.ROUNDS,
        "budget_s": budget,
        "wall_s": wall,
        "timing": "interleaved rounds: every provider of a workload once per round (at least one "
        f"call, {_workloads.ROUND_S} s), order reversed every other round; ms = median of the "
        "per-round medians, ratio_vs = median of the per-round ratios peer / seqkern, "
        "ratio_range = their min and max",
        "rows": rows,
    }
    out_dir = Path(args.out) / slug(dev_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{run_name}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(_workloads.table(rows))
    print(f"\n{wall:.0f} s; wrote {json_path}")
    png = out_dir / f"{run_name}.png"
    title = (
        f"seqkern vs peers on {dev_name}, {torch.get_num_threads()} threads, fp32 | "
        f"torch {torch.__version__} | seqkern {result['commit']}"
    )
    if _workloads.plot(rows, png, title):
        print(f"wrote {png}")
    return 1 if any(r.get("error") for r in rows) else 0
