"""Multi-head damped EMA (MEGA): public functions that run on the selected backend.

Layers, top to bottom:
    ema(), ema_step()     public functions: check the inputs, name what is wrong
    EmaFunction           the autograd.Function over the two full-sequence ops
    seqkern::ema_fwd      torch.library op -> y, with a fake
    seqkern::ema_bwd      torch.library op -> (dx, ddamping, ddecay, dexpansion, dprojection,
                          domega)
    seqkern::ema_step     torch.library op -> (y, new_state); inference only (no backward)
    backends.select("ema" / "ema_step") picks cuda / cpu / reference for the inputs

Backends: `reference` is `seqkern.reference.ema` (upstream's fp32 FFT convolution and the plain
step), plain differentiable PyTorch: in eager mode a call that selects it runs it directly under
autograd (double backward included); inside the ops (torch.compile, direct op calls) it is a
stage pair whose backward is written out and tested against autograd through `ema_ref`.
`cpu` (C++) and `cuda` run a chunked scan of the recurrence in fp32 (fp64 for fp64 inputs), see
csrc/ema/ema.h. The step kernels decline inputs that need a gradient, so autograd always has the
reference to differentiate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqkern import _ext, backends
from seqkern.ops._library import define_op
from seqkern.reference.ema import ema_coefficients, ema_ref, ema_step_ref

OP = "ema"
OP_STEP = "ema_step"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _step_dtype(x, state, damping, decay, expansion, projection) -> torch.dtype:
    """The dtype of the step's outputs: the promotion of x, the parameters and the state (as
    `ema_step_ref` computes)."""
    dt = x.dtype
    for t in (damping, decay, expansion, projection, state):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


# ---------------------------------------------------------------------------------------------
# The reference as op stages (used when the op itself selects the reference backend). The ops
# return y and dx laid out like x (empty_like), as the fakes and the kernels do.


def _like(t: Tensor, like: Tensor) -> Tensor:
    return torch.empty_like(like).copy_(t)


def _reference_fwd(x, damping, decay, expansion, projection, pad_mask, omega, truncation):
    fn = backends.kernels(OP)["reference"].fwd  # ema_ref
    y = fn(x, damping, decay, expansion, projection, pad_mask, truncation or None)
    if omega is not None:
        y = (y + x * omega).to(x.dtype)
    return y


def _reference_bwd(dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation):
    """The gradients of `_reference_fwd`, written out: an op's stage may run below autograd
    (dispatch modes, opcheck), so no autograd inside. The FFT correlations of upstream's fp32
    convolution, then the kernel's chain rule in the parameters' dtype; tested against autograd
    through `ema_ref`."""
    B, L, D = x.shape
    acc = _acc_dtype(x)
    if x.numel() == 0:  # no step, batch row or channel: every gradient is 0 (no FFT of length 0)
        zeros = [torch.zeros(t.shape, dtype=acc, device=x.device) for t in (damping, decay)]
        zeros += [torch.zeros(t.shape, dtype=acc, device=x.device) for t in (expansion, projection)]
        domega = x.new_zeros(D if omega is not None else 0, dtype=acc)
        return (torch.zeros_like(x), *zeros, domega)
    taps = L if not truncation else min(truncation, L)
    p, q = ema_coefficients(damping, decay)
    delta = torch.sigmoid(decay)
    scale = math.sqrt(1.0 / projection.shape[-1])
    a = (p * expansion).squeeze(-1)  # (D, h)
    c = projection * scale
    powers = torch.exp(torch.arange(taps).to(q) * torch.log(q))  # (D, h, taps): q^l
    kernel = torch.einsum("dnl,dn->dl", powers, a * c)
    n = 2 * L
    xm = x.transpose(1, 2)  # (B, D, L)
    if pad_mask is not None:
        xm = xm.masked_fill(pad_mask.unsqueeze(1), 0.0)
    # The correlations in float32 like autograd through the forward's float32 FFT, except for
    # float64 inputs: float64 there (another float32 order than autograd's left up to 4x its
    # rounding in dx and the parameter gradients)
    fft = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy_f = torch.fft.rfft(dy.transpose(1, 2).to(fft), n=n)
    k_f = torch.fft.rfft(kernel.to(fft), n=n)
    # y_t = sum_l k_l xm_{t-l}: dxm_j = sum_t dy_t k_{t-j}, dk_l = sum_t dy_t xm_{t-l}.
    # conj_physical, not the lazy conj bit: an op may run with the Conjugate key excluded.
    dxm = torch.fft.irfft(dy_f * torch.conj_physical(k_f), n=n)[..., :L]
    x_f = torch.fft.rfft(xm.to(fft), n=n)
    dk = torch.fft.irfft(dy_f * torch.conj_physical(x_f), n=n)[..., :taps].sum(0)
    dk = dk.to(kernel.dtype)  # (D, taps)
    if pad_mask is not None:
        dxm = dxm.masked_fill(pad_mask.unsqueeze(1), 0.0)
    dx = dxm.to(x.dtype).transpose(1, 2)
    if omega is not None:
        dx = dx + dy * omega
    # k_l = sum_n w_n q_n^l, w = a c: dw_n = sum_l dk_l q^l, dq_n = w_n sum_l dk_l l q^(l-1).
    dw = torch.einsum("dl,dnl->dn", dk, powers)
    lq = torch.arange(taps).to(q) * torch.exp(torch.arange(-1, taps - 1).to(q) * torch.log(q))
    dq = (a * c) * torch.einsum("dl,dnl->dn", dk, lq)
    dq = dq.unsqueeze(-1)
    da, dc = (c * dw).unsqueeze(-1), a * dw
    dp = expansion * da - delta * dq
    grads = (
        dp * p * (1 - p),
        -p * dq * delta * (1 - delta),
        p * da,
        scale * dc,
        # in acc, as autograd through y + x * omega sums it (not rounded to x's dtype per term)
        (dy.to(acc) * x.to(acc)).sum((0, 1)) if omega is not None else x.new_empty(0, dtype=acc),
    )
    return (_like(dx, x), *(g.to(acc).contiguous() for g in grads))


def _reference_step(x, state, damping, decay, expansion, projection, omega):
    fn = backends.kernels(OP_STEP)["reference"].fwd  # ema_step_ref
    y, new_state = fn(x, state, damping, decay, expansion, projection)
    if omega is not None:
        y = (y + x * omega).to(y.dtype)
    return y, new_state


# ---------------------------------------------------------------------------------------------
# torch.library ops. `truncation` 0 = none; `chunk` 0 = the backend's choice. An absent gradient
# (domega without omega) is an empty tensor.


def _fwd_impl(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
    kernel = backends.select(OP, x, damping)
    if kernel.backend == "reference":
        y = _reference_fwd(x, damping, decay, expansion, projection, pad_mask, omega, truncation)
        return _like(y, x)
    return kernel.fwd(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk)


def _fwd_fake(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
    return torch.empty_like(x)


def _bwd_impl(dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
    kernel = backends.select(OP, x, damping)
    if kernel.backend == "reference":
        out = _reference_bwd(
            dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation
        )
    else:
        out = kernel.bwd(
            dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk
        )
    return tuple(out)


def _bwd_fake(dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
    acc = _acc_dtype(x)
    d, h = projection.shape
    return (
        torch.empty_like(x),
        x.new_empty((d, h, 1), dtype=acc),
        x.new_empty((d, h, 1), dtype=acc),
        x.new_empty((d, h, 1), dtype=acc),
        x.new_empty((d, h), dtype=acc),
        x.new_empty((d if omega is not None else 0,), dtype=acc),
    )


def _step_impl(x, state, damping, decay, expansion, projection, omega):
    kernel = backends.select(OP_STEP, x, state, damping, decay, expansion, projection, omega)
    if kernel.backend == "reference":
        y, new_state = _reference_step(x, state, damping, decay, expansion, projection, omega)
        return y.contiguous(), new_state.contiguous()  # the fake's (and the kernels') layout
    return tuple(kernel.fwd(x, state, damping, decay, expansion, projection, omega))


def _step_fake(x, state, damping, decay, expansion, projection, omega):
    dt = _step_dtype(x, state, damping, decay, expansion, projection)
    b, d = x.shape
    return x.new_empty((b, d), dtype=dt), x.new_empty((b, d, projection.shape[1]), dtype=dt)


define_op(
    "ema_fwd",
    "(Tensor x, Tensor damping, Tensor decay, Tensor expansion, Tensor projection,"
    " Tensor? pad_mask, Tensor? omega, int truncation, int chunk) -> Tensor",
    _fwd_impl,
    _fwd_fake,
)
define_op(
    "ema_bwd",
    "(Tensor dy, Tensor x, Tensor damping, Tensor decay, Tensor expansion, Tensor projection,"
    " Tensor? pad_mask, Tensor? omega, int truncation, int chunk) -> (Tensor dx,"
    " Tensor ddamping, Tensor ddecay, Tensor dexpansion, Tensor dprojection, Tensor domega)",
    _bwd_impl,
    _bwd_fake,
)
define_op(
    "ema_step",
    "(Tensor x, Tensor? state, Tensor damping, Tensor decay, Tensor expansion,"
    " Tensor projection, Tensor? omega) -> (Tensor y, Tensor new_state)",
    _step_impl,
    _step_fake,
)


class EmaFunction(torch.autograd.Function):
    """The full-sequence EMA over `seqkern::ema_fwd` / `seqkern::ema_bwd`.

    apply(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk), with
    truncation 0 = none and chunk 0 = the backend's choice (a testing and tuning knob: the chunk
    length changes only the rounding).
    """

    @staticmethod
    def forward(ctx, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
        y = torch.ops.seqkern.ema_fwd(
            x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk
        )
        ctx.save_for_backward(x, damping, decay, expansion, projection, pad_mask, omega)
        ctx.truncation, ctx.chunk = truncation, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, damping, decay, expansion, projection, pad_mask, omega = ctx.saved_tensors
        dx, dd, dc, de, dp, do = torch.ops.seqkern.ema_bwd(
            dy, x, damping, decay, expansion, projection, pad_mask, omega, ctx.truncation, ctx.chunk
        )
        return (
            dx,
            dd.to(damping.dtype),
            dc.to(decay.dtype),
            de.to(expansion.dtype),
            dp.to(projection.dtype),
            None,
            None if omega is None else do.to(omega.dtype),
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------
# Public functions


def _check_params(fn: str, d: int, damping, decay, expansion, projection, x: Tensor) -> int:
    if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[0] != d:
        shape = tuple(projection.shape) if isinstance(projection, Tensor) else type(projection)
        raise ValueError(f"{fn}: projection must be (D, h) with D = {d}, got {shape}")
    h = projection.shape[1]
    for name, t in (("damping", damping), ("decay", decay), ("expansion", expansion)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (d, h, 1):
            raise ValueError(f"{fn}: {name} must be (D, h, 1) = {(d, h, 1)}, got {tuple(t.shape)}")
    for name, t in (
        ("damping", damping),
        ("decay", decay),
        ("expansion", expansion),
        ("projection", projection),
    ):
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")
    return h


def _check_omega(fn: str, d: int, omega, x: Tensor) -> None:
    if omega is None:
        return
    if not isinstance(omega, Tensor) or tuple(omega.shape) != (d,):
        shape = tuple(omega.shape) if isinstance(omega, Tensor) else type(omega).__name__
        raise ValueError(f"{fn}: omega must be (D,) = {(d,)}, got {shape}")
    if not omega.is_floating_point():
        raise ValueError(f"{fn}: omega must be floating point, got {omega.dtype}")
    if omega.device != x.device:
        raise ValueError(f"{fn}: omega must be on x's device {x.device}, got {omega.device}")


def ema(
    x: Tensor,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
    pad_mask: Tensor | None = None,
    truncation: int | None = None,
    *,
    omega: Tensor | None = None,
) -> Tensor:
    """Multi-head damped EMA of a whole sequence (causal convolution, fp32 like upstream).

    Args:
        x: (B, L, D) floating point, any strides (MEGA's time-major (L, B, D) passed as
            ``x.transpose(0, 1)`` is read without a copy by the kernels).
        damping, decay, expansion: (D, h, 1) raw parameters (damping and decay pre-sigmoid).
        projection: (D, h) kernel projection matrix.
        pad_mask: optional (B, L) bool, True = padding (zeroed before the convolution).
        truncation: optional kernel length limit (>= 1); None = the whole sequence.
        omega: optional (D,) residual weight: ``x * omega`` (unmasked x) is added to the output,
            fused into the kernels.
    Returns:
        (B, L, D) in x's dtype: the EMA term (plus ``x * omega``), before upstream's activation.
        Differentiable with respect to x and every parameter.

    Example:
        >>> D, h = 16, 2
        >>> p = [torch.randn(D, h, 1) for _ in range(3)]
        >>> y = seqkern.ops.ema.ema(torch.randn(2, 9, D), *p, torch.randn(D, h))
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ema: x must be a (B, L, D) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"ema: x must be floating point, got {x.dtype}")
    _check_params("ema", x.shape[2], damping, decay, expansion, projection, x)
    _check_omega("ema", x.shape[2], omega, x)
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
            raise ValueError("ema: pad_mask must be a bool tensor (True = padding)")
        if tuple(pad_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"ema: pad_mask must be (B, L) = {tuple(x.shape[:2])}, got {tuple(pad_mask.shape)}"
            )
        if pad_mask.device != x.device:
            raise ValueError(
                f"ema: pad_mask must be on x's device {x.device}, got {pad_mask.device}"
            )
    if truncation is not None and (
        not isinstance(truncation, int) or isinstance(truncation, bool) or truncation < 1
    ):
        raise ValueError(f"ema: truncation must be None or an int >= 1, got {truncation!r}")
    if not torch.compiler.is_compiling():
        # Eager: the reference runs as itself, under autograd (double backward included).
        # Compiled: the op selects at run time (the selection reads a ContextVar, which dynamo
        # cannot trace), with the reference as one of its stages.
        kernel = backends.select(OP, x, damping)
        if kernel.backend == "reference":
            return _reference_fwd(
                x, damping, decay, expansion, projection, pad_mask, omega, truncation
            )
    return EmaFunction.apply(
        x, damping, decay, expansion, projection, pad_mask, omega, truncation or 0, 0
    )


