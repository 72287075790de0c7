// AdaLN launchers: raw pointers, sizes and a stream. Shared by adaln.cu (nvcc) and adaln_api.cpp.
//
//   y[b,t,:] = gamma[b(,t),:] * (x[b,t,:] - mean[b,t]) * rstd[b,t] + beta[b(,t),:]
//   mean, rstd: statistics of x over the last axis (LayerNorm without affine), in fp32.
//
// x, y, dy, dx: (B, T, D) contiguous. gamma, beta, dgamma, dbeta: (B, D) when per_token is
// false, (B, T, D) when true; contiguous. All tensors of one call share the dtype tag.
#pragma once

#include <cstdint>

#include "sk_dtype.h"

namespace seqkern {
namespace adaln {

struct FwdParams {
  const void* x;
  const void* gamma;
  const void* beta;
  void* y;
  float* mean;  // (B, T)
  float* rstd;  // (B, T)
  int64_t batch, seqlen, dim;
  bool per_token;
  float eps;
};

struct BwdParams {
  const void* dy;
  const void* x;
  const void* gamma;
  const float* mean;
  const float* rstd;
  void* dx;
  void* dgamma;
  void* dbeta;
  // (batch, num_splits, 2, dim) fp32 partial sums of dgamma/dbeta; only when !per_token.
  float* workspace;
  int64_t batch, seqlen, dim;
  int64_t num_splits;
  bool per_token;
};

// Largest D the CUDA kernels take (512 threads x 16 register-resident values per row tensor).
constexpr int64_t kCudaMaxDim = 8192;

// How many row-splits per batch element the backward uses (sizes the workspace).
int64_t cuda_bwd_num_splits(int64_t batch, int64_t seqlen, int device);

Status cuda_fwd(DType dtype, const FwdParams& p, void* stream);
Status cuda_bwd(DType dtype, const BwdParams& p, void* stream);

}  // namespace adaln
}  // namespace seqkern
