// One streaming step of a ConvEmformer (or plain Emformer) layer on the CPU, fused: the whole
// layer in one call; both share the attention and state update (`attend`).
//
// Streaming inference at batch 1 runs each layer on ~21 rows (right context, one segment, its
// summary). Unfused, that is ~150 small PyTorch ops per layer whose Python and dispatch costs
// rival their arithmetic, and two oneDNN depthwise convolutions whose setup dwarfs their ~40k
// multiply-adds. Here the layer is one C++ call. Its cost is then the weights (6 MB per layer at
// input_dim 256, read from memory each segment): float32 Linears run on the AVX-512 skinny GEMM
// (csrc/linear/skinny_gemm_cpu.cpp) with bias, activation and residual fused into its epilogue,
// and on BLAS where that kernel does not apply. The attention reads its keys where the GEMM and
// the state hold them (tiny_gemm per head, ATen's fp32 softmax), the state updates are written
// once, LayerNorm and the depthwise convolution are loops.
// seqkern.modules.emformer takes this path for ConvEmformer.infer without autograd, dropout
// inactive, on float32 or float64 CPU tensors; the Python ops otherwise.
//
// Math (time-major rows, D = input_dim, upstream torchaudio 2.8.0 order; U = segment frames,
// R = right-context frames, S = 1 summary row when memory is used, else 0):
//   x      = [rc ; utt ; mean(utt)]                                      (R + U + S rows)
//   f0     = x + 0.5 FFN0(x),  FFN(z) = W2 act(W1 LN(z) + b1) + b2
//   n      = LN_in(f0) = [n_rc ; n_utt ; n_sum]
//   q      = Wq n + bq ;  [k ; v] = Wkv [mem ; n_rc ; n_utt] + bkv
//   keys   = [k_mem ; k_rc ; k_utt[:a] ; lc_key ; k_utt[a:]] (values likewise), mem and lc the
//            valid state rows, a = U - max(lengths) (0 unless every row is partial)
//   a      = softmax_fp32(mask(q k^T / sqrt(hd))) v, masked logits = negative_inf: the summary
//            row does not see memory; for B > 1, key j of batch b is masked from
//            lengths[b] + Tk - max(lengths) on (upstream's padding rule)
//   o      = Wo a + bo ;  rows [rc ; utt] -> r = o + f0[rc ; utt] ;  summary -> next memory
//            (clamp to [-10, 10], or tanh)
//   z      = GLU(Wp LN(r) + bp) ;  the utterance part is convolved (depthwise, width k) after
//            the (k - 1)-frame cache; the right context after the last k - 1 frames of
//            [cache ; z_utt]
//   c      = Wpost act(LN(conv)) + bpost + r ;  y = LN_out(c + 0.5 FFN1(c))
// State: memory <- last M of [memory ; mems_in],
// lc <- last LC of [lc ; k_utt[:a] ; lc_valid ; k_utt[a:]],
// conv cache <- last k - 1 frames of [cache ; z_utt], past_length += U.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "linear/bf16_linear.h"
#include "linear/skinny_gemm.h"
#include "sk_checks.h"
#include "sk_multiversion.h"

