// AdaLN launchers: choose the register tiling, check alignment, launch on the given stream.
// Compiles with nvcc alone (no torch headers).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "adaln/adaln.h"
#include "adaln/adaln_kernel.cuh"

namespace seqkern {

const char* cuda_status_string(Status status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

namespace adaln {
namespace {

struct Tiling {
  int vec;      // elements per 16-byte pack, or 1
  int nv;       // packs per thread: 1, 2, 4, 8 or 16
  int threads;  // multiple of 32, at most kMaxThreads
};

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Register budget: past 16 fp32 values of each row tensor per thread, ptxas spills the backward.
constexpr int kMaxElemsPerThread = 16;

// Returns false when dim is too large for a register-resident row (dim > 512 * 16 = 8192).
template <typename T>
bool choose_tiling(int64_t dim, bool can_vectorize, Tiling* out) {
  const int vec = (can_vectorize && dim % (16 / sizeof(T)) == 0) ? 16 / sizeof(T) : 1;
  const int64_t packs = dim / vec;
  for (int nv = 1; nv * vec <= kMaxElemsPerThread; nv *= 2) {
    const int64_t threads = ((packs + nv - 1) / nv + 31) / 32 * 32;
    if (threads <= kMaxThreads) {
      *out = Tiling{vec, nv, static_cast<int>(threads)};
      return true;
    }
  }
  return false;
}

// Calls f(std::integral_constant<int, NV>, std::integral_constant<int, VEC>) for the tiling;
// tilings over the register budget are never instantiated.
template <int NV, int VEC, typename F>
Status call_tiled(F&& f) {
  if constexpr (NV * VEC <= kMaxElemsPerThread) {
    return f(std::integral_constant<int, NV>{}, std::integral_constant<int, VEC>{});
  } else {
    return static_cast<Status>(cudaErrorInvalidValue);
  }
}

template <typename T, typename F>
Status with_tiling(const Tiling& t, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
#define SK_ADALN_NV(NV)                                    \
  case NV:                                                 \
    if (t.vec == 1) return call_tiled<NV, 1>(f);           \
    return call_tiled<NV, kVec>(f);
  switch (t.nv) {
    SK_ADALN_NV(1)
    SK_ADALN_NV(2)
    SK_ADALN_NV(4)
    SK_ADALN_NV(8)
    SK_ADALN_NV(16)
  }
#undef SK_ADALN_NV
  return static_cast<Status>(cudaErrorInvalidValue);
}

template <typename T>
Status fwd_typed(const FwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen;
  if (rows == 0) return kSuccess;
  const bool can_vec = aligned16(p.x) && aligned16(p.gamma) && aligned16(p.beta) && aligned16(p.y);
  Tiling t;
  if (!choose_tiling<T>(p.dim, can_vec, &t) || rows > 0x7fffffffLL)
    return static_cast<Status>(cudaErrorInvalidValue);
  return with_tiling<T>(t, [&](auto nv, auto vec) {
    adaln_fwd_kernel<T, decltype(nv)::value, decltype(vec)::value>
        <<<static_cast<unsigned>(rows), t.threads, 0, stream>>>(
            static_cast<const T*>(p.x), static_cast<const T*>(p.gamma),
            static_cast<const T*>(p.beta), static_cast<T*>(p.y), p.mean, p.rstd, p.seqlen, p.dim,
            p.per_token, p.eps);
    return static_cast<Status>(cudaGetLastError());
  });
}

template <typename T>
Status bwd_typed(const BwdParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen == 0 && p.per_token) return kSuccess;
  const bool can_vec = aligned16(p.dy) && aligned16(p.x) && aligned16(p.gamma) &&
                       aligned16(p.dx) && aligned16(p.dgamma) && aligned16(p.dbeta);
  Tiling t;
  if (!choose_tiling<T>(p.dim, can_vec, &t) || p.num_splits < 1 || p.num_splits > 65535 ||
      p.batch > 0x7fffffffLL)
    return static_cast<Status>(cudaErrorInvalidValue);
  const int64_t rows_per_split = (p.seqlen + p.num_splits - 1) / p.num_splits;
  if (p.batch * p.seqlen > 0) {
    const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(p.num_splits));
    const Status st = with_tiling<T>(t, [&](auto nv, auto vec) {
      adaln_bwd_kernel<T, decltype(nv)::value, decltype(vec)::value><<<grid, t.threads, 0, stream>>>(
          static_cast<const T*>(p.dy), static_cast<const T*>(p.x), static_cast<const T*>(p.gamma),
          p.mean, p.rstd, static_cast<T*>(p.dx), static_cast<T*>(p.dgamma),
          static_cast<T*>(p.dbeta), p.workspace, p.seqlen, p.dim, rows_per_split, p.per_token);
      return static_cast<Status>(cudaGetLastError());
    });
    if (st != kSuccess) return st;
  } else if (!p.per_token) {
    // T == 0: the partial sums are all zero.
    const cudaError_t err = cudaMemsetAsync(
        p.workspace, 0, sizeof(float) * p.batch * p.num_splits * 2 * p.dim, stream);
    if (err != cudaSuccess) return static_cast<Status>(err);
  }
  if (!p.per_token && p.batch * p.dim > 0) {
    const int threads = 256;
    const int64_t blocks = (p.batch * p.dim + threads - 1) / threads;
    adaln_bwd_reduce_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        p.workspace, static_cast<T*>(p.dgamma), static_cast<T*>(p.dbeta), p.batch, p.num_splits,
        p.dim);
    return static_cast<Status>(cudaGetLastError());
  }
  return kSuccess;
}

}  // namespace

int64_t cuda_bwd_num_splits(int64_t batch, int64_t seqlen, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    sms = 108;
  // Enough CTAs to fill the GPU about 4 deep, but at least ~8 rows per CTA so the per-CTA
  // partial sums (and the reduce that follows) stay small next to the rows themselves.
  const int64_t target = 4 * static_cast<int64_t>(sms);
  int64_t splits = std::max<int64_t>(1, (target + batch - 1) / std::max<int64_t>(batch, 1));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (seqlen + 7) / 8));
  return std::min<int64_t>(splits, 65535);
}

Status cuda_fwd(DType dtype, const FwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, s);
    case DType::kFloat16: return fwd_typed<__half>(p, s);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(p, s);
  }
  return static_cast<Status>(cudaErrorInvalidValue);
}

Status cuda_bwd(DType dtype, const BwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return bwd_typed<float>(p, s);
    case DType::kFloat16: return bwd_typed<__half>(p, s);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(p, s);
  }
  return static_cast<Status>(cudaErrorInvalidValue);
}

}  // namespace adaln
}  // namespace seqkern
