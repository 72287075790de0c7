// MEGA multi-head damped EMA, CUDA kernels (nvcc only; no torch headers). See ema.h for the
// chunked decomposition and ema_math.h for the per-channel math, which the CPU kernels share.
//
// A tile is (b, chunk, block of kThreads * VEC channels): one thread owns VEC adjacent channels
// and keeps the state of all their heads in registers (H = the next power of two >= h; heads
// past h are skipped by a grid-uniform branch and never stored). A warp's loads of one time
// step are consecutive along D, so they coalesce; VEC = 2 moves two channels per load where
// alignment allows. The thread walks its chunk one time step after another.
#pragma once

#include "ema/ema.h"
#include "ema/ema_math.h"
#include "sk_cuda.cuh"

namespace seqkern {
namespace ema {

constexpr int kThreads = 128;       // threads per tile
constexpr int kCarryThreads = 256;  // threads per block of the serial-over-chunks kernels
// The backward's omega sum (dy * x) runs in fp32 over at most kFlush steps, then into a second
// fp32 accumulator: two levels keep long chunks near the rounding of a pairwise sum. (G and R
// need no such care: their error is dominated by q's fp32 rounding, as the reference's is.)
constexpr int64_t kFlush = 64;
static_assert((kFlush & (kFlush - 1)) == 0, "kFlush must be a power of two");

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ ptr, float (&v)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = to_float(pack.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ ptr, const float (&v)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(v[j]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// The coefficients of a thread's VEC channels x H heads; heads >= h are zero (inert).
template <int H, int VEC>
struct ThreadCoeffs {
  float q[VEC][H], w[VEC][H], Q[VEC][H], dQ[VEC][H];

  __device__ __forceinline__ void load(const float* __restrict__ damping,
                                       const float* __restrict__ decay,
                                       const float* __restrict__ expansion,
                                       const float* __restrict__ projection, int64_t d0,
                                       int heads, float scale, int64_t trunc_len) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) {
          const int64_t i = (d0 + v) * heads + n;
          const Coeffs<float> k =
              make_coeffs<float>(damping[i], decay[i], expansion[i], projection[i], scale,
                                 trunc_len);
          q[v][n] = k.q;
          w[v][n] = k.w;
          Q[v][n] = k.Q;
          dQ[v][n] = k.dQ;
        } else {
          q[v][n] = 0.f;
          w[v][n] = 0.f;
          Q[v][n] = 0.f;
          dQ[v][n] = 0.f;
        }
      }
    }
  }
};

struct Tile {
  int64_t b, c, d0;  // batch, chunk, first channel of this thread
  int64_t t0, t1;    // the chunk's steps
};

__device__ __forceinline__ Tile decode_tile(int64_t nchunks, int64_t nblocks, int vec,
                                            int64_t chunk, int64_t seqlen) {
  const int64_t tile = blockIdx.x;
  Tile t;
  const int64_t db = tile % nblocks;
  t.c = (tile / nblocks) % nchunks;
  t.b = tile / (nblocks * nchunks);
  t.d0 = (db * kThreads + threadIdx.x) * vec;
  t.t0 = t.c * chunk;
  t.t1 = t.t0 + chunk < seqlen ? t.t0 + chunk : seqlen;
  return t;
}

// Offset of (b, c, n, d) in a (B, nchunks, h, D) buffer.
__device__ __forceinline__ int64_t carry_index(int64_t b, int64_t c, int64_t n, int64_t d,
                                               int64_t nchunks, int64_t heads, int64_t dim) {
  return ((b * nchunks + c) * heads + n) * dim + d;
}

__device__ __forceinline__ float head_scale(int heads) {
  return sqrtf(1.f / static_cast<float>(heads));
}