namespace seqkern {
namespace emformer {
namespace {

enum Activation : int64_t { kRelu = 0, kGelu = 1, kSilu = 2 };

// y <- act(y) in place (act a linear::SkinnyAct): ATen's vectorised kernels, the op path's own
void activate_(at::Tensor& y, int act) {
  switch (act) {
    case linear::kActRelu: y.relu_(); break;
    case linear::kActGelu: at::gelu_(y); break;  // exact (erf), as nn.GELU()
    case linear::kActSilu: at::silu_(y); break;
    default: break;
  }
}

// Rows up to which the skinny GEMM beats BLAS (streaming: (R + U + 1) x batch rows).
constexpr int64_t kSkinnyRows = 96;

// residual + alpha * act(x W^T + b) (act a linear::SkinnyAct; residual may be undefined).
// float32 streaming shapes take the AVX-512 skinny GEMM with the epilogue fused; the rest
// (float64, many rows, no AVX-512) BLAS and ATen ops in the same order of operations. A
// bfloat16 w (float32 x only: swap's cpu_weights="bf16") comes (n, k), read as it is by the
// skinny GEMM and widened to float32 for BLAS (float32 arithmetic on the widened values), or
// packed for the CPU's matrix units (3-D, linear::pack_bf16_weight: x rounded to bfloat16 too,
// float32 accumulation).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  int act = linear::kActNone, const at::Tensor& residual = {},
                  double alpha = 1.0) {
  if (w.dim() == 3) {
    auto y = linear::bf16_packed_linear(x.stride(1) == 1 ? x : x.contiguous(), w, b);
    activate_(y, act);
    if (alpha != 1.0) y.mul_(alpha);
    return residual.defined() ? y.add_(residual) : y;
  }
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const bool bf16w = w.scalar_type() == at::kBFloat16;
  if (x.scalar_type() == at::kFloat && m <= kSkinnyRows && linear::skinny_gemm_f32_available()) {
    const auto xc = x.stride(1) == 1 ? x : x.contiguous();
    const auto wc = w.contiguous();
    const auto bc = b.contiguous();
    linear::SkinnyEpilogue ep;
    ep.bias = bc.const_data_ptr<float>();
    ep.act = act;
    ep.alpha = static_cast<float>(alpha);
    at::Tensor rc;
    if (residual.defined()) {
      rc = residual.contiguous();
      ep.residual = rc.const_data_ptr<float>();
      ep.ldr = n;
    }
    auto y = at::empty({m, n}, x.options());
    const int64_t ldx = std::max<int64_t>(xc.stride(0), 1);
    if (bf16w) {
      linear::skinny_gemm_f32_bf16w(
          xc.const_data_ptr<float>(), ldx,
          reinterpret_cast<const uint16_t*>(wc.const_data_ptr<at::BFloat16>()),
          y.mutable_data_ptr<float>(), n, m, k, n, ep);
    } else {
      linear::skinny_gemm_f32(xc.const_data_ptr<float>(), ldx, wc.const_data_ptr<float>(),
                              y.mutable_data_ptr<float>(), n, m, k, n, ep);
    }
    return y;
  }
  auto y = at::addmm(b, x, (bf16w ? w.to(x.scalar_type()) : w).t());
  activate_(y, act);
  if (alpha != 1.0) y.mul_(alpha);
  return residual.defined() ? y.add_(residual) : y;
}

// LayerNorm of `rows` rows of D: two passes (mean, then the centred variance), accumulated in
// double for double and in float for float (as ATen's CPU kernel); the float loops are
// vectorised (omp simd) and compiled per ISA, picked at load time
template <typename T, typename Acc>
inline void layer_norm_impl(const T* x, const T* w, const T* b, T* y, int64_t rows, int64_t D,
                            double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    Acc sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < D; ++c) sum += xr[c];
    const Acc mean = sum / static_cast<Acc>(D);
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < D; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
    const Acc rstd = Acc(1) / std::sqrt(sq / static_cast<Acc>(D) + static_cast<Acc>(eps));
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) yr[c] = static_cast<T>((xr[c] - mean) * rstd * w[c] + b[c]);
  }
}

SK_MULTIVERSION
void layer_norm_rows_f32(const float* x, const float* w, const float* b, float* y, int64_t rows,
                         int64_t D, double eps) {
  layer_norm_impl<float, float>(x, w, b, y, rows, D, eps);
}

// LayerNorm over the last dim of (rows, D) x: a direct loop (ATen's costs more in dispatch
// than in arithmetic at ~21 rows)
at::Tensor layer_norm_rows(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b,
                           double eps) {
  const auto x = x_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  if (x.scalar_type() == at::kFloat) {
    layer_norm_rows_f32(x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                        b.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows, D, eps);
    return y;
  }
  TORCH_CHECK(x.scalar_type() == at::kDouble, "conv_emformer_step_cpu: float32 or float64");
  layer_norm_impl<double, double>(x.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                  b.const_data_ptr<double>(), y.mutable_data_ptr<double>(), rows,
                                  D, eps);
  return y;
}

// out (T_out, B, D) = bias + sum_j wt[j, :] * in[t + j]  (in (T_out + k - 1, B, D), wt (k, D):
// the depthwise weight transposed, so the channel loop reads it contiguously)
template <typename T>
inline void depthwise_conv_impl(const T* x, const T* wt, const T* bias, T* y, int64_t t_out,
                                int64_t rows, int64_t D, int64_t k) {
  const int64_t frame = rows * D;
  for (int64_t t = 0; t < t_out; ++t) {
    for (int64_t b = 0; b < rows; ++b) {
      T* yo = y + t * frame + b * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) yo[c] = bias[c];
      for (int64_t j = 0; j < k; ++j) {
        const T* xi = x + (t + j) * frame + b * D;
        const T* wj = wt + j * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) yo[c] += wj[c] * xi[c];
      }
    }
  }
}

SK_MULTIVERSION
void depthwise_conv_f32(const float* x, const float* wt, const float* bias, float* y,
                        int64_t t_out, int64_t rows, int64_t D, int64_t k) {
  depthwise_conv_impl<float>(x, wt, bias, y, t_out, rows, D, k);
}

