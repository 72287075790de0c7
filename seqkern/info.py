"""`seqkern info`: versions, what _C was built against, the GPU, and op x backend availability."""

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


def _c_line() -> str:
    if _ext.C is None:
        return f"not loaded: {_ext.C_ERROR}"
    b = _ext.C.build_info
    cuda = f"CUDA {b['cuda']} for archs {b['cuda_archs']}" if b["with_cuda"] else "no CUDA ops"
    why = (_ext.BUILD_INFO or {}).get("cuda_skipped_because")
    if not b["with_cuda"] and why:
        cuda += f" ({why})"
    return f"loaded, built against torch {b['torch']}, {cuda}"


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
        f"backend setting: {', '.join(backends.allowed_backends() or ('auto',))}"
        f"  (SEQKERN_BACKEND={os.environ.get('SEQKERN_BACKEND', '') or 'unset'}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '') or 'unset'})",
        "",
    ]
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
