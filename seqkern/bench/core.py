"""The types every benchmark spec is written in: a case, a provider, an op's spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

DIRECTIONS = ("fwd", "bwd")
BASELINES = ("upstream", "compile", "sdpa", "flex", "sdpa_nobias", "parts")


@dataclass
class Case:
    name: str
    params: dict


@dataclass
class Provider:
    """A way to compute the op: `fn(*inputs) -> output`, with an optional backend setting."""

    provider: str  # seqkern | upstream | compile | sdpa | flex | sdpa_nobias | parts
    fn: Callable[..., Tensor]
    backend: str | None = None  # the seqkern backend, for provider == "seqkern"
    exact: bool = True  # False: a reference point computing a different function (no max_err)

    @property
    def label(self) -> str:
        return f"seqkern[{self.backend}]" if self.backend else self.provider


@dataclass
class OpBench:
    """What `seqkern bench` needs to know about one op."""

    op: str
    cases: Callable[[bool, torch.device], list[Case]]
    make_inputs: Callable[[Case, torch.dtype, torch.device], tuple[list[Tensor], Tensor]]
    oracle: Callable[..., Tensor]  # the reference, run on float64 copies of the inputs
    public: Callable[..., Tensor]  # the seqkern public function
    baselines: Callable[[torch.device, bool], list[Provider]]
    bytes: Callable[[Case, torch.dtype, str], int]
    flops: Callable[[Case, str], int]
    notes: list[str] = field(default_factory=list)
    oracle_dtype: torch.dtype = torch.float64  # float32 where float64 would not fit in memory
    gpu_dtypes: tuple[torch.dtype, ...] | None = None  # default: bfloat16 and float32


def _raise_recompile_limit() -> None:
    # One compiled function sees every case x dtype: let it specialise on each.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def _compile_provider(fn: Callable) -> Provider:
    _raise_recompile_limit()
    return Provider("compile", torch.compile(fn, dynamic=False))
