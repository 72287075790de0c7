// One decoding step of a MEGA block on the CPU, fused: the whole block in one call.
//
// A beam-search step runs each block on B <= 8 rows. Unfused, that is ~35 small PyTorch ops per
// block whose dispatch costs more than their arithmetic, plus five matrix-vector products bound
// by reading the weights. Here the products stream each weight once (linear_rows_f32) and
// everything between them is a loop over B x D values. The supported configuration is the
// ESPnet default: SiLU activation, LayerNorm, the "simple" relative-position bias, no dropout,
// float32; seqkern.modules.mega takes this path only then, and the unfused ops otherwise.
//
// Math (per row b; D model size, h EMA heads, K qk size, V value size; upstream's order):
//   v      = silu(x Wv^T + bv)                                            (V)
//   s'     = (p*beta) x + q s ;  e = silu(sum_n s'_n eta_n sqrt(1/h) + omega x)   (D, h), (D)
//   mx     = e Wmx^T + bmx = [gate (D) | g (K + V) | hidden (D)]
//   base, u = split(silu(g), [K, V]) ;  qry = base qk_w[0] + qk_b[0] ; key = base qk_w[1] + qk_b[1]
//   keys   = [prev_key ; key], values = [prev_value ; v]                   (Lk + 1 each)
//   o      = softmax((qry * scaling) keys^T + rel) values                  (V), softmax in fp32
//   h      = silu(hidden + (o * u) Wh^T + bh)
//   out    = LayerNorm(x + sigmoid(gate) * (h - x))
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "linear/small_linear.h"
#include "sk_checks.h"

namespace seqkern {
namespace mega {
namespace {

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }
inline float silu(float v) { return v / (1.f + std::exp(-v)); }

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu(), "mega_step_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mega_step_cpu: ", name, " must be float32, got ",
              t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  check_f32(t, name);
  TORCH_CHECK(t.sizes() == shape, "mega_step_cpu: ", name, " must be ", shape, ", got ",
              t.sizes());
}

}  // namespace