def ema_step(
    x: Tensor,
    state: Tensor | None,
    damping: Tensor,
    decay: Tensor,
    expansion: Tensor,
    projection: Tensor,
    *,
    omega: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the multi-head damped EMA (ignores truncation, as upstream).

    Args:
        x: (B, D) input at this step.
        state: (B, D, h), (D, h) (shared by the batch, as `init_state` gives) or None (zero):
            upstream's expansion-scaled state.
        damping, decay, expansion: (D, h, 1) raw parameters; projection: (D, h).
        omega: optional (D,) residual weight: ``x * omega`` is added to y.
    Returns:
        y: (B, D) the EMA term (plus ``x * omega``); new_state: (B, D, h). Both in the promoted
        dtype of x, the parameters and the state (as `ema_step_ref`). The coefficients are
        recomputed from the parameters at every call (no stale cache). The cpu and cuda kernels
        are inference-only: a call that needs a gradient runs the reference.

    Example:
        >>> D, h = 16, 2
        >>> p = [torch.randn(D, h, 1) for _ in range(3)]
        >>> y, s = seqkern.ops.ema.ema_step(torch.randn(4, D), None, *p, torch.randn(D, h))
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ema_step: x must be a (B, D) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"ema_step: x must be floating point, got {x.dtype}")
    h = _check_params("ema_step", x.shape[1], damping, decay, expansion, projection, x)
    _check_omega("ema_step", x.shape[1], omega, x)
    if state is not None:
        b, d = x.shape
        if not isinstance(state, Tensor) or tuple(state.shape) not in ((b, d, h), (d, h)):
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(
                f"ema_step: state must be (B, D, h) = {(b, d, h)} or (D, h), got {shape}"
            )
        if not state.is_floating_point():
            raise ValueError(f"ema_step: state must be floating point, got {state.dtype}")
        if state.device != x.device:
            raise ValueError(
                f"ema_step: state must be on x's device {x.device}, got {state.device}"
            )
    args = (x, state, damping, decay, expansion, projection, omega)
    if not torch.compiler.is_compiling():
        kernel = backends.select(OP_STEP, *args)
        if kernel.backend == "reference":
            return _reference_step(*args)
        return tuple(kernel.fwd(*args))
    if _needs_grad(*args):
        return _reference_step(*args)
    return torch.ops.seqkern.ema_step(*args)


