// MEGA multi-head damped EMA, CPU kernels (ATen). Inputs are checked and allocated by
// ema_api.cpp: x, y, dy, dx are (B, L, D) with stride 1 along D; pad is (B, L) bool contiguous
// or undefined; the parameters are (D, h) contiguous in the accumulation dtype (fp64 for fp64
// inputs, else fp32); omega is (D,) in that dtype or undefined. The same chunked decomposition
// as the CUDA kernels (see ema.h), with the per-channel math from ema_math.h.
#pragma once

#include <torch/extension.h>

namespace seqkern {
namespace ema {

// Steps per chunk for the CPU kernels: `chunk` > 0 as given (capped at L); 0 = auto.
int64_t cpu_chunk(int64_t batch, int64_t seqlen, int64_t dim, int64_t chunk);

// trunc_len: Lk when truncation applies (Lk < L), else 0.
void cpu_fwd(const at::Tensor& x, const at::Tensor& pad, const at::Tensor& damping,
             const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
             const at::Tensor& omega, int64_t trunc_len, int64_t chunk, at::Tensor& y);

// dx like x; ddamping, ddecay, dexpansion, dprojection (D, h) and domega (D,) (when omega is
// defined) in the accumulation dtype.
void cpu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& pad,
             const at::Tensor& damping, const at::Tensor& decay, const at::Tensor& expansion,
             const at::Tensor& projection, const at::Tensor& omega, int64_t trunc_len,
             int64_t chunk, at::Tensor& dx, at::Tensor& ddamping, at::Tensor& ddecay,
             at::Tensor& dexpansion, at::Tensor& dprojection, at::Tensor& domega);

// x (B, D) contiguous; state (B, D, h) or (D, h) contiguous in x's dtype, or undefined (zero);
// y (B, D) and new_state (B, D, h) in x's dtype.
void cpu_step(const at::Tensor& x, const at::Tensor& state, const at::Tensor& damping,
              const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
              const at::Tensor& omega, at::Tensor& y, at::Tensor& new_state);

}  // namespace ema
}  // namespace seqkern