// in (T_out + k - 1, B, D) contiguous, wt (k, D), bias (D) -> (T_out, B, D)
at::Tensor conv(const at::Tensor& in, const at::Tensor& wt, const at::Tensor& bias) {
  const int64_t k = wt.size(0), t_out = in.size(0) - k + 1;
  const int64_t rows = in.size(1), D = in.size(2);
  auto out = at::empty({t_out, rows, D}, in.options());
  if (in.scalar_type() == at::kFloat) {
    depthwise_conv_f32(in.const_data_ptr<float>(), wt.const_data_ptr<float>(),
                       bias.const_data_ptr<float>(), out.mutable_data_ptr<float>(), t_out, rows,
                       D, k);
  } else {
    TORCH_CHECK(in.scalar_type() == at::kDouble, "conv_emformer_step_cpu: float32 or float64");
    depthwise_conv_impl<double>(in.const_data_ptr<double>(), wt.const_data_ptr<double>(),
                                bias.const_data_ptr<double>(), out.mutable_data_ptr<double>(),
                                t_out, rows, D, k);
  }
  return out;
}

// A run of frames of (B, D) rows: frame t, batch row b starts at base + t * frame + b * row
// (D contiguous values), so a run can be a column block of a GEMM output as well as a state.
template <typename T>
struct Frames {
  const T* base;
  int64_t frames, frame, row;
};

// out (cap, B, D) <- the last `cap` frames of the concatenation of `parts` (which hold at
// least `cap` frames): the state updates, written once, without the concatenation
template <typename T>
void keep_last(const std::vector<Frames<T>>& parts, int64_t cap, int64_t B, int64_t D, T* out) {
  int64_t skip = -cap;
  for (const auto& p : parts) skip += p.frames;
  for (const auto& p : parts) {
    const int64_t from = std::min(skip, p.frames);
    skip -= from;
    for (int64_t t = from; t < p.frames; ++t, out += B * D) {
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(out + b * D, p.base + t * p.frame + b * p.row, D * sizeof(T));
      }
    }
  }
}

// The two attention products of a head, both c (M, N) = a (M, K) b (K, N) with a's entries
// cast to T (probs are fp32; upstream casts them to the input dtype first) and b stored K-major
// with N a multiple of kLanes: register blocks of kRows rows x kLanes columns, each a's
// entry broadcast over a row of b (no horizontal sums). a's rows are read up to a multiple of
// kRows (the caller pads them).
constexpr int64_t kLanes = 16, kRows = 8;

template <typename T, typename TA>
SK_INLINE void tiny_gemm(const TA* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                      int64_t M, int64_t N, int64_t K) {
  for (int64_t i0 = 0; i0 < M; i0 += kRows) {
    const int64_t rows = std::min(kRows, M - i0);
    for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
      T acc[kRows][kLanes] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* bk = b + k * ldb + j0;
        for (int64_t i = 0; i < kRows; ++i) {
          const T ai = static_cast<T>(a[(i0 + i) * lda + k]);
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[i][l] += ai * bk[l];
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        std::copy(acc[i], acc[i] + kLanes, c + (i0 + i) * ldc + j0);
      }
    }
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Attention of the (b, h) pairs [bh0, bh1), in two passes around one fp32 softmax over all
// of them (ATen's, as upstream). q is (Tq B, D) time-major; kp[j B + b] / vp[j B + b] point at
// key / value j of batch row b. Pass 1: logits[(b H + h), i, j] = float((q_i * scaling) . k_j),
// or negative_inf where masked (the summary row, last when `summary`, does not see the first
// `mem` keys; key j >= key_len[b] is padding). Pass 2: out (Tq B, D) time-major = probs @ v.
// Each pass gathers the head's operands into kLanes-padded buffers for tiny_gemm.
template <typename T>
SK_INLINE void logits_impl(const T* q, const T* const* kp, float* logits, int64_t Tq, int64_t Tk,
                 int64_t B, int64_t H, int64_t hd, double scaling, bool summary, int64_t mem,
                 const int64_t* key_len, float negative_inf, int64_t bh0, int64_t bh1) {
  const int64_t D = H * hd, Tkp = round_up(Tk, kLanes);
  std::vector<T> qs(round_up(Tq, kRows) * hd, T(0)), kt(hd * Tkp, T(0)), scores(Tq * Tkp);
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    for (int64_t i = 0; i < Tq; ++i) {
      const T* qi = q + (i * B + b) * D + h * hd;
      for (int64_t c = 0; c < hd; ++c) qs[i * hd + c] = qi[c] * static_cast<T>(scaling);
    }
    for (int64_t j = 0; j < Tk; ++j) {
      const T* k = kp[j * B + b] + h * hd;
      for (int64_t c = 0; c < hd; ++c) kt[c * Tkp + j] = k[c];
    }
    tiny_gemm<T, T>(qs.data(), hd, kt.data(), Tkp, scores.data(), Tkp, Tq, Tkp, hd);
    const int64_t visible = key_len ? std::clamp<int64_t>(key_len[b], 0, Tk) : Tk;
    for (int64_t i = 0; i < Tq; ++i) {
      const int64_t hidden = summary && i == Tq - 1 ? std::min(mem, Tk) : 0;
      float* row = logits + (bh * Tq + i) * Tk;
      for (int64_t j = 0; j < Tk; ++j) {
        row[j] = j < hidden || j >= visible ? negative_inf
                                            : static_cast<float>(scores[i * Tkp + j]);
      }
    }
  }
}

