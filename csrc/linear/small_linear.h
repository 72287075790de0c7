// The few-row Linear on raw float pointers, for other C++ CPU ops (e.g. the fused MEGA step).
#pragma once

#include <cstdint>

namespace seqkern {
namespace linear {

// y (m, n) = x (m, k) @ w (n, k)^T + b (n) [b may be null]; all contiguous float32; any m
// (rows are taken four at a time); output features split across threads.
void linear_rows_f32(const float* x, const float* w, const float* b, float* y, int64_t m,
                     int64_t k, int64_t n);

}  // namespace linear
}  // namespace seqkern
