// MEGA's multi-head damped EMA: the per-channel arithmetic shared by the CPU kernels
// (ema_cpu.cpp) and the CUDA kernels (ema.cu), so the CPU tests exercise the very code the GPU
// runs. Plain C++ (no torch, no CUDA headers); every function is __host__ __device__ under nvcc.
//
// Per batch b, channel d and EMA head n (all functions below work on one (d, n) pair):
//   p = sigmoid(damping), delta = sigmoid(decay), q = 1 - p * delta
//   a = p * expansion, c = projection * sqrt(1/h), w = a * c
//   s_t = q s_{t-1} + xm_t - Q xm_{t-Lk}         Q = q^Lk, the subtraction only when Lk < L
//   y_t = sum_n w_n s_t,n (+ omega x_t)
// Backward, in adjoint form (no stored states): with dyf_t = dy_{t+Lk} (0 past the end)
//   z_t  = q z_{t+1} + dy_t - Q dyf_t             dx_t = sum_n w_n z_t,n (0 where padded) + omega dy_t
//   zr_t = q zr_{t+1} + z_{t+1} - Lk q^(Lk-1) dyf_t   (zr = dz/dq)
//   G_n = sum xm_t z_t,n = sum dy_t s_t,n,   R_n = sum xm_t zr_t,n = sum dy_t ds_t,n/dq
//   dw = G, dq = w R, then the chain rule to the raw parameters (param_grads).
// Over n steps with zero input the pair (z, zr) maps to (q^n z, q^n zr + n q^(n-1) z): that is
// how a chunk's local result is composed with the state coming in from its neighbour.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace seqkern {
namespace ema {

SK_HD float sk_exp(float v) {
#ifdef __CUDA_ARCH__
  return expf(v);
#else
  return std::exp(v);
#endif
}
SK_HD double sk_exp(double v) {
#ifdef __CUDA_ARCH__
  return exp(v);
#else
  return std::exp(v);
#endif
}
SK_HD float sk_pow(float b, float e) {
#ifdef __CUDA_ARCH__
  return powf(b, e);
#else
  return std::pow(b, e);
#endif
}
SK_HD double sk_pow(double b, double e) {
#ifdef __CUDA_ARCH__
  return pow(b, e);
#else
  return std::pow(b, e);
#endif
}

template <typename acc_t>
SK_HD acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + sk_exp(-v));
}

// The coefficients of one (channel, head) pair, from the raw parameters.
template <typename acc_t>
struct Coeffs {
  acc_t p, delta, q;  // damping weight, decay, state weight q = 1 - p * delta
  acc_t a, c, w;      // expansion a = p * beta, projection c = eta * scale, w = a * c
  acc_t Q, dQ;        // q^Lk and Lk q^(Lk-1) when truncating, else 0
};

// trunc_len: Lk when truncation applies (Lk < L), else 0. scale = sqrt(1/h).
template <typename acc_t>
SK_HD Coeffs<acc_t> make_coeffs(acc_t damping, acc_t decay, acc_t expansion, acc_t projection,
                                acc_t scale, int64_t trunc_len) {
  Coeffs<acc_t> k;
  k.p = sigmoid(damping);
  k.delta = sigmoid(decay);
  k.q = acc_t(1) - k.p * k.delta;
  k.a = k.p * expansion;
  k.c = projection * scale;
  k.w = k.a * k.c;
  if (trunc_len > 0) {
    // pow rather than upstream's exp(Lk * log q): exact at q = 0 (pow(0, 0) = 1), same value else.
    k.Q = sk_pow(k.q, static_cast<acc_t>(trunc_len));
    k.dQ = static_cast<acc_t>(trunc_len) * sk_pow(k.q, static_cast<acc_t>(trunc_len - 1));
  } else {
    k.Q = acc_t(0);
    k.dQ = acc_t(0);
  }
  return k;
}

// One forward step: x is the (masked) input at t, x_back the (masked) input at t - Lk, or 0.
template <typename acc_t>
SK_HD acc_t scan_fwd(acc_t s, acc_t q, acc_t Q, acc_t x, acc_t x_back) {
  return q * s + (x - Q * x_back);
}

// One backward (reverse) step: dy at t, dy_fwd = dy at t + Lk, or 0. Updates (z, zr) in place.
template <typename acc_t>
SK_HD void scan_bwd(acc_t& z, acc_t& zr, acc_t q, acc_t Q, acc_t dQ, acc_t dy, acc_t dy_fwd) {
  const acc_t z_next = z;
  zr = q * zr + (z_next - dQ * dy_fwd);
  z = q * z_next + (dy - Q * dy_fwd);
}

// The state after a chunk of n steps that started from s_in: qn = q^n, local = the chunk's own
// result from a zero state.
template <typename acc_t>
SK_HD acc_t carry_fwd(acc_t s_in, acc_t qn, acc_t local) {
  return qn * s_in + local;
}

// The same for the backward pair: nqn1 = n q^(n-1).
template <typename acc_t>
SK_HD void carry_bwd(acc_t& z, acc_t& zr, acc_t qn, acc_t nqn1, acc_t local_z, acc_t local_zr) {
  zr = qn * zr + nqn1 * z + local_zr;
  z = qn * z + local_z;
}

// q^n and n q^(n-1) for a chunk of n >= 1 steps.
template <typename acc_t>
SK_HD void chunk_powers(acc_t q, int64_t n, acc_t* qn, acc_t* nqn1) {
  *qn = sk_pow(q, static_cast<acc_t>(n));
  *nqn1 = static_cast<acc_t>(n) * sk_pow(q, static_cast<acc_t>(n - 1));
}

// One term x * g of the sums G = sum xm z and R = sum xm zr: 0 where the adjoint g is exactly 0,
// also for a NaN or Inf input. The recurrence's derivative has no such term (zr is 0 at the last
// step: the state there never meets q), so a NaN at the last step must not reach dq.
template <typename acc_t>
SK_HD acc_t adjoint_term(acc_t x, acc_t g) {
  return g == acc_t(0) ? acc_t(0) : x * g;
}

template <typename acc_t>
struct ParamGrads {
  acc_t damping, decay, expansion, projection;
};

// Chain rule from G = dL/dw and R (dL/dq = w R) to the raw parameters of one (d, n) pair.
template <typename acc_t>
SK_HD ParamGrads<acc_t> param_grads(const Coeffs<acc_t>& k, acc_t expansion, acc_t scale,
                                    acc_t G, acc_t R) {
  const acc_t dq = k.w * R;
  const acc_t da = k.c * G;
  const acc_t dc = k.a * G;
  const acc_t dp = expansion * da - k.delta * dq;
  const acc_t ddelta = -k.p * dq;
  ParamGrads<acc_t> g;
  g.projection = scale * dc;
  g.expansion = k.p * da;
  g.damping = dp * k.p * (acc_t(1) - k.p);
  g.decay = ddelta * k.delta * (acc_t(1) - k.delta);
  return g;
}

// One streaming step on the a-scaled state (upstream's layout): state' = a x + q state;
// the output is sum_n c_n state'_n.
template <typename acc_t>
SK_HD acc_t step_state(const Coeffs<acc_t>& k, acc_t x, acc_t state) {
  return k.a * x + k.q * state;
}

}  // namespace ema
}  // namespace seqkern
