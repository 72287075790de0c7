"""`seqkern info`: versions, what _C was built against, the GPU, the CPU's ISA and the CPU code
each op runs on it, and op x backend availability."""

from __future__ import annotations

import os
import platform

import torch

import seqkern
from seqkern import _ext, backends


def _triton_version() -> str:
    why = backends.unavailable_reason("triton")
    if why:
        return f"unavailable ({why})"
    import triton

    return triton.__version__


def _gpu() -> str:
    if not torch.cuda.is_available():
        return "none visible to torch"
    p = torch.cuda.get_device_properties(0)
    return (
        f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
        f"{p.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} device(s)"
    )


# The ISA features seqkern's CPU code (and ATen's, under it) dispatches on: (label, cpuinfo flag).
ISA_FEATURES = (
    ("AVX2", "avx2"),
    ("FMA", "fma"),
    ("AVX-512F", "avx512f"),
    ("AVX-512BW", "avx512bw"),
    ("AVX-512VL", "avx512vl"),
    ("AVX512-BF16", "avx512_bf16"),
    ("AVX512-FP16", "avx512_fp16"),
    ("AVX512-VNNI", "avx512_vnni"),
    ("AVX-VNNI", "avx_vnni"),
    ("AMX-BF16", "amx_bf16"),
    ("AMX-INT8", "amx_int8"),
)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool] | None:
    """{label: present} for ISA_FEATURES, from /proc/cpuinfo's flags; None where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {label: flag in flags for label, flag in ISA_FEATURES}
    except OSError:
        pass
    return None


def cpu_kernels() -> list[tuple[str, str]]:
    """(op, the CPU code it runs on this machine), for each op with C++ or ATen CPU code."""
    capability = torch.backends.cpu.get_cpu_capability()
    if _ext.C is None:
        native = f"not available ({_ext.C_ERROR}): the reference runs"
        return [(op, native) for op in ("adaln", "ema", "linear_rows", "ConvEmformer infer")]
    dispatch = _ext.C.cpu_dispatch()
    clone = dispatch["multiversion_clone"]
    gemm = "AVX-512 skinny GEMM" if dispatch["skinny_gemm"] == "avx512f" else "BLAS (no AVX-512F)"
    return [
        ("adaln", "C++ row loops, one build for every CPU (fp32 accumulation)"),
        ("ema, ema_step", "C++ scan loops, one build for every CPU (fp32 state)"),
        ("linear_rows", f"C++ loops, the {clone} clone"),
        ("ConvEmformer infer", f"C++ layer step: {clone} clone loops, Linears on the {gemm}"),
        (
            "attention",
            f"ATen's flash forward (ATen CPU capability {capability}); the backward is "
            "seqkern's softmax backward on ATen matmuls",
        ),
        ("chunk_attention", f"PyTorch ops (ATen CPU capability {capability})"),
    ]


def _c_line() -> str:
    if _ext.C is None:
        return f"not loaded: {_ext.C_ERROR}"
    b = _ext.C.build_info
    cuda = f"CUDA {b['cuda']} for archs {b['cuda_archs']}" if b["with_cuda"] else "no CUDA ops"
    why = (_ext.BUILD_INFO or {}).get("cuda_skipped_because")
    if not b["with_cuda"] and why:
        cuda += f" ({why})"
    return f"loaded, built against torch {b['torch']}, {cuda}"


def _isa_line() -> str:
    features = cpu_features()
    if features is None:
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(f"{label} {'yes' if on else 'no'}" for label, on in features.items())


def availability(op: str) -> dict[str, str | None]:
    """For each backend: None if it can run `op` in this process, else why not.

    Input-independent; per-input reasons (dtype, size) come from BackendError at call time.
    """
    out: dict[str, str | None] = {}
    kernels = backends.kernels(op)
    for name in backends.BACKENDS:
        if name not in kernels:
            out[name] = f"no {name} kernel for {op} yet"
            continue
        why = backends.unavailable_reason(name)
        if why is None and name == "triton" and not torch.cuda.is_available():
            if backends.triton_interpret():
                why = None  # CPU tensors through the interpreter
            else:
                why = "no CUDA device (CPU tensors need TRITON_INTERPRET=1)"
        out[name] = why
    return out


def report() -> str:
    lines = [
        f"seqkern {seqkern.__version__}",
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}), triton {_triton_version()}",
        f"seqkern._C: {_c_line()}",
        f"GPU: {_gpu()}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}",
        f"CPU ISA: {_isa_line()}",
        f"backend setting: {', '.join(backends.allowed_backends() or ('auto',))}"
        f"  (SEQKERN_BACKEND={os.environ.get('SEQKERN_BACKEND', '') or 'unset'}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '') or 'unset'})",
        "TorchScript: Emformer and ConvEmformer script (alone and inside torchaudio models); a "
        "scripted module runs the reference path (upstream's arithmetic, no seqkern kernels)",
        "",
    ]
    lines += ["CPU code per op on this machine:"]
    kernels_here = cpu_kernels()
    w = max(len(op) for op, _ in kernels_here)
    lines += [f"  {op.ljust(w)}  {what}" for op, what in kernels_here] + [""]
    ops = backends.registered_ops()
    width = max([len("op")] + [len(o) for o in ops])
    header = "op".ljust(width) + "  " + "  ".join(b.ljust(9) for b in backends.BACKENDS)
    lines += [header, "-" * len(header)]
    notes: list[str] = []
    any_missing = False
    for op in ops:
        cells = []
        kernels = backends.kernels(op)
        for name, why in availability(op).items():
            if why is None:
                cells.append("yes".ljust(9))
            elif name not in kernels:
                any_missing = True
                cells.append("-".ljust(9))
            else:
                notes.append(f"  {op} / {name}: {why}")
                cells.append(f"no [{len(notes)}]".ljust(9))
        lines.append((op.ljust(width) + "  " + "  ".join(cells)).rstrip())
    if any_missing:
        lines += ["", "-: no kernel for this op on this backend yet (the reference runs it)"]
    if notes:
        lines += ["", "why not:"] + [f"  [{i}]{n[1:]}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(report())
    return 0
