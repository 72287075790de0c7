"""Which backend runs each op, and why the others did not.

Backends, in the order auto mode tries them:

    cuda       seqkern._C CUDA kernels (CUDA tensors)
    triton     Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
    cpu        seqkern._C C++ kernels (CPU tensors)
    reference  plain PyTorch: the oracle every other backend is tested against

`use_backend("triton", "cpu")` (or SEQKERN_BACKEND=triton,cpu) names the allowed backends in
order of preference: each op runs the first one that supports its inputs and raises BackendError,
naming every reason, when none does. That is how a test proves that no reference fallback
happened. With no setting (or "auto"), every backend is allowed, except that auto mode never
sends CPU tensors to the Triton interpreter (a testing device, far slower than `cpu`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from seqkern import _ext

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "SEQKERN_BACKEND"

_allowed: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "seqkern_allowed_backends", default=None
)


class BackendError(RuntimeError):
    """No allowed backend can run an op on the given inputs."""


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op.

    `supports(*args)` returns None when this backend can run these inputs, else the reason it
    cannot; it must not synchronise with the device. `fwd` and `bwd` are the op's stages. An op
    whose only backend so far is the reference registers `bwd=None`: its `fwd` is plain,
    differentiable PyTorch, and autograd differentiates through it.
    """

    op: str
    backend: str
    fwd: Callable
    bwd: Callable | None
    supports: Callable[..., str | None]


_REGISTRY: dict[str, dict[str, Kernel]] = {}


def register(kernel: Kernel) -> Kernel:
    if kernel.backend not in BACKENDS:
        raise ValueError(f"unknown backend {kernel.backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(kernel.op, {})[kernel.backend] = kernel
    return kernel


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def kernels(op: str) -> dict[str, Kernel]:
    return dict(_REGISTRY[op])


def _parse(names: tuple[str, ...] | list[str], source: str) -> tuple[str, ...] | None:
    names = tuple(n.strip().lower() for n in names if n.strip())
    if not names or names == ("auto",):
        return None
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ValueError(f"{source}: unknown backend(s) {bad}; expected names from {BACKENDS}")
    return names


def allowed_backends() -> tuple[str, ...] | None:
    """The backends allowed now, in order of preference; None means auto."""
    ctx = _allowed.get()
    if ctx is not None:
        return ctx if ctx != ("auto",) else None
    env = os.environ.get(ENV_VAR, "")
    return _parse(env.split(","), ENV_VAR) if env.strip() else None


@contextlib.contextmanager
def use_backend(*names: str) -> Iterator[None]:
    """Allow only `names` (in order of preference) inside the block; no names means auto.

    >>> with seqkern.use_backend("triton", "cpu"):
    ...     y = seqkern.adaln(x, gamma, beta)  # raises BackendError rather than fall back
    """
    parsed = _parse(list(names), "use_backend")
    token = _allowed.set(parsed if parsed is not None else ("auto",))
    try:
        yield
    finally:
        _allowed.reset(token)


@functools.cache
def _triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"triton is not importable ({type(err).__name__}: {err})"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run anything in this process (None when it can); fixed per process."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return _ext.C_ERROR if _ext.C is None else None
    if backend == "cuda":
        if _ext.C is None:
            return _ext.C_ERROR
        if not _ext.C.build_info.get("with_cuda", False):
            why = (_ext.BUILD_INFO or {}).get("cuda_skipped_because") or "CPU-only build"
            return f"seqkern._C was built without CUDA ({why})"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    if backend == "triton":
        return _triton_unavailable()
    raise ValueError(f"unknown backend {backend!r}")


def _device_of(args: tuple) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _why_not(op: str, name: str, args: tuple, explicit: bool) -> str | None:
    kernel = _REGISTRY.get(op, {}).get(name)
    if kernel is None:
        return f"no {name} kernel for {op}"
    why = unavailable_reason(name) or kernel.supports(*args)
    if why is None and name == "triton" and not explicit:
        dev = _device_of(args)
        if dev is not None and dev.type == "cpu":
            why = "auto mode keeps CPU tensors off the Triton interpreter; use_backend('triton')"
    return why


def reasons(op: str, *args, explicit: bool = True) -> dict[str, str | None]:
    """For each backend, None if it would run `op` on `args`, else why not."""
    return {name: _why_not(op, name, args, explicit) for name in BACKENDS}


def always_supported(*args) -> str | None:
    """`supports` for the reference backend, which runs anything."""
    return None


def register_reference(op: str, fn: Callable) -> Kernel:
    """Register `fn` (a plain-PyTorch, differentiable `<op>_ref`) as `op`'s reference backend."""
    return register(Kernel(op, "reference", fn, None, always_supported))


def select(op: str, *args) -> Kernel:
    """The kernel that runs `op` on `args` under the current backend setting."""
    order = allowed_backends()
    explicit = order is not None
    for name in order or BACKENDS:
        if _why_not(op, name, args, explicit) is None:
            return _REGISTRY[op][name]
    why = reasons(op, *args, explicit=explicit)
    detail = "; ".join(f"{n}: {why[n]}" for n in order or BACKENDS)
    allowed = ", ".join(order) if explicit else "auto"
    raise BackendError(
        f"seqkern.{op}: no allowed backend can run these inputs (allowed: {allowed}). {detail}"
    )
