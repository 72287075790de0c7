// bfloat16 Linears for CPU streaming inference (seqkern.swap's cpu_weights="bf16"), on the
// matrix units of the CPU (Intel AMX; oneDNN decides whether it also packs for AVX512-BF16
// alone), through the batch-reduce GEMM micro-kernel that ATen exports from oneDNN
// (at::native::cpublas::brgemm).
//
// The weight (n, k) is rounded to bfloat16 and laid out once, at load: transposed to (k, n),
// cut into 64-column panels, each packed in the VNNI order the micro-kernel reads (pairs of k
// side by side). A call rounds x to bfloat16 (its only rounding besides the weight's), and the
// products accumulate in float32 into a float32 y.
#pragma once

#include <ATen/ATen.h>

namespace seqkern {
namespace linear {

// True where this torch build's micro-kernel packs bfloat16 on this CPU (AMX or AVX512-BF16)
// and the path is enabled (bf16_packed_set_enabled: tests run the other paths on the same
// machine).
bool bf16_packed_available();
bool bf16_packed_set_enabled(bool on);  // returns the previous setting

// (n, k) float weight -> its packed bfloat16 panels, a (panels, k rounded up to even, 64)
// bfloat16 tensor. Requires bf16_packed_available().
at::Tensor pack_bf16_weight(const at::Tensor& w);

// y (m, n) float32 = bf16(x) (m, k) @ W^T + b, for the weight `packed` holds (n = b's size).
at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& b);

}  // namespace linear
}  // namespace seqkern