// Forward phases 1 (kOut = false: the chunk's end state from zero into carry) and 3 (kOut =
// true: from the incoming state in carry, zero for chunk 0, writing y).
template <typename T, int H, int VEC, bool kOut>
__global__ void __launch_bounds__(kThreads)
    ema_fwd_kernel(const FwdParams p, int64_t nchunks, int64_t nblocks) {
  const Tile tl = decode_tile(nchunks, nblocks, VEC, p.chunk, p.seqlen);
  if (!kOut && tl.c == nchunks - 1) return;  // nobody reads the last chunk's end state
  if (tl.d0 >= p.dim) return;
  const int heads = static_cast<int>(p.heads);
  const int64_t D = p.dim, Lk = p.trunc_len;
  ThreadCoeffs<H, VEC> k;
  k.load(p.damping, p.decay, p.expansion, p.projection, tl.d0, heads, head_scale(heads), Lk);

  float s[VEC][H];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
#pragma unroll
    for (int n = 0; n < H; ++n) {
      s[v][n] = (kOut && tl.c > 0 && n < heads)
                    ? p.carry[carry_index(tl.b, tl.c, n, tl.d0 + v, nchunks, heads, D)]
                    : 0.f;
    }
  }
  const bool has_omega = kOut && p.omega != nullptr;
  float om[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) om[v] = has_omega ? p.omega[tl.d0 + v] : 0.f;

  const T* __restrict__ x = static_cast<const T*>(p.x) + tl.b * p.x_stride_b + tl.d0;
  T* __restrict__ y = static_cast<T*>(p.y) + tl.b * p.y_stride_b + tl.d0;
  const bool* __restrict__ pad = p.pad != nullptr ? p.pad + tl.b * p.seqlen : nullptr;
#pragma unroll 4
  for (int64_t t = tl.t0; t < tl.t1; ++t) {
    float xr[VEC], xb[VEC];
    load_vec<T, VEC>(x + t * p.x_stride_t, xr);
    const bool masked = pad != nullptr && pad[t];
#pragma unroll
    for (int v = 0; v < VEC; ++v) xb[v] = 0.f;
    if (Lk > 0 && t >= Lk && !(pad != nullptr && pad[t - Lk])) {
      load_vec<T, VEC>(x + (t - Lk) * p.x_stride_t, xb);
    }
    float yv[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float xm = masked ? 0.f : xr[v];  // a select: a NaN at a padded step is dropped
      yv[v] = has_omega ? om[v] * xr[v] : 0.f;  // no 0 * x: an inf or NaN x stays out
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) {  // uniform over the grid: the padding heads do nothing
          s[v][n] = scan_fwd(s[v][n], k.q[v][n], k.Q[v][n], xm, xb[v]);
          yv[v] += k.w[v][n] * s[v][n];
        }
      }
    }
    if (kOut) store_vec<T, VEC>(y + t * p.y_stride_t, yv);
  }
  if (!kOut) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) p.carry[carry_index(tl.b, tl.c, n, tl.d0 + v, nchunks, heads, D)] = s[v][n];
      }
    }
  }
}

// Forward phase 2: per (b, n, d), serially over chunks, local end states -> incoming states.
__global__ void __launch_bounds__(kCarryThreads)
    ema_fwd_carry_kernel(const FwdParams p, int64_t nchunks) {
  const int64_t HD = p.heads * p.dim;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * HD) return;
  const int64_t b = i / HD, k = i % HD, n = k / p.dim, d = k % p.dim;
  const int heads = static_cast<int>(p.heads);
  const int64_t pi = d * heads + n;
  const Coeffs<float> co = make_coeffs<float>(p.damping[pi], p.decay[pi], p.expansion[pi],
                                              p.projection[pi], head_scale(heads), 0);
  float qn, unused;
  chunk_powers(co.q, p.chunk, &qn, &unused);
  float* cr = p.carry + b * nchunks * HD + k;
  float run = 0.f;
  for (int64_t c = 0; c < nchunks; ++c) {
    // Phase 1 skipped the last chunk: its slot is only written here.
    const float local = c < nchunks - 1 ? cr[c * HD] : 0.f;
    cr[c * HD] = run;
    run = carry_fwd(run, qn, local);
  }
}

