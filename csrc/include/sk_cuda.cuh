// Device-side helpers shared by the CUDA kernels (nvcc only; no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace seqkern {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC contiguous elements moved as one aligned load/store (16 bytes for the vector path).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of two values over the whole block; blockDim.x must be a multiple of 32.
// `smem` holds 2 * 32 floats. Every thread gets the result.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < num_warps ? smem[lane] : 0.f;
    b = lane < num_warps ? smem[32 + lane] : 0.f;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      smem[0] = a;
      smem[32] = b;
    }
  }
  __syncthreads();
  const float2 out = make_float2(smem[0], smem[32]);
  __syncthreads();  // smem may be reused by the caller's next reduction
  return out;
}

__device__ __forceinline__ float block_sum(float a, float* smem) {
  return block_sum2(a, 0.f, smem).x;
}

}  // namespace seqkern