template <typename T>
SK_INLINE void weighted_sum_impl(const float* probs, const T* const* vp, T* out, int64_t Tq, int64_t Tk,
                       int64_t B, int64_t H, int64_t hd, int64_t bh0, int64_t bh1) {
  const int64_t D = H * hd, hdp = round_up(hd, kLanes);
  std::vector<float> p(round_up(Tq, kRows) * Tk, 0.0f);
  std::vector<T> vt(Tk * hdp, T(0)), o(Tq * hdp);
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    std::copy(probs + bh * Tq * Tk, probs + (bh + 1) * Tq * Tk, p.begin());
    for (int64_t j = 0; j < Tk; ++j) {
      const T* v = vp[j * B + b] + h * hd;
      std::copy(v, v + hd, vt.data() + j * hdp);
    }
    tiny_gemm<T, float>(p.data(), Tk, vt.data(), hdp, o.data(), hdp, Tq, hdp, Tk);
    for (int64_t i = 0; i < Tq; ++i) {
      std::copy(o.data() + i * hdp, o.data() + i * hdp + hd, out + (i * B + b) * D + h * hd);
    }
  }
}

SK_MULTIVERSION
void logits_f32(const float* q, const float* const* kp, float* logits, int64_t Tq, int64_t Tk,
                int64_t B, int64_t H, int64_t hd, double scaling, bool summary, int64_t mem,
                const int64_t* key_len, float negative_inf, int64_t bh0, int64_t bh1) {
  logits_impl<float>(q, kp, logits, Tq, Tk, B, H, hd, scaling, summary, mem, key_len,
                     negative_inf, bh0, bh1);
}

SK_MULTIVERSION
void weighted_sum_f32(const float* probs, const float* const* vp, float* out, int64_t Tq,
                      int64_t Tk, int64_t B, int64_t H, int64_t hd, int64_t bh0, int64_t bh1) {
  weighted_sum_impl<float>(probs, vp, out, Tq, Tk, B, H, hd, bh0, bh1);
}

// The part both layer types share: attention of the query rows over [memory ; rc ; utt with
// the left context inserted], and the state update. qin holds the (R + U + S) x B query rows;
// its first (R + U) x B rows (the normed [rc ; utt]) are also the key/value rows.
struct Attended {
  at::Tensor o;             // out_proj of the attention, ((R + U + S) B, D)
  at::Tensor next_mems;     // the summary row's output, clamped or tanh: (S, B, D)
  at::Tensor memory, lc_key, lc_val, past_length;  // the new state
};

