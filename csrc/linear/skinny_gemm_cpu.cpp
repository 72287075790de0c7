// The skinny float32 GEMM of skinny_gemm.h: an AVX-512 kernel for m ~ 1..64 rows.
//
// Streaming a ConvEmformer at batch 1 runs every Linear on ~21 rows, and the layer's cost is
// the weights: each is read from memory once per segment. BLAS (MKL's sgemm on this path)
// reaches ~51 GFLOP/s per core on a 21 x 256 x 1024 product with cold weights, this kernel ~82
// (benchmarks/skinny_gemm.py, results/cpu-amd-epyc/skinny_gemm-1thread.json).
// It reads the weight where it lies, in blocks of 4 output rows:
//   - each 64-byte piece of the 4 weight rows is loaded once into a register and meets up to
//     6 rows of x (24 accumulators of 16 lanes, 29 of the 32 zmm registers in use);
//   - the 4 x (up to) 6 partial sums are folded to scalars only once per block;
//   - the block after next is prefetched into L2 while this one is computed;
//   - bias, activation, scale and residual are applied as each output is written.
// Output blocks are split across at::parallel_for's threads.
#include "linear/skinny_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SK_SKINNY_X86 1
// GCC 12's AVX-512 headers fill unused lanes from a deliberately undefined value, and its
// -Wmaybe-uninitialized reports every inlined use (GCC bug 105593, fixed in GCC 13)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SK_AVX512 __attribute__((target("avx512f")))
#else
#define SK_SKINNY_X86 0
#endif

namespace seqkern {
namespace linear {
namespace {

std::atomic<bool> g_enabled{true};

inline float activate(float v, int act) {
  switch (act) {
    case kActRelu:
      return v > 0.0f ? v : 0.0f;
    case kActGelu:  // exact (erf), as nn.GELU()
      return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case kActSilu:
      return v / (1.0f + std::exp(-v));
    default:
      return v;
  }
}

// s (rows, 4) sums of output columns [j0, j0 + nr) -> y through the epilogue
inline void store(const float (*s)[4], int rows, int nr, int64_t i0, int64_t j0, float* y,
                  int64_t ldy, const SkinnyEpilogue& ep) {
  for (int i = 0; i < rows; ++i) {
    float* yr = y + (i0 + i) * ldy + j0;
    const float* rr = ep.residual ? ep.residual + (i0 + i) * ep.ldr + j0 : nullptr;
    for (int j = 0; j < nr; ++j) {
      const float v = activate(s[i][j] + (ep.bias ? ep.bias[j0 + j] : 0.0f), ep.act) * ep.alpha;
      yr[j] = rr ? rr[j] + v : v;
    }
  }
}

#if SK_SKINNY_X86

// (a0, a1, a2, a3) -> (sum a0, sum a1, sum a2, sum a3)
SK_AVX512 inline __m256 fold(__m512 a) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  return _mm256_add_ps(_mm512_castps512_ps256(a), hi);
}

SK_AVX512 inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a0), fold(a1)),
                                  _mm256_hadd_ps(fold(a2), fold(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// 16 weights from p as float32: the float32 weight itself, or a bfloat16 one widened exactly
// (its 16 bits are the high half of the float's); masked lanes read as 0
SK_AVX512 inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
SK_AVX512 inline __m512 load_w(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SK_AVX512 inline __m512 load_w(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
SK_AVX512 inline __m512 load_w(__mmask16 m, const uint16_t* p) {
  // (a masked 16-bit load needs AVX512BW; the tail is short, so go through a zeroed copy)
  alignas(32) uint16_t h[16] = {};
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) h[i] = p[i];
  return load_w(h);
}

// s[i][j] = x[i, :] . w[j][:] for MR rows of x and 4 weight rows; k = kfull + a masked tail.
// WT: the weight's storage (float, or uint16_t holding bfloat16); the products and sums are
// float32 either way, so a bfloat16 weight gives exactly the float32 result on its widened
// values.
template <int MR, typename WT>
SK_AVX512 inline void block(const float* x, int64_t ldx, const WT* const* w, int64_t kfull,
                            __mmask16 tail, float (*s)[4]) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kfull; p += 16) {
    const __m512 w0 = load_w(w[0] + p), w1 = load_w(w[1] + p);
    const __m512 w2 = load_w(w[2] + p), w3 = load_w(w[3] + p);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + p);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  if (tail) {
    const int64_t p = kfull;
    const __m512 w0 = load_w(tail, w[0] + p), w1 = load_w(tail, w[1] + p);
    const __m512 w2 = load_w(tail, w[2] + p), w3 = load_w(tail, w[3] + p);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + i * ldx + p);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i) _mm_storeu_ps(s[i], sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

constexpr int kMr = 6;         // rows of x per register block
constexpr int kNr = 4;         // weight rows (output features) per block
constexpr int64_t kAhead = 2;  // blocks prefetched ahead

// output blocks [b0, b1) of 4 features each
template <typename WT>
SK_AVX512 void run_blocks(const float* x, int64_t ldx, const WT* w, float* y, int64_t ldy,
                          int64_t m, int64_t k, int64_t n, const SkinnyEpilogue& ep, int64_t b0,
                          int64_t b1) {
  const int64_t kfull = k & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - kfull)) - 1u);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = b * kNr;
    const int nr = static_cast<int>(std::min<int64_t>(kNr, n - j0));
    if (b + kAhead < b1) {  // weight rows are contiguous: one run of lines
      const int64_t ja = j0 + kAhead * kNr;
      const char* p = reinterpret_cast<const char*>(w + ja * k);
      const int64_t bytes = std::min<int64_t>(kNr, n - ja) * k * int64_t{sizeof(WT)};
      for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
    }
    const WT* wr[kNr];
    for (int j = 0; j < kNr; ++j) wr[j] = w + std::min<int64_t>(j0 + j, n - 1) * k;
    float s[kMr][4];
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int rows = static_cast<int>(std::min<int64_t>(kMr, m - i0));
      const float* xi = x + i0 * ldx;
      switch (rows) {
        case 6: block<6>(xi, ldx, wr, kfull, tail, s); break;
        case 5: block<5>(xi, ldx, wr, kfull, tail, s); break;
        case 4: block<4>(xi, ldx, wr, kfull, tail, s); break;
        case 3: block<3>(xi, ldx, wr, kfull, tail, s); break;
        case 2: block<2>(xi, ldx, wr, kfull, tail, s); break;
        default: block<1>(xi, ldx, wr, kfull, tail, s); break;
      }
      store(s, rows, nr, i0, j0, y, ldy, ep);
    }
  }
}

