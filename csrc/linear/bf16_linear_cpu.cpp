// The packed bfloat16 Linear of bf16_linear.h.
//
// One micro-kernel call per (row chunk, 64-column panel): C (rows, 64) = A (rows, kp) B (kp, 64),
// A the bfloat16 rows of x (zero-padded to an even k), B the panel, C written into y at the
// panel's columns (ld n_pad), then the bias added as the float32 result is copied out. Panels
// and row chunks are split across at::parallel_for's threads; each thread releases the
// micro-kernel's hardware context (AMX tile state) when its share is done.
#include "linear/bf16_linear.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>

namespace seqkern {
namespace linear {
namespace {

constexpr int64_t kPanel = 64;  // columns per packed panel (oneDNN packs 16, 32, 48 or 64)
constexpr int64_t kRows = 32;   // rows of x per micro-kernel call

std::atomic<bool> g_enabled{true};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

bool bf16_packed_available() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  static const bool cpu = at::native::cpublas::could_pack(at::kBFloat16);
  return cpu && g_enabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

bool bf16_packed_set_enabled(bool on) { return g_enabled.exchange(on); }

at::Tensor pack_bf16_weight(const at::Tensor& w) {
  TORCH_CHECK(bf16_packed_available(),
              "pack_bf16_weight: this CPU or torch build has no packed bfloat16 GEMM");
  TORCH_CHECK(w.dim() == 2 && w.is_cpu() && w.is_floating_point(),
              "pack_bf16_weight: expected a (n, k) floating CPU weight, got ", w.sizes());
  const int64_t n = w.size(0), k = w.size(1), kp = round_up(k, 2), np = round_up(n, kPanel);
  // (kp, np) bfloat16, zero where padded
  auto t = at::zeros({kp, np}, w.options().dtype(at::kBFloat16));
  t.narrow(0, 0, k).narrow(1, 0, n).copy_(w.t());
  auto packed = at::empty({np / kPanel, kp, kPanel}, t.options());
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  for (int64_t p = 0; p < np / kPanel; ++p) {
    at::native::cpublas::pack(kp, kPanel, np, kPanel, at::kBFloat16, at::kBFloat16,
                              t.const_data_ptr<at::BFloat16>() + p * kPanel,
                              packed[p].mutable_data_ptr<at::BFloat16>());
  }
#endif
  return packed;
}

at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& b) {
  TORCH_CHECK(bf16_packed_available(),
              "bf16_packed_linear: this CPU or torch build has no packed bfloat16 GEMM");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "bf16_packed_linear: x must be a ",
              "(m, k) float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(2) == kPanel && packed.is_contiguous(),
              "bf16_packed_linear: the weight must come from pack_bf16_weight");
  const int64_t m = x.size(0), k = x.size(1), n = b.numel();
  const int64_t panels = packed.size(0), kp = packed.size(1), np = panels * kPanel;
  TORCH_CHECK(kp == round_up(k, 2) && n > np - kPanel && n <= np, "bf16_packed_linear: x (",
              m, ", ", k, ") and bias (", n, ") do not fit the packed weight ", packed.sizes());
  auto xb = at::zeros({m, kp}, x.options().dtype(at::kBFloat16));
  xb.narrow(1, 0, k).copy_(x);
  auto yp = at::empty({m, np}, x.options());
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  const int64_t chunks = (m + kRows - 1) / kRows;
  const at::BFloat16* a = xb.const_data_ptr<at::BFloat16>();
  const at::BFloat16* w = packed.const_data_ptr<at::BFloat16>();
  float* y = yp.mutable_data_ptr<float>();
  // a task is worth a thread from ~64k multiply-adds
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kRows * kPanel * kp));
  at::parallel_for(0, chunks * panels, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t % panels, i0 = t / panels * kRows;
      const int64_t rows = std::min(kRows, m - i0);
      at::native::cpublas::brgemm(rows, kPanel, kp, kp, kPanel, np, false, a + i0 * kp,
                                  w + p * kp * kPanel, y + i0 * np + p * kPanel, true);
    }
    at::native::cpublas::brgemm_release(true);
  });
#endif
  auto out = yp.narrow(1, 0, n);
  return n == np ? out.add_(b) : out + b;
}

}  // namespace linear
}  // namespace seqkern