template <typename T>
Attended attend_impl(const at::Tensor& qin, const at::Tensor& mems_in_, const at::Tensor& memory_,
                     const at::Tensor& lc_key_, const at::Tensor& lc_val_,
                     const at::Tensor& past_length, const at::Tensor& lengths,
                     const std::vector<at::Tensor>& W, int64_t wq, int64_t num_heads,
                     int64_t segment_length, int64_t R, int64_t U, int64_t B, bool tanh_on_mem,
                     double negative_inf) {
  const int64_t D = qin.size(1), S = mems_in_.size(0) > 0 ? 1 : 0, Tq = R + U + S;
  const auto opts = qin.options();
  const auto memory = memory_.contiguous(), mems_in = mems_in_.contiguous();
  const auto lc_key = lc_key_.contiguous(), lc_val = lc_val_.contiguous();
  const int64_t m_cap = memory.size(0), lc_cap = lc_key.size(0);
  // valid (right-aligned) state rows; upstream reads batch element 0's past length
  const int64_t past = past_length.reshape({-1})[0].item<int64_t>();
  const int64_t lc_rows = std::min(lc_cap, past);
  const int64_t mem_rows =
      S ? std::min(m_cap, (past + segment_length - 1) / segment_length) : int64_t{0};
  const auto len = lengths.to(at::kLong).contiguous();
  const int64_t* len_p = len.const_data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(len_p, len_p + B);

  // keys (values alike): [mem ; rc ; utt[:a] ; lc ; utt[a:]]: upstream inserts the left
  // context after M + R' keys, R' = R + U - max(lengths), so a = U - max(lengths) (0 for a full
  // segment; a segment where every row is partial moves it, and with it the keys the state
  // keeps). The projected rows are read where the GEMM wrote them, the left context where the
  // state holds it.
  const int64_t Tk = mem_rows + R + lc_rows + U, front = mem_rows + R;
  const int64_t a = std::clamp<int64_t>(U - max_len, int64_t{0}, U);
  const auto q = linear(qin, W[wq], W[wq + 1]);
  auto kv_in = at::empty({(mem_rows + R + U) * B, D}, opts);
  T* kv_in_p = kv_in.mutable_data_ptr<T>();
  if (mem_rows) {
    std::memcpy(kv_in_p, memory.const_data_ptr<T>() + (m_cap - mem_rows) * B * D,
                mem_rows * B * D * sizeof(T));
  }
  std::memcpy(kv_in_p + mem_rows * B * D, qin.const_data_ptr<T>(), (R + U) * B * D * sizeof(T));
  const auto kv = linear(kv_in, W[wq + 2], W[wq + 3]);  // (frames, B, 2D) as rows
  const T* kv_p = kv.const_data_ptr<T>();
  auto runs = [&](const T* fresh, const T* lc) {  // fresh: kv's key (or value) columns
    const int64_t f = B * 2 * D, r = 2 * D;
    return std::vector<Frames<T>>{{fresh, front, f, r},
                                  {fresh + front * f, a, f, r},
                                  {lc + (lc_cap - lc_rows) * B * D, lc_rows, B * D, D},
                                  {fresh + (front + a) * f, U - a, f, r}};
  };
  const auto key_runs = runs(kv_p, lc_key.const_data_ptr<T>());
  const auto val_runs = runs(kv_p + D, lc_val.const_data_ptr<T>());
  std::vector<const T*> kp, vp;
  kp.reserve(Tk * B), vp.reserve(Tk * B);
  for (size_t p = 0; p < key_runs.size(); ++p) {
    for (int64_t t = 0; t < key_runs[p].frames; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        kp.push_back(key_runs[p].base + t * key_runs[p].frame + b * key_runs[p].row);
        vp.push_back(val_runs[p].base + t * val_runs[p].frame + b * val_runs[p].row);
      }
    }
  }

  // upstream's key padding for B > 1 (none for B = 1): key j >= lengths[b] + Tk - max(lengths)
  std::vector<int64_t> key_len;
  if (B > 1) {
    for (int64_t b = 0; b < B; ++b) key_len.push_back(len_p[b] + Tk - max_len);
  }
  const int64_t H = num_heads, hd = D / H;
  const double scaling = 1.0 / std::sqrt(static_cast<double>(hd));
  const T* q_p = q.const_data_ptr<T>();
  const int64_t* kl = key_len.empty() ? nullptr : key_len.data();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Tq * Tk * hd));
  auto logits = at::empty({B * H, Tq, Tk}, opts.dtype(at::kFloat));
  float* logits_p = logits.mutable_data_ptr<float>();
  at::parallel_for(0, B * H, grain, [&](int64_t bh0, int64_t bh1) {
    if constexpr (std::is_same_v<T, float>) {
      logits_f32(q_p, kp.data(), logits_p, Tq, Tk, B, H, hd, scaling, S > 0, mem_rows, kl,
                 static_cast<float>(negative_inf), bh0, bh1);
    } else {
      logits_impl<T>(q_p, kp.data(), logits_p, Tq, Tk, B, H, hd, scaling, S > 0, mem_rows, kl,
                     static_cast<float>(negative_inf), bh0, bh1);
    }
  });
  const auto probs = at::softmax(logits, -1);  // fp32, as upstream
  const float* probs_p = probs.const_data_ptr<float>();
  auto attn = at::empty({Tq * B, D}, opts);
  T* attn_p = attn.mutable_data_ptr<T>();
  at::parallel_for(0, B * H, grain, [&](int64_t bh0, int64_t bh1) {
    if constexpr (std::is_same_v<T, float>) {
      weighted_sum_f32(probs_p, vp.data(), attn_p, Tq, Tk, B, H, hd, bh0, bh1);
    } else {
      weighted_sum_impl<T>(probs_p, vp.data(), attn_p, Tq, Tk, B, H, hd, bh0, bh1);
    }
  });
  Attended out;
  out.o = linear(attn, W[wq + 4], W[wq + 5]);
  auto next_mems = out.o.narrow(0, (R + U) * B, S * B).view({S, B, D});
  out.next_mems = tanh_on_mem ? at::tanh(next_mems) : at::clamp(next_mems, -10, 10);

  // state: memory <- last M of [memory ; mems_in], lc <- last LC of [lc ; the new keys]
  out.memory = at::empty({m_cap, B, D}, opts);
  keep_last<T>({{memory.const_data_ptr<T>(), m_cap, B * D, D},
                {mems_in.const_data_ptr<T>(), mems_in.size(0), B * D, D}},
               m_cap, B, D, out.memory.mutable_data_ptr<T>());
  auto new_lc = [&](const at::Tensor& lc, const std::vector<Frames<T>>& r) {
    auto next = at::empty({lc_cap, B, D}, opts);
    keep_last<T>({{lc.const_data_ptr<T>(), lc_cap, B * D, D}, r[1], r[2], r[3]}, lc_cap, B, D,
                 next.mutable_data_ptr<T>());
    return next;
  };
  out.lc_key = new_lc(lc_key, key_runs);
  out.lc_val = new_lc(lc_val, val_runs);
  out.past_length = past_length + U;
  return out;
}

