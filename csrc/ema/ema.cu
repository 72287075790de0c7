// MEGA multi-head damped EMA launchers: choose the head count and vector width, check sizes and
// alignment, launch the phases of the chunked scan on the given stream. Compiles with nvcc alone
// (no torch headers).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ema/ema.h"
#include "ema/ema_kernel.cuh"

namespace seqkern {
namespace ema {
namespace {

constexpr int64_t kMinChunk = 32;        // shortest chunk the auto choice makes
constexpr int64_t kMaxGrid = 0x7fffffffLL;  // gridDim.x limit
constexpr int kMaxVecHeads = 4;  // two channels per thread only up to 4 heads (registers)

Status invalid() { return static_cast<Status>(cudaErrorInvalidValue); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every row start b * stride_b + t * stride_t + (even d) of `ptr` is 2-element aligned.
template <typename T>
bool rows_vec2(const void* ptr, int64_t stride_b, int64_t stride_t, int64_t batch,
               int64_t seqlen) {
  return reinterpret_cast<uintptr_t>(ptr) % (2 * sizeof(T)) == 0 &&
         (batch == 1 || stride_b % 2 == 0) && (seqlen == 1 || stride_t % 2 == 0);
}

// Calls f(integral_constant<int, H>, integral_constant<int, VEC>) with H the smallest of
// {1, 2, 4, 8, 16} >= heads, and VEC = 2 when vec2 and H <= kMaxVecHeads, else 1.
template <int H, typename F>
Status call_tiled(bool vec2, F&& f) {
  if constexpr (H <= kMaxVecHeads) {
    if (vec2) return f(std::integral_constant<int, H>{}, std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, H>{}, std::integral_constant<int, 1>{});
}

template <typename F>
Status with_tiling(int64_t heads, bool vec2, F&& f) {
  if (heads < 1) return invalid();
  if (heads <= 1) return call_tiled<1>(vec2, f);
  if (heads <= 2) return call_tiled<2>(vec2, f);
  if (heads <= 4) return call_tiled<4>(vec2, f);
  if (heads <= 8) return call_tiled<8>(vec2, f);
  if (heads <= 16) return call_tiled<16>(vec2, f);
  return invalid();
}

static_assert(kCudaMaxHeads == 16, "with_tiling instantiates up to 16 heads");

Status launch_status() { return static_cast<Status>(cudaGetLastError()); }

template <typename T>
Status fwd_typed(const FwdParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen * p.dim == 0) return kSuccess;
  if (p.chunk < 1 || p.heads < 1 || p.heads > kCudaMaxHeads) return invalid();
  const int64_t nchunks = ceil_div(p.seqlen, p.chunk);
  if (nchunks > 1 && p.carry == nullptr) return invalid();
  const bool vec2 = p.dim % 2 == 0 &&
                    rows_vec2<T>(p.x, p.x_stride_b, p.x_stride_t, p.batch, p.seqlen) &&
                    rows_vec2<T>(p.y, p.y_stride_b, p.y_stride_t, p.batch, p.seqlen);
  return with_tiling(p.heads, vec2, [&](auto h, auto vec) {
    constexpr int H = decltype(h)::value;
    constexpr int VEC = decltype(vec)::value;
    const int64_t nblocks = ceil_div(p.dim, static_cast<int64_t>(kThreads) * VEC);
    const int64_t tiles = p.batch * nchunks * nblocks;
    if (tiles > kMaxGrid) return invalid();
    if (nchunks > 1) {
      ema_fwd_kernel<T, H, VEC, false>
          <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, nchunks, nblocks);
      Status st = launch_status();
      if (st != kSuccess) return st;
      const int64_t blocks = ceil_div(p.batch * p.heads * p.dim, kCarryThreads);
      if (blocks > kMaxGrid) return invalid();
      ema_fwd_carry_kernel<<<static_cast<unsigned>(blocks), kCarryThreads, 0, stream>>>(p,
                                                                                      nchunks);
      st = launch_status();
      if (st != kSuccess) return st;
    }
    ema_fwd_kernel<T, H, VEC, true>
        <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, nchunks, nblocks);
    return launch_status();
  });
}

template <typename T>
Status bwd_typed(const BwdParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen * p.dim == 0) return kSuccess;
  if (p.chunk < 1 || p.heads < 1 || p.heads > kCudaMaxHeads) return invalid();
  const int64_t nchunks = ceil_div(p.seqlen, p.chunk);
  if (nchunks > 1 && (p.carry_z == nullptr || p.carry_zr == nullptr)) return invalid();
  if (p.partial_g == nullptr || p.partial_r == nullptr) return invalid();
  if ((p.omega != nullptr) != (p.partial_omega != nullptr) ||
      (p.omega != nullptr) != (p.domega != nullptr))
    return invalid();
  const bool vec2 = p.dim % 2 == 0 &&
                    rows_vec2<T>(p.dy, p.dy_stride_b, p.dy_stride_t, p.batch, p.seqlen) &&
                    rows_vec2<T>(p.x, p.x_stride_b, p.x_stride_t, p.batch, p.seqlen) &&
                    rows_vec2<T>(p.dx, p.dx_stride_b, p.dx_stride_t, p.batch, p.seqlen);
  const Status st = with_tiling(p.heads, vec2, [&](auto h, auto vec) {
    constexpr int H = decltype(h)::value;
    constexpr int VEC = decltype(vec)::value;
    const int64_t nblocks = ceil_div(p.dim, static_cast<int64_t>(kThreads) * VEC);
    const int64_t tiles = p.batch * nchunks * nblocks;
    if (tiles > kMaxGrid) return invalid();
    if (nchunks > 1) {
      ema_bwd_kernel<T, H, VEC, false>
          <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, nchunks, nblocks);
      Status s = launch_status();
      if (s != kSuccess) return s;
      const int64_t blocks = ceil_div(p.batch * p.heads * p.dim, kCarryThreads);
      if (blocks > kMaxGrid) return invalid();
      ema_bwd_carry_kernel<<<static_cast<unsigned>(blocks), kCarryThreads, 0, stream>>>(p,
                                                                                      nchunks);
      s = launch_status();
      if (s != kSuccess) return s;
    }
    ema_bwd_kernel<T, H, VEC, true>
        <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, nchunks, nblocks);
    return launch_status();
  });
  if (st != kSuccess) return st;
  const int64_t blocks = ceil_div(p.heads * p.dim, kCarryThreads);
  if (blocks > kMaxGrid) return invalid();
  ema_bwd_reduce_kernel<<<static_cast<unsigned>(blocks), kCarryThreads, 0, stream>>>(
      p, p.batch * nchunks);
  return launch_status();
}