# ---------------------------------------------------------------------------------------------
# Backends. `supports` returns None when the backend can run the inputs, else the reason.


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors if isinstance(t, Tensor)
    )


def _supports_cpu(x: Tensor, damping: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"needs CPU tensors, got {x.device}"
    if x.dtype not in _KERNEL_DTYPES + (torch.float64,):
        return f"dtype {x.dtype} not supported"
    return None


def _supports_cuda(x: Tensor, damping: Tensor) -> str | None:
    if x.device.type != "cuda":
        return f"needs CUDA tensors, got {x.device}"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    limit = getattr(_ext.C, "ema_cuda_max_heads", 16)
    if damping.dim() >= 2 and damping.shape[1] > limit:
        return f"h = {damping.shape[1]} > {limit} EMA heads (kept in registers)"
    return None


_INFERENCE_ONLY = "the step kernel is inference-only (no backward): autograd needs the reference"


def _supports_step(device: str, dtypes: tuple[torch.dtype, ...]):
    def supports(x, state, damping, decay, expansion, projection, omega) -> str | None:
        if _needs_grad(x, state, damping, decay, expansion, projection, omega):
            return _INFERENCE_ONLY
        if x.device.type != device:
            return f"needs {device.upper()} tensors, got {x.device}"
        dt = _step_dtype(x, state, damping, decay, expansion, projection)
        if dt not in dtypes:
            return f"dtype {dt} not supported"
        if device == "cuda":
            limit = getattr(_ext.C, "ema_cuda_max_heads", 16)
            if projection.shape[1] > limit:
                return f"h = {projection.shape[1]} > {limit} EMA heads"
        return None

    return supports


def _step_kernel(name: str):
    def run(x, state, damping, decay, expansion, projection, omega):
        dt = _step_dtype(x, state, damping, decay, expansion, projection)
        if state is not None:
            state = state.to(dt)
        fn = getattr(_ext.C, name)
        y, new_state = fn(x.to(dt), state, damping, decay, expansion, projection, omega)
        return y, new_state

    return run


def _kernel_stages(device: str):
    def fwd(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
        fn = getattr(_ext.C, f"ema_fwd_{device}")
        return fn(x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk)

    def bwd(dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk):
        fn = getattr(_ext.C, f"ema_bwd_{device}")
        return fn(dy, x, damping, decay, expansion, projection, pad_mask, omega, truncation, chunk)

    return fwd, bwd


backends.register_reference(OP, ema_ref)
backends.register_reference(OP_STEP, ema_step_ref)
for _device, _supports in (("cpu", _supports_cpu), ("cuda", _supports_cuda)):
    backends.register(backends.Kernel(OP, _device, *_kernel_stages(_device), _supports))
backends.register(
    backends.Kernel(
        OP_STEP,
        "cpu",
        _step_kernel("ema_step_cpu"),
        None,
        _supports_step("cpu", _KERNEL_DTYPES + (torch.float64,)),
    )
)
backends.register(
    backends.Kernel(
        OP_STEP, "cuda", _step_kernel("ema_step_cuda"), None, _supports_step("cuda", _KERNEL_DTYPES)
    )
)