Attended attend(const at::Tensor& qin, const at::Tensor& mems_in, const at::Tensor& memory,
                const at::Tensor& lc_key, const at::Tensor& lc_val,
                const at::Tensor& past_length, const at::Tensor& lengths,
                const std::vector<at::Tensor>& W, int64_t wq, int64_t num_heads,
                int64_t segment_length, int64_t R, int64_t U, int64_t B, bool tanh_on_mem,
                double negative_inf) {
  TORCH_CHECK(qin.is_contiguous(), "attend: the query rows must be contiguous");
  if (qin.scalar_type() == at::kFloat) {
    return attend_impl<float>(qin, mems_in, memory, lc_key, lc_val, past_length, lengths, W, wq,
                              num_heads, segment_length, R, U, B, tanh_on_mem, negative_inf);
  }
  TORCH_CHECK(qin.scalar_type() == at::kDouble, "emformer step: float32 or float64");
  return attend_impl<double>(qin, mems_in, memory, lc_key, lc_val, past_length, lengths, W, wq,
                             num_heads, segment_length, R, U, B, tanh_on_mem, negative_inf);
}

// The checks both steps make; returns (U, R, B, D).
std::vector<int64_t> check_step(const char* op, const at::Tensor& utt, const at::Tensor& rc,
                                const std::vector<const at::Tensor*>& acts,
                                const std::vector<at::Tensor>& weights, size_t n_weights,
                                const std::vector<double>& eps, size_t n_eps,
                                const std::vector<int64_t>& codes, int64_t num_heads) {
  TORCH_CHECK(weights.size() == n_weights, op, ": expected ", n_weights, " weights, got ",
              weights.size());
  TORCH_CHECK(eps.size() == n_eps, op, ": expected ", n_eps, " eps, got ", eps.size());
  for (const int64_t code : codes) {
    TORCH_CHECK(code == kRelu || code == kGelu || code == kSilu, op,
                ": unknown activation code ", code);
  }
  SK_CHECK_DIM(utt, 3);
  SK_CHECK_DIM(rc, 3);
  const int64_t U = utt.size(0), R = rc.size(0), B = utt.size(1), D = utt.size(2);
  for (const at::Tensor* t : acts) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == utt.scalar_type(), op,
                ": every activation and state tensor must be a CPU tensor of the utterance's "
                "dtype ",
                utt.scalar_type());
  }
  for (const auto& w : weights) {
    // Linear weights of a float32 step may be bfloat16 (cpu_weights="bf16"): (n, k), or
    // packed (3-D); the depthwise conv's weight is checked to be of the utterance's dtype
    const bool bf16_linear = w.scalar_type() == at::kBFloat16 && utt.scalar_type() == at::kFloat;
    TORCH_CHECK(w.is_cpu() && (w.scalar_type() == utt.scalar_type() || bf16_linear), op,
                ": weights must be CPU tensors of the utterance's dtype (Linear weights of a "
                "float32 step may be bfloat16), got ",
                w.scalar_type(), " for a ", utt.scalar_type(), " utterance");
  }
  TORCH_CHECK(rc.size(1) == B && rc.size(2) == D, op, ": rc must be (R, ", B, ", ", D,
              "), got ", rc.sizes());
  TORCH_CHECK(D % num_heads == 0, op, ": D must be a multiple of num_heads");
  return {U, R, B, D};
}

}  // namespace

