"""Tolerances, comparison helpers and input makers, shared by seqkern's tests and its users.

The rule (flash-attention's): a kernel run in dtype `dt` is compared with the oracle computed
in float64, and its error may be at most ORACLE_FACTOR times the error of the *reference* run in
`dt`, plus a small floor relative to the oracle's magnitude. NaN never passes unless the oracle
has NaN in exactly the same places.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: The kernel may be this many times worse than the reference computed in the kernel's dtype.
ORACLE_FACTOR = 2.0

#: Floor of the bound, times max(1, max|oracle|), for each dtype the kernel runs in.
TOLERANCE_FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_abs_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| over the entries where `want` is finite (float64 arithmetic)."""
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    finite = torch.isfinite(want64)
    if not bool(finite.any()):
        return 0.0
    return float((got64 - want64)[finite].abs().max())


def _check_nonfinite_pattern(name: str, got: Tensor, want: Tensor) -> None:
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    if not torch.equal(got_nan, want_nan):
        extra = int((got_nan & ~want_nan).sum())
        missing = int((want_nan & ~got_nan).sum())
        raise AssertionError(
            f"{name}: NaN pattern differs from the oracle ({extra} unexpected NaN, "
            f"{missing} NaN hidden)"
        )
    got_inf, want_inf = torch.isinf(got), torch.isinf(want)
    if not torch.equal(got_inf, want_inf) or not torch.equal(
        got[got_inf], want[want_inf].to(got.dtype)
    ):
        raise AssertionError(f"{name}: infinities differ from the oracle")


def assert_close_to_oracle(
    got: Tensor,
    oracle: Tensor,
    ref: Tensor,
    *,
    name: str = "output",
    factor: float = ORACLE_FACTOR,
    floor: float | None = None,
) -> None:
    """Assert that `got` is as close to `oracle` as the reference run in `got`'s dtype is.

    Args:
        got: the kernel's result, in the kernel's dtype.
        oracle: the reference computed in float64 on the same (up-cast) inputs.
        ref: the reference computed in `got`'s dtype on the same inputs.
        name: what is compared, for the error message.
        factor: allowed multiple of the reference's own error.
        floor: absolute floor relative to max(1, max|oracle|); default TOLERANCE_FLOOR[dtype].
    """
    if got.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != oracle {tuple(oracle.shape)}")
    if got.dtype != ref.dtype:
        raise AssertionError(f"{name}: dtype {got.dtype} != reference dtype {ref.dtype}")
    oracle64 = oracle.detach().to(torch.float64).cpu()
    got64 = got.detach().to(torch.float64).cpu()
    _check_nonfinite_pattern(name, got64, oracle64)
    finite = torch.isfinite(oracle64)
    scale = max(1.0, float(oracle64[finite].abs().max())) if bool(finite.any()) else 1.0
    floor = TOLERANCE_FLOOR[got.dtype] if floor is None else floor
    err = max_abs_error(got64, oracle64)
    ref_err = max_abs_error(ref.detach().cpu(), oracle64)
    bound = factor * ref_err + floor * scale
    if not err <= bound:
        raise AssertionError(
            f"{name} ({got.dtype}): max error {err:.3e} > bound {bound:.3e} "
            f"(= {factor} x reference error {ref_err:.3e} + {floor:.1e} x scale {scale:.3g})"
        )


def assert_poisoned_grad_close_to_oracle(
    got: Tensor, oracle: Tensor, ref: Tensor, *, name: str = "grad"
) -> None:
    """The rule for a gradient when an input holds NaN or Inf.

    The oracle's dense matmuls also carry 0 * NaN into entries a kernel rightly skips (a masked
    logit's gradient, a key no query sees), so the patterns need not be equal. Instead: no NaN
    where the oracle has none, NaN in every slice (last dim) that the oracle has all NaN, and
    `assert_close_to_oracle` on the entries finite in the kernel, the oracle and the reference.
    """
    got, oracle, ref = (t.detach().cpu() for t in (got, oracle, ref))
    if not got.numel() or not oracle.numel():  # nothing to poison: shapes and dtypes only
        assert_close_to_oracle(got, oracle, ref, name=name)
        return
    got_nan, want_nan = got.isnan(), oracle.isnan()
    if (got_nan & ~want_nan).any():
        raise AssertionError(f"{name}: NaN where the oracle has none")
    if not got_nan.any(-1)[want_nan.all(-1)].all():
        raise AssertionError(f"{name}: NaN hidden (a slice all NaN in the oracle is finite)")
    keep = ~(got_nan | want_nan | oracle.isinf() | ref.isnan() | ref.isinf())
    assert_close_to_oracle(
        torch.where(keep, got, 0).to(got.dtype),
        torch.where(keep, oracle, 0),
        torch.where(keep, ref, 0).to(ref.dtype),
        name=name,
    )


