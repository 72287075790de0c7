// MEGA multi-head damped EMA, CUDA launchers: raw pointers, sizes and a stream. Shared by ema.cu
// (nvcc) and ema_api.cpp. The math is in ema_math.h.
//
// x, y, dy, dx: (B, L, D) with the D axis contiguous and any batch/time strides (in elements),
// so the time-major (L, B, D) layout MEGA keeps is read without a copy. pad: (B, L) bool
// (1 = padding) contiguous, or nullptr. Parameters: damping, decay, expansion, projection
// (D, h) fp32 contiguous (the trailing 1 of (D, h, 1) dropped); omega (D,) fp32 or nullptr.
//
// The full sequence is a chunked scan: L is cut into chunks of `chunk` steps; a tile is
// (b, chunk, block of channels), one thread per channel (or two) with all h heads in registers.
//   forward  1. per tile, the chunk's end state from a zero state          -> carry (local)
//            2. per (b, n, d), serially over chunks: each chunk's incoming state -> carry
//            3. per tile, rescan from the incoming state and write y
//   backward the same three phases in reverse for the adjoint pair (z, zr); phase 3 writes dx and
//            per-tile partial sums of G, R (and of dy * x for omega), then a small kernel reduces
//            them over tiles in a fixed order (no atomics) and applies the chain rule.
// With one chunk, phases 1 and 2 are skipped.
#pragma once

#include <cstdint>

#include "sk_dtype.h"

namespace seqkern {
namespace ema {

struct FwdParams {
  const void* x;
  int64_t x_stride_b, x_stride_t;
  void* y;
  int64_t y_stride_b, y_stride_t;
  const bool* pad;  // (B, L) or nullptr
  const float* damping;
  const float* decay;
  const float* expansion;
  const float* projection;
  const float* omega;  // (D,) or nullptr
  float* carry;        // (B, nchunks, h, D); only read/written when nchunks > 1
  int64_t batch, seqlen, dim, heads;
  int64_t trunc_len;  // Lk when Lk < L (truncation applies), else 0
  int64_t chunk;      // steps per chunk, >= 1
};

struct BwdParams {
  const void* dy;
  int64_t dy_stride_b, dy_stride_t;
  const void* x;
  int64_t x_stride_b, x_stride_t;
  void* dx;
  int64_t dx_stride_b, dx_stride_t;
  const bool* pad;
  const float* damping;
  const float* decay;
  const float* expansion;
  const float* projection;
  const float* omega;
  float* carry_z;        // (B, nchunks, h, D); only when nchunks > 1
  float* carry_zr;       // (B, nchunks, h, D); only when nchunks > 1
  float* partial_g;      // (B * nchunks, h, D)
  float* partial_r;      // (B * nchunks, h, D)
  float* partial_omega;  // (B * nchunks, D); only with omega
  float* ddamping;       // (D, h) outputs, fp32
  float* ddecay;
  float* dexpansion;
  float* dprojection;
  float* domega;  // (D,) or nullptr
  int64_t batch, seqlen, dim, heads;
  int64_t trunc_len;
  int64_t chunk;
};

// One streaming step: x (B, D); state (B, D, h), (D, h) when state_stride_b == 0, or nullptr
// (zero); y (B, D), new_state (B, D, h). x, state, y and new_state share the dtype tag.
struct StepParams {
  const void* x;
  const void* state;
  int64_t state_stride_b;  // D * h, or 0 for a (D, h) state shared by the batch
  void* y;
  void* new_state;
  const float* damping;
  const float* decay;
  const float* expansion;
  const float* projection;
  const float* omega;
  int64_t batch, dim, heads;
};

// Most EMA heads the CUDA kernels keep in registers.
constexpr int64_t kCudaMaxHeads = 16;

// The chunk length the CUDA kernels use when asked for `chunk` (0 = auto, from the SM count).
int64_t cuda_chunk(int64_t batch, int64_t seqlen, int64_t dim, int64_t chunk, int device);

Status cuda_fwd(DType dtype, const FwdParams& p, void* stream);
Status cuda_bwd(DType dtype, const BwdParams& p, void* stream);
Status cuda_step(DType dtype, const StepParams& p, void* stream);

}  // namespace ema
}  // namespace seqkern