// weights, in this order (upstream names under the layer):
//   0-5   ffn0: module[0] LN w, b; module[1] Linear w, b; module[4] Linear w, b
//   6-7   layer_norm_input w, b
//   8-13  attention.emb_to_query w, b; attention.emb_to_key_value w, b; attention.out_proj w, b
//   14-15 conv.pre_conv[0] LN w, b        16-17 conv.pre_conv[1] Linear w, b
//   18-19 conv.conv weight (D, 1, k), bias
//   20-21 conv.post_conv[0] LN w, b       22-23 conv.post_conv[2] Linear w, b
//   24-29 ffn1 (as ffn0)                  30-31 layer_norm_output w, b
// eps: the six LayerNorms' eps in the order ffn0, input, pre_conv, post_conv, ffn1, output.
std::vector<at::Tensor> conv_emformer_step_cpu(
    const at::Tensor& utt, const at::Tensor& rc, const at::Tensor& mems_in,
    const at::Tensor& memory, const at::Tensor& lc_key, const at::Tensor& lc_val,
    const at::Tensor& past_length, const at::Tensor& cache,
    const at::Tensor& lengths, const std::vector<at::Tensor>& weights,
    const std::vector<double>& eps, int64_t num_heads, int64_t segment_length,
    int64_t ffn_activation, int64_t conv_activation, bool tanh_on_mem, double negative_inf) {
  const auto dims = check_step("conv_emformer_step_cpu", utt, rc,
                               {&utt, &rc, &mems_in, &memory, &lc_key, &lc_val, &cache}, weights,
                               32, eps, 6, {ffn_activation, conv_activation}, num_heads);
  const int64_t U = dims[0], R = dims[1], B = dims[2], D = dims[3];
  const auto opts = utt.options();
  const int64_t S = mems_in.size(0) > 0 ? 1 : 0;  // a summary row when memory is used
  TORCH_CHECK(weights[18].dim() == 3 && weights[18].size(0) == D && weights[18].size(1) == 1 &&
                  weights[18].scalar_type() == utt.scalar_type() && weights[19].numel() == D,
              "conv_emformer_step_cpu: the depthwise conv must be (D, 1, k) with a (D,) bias, "
              "got ",
              weights[18].sizes(), " and ", weights[19].sizes());
  const int64_t k = weights[18].size(2);
  TORCH_CHECK(cache.dim() == 3 && cache.size(0) == B && cache.size(1) == D &&
                  cache.size(2) == k - 1,
              "conv_emformer_step_cpu: cache must be (B, D, k - 1), got ", cache.sizes());

  const auto& W = weights;
  auto ln = [&](const at::Tensor& x, int64_t i, double e) {
    return layer_norm_rows(x, W[i].contiguous(), W[i + 1].contiguous(), e);
  };
  // x + 0.5 FFN(x), the residual fused into the second GEMM
  auto ffn_residual = [&](const at::Tensor& x, int64_t i, double e) {
    const auto h = linear(ln(x, i, e), W[i + 2], W[i + 3], ffn_activation + 1);
    return linear(h, W[i + 4], W[i + 5], linear::kActNone, x, 0.5);
  };

  // x = [rc ; utt ; summary of the raw utterance]
  const int64_t Tq = R + U + S;
  auto x = at::empty({Tq, B, D}, opts);
  x.narrow(0, 0, R).copy_(rc);
  x.narrow(0, R, U).copy_(utt);
  if (S) x.narrow(0, R + U, 1).copy_(utt.narrow(0, 0, std::min(segment_length, U)).mean(0, true));
  const auto X = x.view({Tq * B, D});
  const auto f0 = ffn_residual(X, 0, eps[0]);
  const auto n = ln(f0, 6, eps[1]);
  const auto att = attend(n, mems_in, memory, lc_key, lc_val, past_length, lengths, W, 8,
                          num_heads, segment_length, R, U, B, tanh_on_mem, negative_inf);
  const auto r = att.o.narrow(0, 0, (R + U) * B) + f0.narrow(0, 0, (R + U) * B);

  // convolution module on [rc ; utt]
  const auto z = at::glu(linear(ln(r, 14, eps[2]), W[16], W[17]), -1).view({R + U, B, D});
  const auto w_conv = W[18].reshape({D, k}).t().contiguous();  // (k, D)
  const auto b_conv = W[19].contiguous();
  auto padded = at::empty({k - 1 + U, B, D}, opts);
  padded.narrow(0, 0, k - 1).copy_(cache.permute({2, 0, 1}));
  padded.narrow(0, k - 1, U).copy_(z.narrow(0, R, U));
  auto y = at::empty({R + U, B, D}, opts);
  if (R > 0) {
    auto rc_window = at::empty({k - 1 + R, B, D}, opts);
    rc_window.narrow(0, 0, k - 1).copy_(padded.narrow(0, U, k - 1));
    rc_window.narrow(0, k - 1, R).copy_(z.narrow(0, 0, R));
    y.narrow(0, 0, R).copy_(conv(rc_window, w_conv, b_conv));
  }
  y.narrow(0, R, U).copy_(conv(padded, w_conv, b_conv));
  const auto Y = y.view({(R + U) * B, D});
  auto post = ln(Y, 20, eps[3]);
  activate_(post, static_cast<int>(conv_activation) + 1);  // kRelu.. -> the SkinnyAct codes
  const auto c = linear(post, W[22], W[23], linear::kActNone, r);
  const auto out = ln(ffn_residual(c, 24, eps[4]), 30, eps[5]).view({R + U, B, D});
  // conv cache <- last k - 1 frames of [cache ; z_utt]
  const auto new_cache = padded.narrow(0, U, k - 1).permute({1, 2, 0}).contiguous();
  return {out.narrow(0, R, U), out.narrow(0, 0, R), att.next_mems, att.memory,
          att.lc_key,          att.lc_val,          att.past_length, new_cache};
}