#endif  // SK_SKINNY_X86

}  // namespace

bool skinny_gemm_f32_available() {
#if SK_SKINNY_X86
  static const bool cpu = __builtin_cpu_supports("avx512f");
  return cpu && g_enabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

bool skinny_gemm_set_enabled(bool on) { return g_enabled.exchange(on); }

namespace {

template <typename WT>
void skinny_gemm(const float* x, int64_t ldx, const WT* w, float* y, int64_t ldy, int64_t m,
                 int64_t k, int64_t n, const SkinnyEpilogue& ep) {
#if SK_SKINNY_X86
  if (m <= 0 || n <= 0) return;
  const int64_t blocks = (n + kNr - 1) / kNr;
  // a task is worth a thread from ~64k multiply-adds (a few microseconds)
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kNr * m * k));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run_blocks(x, ldx, w, y, ldy, m, k, n, ep, b0, b1);
  });
#else
  (void)x, (void)ldx, (void)w, (void)y, (void)ldy, (void)m, (void)k, (void)n, (void)ep;
#endif
}

}  // namespace

void skinny_gemm_f32(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t m,
                     int64_t k, int64_t n, const SkinnyEpilogue& ep) {
  skinny_gemm(x, ldx, w, y, ldy, m, k, n, ep);
}

void skinny_gemm_f32_bf16w(const float* x, int64_t ldx, const uint16_t* w, float* y, int64_t ldy,
                           int64_t m, int64_t k, int64_t n, const SkinnyEpilogue& ep) {
  skinny_gemm(x, ldx, w, y, ldy, m, k, n, ep);
}

}  // namespace linear
}  // namespace seqkern
