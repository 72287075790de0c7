// y = x @ weight^T + bias for a few rows of x (M <= kMaxRows) on the CPU.
//
// Decoding runs the same Linear layers on a handful of rows (a beam) per step. That is a
// matrix-vector product: its cost is reading the weight once. BLAS sgemm reaches only part of
// the memory bandwidth at M = 1..8, so this kernel streams each weight row once, from memory
// into L1, and takes the dot products of that row with every (L1-resident) row of x. Output rows
// are split across threads. The inner loop is compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (GCC's target_clones), so one wheel runs everywhere at full width.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "linear/bf16_linear.h"
#include "linear/skinny_gemm.h"
#include "linear/small_linear.h"
#include "sk_checks.h"
#include "sk_multiversion.h"

namespace seqkern {
namespace linear {

constexpr int64_t kMaxRows = 8;  // past ~8 rows BLAS is as fast (measured)

namespace {

// Dot products of one weight row with R rows of x at once: each weight element is loaded once
// for R fused multiply-adds, into R independent vector accumulators.
template <typename T, int R>
inline void dot_rows(const T* __restrict wr, const T* __restrict x, int64_t k, T* out) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const T* x0 = x;
  const T* x1 = x + (R > 1 ? k : 0);
  const T* x2 = x + (R > 2 ? 2 * k : 0);
  const T* x3 = x + (R > 3 ? 3 * k : 0);
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < k; ++i) {
    const T w = wr[i];
    a0 += w * x0[i];
    if (R > 1) a1 += w * x1[i];
    if (R > 2) a2 += w * x2[i];
    if (R > 3) a3 += w * x3[i];
  }
  out[0] = a0;
  if (R > 1) out[1] = a1;
  if (R > 2) out[2] = a2;
  if (R > 3) out[3] = a3;
}

// Output features [begin, end) of all m rows; x rows in groups of four.
template <typename T>
SK_INLINE void rows_impl(const T* x, const T* w, const T* b, T* y, int64_t m, int64_t k, int64_t n,
                      int64_t begin, int64_t end) {
  T acc[4];
  for (int64_t o = begin; o < end; ++o) {
    const T* wr = w + o * k;
    const T bias = b ? b[o] : T(0);
    for (int64_t r = 0; r < m; r += 4) {
      const int64_t left = m - r;
      const T* xr = x + r * k;
      if (left >= 4) dot_rows<T, 4>(wr, xr, k, acc);
      else if (left == 3) dot_rows<T, 3>(wr, xr, k, acc);
      else if (left == 2) dot_rows<T, 2>(wr, xr, k, acc);
      else dot_rows<T, 1>(wr, xr, k, acc);
      for (int64_t j = 0; j < std::min<int64_t>(left, 4); ++j) y[(r + j) * n + o] = acc[j] + bias;
    }
  }
}

// float is the hot path: compiled per ISA and picked at load time.
SK_MULTIVERSION
void rows(const float* x, const float* w, const float* b, float* y, int64_t m, int64_t k,
          int64_t n, int64_t begin, int64_t end) {
  rows_impl(x, w, b, y, m, k, n, begin, end);
}

void rows(const double* x, const double* w, const double* b, double* y, int64_t m, int64_t k,
          int64_t n, int64_t begin, int64_t end) {
  rows_impl(x, w, b, y, m, k, n, begin, end);
}

// A task streams >= ~64 KB of weight, enough to pay for waking a thread.
int64_t grain_for(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

}  // namespace

void linear_rows_f32(const float* x, const float* w, const float* b, float* y, int64_t m,
                     int64_t k, int64_t n) {
  at::parallel_for(0, n, grain_for(k),
                   [&](int64_t begin, int64_t end) { rows(x, w, b, y, m, k, n, begin, end); });
}

// x (M, K), weight (N, K), bias (N) or undefined -> (M, N). float32 or float64, CPU.
at::Tensor small_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                            const c10::optional<at::Tensor>& b_in) {
  const at::Tensor& x = x_in;
  const at::Tensor& weight = w_in;
  SK_CHECK_DIM(x, 2);
  SK_CHECK_DIM(weight, 2);
  TORCH_CHECK(x.is_cpu() && weight.is_cpu(), "small_linear_cpu: x and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "small_linear_cpu: x must be float32 or float64, got ", x.scalar_type());
  SK_CHECK_DTYPE(weight, x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(m <= kMaxRows, "small_linear_cpu: at most ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(weight.size(1) == k, "small_linear_cpu: weight must be (N, ", k, "), got ",
              weight.sizes());
  at::Tensor b;
  if (b_in.has_value() && b_in->defined()) {
    const at::Tensor& bias = *b_in;
    SK_CHECK_DTYPE(bias, x_in.scalar_type());
    SK_CHECK_SHAPE(bias, n);
    TORCH_CHECK(bias.is_cpu(), "small_linear_cpu: bias must be a CPU tensor");
    b = bias.contiguous();
  }
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const int64_t grain = grain_for(k);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_linear_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      rows(xp, wp, bp, yp, m, k, n, begin, end);
    });
  });
  return y;
}