template <typename T>
Status step_typed(const StepParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return kSuccess;
  if (p.heads < 1) return invalid();
  const int64_t blocks = ceil_div(p.batch * p.dim, kCarryThreads);
  if (blocks > kMaxGrid) return invalid();
  ema_step_kernel<T><<<static_cast<unsigned>(blocks), kCarryThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

int64_t cuda_chunk(int64_t batch, int64_t seqlen, int64_t dim, int64_t chunk, int device) {
  if (seqlen <= 0) return 1;
  if (chunk > 0) return std::min(chunk, seqlen);
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms < 1) {
    (void)cudaGetLastError();  // do not leave the failed query for a later launch check
    sms = 108;
  }
  // About 8 tiles per SM. One pass over time (no phases 1-2) when batch x channel blocks give
  // that alone; else cut time into chunks, none shorter than kMinChunk steps.
  const int64_t base = std::max<int64_t>(1, batch * ceil_div(dim, kThreads));
  const int64_t target = 8 * static_cast<int64_t>(sms);
  if (base >= target) return seqlen;
  const int64_t nchunks = ceil_div(target, base);
  return std::min(seqlen, std::max(kMinChunk, ceil_div(seqlen, nchunks)));
}

Status cuda_fwd(DType dtype, const FwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, s);
    case DType::kFloat16: return fwd_typed<__half>(p, s);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(p, s);
  }
  return invalid();
}

Status cuda_bwd(DType dtype, const BwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return bwd_typed<float>(p, s);
    case DType::kFloat16: return bwd_typed<__half>(p, s);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(p, s);
  }
  return invalid();
}

Status cuda_step(DType dtype, const StepParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return step_typed<float>(p, s);
    case DType::kFloat16: return step_typed<__half>(p, s);
    case DType::kBFloat16: return step_typed<__nv_bfloat16>(p, s);
  }
  return invalid();
}

}  // namespace ema
}  // namespace seqkern