// Backward phases 1 (kOut = false: the chunk's (z, zr) at its first step from zero at its end)
// and 3 (kOut = true: from the incoming pair, zero for the last chunk, writing dx and the tile's
// partial sums of G = sum xm z, R = sum xm zr and dy * x).
template <typename T, int H, int VEC, bool kOut>
__global__ void __launch_bounds__(kThreads)
    ema_bwd_kernel(const BwdParams p, int64_t nchunks, int64_t nblocks) {
  const Tile tl = decode_tile(nchunks, nblocks, VEC, p.chunk, p.seqlen);
  if (!kOut && tl.c == 0) return;  // nobody reads the first chunk's state at its start
  if (tl.d0 >= p.dim) return;
  const int heads = static_cast<int>(p.heads);
  const int64_t D = p.dim, L = p.seqlen, Lk = p.trunc_len;
  ThreadCoeffs<H, VEC> k;
  k.load(p.damping, p.decay, p.expansion, p.projection, tl.d0, heads, head_scale(heads), Lk);

  const bool incoming = kOut && tl.c < nchunks - 1;
  const bool has_omega = kOut && p.omega != nullptr;
  float z[VEC][H], zr[VEC][H], G[VEC][H], R[VEC][H], om[VEC], om_hi[VEC], omg[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
#pragma unroll
    for (int n = 0; n < H; ++n) {
      const bool read = incoming && n < heads;
      const int64_t ci = carry_index(tl.b, tl.c, n, tl.d0 + v, nchunks, heads, D);
      z[v][n] = read ? p.carry_z[ci] : 0.f;
      zr[v][n] = read ? p.carry_zr[ci] : 0.f;
      G[v][n] = 0.f;
      R[v][n] = 0.f;
    }
    om[v] = 0.f;
    om_hi[v] = 0.f;
    omg[v] = has_omega ? p.omega[tl.d0 + v] : 0.f;
  }

  const T* __restrict__ dy = static_cast<const T*>(p.dy) + tl.b * p.dy_stride_b + tl.d0;
  const T* __restrict__ x = static_cast<const T*>(p.x) + tl.b * p.x_stride_b + tl.d0;
  T* __restrict__ dx = static_cast<T*>(p.dx) + tl.b * p.dx_stride_b + tl.d0;
  const bool* __restrict__ pad = p.pad != nullptr ? p.pad + tl.b * L : nullptr;
#pragma unroll 4
  for (int64_t t = tl.t1 - 1; t >= tl.t0; --t) {
    float dyv[VEC], dyf[VEC], xr[VEC];
    load_vec<T, VEC>(dy + t * p.dy_stride_t, dyv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      dyf[v] = 0.f;
      xr[v] = 0.f;
    }
    if (Lk > 0 && t + Lk < L) load_vec<T, VEC>(dy + (t + Lk) * p.dy_stride_t, dyf);
    bool masked = false;
    if (kOut) {
      load_vec<T, VEC>(x + t * p.x_stride_t, xr);
      masked = pad != nullptr && pad[t];
    }
    float dxv[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float xm = masked ? 0.f : xr[v];
      float acc = 0.f;
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) {
          scan_bwd(z[v][n], zr[v][n], k.q[v][n], k.Q[v][n], k.dQ[v][n], dyv[v], dyf[v]);
          if (kOut) {
            acc += k.w[v][n] * z[v][n];
            G[v][n] += adjoint_term(xm, z[v][n]);
            R[v][n] += adjoint_term(xm, zr[v][n]);
          }
        }
      }
      dxv[v] = masked ? 0.f : acc;
      if (has_omega) {
        dxv[v] += omg[v] * dyv[v];
        om[v] += dyv[v] * xr[v];
      }
    }
    if (kOut) store_vec<T, VEC>(dx + t * p.dx_stride_t, dxv);
    if (has_omega && ((tl.t1 - t) & (kFlush - 1)) == 0) {  // see kFlush
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        om_hi[v] += om[v];
        om[v] = 0.f;
      }
    }
  }
  if (kOut) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) {
          const int64_t ci = carry_index(tl.b, tl.c, n, tl.d0 + v, nchunks, heads, D);
          p.partial_g[ci] = G[v][n];  // the (B * nchunks, h, D) slot of this tile
          p.partial_r[ci] = R[v][n];
        }
      }
      if (has_omega) p.partial_omega[(tl.b * nchunks + tl.c) * D + tl.d0 + v] = om_hi[v] + om[v];
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int n = 0; n < H; ++n) {
        if (n < heads) {
          const int64_t ci = carry_index(tl.b, tl.c, n, tl.d0 + v, nchunks, heads, D);
          p.carry_z[ci] = z[v][n];
          p.carry_zr[ci] = zr[v][n];
        }
      }
    }
  }
}