// The skinny GEMM (skinny_gemm.h) on tensors, for tests: x (M, K) with unit column stride,
// weight (N, K) float32 or bfloat16, optional bias (N) and residual (M, N)
// -> residual + alpha * act(x W^T + b).
at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, int64_t act,
                             const c10::optional<at::Tensor>& residual, double alpha) {
  TORCH_CHECK(skinny_gemm_f32_available(),
              "skinny_linear_cpu: the AVX-512 kernel is unavailable here (or disabled)");
  SK_CHECK_DIM(x, 2);
  SK_CHECK_DIM(weight, 2);
  TORCH_CHECK(x.is_cpu() && weight.is_cpu(), "skinny_linear_cpu: CPU tensors only");
  SK_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "skinny_linear_cpu: weight must be float32 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(act >= kActNone && act <= kActSilu, "skinny_linear_cpu: unknown activation ", act);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "skinny_linear_cpu: weight must be (N, ", k, "), got ",
              weight.sizes());
  TORCH_CHECK(x.stride(1) == 1 || k <= 1, "skinny_linear_cpu: x needs unit column stride");
  const at::Tensor w = weight.contiguous();
  SkinnyEpilogue ep;
  ep.act = static_cast<int>(act);
  ep.alpha = static_cast<float>(alpha);
  at::Tensor b, r;
  if (bias.has_value() && bias->defined()) {
    SK_CHECK_DTYPE(*bias, at::kFloat);
    SK_CHECK_SHAPE(*bias, n);
    b = bias->contiguous();
    ep.bias = b.const_data_ptr<float>();
  }
  if (residual.has_value() && residual->defined()) {
    SK_CHECK_DTYPE(*residual, at::kFloat);
    SK_CHECK_SHAPE(*residual, m, n);
    r = residual->contiguous();
    ep.residual = r.const_data_ptr<float>();
    ep.ldr = n;
  }
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t ldx = std::max<int64_t>(x.stride(0), 1);
  if (w.scalar_type() == at::kBFloat16) {
    skinny_gemm_f32_bf16w(x.const_data_ptr<float>(), ldx,
                          reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()),
                          y.mutable_data_ptr<float>(), n, m, k, n, ep);
  } else {
    skinny_gemm_f32(x.const_data_ptr<float>(), ldx, w.const_data_ptr<float>(),
                    y.mutable_data_ptr<float>(), n, m, k, n, ep);
  }
  return y;
}

void bind(pybind11::module_& m) {
  m.def("skinny_linear_cpu", &skinny_linear_cpu,
        "residual + alpha * act(x @ weight^T + bias), the AVX-512 skinny GEMM (tests)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("act") = 0, pybind11::arg("residual") = pybind11::none(),
        pybind11::arg("alpha") = 1.0);
  m.def("skinny_gemm_available", &skinny_gemm_f32_available,
        "whether the AVX-512 skinny GEMM runs on this CPU (and is enabled)");
  m.def("skinny_gemm_set_enabled", &skinny_gemm_set_enabled,
        "turn the skinny GEMM on or off (callers fall back to BLAS); returns the previous value");
  m.def("pack_bf16_linear_weight", &pack_bf16_weight,
        "an (n, k) Linear weight rounded to bfloat16 and packed for bf16_packed_linear");
  m.def("bf16_packed_available", &bf16_packed_available,
        "whether the packed bfloat16 GEMM (AMX / AVX512-BF16 via oneDNN) runs here (enabled)");
  m.def("bf16_packed_set_enabled", &bf16_packed_set_enabled,
        "turn the packed bfloat16 GEMM on or off; returns the previous value");
  m.def("small_linear_cpu", &small_linear_cpu, "x @ weight^T + bias for at most 8 rows (CPU)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.attr("small_linear_max_rows") = kMaxRows;
}

}  // namespace linear
}  // namespace seqkern