def assert_result_close_to_oracle(
    got: Tensor,
    oracle: Tensor,
    ref: Tensor,
    *,
    name: str,
    poisoned: bool = False,
    gradient: bool = True,
) -> None:
    """One result of a run whose inputs may hold NaN or Inf, under the rule that fits it.

    An output (or a returned state), and anything of a run without poison, must match the
    oracle's NaN/Inf pattern exactly (`assert_close_to_oracle`); a gradient of a poisoned run is
    held to `assert_poisoned_grad_close_to_oracle`. `poisoned`: a NaN or Inf was placed in an
    input; `gradient`: `got` is a gradient (not an output).
    """
    if poisoned and gradient:
        assert_poisoned_grad_close_to_oracle(got, oracle, ref, name=name)
    else:
        assert_close_to_oracle(got, oracle, ref, name=name)


def poison_(t: Tensor, value: float, generator: torch.Generator) -> bool:
    """Write `value` (NaN, +-Inf) at one random element of `t`, in place; False (and nothing
    written) when `t` is empty."""
    if not t.numel():
        return False
    t.view(-1)[int(torch.randint(t.numel(), (1,), generator=generator))] = value
    return True


def rel_rms_error(got: Tensor, want: Tensor) -> float:
    """||got - want||_2 / ||want||_2: the measure for long recurrences, where max-abs misleads."""
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    return float((got64 - want64).norm() / want64.norm().clamp_min(1e-300))


def grads_of(outputs: Tensor, inputs: Sequence[Tensor], grad_out: Tensor) -> tuple[Tensor, ...]:
    """d(outputs . grad_out)/d(inputs), without touching .grad."""
    return torch.autograd.grad(outputs, tuple(inputs), grad_out)


def grads_or_zeros(outputs: Tensor, inputs: Sequence[Tensor], grad_out: Tensor) -> list[Tensor]:
    """d(outputs . grad_out)/d(inputs) for the inputs that require grad; an input that `outputs`
    does not reach (or every input, for an empty output or one without a graph) gets zeros, the
    gradient of an empty sum."""
    needs = [t for t in inputs if t.requires_grad]
    if not needs or not outputs.numel() or not outputs.requires_grad:
        return [torch.zeros_like(t) for t in needs]
    grads = torch.autograd.grad(outputs, needs, grad_out, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, needs, strict=True)]


def upcast(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Detached copies in `dtype` that require grad: inputs for the oracle."""
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def _noncontiguous(t: Tensor) -> Tensor:
    """The same values, stored as a strided slice of a larger buffer (last dim not contiguous)."""
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    buf.normal_()
    view = buf[..., 1::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def make_adaln_inputs(
    batch: int,
    seqlen: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    per_token: bool = False,
    noncontiguous: bool = False,
    seed: int = 0,
    requires_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fresh random (x, gamma, beta, dy) for AdaLN.

    x has a non-zero mean and scale per row (so LayerNorm has work to do), gamma is centred on 1
    and beta on 0 with real spread: never the degenerate ones/zeros upstream init.
    gamma, beta: (B, T, D) if per_token else (B, D).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = rand(batch, seqlen, dim) * (0.5 + rand(batch, seqlen, 1).abs()) + rand(batch, seqlen, 1)
    mod_shape = (batch, seqlen, dim) if per_token else (batch, dim)
    gamma = 1.0 + 0.5 * rand(*mod_shape)
    beta = 0.5 * rand(*mod_shape)
    dy = rand(batch, seqlen, dim)
    out = [t.to(device=device, dtype=dtype) for t in (x, gamma, beta, dy)]
    if noncontiguous:
        out[0] = _noncontiguous(out[0])
        out[3] = _noncontiguous(out[3])
    for t in out[:3]:
        t.requires_grad_(requires_grad)
    return out[0], out[1], out[2], out[3]