// Backward phase 2: per (b, n, d), serially from the last chunk to the first. The last chunk
// (maybe shorter than p.chunk) composes onto the zero state past the end, so only p.chunk-step
// powers appear.
__global__ void __launch_bounds__(kCarryThreads)
    ema_bwd_carry_kernel(const BwdParams p, int64_t nchunks) {
  const int64_t HD = p.heads * p.dim;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * HD) return;
  const int64_t b = i / HD, k = i % HD, n = k / p.dim, d = k % p.dim;
  const int heads = static_cast<int>(p.heads);
  const int64_t pi = d * heads + n;
  const Coeffs<float> co = make_coeffs<float>(p.damping[pi], p.decay[pi], p.expansion[pi],
                                              p.projection[pi], head_scale(heads), 0);
  float qT, nqT;
  chunk_powers(co.q, p.chunk, &qT, &nqT);
  float* cz = p.carry_z + b * nchunks * HD + k;
  float* czr = p.carry_zr + b * nchunks * HD + k;
  float z = 0.f, zr = 0.f;
  for (int64_t c = nchunks - 1; c > 0; --c) {
    const float lz = cz[c * HD], lzr = czr[c * HD];
    cz[c * HD] = z;
    czr[c * HD] = zr;
    carry_bwd(z, zr, qT, nqT, lz, lzr);
  }
  cz[0] = z;  // phase 1 skipped the first chunk: its slot is only written here
  czr[0] = zr;
}

// Sums the per-tile partials over the B * nchunks tiles in a fixed order (fp64), then applies
// the chain rule per (d, n); domega likewise per d.
__global__ void __launch_bounds__(kCarryThreads)
    ema_bwd_reduce_kernel(const BwdParams p, int64_t slots) {
  const int64_t HD = p.heads * p.dim;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int heads = static_cast<int>(p.heads);
  if (i < HD) {
    double g = 0.0, r = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      g += static_cast<double>(p.partial_g[s * HD + i]);
      r += static_cast<double>(p.partial_r[s * HD + i]);
    }
    const int64_t n = i / p.dim, d = i % p.dim, pi = d * heads + n;
    const float scale = head_scale(heads);
    const Coeffs<float> co = make_coeffs<float>(p.damping[pi], p.decay[pi], p.expansion[pi],
                                                p.projection[pi], scale, p.trunc_len);
    const ParamGrads<float> pg =
        param_grads(co, p.expansion[pi], scale, static_cast<float>(g), static_cast<float>(r));
    p.ddamping[pi] = pg.damping;
    p.ddecay[pi] = pg.decay;
    p.dexpansion[pi] = pg.expansion;
    p.dprojection[pi] = pg.projection;
  }
  if (p.domega != nullptr && i < p.dim) {
    double o = 0.0;
    for (int64_t s = 0; s < slots; ++s) o += static_cast<double>(p.partial_omega[s * p.dim + i]);
    p.domega[i] = static_cast<float>(o);
  }
}

// One streaming step; one thread per (b, d), looping over the heads.
template <typename T>
__global__ void __launch_bounds__(kCarryThreads) ema_step_kernel(const StepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.dim) return;
  const int64_t b = i / p.dim, d = i % p.dim;
  const int heads = static_cast<int>(p.heads);
  const float scale = head_scale(heads);
  const T* __restrict__ state = static_cast<const T*>(p.state);
  T* __restrict__ new_state = static_cast<T*>(p.new_state);
  const float xv = to_float(static_cast<const T*>(p.x)[i]);
  float yv = p.omega != nullptr ? p.omega[d] * xv : 0.f;
  for (int n = 0; n < heads; ++n) {
    const int64_t pi = d * heads + n;
    const Coeffs<float> co = make_coeffs<float>(p.damping[pi], p.decay[pi], p.expansion[pi],
                                                p.projection[pi], scale, 0);
    const float old = state != nullptr ? to_float(state[b * p.state_stride_b + pi]) : 0.f;
    const float s = step_state(co, xv, old);
    new_state[i * heads + n] = from_float<T>(s);
    yv += co.c * s;
  }
  static_cast<T*>(p.y)[i] = from_float<T>(yv);
}

}  // namespace ema
}  // namespace seqkern