std::vector<at::Tensor> mega_step_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& prev_key_in, const c10::optional<at::Tensor>& prev_value_in,
    const at::Tensor& damping_in, const at::Tensor& decay_in, const at::Tensor& expansion_in,
    const at::Tensor& projection_in, const at::Tensor& omega_in, const at::Tensor& wv_in,
    const at::Tensor& bv_in, const at::Tensor& wmx_in, const at::Tensor& bmx_in,
    const at::Tensor& wh_in, const at::Tensor& bh_in, const at::Tensor& qk_weight_in,
    const at::Tensor& qk_bias_in, const at::Tensor& rel_in, const at::Tensor& ln_weight_in,
    const at::Tensor& ln_bias_in, double ln_eps, double scaling) {
  check_f32(x_in, "x");
  SK_CHECK_DIM(x_in, 2);
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(projection_in.dim() == 2 && projection_in.size(0) == D,
              "mega_step_cpu: projection must be (D, h), got ", projection_in.sizes());
  const int64_t h = projection_in.size(1);
  const int64_t V = wv_in.size(0), K = qk_weight_in.size(1);
  check_shape(damping_in, "damping", {D, h, 1});
  check_shape(decay_in, "decay", {D, h, 1});
  check_shape(expansion_in, "expansion", {D, h, 1});
  check_shape(omega_in, "omega", {D});
  check_shape(wv_in, "wv", {V, D});
  check_shape(bv_in, "bv", {V});
  check_shape(wmx_in, "wmx", {2 * D + K + V, D});
  check_shape(bmx_in, "bmx", {2 * D + K + V});
  check_shape(wh_in, "wh", {D, V});
  check_shape(bh_in, "bh", {D});
  check_shape(qk_weight_in, "qk_weight", {2, K});
  check_shape(qk_bias_in, "qk_bias", {2, K});
  check_shape(ln_weight_in, "ln_weight", {D});
  check_shape(ln_bias_in, "ln_bias", {D});
  int64_t Lk = 0;
  const bool has_prev = prev_key_in.has_value() && prev_key_in->defined();
  TORCH_CHECK(has_prev == (prev_value_in.has_value() && prev_value_in->defined()),
              "mega_step_cpu: prev_key and prev_value must be given together");
  if (has_prev) {
    Lk = prev_key_in->size(1);
    check_shape(*prev_key_in, "prev_key", {B, Lk, K});
    check_shape(*prev_value_in, "prev_value", {B, Lk, V});
  }
  check_shape(rel_in, "rel", {Lk + 1});
  const bool has_state = state_in.has_value() && state_in->defined();
  bool shared_state = false;
  if (has_state) {
    shared_state = state_in->dim() == 2;
    if (shared_state) check_shape(*state_in, "ema_state", {D, h});
    else check_shape(*state_in, "ema_state", {B, D, h});
  }

  const auto c = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor x = c(x_in), damping = c(damping_in), decay = c(decay_in);
  const at::Tensor expansion = c(expansion_in), projection = c(projection_in), omega = c(omega_in);
  const at::Tensor wv = c(wv_in), bv = c(bv_in), wmx = c(wmx_in), bmx = c(bmx_in);
  const at::Tensor wh = c(wh_in), bh = c(bh_in), qkw = c(qk_weight_in), qkb = c(qk_bias_in);
  const at::Tensor rel = c(rel_in), lnw = c(ln_weight_in), lnb = c(ln_bias_in);
  // held by name: a pointer into a temporary contiguous() copy would dangle
  const at::Tensor state = has_state ? c(*state_in) : at::Tensor();
  const at::Tensor prev_key = has_prev ? c(*prev_key_in) : at::Tensor();
  const at::Tensor prev_value = has_prev ? c(*prev_value_in) : at::Tensor();
  const auto opts = x.options();

  at::Tensor out = at::empty({B, D}, opts);
  at::Tensor new_state = at::empty({B, D, h}, opts);
  at::Tensor keys = at::empty({B, Lk + 1, K}, opts);
  at::Tensor values = at::empty({B, Lk + 1, V}, opts);
  std::vector<float> vbuf(B * V), ebuf(B * D), mx(B * (2 * D + K + V)), ubuf(B * V),
      hp(B * D), logits(Lk + 1);

  const float* xp = x.const_data_ptr<float>();
  // v = silu(x Wv^T + bv): the new last value row
  linear::linear_rows_f32(xp, wv.const_data_ptr<float>(), bv.const_data_ptr<float>(),
                          vbuf.data(), B, D, V);
  for (auto& v : vbuf) v = silu(v);

  // EMA step, residual, activation
  {
    const float *dp = damping.const_data_ptr<float>(), *cp = decay.const_data_ptr<float>();
    const float *ep = expansion.const_data_ptr<float>(), *pp = projection.const_data_ptr<float>();
    const float* op = omega.const_data_ptr<float>();
    const float* sp = has_state ? state.const_data_ptr<float>() : nullptr;
    float* np = new_state.mutable_data_ptr<float>();
    const float scale = std::sqrt(1.f / static_cast<float>(h));
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t n = 0; n < h; ++n) {
        const int64_t i = d * h + n;
        const float p = sigmoid(dp[i]);
        const float q = 1.f - p * sigmoid(cp[i]);
        const float a = p * ep[i];
        for (int64_t b = 0; b < B; ++b) {
          const float prev = sp ? sp[(shared_state ? 0 : b * D * h) + i] : 0.f;
          np[b * D * h + i] = a * xp[b * D + d] + q * prev;
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.f;
        for (int64_t n = 0; n < h; ++n) acc += np[(b * D + d) * h + n] * (pp[d * h + n] * scale);
        ebuf[b * D + d] = silu(acc + op[d] * xp[b * D + d]);
      }
    }
  }

  const int64_t M = 2 * D + K + V;
  linear::linear_rows_f32(ebuf.data(), wmx.const_data_ptr<float>(), bmx.const_data_ptr<float>(),
                          mx.data(), B, D, M);

  const float *qw = qkw.const_data_ptr<float>(), *qb = qkb.const_data_ptr<float>();
  const float* relp = rel.const_data_ptr<float>();
  float* kp = keys.mutable_data_ptr<float>();
  float* vp = values.mutable_data_ptr<float>();
  const float* pk = has_prev ? prev_key.const_data_ptr<float>() : nullptr;
  const float* pv = has_prev ? prev_value.const_data_ptr<float>() : nullptr;
  std::vector<float> qry(K), o(V);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = mx.data() + b * M;
    float* krow = kp + b * (Lk + 1) * K;
    float* vrow = vp + b * (Lk + 1) * V;
    if (has_prev) {
      std::copy(pk + b * Lk * K, pk + (b + 1) * Lk * K, krow);
      std::copy(pv + b * Lk * V, pv + (b + 1) * Lk * V, vrow);
    }
    for (int64_t i = 0; i < K; ++i) {
      const float base = silu(row[D + i]);
      qry[i] = (base * qw[i] + qb[i]) * static_cast<float>(scaling);
      krow[Lk * K + i] = base * qw[K + i] + qb[K + i];
    }
    std::copy(vbuf.begin() + b * V, vbuf.begin() + (b + 1) * V, vrow + Lk * V);
    float mmax = -INFINITY;
    for (int64_t j = 0; j <= Lk; ++j) {
      float dot = 0.f;
      for (int64_t i = 0; i < K; ++i) dot += qry[i] * krow[j * K + i];
      logits[j] = dot + relp[j];
      mmax = std::max(mmax, logits[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j <= Lk; ++j) sum += (logits[j] = std::exp(logits[j] - mmax));
    std::fill(o.begin(), o.end(), 0.f);
    for (int64_t j = 0; j <= Lk; ++j) {
      const float pj = logits[j] / sum;
      const float* vr = vrow + j * V;
      for (int64_t i = 0; i < V; ++i) o[i] += pj * vr[i];
    }
    for (int64_t i = 0; i < V; ++i) ubuf[b * V + i] = o[i] * silu(row[D + K + i]);
  }
  linear::linear_rows_f32(ubuf.data(), wh.const_data_ptr<float>(), bh.const_data_ptr<float>(),
                          hp.data(), B, V, D);

  const float *lw = lnw.const_data_ptr<float>(), *lb = lnb.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  std::vector<float> r(D);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = mx.data() + b * M;
    double mean = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const float hv = silu(row[D + K + V + d] + hp[b * D + d]);
      const float xv = xp[b * D + d];
      r[d] = xv + sigmoid(row[d]) * (hv - xv);
      mean += r[d];
    }
    mean /= static_cast<double>(D);
    double var = 0.0;
    for (int64_t d = 0; d < D; ++d) var += (r[d] - mean) * (r[d] - mean);
    const double rstd = 1.0 / std::sqrt(var / static_cast<double>(D) + ln_eps);
    for (int64_t d = 0; d < D; ++d)
      yp[b * D + d] = static_cast<float>((r[d] - mean) * rstd) * lw[d] + lb[d];
  }
  return {out, new_state, keys, values};
}

void bind(pybind11::module_& m) {
  m.def("mega_step_cpu", &mega_step_cpu,
        "one fused MEGA block step (SiLU, LayerNorm, simple bias, float32, CPU)");
}

}  // namespace mega
}  // namespace seqkern
