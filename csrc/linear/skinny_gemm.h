// A skinny float32 GEMM for streaming inference: y (m, n) = epilogue(x (m, k) @ w (n, k)^T)
// for a few dozen rows m against an nn.Linear weight (n, k) read once from memory.
//
// Raw pointers only (no torch headers): csrc/linear/skinny_gemm_cpu.cpp holds the kernel and
// its at::parallel_for driver. The AVX-512 kernel is chosen at run time; where the CPU lacks
// AVX-512F, skinny_gemm_f32_available() is false and callers use BLAS instead.
#pragma once

#include <cstdint>

namespace seqkern {
namespace linear {

enum SkinnyAct : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3 };

// y[i, j] = residual[i, j] + alpha * act(sum_p x[i, p] w[j, p] + bias[j])
// bias and residual may be null (then 0 and y = act(...) * alpha). Rows of x, y and residual
// are strided (ldx, ldy, ldr elements); w is contiguous (n, k). y must not alias x or w.
struct SkinnyEpilogue {
  const float* bias = nullptr;
  int act = kActNone;
  const float* residual = nullptr;
  int64_t ldr = 0;
  float alpha = 1.0f;
};

// True where the CPU has AVX-512F and the kernel is enabled (skinny_gemm_set_enabled, which
// tests use to run their callers' BLAS fallback on the same machine).
bool skinny_gemm_f32_available();
bool skinny_gemm_set_enabled(bool on);  // returns the previous setting

// Splits the output features across at::parallel_for's threads when the product is large
// enough to pay for waking them. Requires skinny_gemm_f32_available().
void skinny_gemm_f32(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t m,
                     int64_t k, int64_t n, const SkinnyEpilogue& ep);

// The same with a bfloat16 weight (its raw 16-bit patterns, (n, k) contiguous), read at half
// the bytes and widened exactly to float32 in registers: the x values, products and sums stay
// float32, so y equals skinny_gemm_f32 on the widened weight (to the summation order, which is
// the same). Plain AVX-512F: no AVX512-BF16 dot product, which would round x to bfloat16 too.
void skinny_gemm_f32_bf16w(const float* x, int64_t ldx, const uint16_t* w, float* y, int64_t ldy,
                           int64_t m, int64_t k, int64_t n, const SkinnyEpilogue& ep);

}  // namespace linear
}  // namespace seqkern
