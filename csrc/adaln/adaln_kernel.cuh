// AdaLN CUDA kernels. One CTA owns one row (forward) or a run of rows of one batch element
// (backward); the row lives in registers: each thread holds NV packs of VEC elements, so x and
// dy are read from global memory exactly once and all statistics are accumulated in fp32.
#pragma once

#include "sk_cuda.cuh"

namespace seqkern {
namespace adaln {

constexpr int kMaxThreads = 512;

template <typename T, int NV, int VEC>
struct RowRegs {
  float v[NV][VEC];

  // Loads row[0:dim] as NV packs per thread; lanes past `dim` read as 0.
  __device__ __forceinline__ void load(const T* __restrict__ row, int64_t dim) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col < dim) {
        const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(row + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = to_float(pack.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
      }
    }
  }
};

template <typename T, int NV, int VEC>
__device__ __forceinline__ void store_row(T* __restrict__ row, const float (&v)[NV][VEC],
                                          int64_t dim) {
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col < dim) {
      Pack<T, VEC> pack;
#pragma unroll
      for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(v[i][j]);
      *reinterpret_cast<Pack<T, VEC>*>(row + col) = pack;
    }
  }
}

template <typename T, int NV, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                     const T* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean_out,
                     float* __restrict__ rstd_out, int64_t seqlen, int64_t dim, bool per_token,
                     float eps) {
  __shared__ float smem[64];
  const int64_t row = blockIdx.x;  // b * seqlen + t
  const int64_t mod_row = per_token ? row : row / seqlen;

  RowRegs<T, NV, VEC> xr;
  xr.load(x + row * dim, dim);

  // Two-pass statistics over the register-resident row: no E[x^2] - E[x]^2 cancellation.
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += xr.v[i][j];
  const float mean = block_sum(sum, smem) / static_cast<float>(dim);

  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float c = col < dim ? xr.v[i][j] - mean : 0.f;
      sq += c * c;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, smem) / static_cast<float>(dim) + eps);

  RowRegs<T, NV, VEC> g, b;
  g.load(gamma + mod_row * dim, dim);
  b.load(beta + mod_row * dim, dim);
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) xr.v[i][j] = g.v[i][j] * ((xr.v[i][j] - mean) * rstd) + b.v[i][j];
  store_row<T, NV, VEC>(y + row * dim, xr.v, dim);

  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Grid (batch, num_splits). CTA (b, s) walks rows t in [s*rows, (s+1)*rows) of batch b.
//   xhat = (x - mean) * rstd,  g = dy * gamma
//   dx   = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
//   dgamma = dy * xhat, dbeta = dy  (summed over t when gamma is per batch element)
template <typename T, int NV, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    adaln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const T* __restrict__ gamma, const float* __restrict__ mean,
                     const float* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dgamma,
                     T* __restrict__ dbeta, float* __restrict__ workspace, int64_t seqlen,
                     int64_t dim, int64_t rows_per_split, bool per_token) {
  __shared__ float smem[64];
  const int64_t b = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * rows_per_split;
  const int64_t t_end = min(seqlen, t_begin + rows_per_split);
  const float inv_dim = 1.f / static_cast<float>(dim);

  RowRegs<T, NV, VEC> gm;  // gamma row: loaded once when it is per batch element
  if (!per_token) gm.load(gamma + b * dim, dim);

  float dg_acc[NV][VEC], db_acc[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dg_acc[i][j] = db_acc[i][j] = 0.f;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t row = b * seqlen + t;
    if (per_token) gm.load(gamma + row * dim, dim);
    RowRegs<T, NV, VEC> xr, dyr;
    xr.load(x + row * dim, dim);
    dyr.load(dy + row * dim, dim);
    const float mu = mean[row];
    const float rs = rstd[row];

    // x - mean, centred once more on its own mean: the saved fp32 mean is rounded, and where
    // |mean| >> the row's spread that shifts every xhat alike, which dx (a difference of
    // near-equal terms) amplifies by rstd. Lanes past dim hold 0.
    float s_c = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xr.v[i][j] = col < dim ? xr.v[i][j] - mu : 0.f;
        s_c += xr.v[i][j];
      }
    }
    const float shift = block_sum(s_c, smem) * inv_dim;

    float s_g = 0.f, s_gx = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xr.v[i][j] = col < dim ? (xr.v[i][j] - shift) * rs : 0.f;  // xhat
        const float g = dyr.v[i][j] * gm.v[i][j];
        s_g += g;
        s_gx += g * xr.v[i][j];
      }
    }
    const float2 s = block_sum2(s_g, s_gx, smem);
    const float mean_g = s.x * inv_dim;
    const float mean_gx = s.y * inv_dim;

    float out[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out[i][j] = rs * (dyr.v[i][j] * gm.v[i][j] - mean_g - xr.v[i][j] * mean_gx);
    store_row<T, NV, VEC>(dx + row * dim, out, dim);

    if (per_token) {
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[i][j] = dyr.v[i][j] * xr.v[i][j];
      store_row<T, NV, VEC>(dgamma + row * dim, out, dim);
      store_row<T, NV, VEC>(dbeta + row * dim, dyr.v, dim);
    } else {
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dg_acc[i][j] += dyr.v[i][j] * xr.v[i][j];
          db_acc[i][j] += dyr.v[i][j];
        }
    }
  }

  if (!per_token) {
    // workspace[b, split, 0, :] = partial dgamma, workspace[b, split, 1, :] = partial dbeta
    float* ws = workspace + ((b * gridDim.y + split) * 2) * dim;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col < dim) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          ws[col + j] = dg_acc[i][j];
          ws[dim + col + j] = db_acc[i][j];
        }
      }
    }
  }
}

// dgamma[b, d] = sum_s workspace[b, s, 0, d]; dbeta likewise. One thread per (b, d).
template <typename T>
__global__ void adaln_bwd_reduce_kernel(const float* __restrict__ workspace,
                                        T* __restrict__ dgamma, T* __restrict__ dbeta,
                                        int64_t batch, int64_t num_splits, int64_t dim) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * dim) return;
  const int64_t b = idx / dim;
  const int64_t d = idx - b * dim;
  const float* ws = workspace + b * num_splits * 2 * dim + d;
  float sg = 0.f, sb = 0.f;
  for (int64_t s = 0; s < num_splits; ++s) {
    sg += ws[s * 2 * dim];
    sb += ws[s * 2 * dim + dim];
  }
  dgamma[idx] = from_float<T>(sg);
  dbeta[idx] = from_float<T>(sb);
}

}  // namespace adaln
}  // namespace seqkern