// One streaming step of a (plain) Emformer layer, fused:
//   n      = LN_in([rc ; utt]) ;  summary = mean(n_utt) (Emformer summarises the normed rows)
//   o      = attention of [n ; summary] as above (the same `attend`)
//   r      = o[rc ; utt] + [rc ; utt] ;  y = LN_out(r + FFN(r)),  FFN(z) = W2 act(W1 LN(z) + b1) + b2
// weights: 0-1 layer_norm_input; 2-7 attention emb_to_query, emb_to_key_value, out_proj (w, b);
//          8-9 pos_ff[0] LN; 10-11 pos_ff[1] Linear; 12-13 pos_ff[4] Linear; 14-15
//          layer_norm_output. eps: layer_norm_input, pos_ff[0], layer_norm_output.
std::vector<at::Tensor> emformer_step_cpu(
    const at::Tensor& utt, const at::Tensor& rc, const at::Tensor& mems_in,
    const at::Tensor& memory, const at::Tensor& lc_key, const at::Tensor& lc_val,
    const at::Tensor& past_length, const at::Tensor& lengths,
    const std::vector<at::Tensor>& weights, const std::vector<double>& eps, int64_t num_heads,
    int64_t segment_length, int64_t ffn_activation, bool tanh_on_mem, double negative_inf) {
  const auto dims = check_step("emformer_step_cpu", utt, rc,
                               {&utt, &rc, &mems_in, &memory, &lc_key, &lc_val}, weights, 16, eps,
                               3, {ffn_activation}, num_heads);
  const int64_t U = dims[0], R = dims[1], B = dims[2], D = dims[3];
  const int64_t S = mems_in.size(0) > 0 ? 1 : 0, Tq = R + U + S;
  const auto& W = weights;
  auto ln = [&](const at::Tensor& x, int64_t i, double e) {
    return layer_norm_rows(x, W[i].contiguous(), W[i + 1].contiguous(), e);
  };
  auto x = at::empty({R + U, B, D}, utt.options());  // the residual rows [rc ; utt]
  x.narrow(0, 0, R).copy_(rc);
  x.narrow(0, R, U).copy_(utt);
  const auto X = x.view({(R + U) * B, D});
  auto qin = at::empty({Tq * B, D}, utt.options());
  qin.narrow(0, 0, (R + U) * B).copy_(ln(X, 0, eps[0]));
  if (S) {
    const auto n_utt = qin.narrow(0, R * B, U * B).view({U, B, D});
    qin.narrow(0, (R + U) * B, B).copy_(
        n_utt.narrow(0, 0, std::min(segment_length, U)).mean(0).view({B, D}));
  }
  const auto att = attend(qin, mems_in, memory, lc_key, lc_val, past_length, lengths, W, 2,
                          num_heads, segment_length, R, U, B, tanh_on_mem, negative_inf);
  const auto r = att.o.narrow(0, 0, (R + U) * B) + X;
  const auto h = linear(ln(r, 8, eps[1]), W[10], W[11], ffn_activation + 1);
  const auto c = linear(h, W[12], W[13], linear::kActNone, r);
  const auto out = ln(c, 14, eps[2]).view({R + U, B, D});
  return {out.narrow(0, R, U), out.narrow(0, 0, R), att.next_mems, att.memory,
          att.lc_key,          att.lc_val,          att.past_length};
}

// The steps' Linear on tensors, for tests: every path (skinny float32, skinny on a bfloat16
// weight, packed bfloat16, BLAS) as the steps take it.
at::Tensor emformer_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                               int64_t act, const c10::optional<at::Tensor>& residual,
                               double alpha) {
  SK_CHECK_DIM(x, 2);
  TORCH_CHECK(x.is_cpu() && w.is_cpu() && b.is_cpu(), "emformer_linear_cpu: CPU tensors only");
  TORCH_CHECK(act >= linear::kActNone && act <= linear::kActSilu,
              "emformer_linear_cpu: unknown activation ", act);
  const bool packed = w.dim() == 3;
  TORCH_CHECK(packed || (w.dim() == 2 && w.size(1) == x.size(1)),
              "emformer_linear_cpu: weight must be (n, ", x.size(1), ") or packed, got ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() ||
                  (w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kFloat),
              "emformer_linear_cpu: weight must be of x's dtype or bfloat16 for float32 x");
  TORCH_CHECK(b.dim() == 1 && b.scalar_type() == x.scalar_type() &&
                  (packed || b.size(0) == w.size(0)),
              "emformer_linear_cpu: bias must be (n,) of x's dtype");
  return linear(x, w, b, static_cast<int>(act), residual.value_or(at::Tensor()), alpha);
}

void bind(pybind11::module_& m) {
  m.def("emformer_linear_cpu", &emformer_linear_cpu,
        "residual + alpha * act(x W^T + b) as the fused Emformer steps compute it (tests)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("act") = 0, pybind11::arg("residual") = pybind11::none(),
        pybind11::arg("alpha") = 1.0);
  m.def("conv_emformer_step_cpu", &conv_emformer_step_cpu,
        "One ConvEmformer layer's streaming step on the CPU, fused (inference only)");
  m.def("emformer_step_cpu", &emformer_step_cpu,
        "One Emformer layer's streaming step on the CPU, fused (inference only)");
}

}  // namespace emformer
}  // namespace seqkern
