"""Loads the compiled extension seqkern._C, and says why when it cannot.

`import seqkern` must never fail: a missing or broken _C only removes the `cpu` and `cuda`
backends, and `seqkern info` shows the reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

C: ModuleType | None = None
C_ERROR: str | None = None


def _build_info() -> dict | None:
    try:
        from seqkern import _build_info as info
    except ImportError:
        return None
    return {
        "torch": info.TORCH_VERSION,
        "cuda": info.CUDA_VERSION,
        "cuda_archs": info.CUDA_ARCHS,
        "with_cuda": info.WITH_CUDA,
        "cuda_skipped_because": info.CUDA_SKIPPED_BECAUSE,
    }


BUILD_INFO: dict | None = _build_info()


def _explain(err: BaseException) -> str:
    msg = f"{type(err).__name__}: {err}"
    if isinstance(err, ModuleNotFoundError) and err.name == "seqkern._C":
        return (
            "seqkern._C is not built (a pure-Python install); build it with "
            "`pip install --no-build-isolation -e .` where torch is installed"
        )
    built_for = (BUILD_INFO or {}).get("torch")
    if built_for and built_for != torch.__version__:
        return (
            f"seqkern._C was built for torch {built_for} but this is torch {torch.__version__}; "
            f"rebuild with `pip install --no-build-isolation -e .` ({msg})"
        )
    return f"seqkern._C failed to load ({msg})"


def _load() -> None:
    global C, C_ERROR
    try:
        C = importlib.import_module("seqkern._C")
    except Exception as err:  # noqa: BLE001 - ImportError, OSError (undefined symbol), ...
        C, C_ERROR = None, _explain(err)


_load()


def c_has(name: str) -> bool:
    """Whether the loaded _C exports `name` (CUDA entry points exist only in CUDA builds)."""
    return C is not None and hasattr(C, name)
