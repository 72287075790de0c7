// AdaLN CPU kernels (ATen). Inputs are checked, contiguous and allocated by adaln_api.cpp.
#pragma once

#include <torch/extension.h>

namespace seqkern {
namespace adaln {

// y (B,T,D); mean, rstd (B,T) in the accumulation dtype (fp64 for fp64 inputs, else fp32).
void cpu_fwd(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps,
             at::Tensor& y, at::Tensor& mean, at::Tensor& rstd);

// dx like x; dgamma, dbeta like gamma.
void cpu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
             const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dgamma,
             at::Tensor& dbeta);

}  // namespace adaln
}  // namespace seqkern
