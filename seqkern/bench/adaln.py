"""`seqkern bench` spec: AdaLN (VALL-E NAR decoder)."""

from __future__ import annotations

import torch
from torch import Tensor

import seqkern
from seqkern.bench.core import Case, OpBench, Provider, _compile_provider

# --------------------------------------------------------------------------------------------
# AdaLN (VALL-E NAR decoder)


def _adaln_cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [
            Case("B2-T50-D256", dict(B=2, T=50, D=256, per_token=False)),
            Case("B2-T20-D96-tok", dict(B=2, T=20, D=96, per_token=True)),
        ]
    return [
        # VALL-E NAR: n_state 1024, ~1000 codec frames, a batch of utterances.
        Case("B8-T1000-D1024", dict(B=8, T=1000, D=1024, per_token=False)),
        Case("B32-T250-D512", dict(B=32, T=250, D=512, per_token=False)),
        Case("B4-T1500-D1024-tok", dict(B=4, T=1500, D=1024, per_token=True)),
        Case("B4-T2000-D2048", dict(B=4, T=2000, D=2048, per_token=False)),
    ]


def _adaln_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    from seqkern.testing import make_adaln_inputs

    p = case.params
    x, g, b, dy = make_adaln_inputs(
        p["B"], p["T"], p["D"], dtype=dtype, device=device, per_token=p["per_token"]
    )
    return [x, g, b], dy


def _adaln_upstream(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    # espnet2/speechlm/module/transformer.py AdaLN, with the level projections already applied.
    return seqkern.adaln_ref(x, gamma, beta)


def _adaln_baselines(device: torch.device, quick: bool) -> list[Provider]:
    out = [Provider("upstream", _adaln_upstream)]
    if not (quick and device.type == "cpu"):
        out.append(_compile_provider(seqkern.adaln_ref))
    return out


def _adaln_bytes(case: Case, dtype: torch.dtype, direction: str) -> int:
    p = case.params
    n, d = p["B"] * p["T"], p["D"]
    es = torch.finfo(dtype).bits // 8
    mod = (n if p["per_token"] else p["B"]) * d  # elements of gamma (and of beta)
    if direction == "fwd":  # x, gamma, beta in; y out; fp32 mean, rstd out
        return es * (2 * n * d + 2 * mod) + 8 * n
    # dy, x, gamma, mean, rstd in; dx, dgamma, dbeta out
    return es * (3 * n * d + 3 * mod) + 8 * n


def _adaln_flops(case: Case, direction: str) -> int:
    n = case.params["B"] * case.params["T"] * case.params["D"]
    return (7 if direction == "fwd" else 11) * n


SPEC = OpBench(
    op="adaln",
    cases=_adaln_cases,
    make_inputs=_adaln_inputs,
    oracle=seqkern.adaln_ref,
    public=seqkern.adaln,
    baselines=_adaln_baselines,
    bytes=_adaln_bytes,
    flops=_adaln_flops,
)
