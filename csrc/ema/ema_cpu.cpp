// MEGA multi-head damped EMA on the CPU: the chunked scan of ema.h with at::parallel_for over
// tiles (batch, chunk, block of kBlock channels). Inside a tile the states of all h heads for the
// block live in a small scratch array and the inner loop runs over contiguous channels, so it
// vectorises. Accumulation in fp32 (fp64 for fp64 inputs); partial sums are reduced over tiles
// in a fixed order in double (no atomics: the result does not depend on the thread count).
#include "ema/ema_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ema/ema_math.h"

namespace seqkern {
namespace ema {

namespace {

constexpr int64_t kBlock = 64;       // channels per tile (the vectorised inner loop)
constexpr int64_t kAutoChunk = 256;  // shortest chunk the auto choice cuts time into
// The backward's omega sum (dy * x) runs in fp32 over at most kFlush steps, then into a second
// accumulator: two levels keep long chunks near the rounding of a pairwise sum. (G and R need
// no such care: their error is dominated by q's fp32 rounding, as the reference's is.)
constexpr int64_t kFlush = 64;
static_assert((kFlush & (kFlush - 1)) == 0, "kFlush must be a power of two");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per (head, channel) coefficients, laid out (h, D): the inner loop over channels is contiguous.
template <typename acc_t>
struct Tables {
  std::vector<acc_t> q, w, Q, dQ;
};

template <typename acc_t>
acc_t head_scale(int64_t heads) {
  return static_cast<acc_t>(std::sqrt(1.0 / static_cast<double>(heads)));
}

template <typename acc_t>
Coeffs<acc_t> coeffs_at(const at::Tensor& damping, const at::Tensor& decay,
                        const at::Tensor& expansion, const at::Tensor& projection, int64_t i,
                        acc_t scale, int64_t trunc_len) {
  return make_coeffs<acc_t>(damping.const_data_ptr<acc_t>()[i], decay.const_data_ptr<acc_t>()[i],
                            expansion.const_data_ptr<acc_t>()[i],
                            projection.const_data_ptr<acc_t>()[i], scale, trunc_len);
}

template <typename acc_t>
Tables<acc_t> make_tables(const at::Tensor& damping, const at::Tensor& decay,
                          const at::Tensor& expansion, const at::Tensor& projection,
                          int64_t trunc_len) {
  const int64_t D = projection.size(0), H = projection.size(1);
  const acc_t scale = head_scale<acc_t>(H);
  Tables<acc_t> t;
  t.q.resize(H * D);
  t.w.resize(H * D);
  t.Q.resize(H * D);
  t.dQ.resize(H * D);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t n = 0; n < H; ++n) {
      const Coeffs<acc_t> k =
          coeffs_at<acc_t>(damping, decay, expansion, projection, d * H + n, scale, trunc_len);
      t.q[n * D + d] = k.q;
      t.w[n * D + d] = k.w;
      t.Q[n * D + d] = k.Q;
      t.dQ[n * D + d] = k.dQ;
    }
  }
  return t;
}

// Loads n values of a row as acc_t; a padded row reads as zeros (NaN included: masked_fill).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* row, int64_t n, bool masked, acc_t* out) {
  if (masked) {
    std::fill(out, out + n, acc_t(0));
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(row[j]);
}

// Everything a tile needs to know about one call.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t B, L, D, H;
  int64_t trunc_len;  // Lk when truncating, else 0
  int64_t T, NC, ND;  // chunk length, number of chunks, number of channel blocks
  const bool* pad;
  const acc_t* omega;
  const Tables<acc_t>* tab;

  bool masked(int64_t b, int64_t t) const { return pad != nullptr && pad[b * L + t]; }
  int64_t num_tiles() const { return B * NC * ND; }
  // tile -> (b, c, db)
  void decode(int64_t tile, int64_t* b, int64_t* c, int64_t* db) const {
    *b = tile / (NC * ND);
    *c = (tile / ND) % NC;
    *db = tile % ND;
  }
  // Offset of (b, c, n, d) in a (B, NC, H, D) buffer.
  int64_t carry_index(int64_t b, int64_t c, int64_t n, int64_t d) const {
    return ((b * NC + c) * H + n) * D + d;
  }
};

template <typename scalar_t>
int64_t setup(Problem<scalar_t>& pr, int64_t B, int64_t L, int64_t D, int64_t H,
              int64_t trunc_len, int64_t chunk, const at::Tensor& pad, const at::Tensor& omega) {
  using acc_t = at::opmath_type<scalar_t>;
  pr.B = B;
  pr.L = L;
  pr.D = D;
  pr.H = H;
  pr.trunc_len = trunc_len;
  pr.T = std::max<int64_t>(1, std::min(chunk, L));
  pr.NC = ceil_div(L, pr.T);
  pr.ND = ceil_div(D, kBlock);
  pr.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  pr.omega = omega.defined() ? omega.const_data_ptr<acc_t>() : nullptr;
  return pr.NC;
}

// ---------------------------------------------------------------------------------------------
// Forward

// kOut = false: phase 1, the chunk's end state from zero into carry[b, c].
// kOut = true:  phase 3, from the incoming state carry[b, c] (zero for c = 0), writing y.
template <typename scalar_t, bool kOut>
void fwd_tile(const Problem<scalar_t>& pr, const scalar_t* x, int64_t xsb, int64_t xst,
              scalar_t* y, int64_t ysb, int64_t yst, at::opmath_type<scalar_t>* carry,
              int64_t tile, at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t b, c, db;
  pr.decode(tile, &b, &c, &db);
  const int64_t d0 = db * kBlock, nd = std::min(kBlock, pr.D - d0);
  const int64_t t0 = c * pr.T, t1 = std::min(pr.L, t0 + pr.T);
  const int64_t D = pr.D, Lk = pr.trunc_len;
  acc_t* s = scratch;                    // (H, kBlock)
  acc_t* xm = s + pr.H * kBlock;         // masked x_t
  acc_t* xb = xm + kBlock;               // masked x_{t-Lk}, or 0
  acc_t* yacc = xb + kBlock;             // y_t
  acc_t* xraw = yacc + kBlock;           // unmasked x_t (omega)
  for (int64_t n = 0; n < pr.H; ++n) {
    for (int64_t j = 0; j < nd; ++j) {
      s[n * kBlock + j] = (kOut && c > 0) ? carry[pr.carry_index(b, c, n, d0 + j)] : acc_t(0);
    }
  }
  std::fill(xb, xb + kBlock, acc_t(0));
  const Tables<acc_t>& tab = *pr.tab;
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* xr = x + b * xsb + t * xst + d0;
    load_row(xr, nd, pr.masked(b, t), xm);
    // t >= Lk stays true once it is: xb is zero until then.
    if (Lk > 0 && t >= Lk) load_row(x + b * xsb + (t - Lk) * xst + d0, nd, pr.masked(b, t - Lk), xb);
    if constexpr (kOut) {
      if (pr.omega != nullptr) {
        load_row(xr, nd, false, xraw);
#pragma omp simd
        for (int64_t j = 0; j < nd; ++j) yacc[j] = pr.omega[d0 + j] * xraw[j];
      } else {
        std::fill(yacc, yacc + nd, acc_t(0));
      }
    }
    for (int64_t n = 0; n < pr.H; ++n) {
      acc_t* sn = s + n * kBlock;
      const acc_t* qn = tab.q.data() + n * D + d0;
      const acc_t* Qn = tab.Q.data() + n * D + d0;
      const acc_t* wn = tab.w.data() + n * D + d0;
#pragma omp simd
      for (int64_t j = 0; j < nd; ++j) {
        sn[j] = scan_fwd(sn[j], qn[j], Qn[j], xm[j], xb[j]);
        if constexpr (kOut) yacc[j] += wn[j] * sn[j];
      }
    }
    if constexpr (kOut) {
      scalar_t* yr = y + b * ysb + t * yst + d0;
#pragma omp simd
      for (int64_t j = 0; j < nd; ++j) yr[j] = static_cast<scalar_t>(yacc[j]);
    }
  }
  if constexpr (!kOut) {
    for (int64_t n = 0; n < pr.H; ++n) {
      for (int64_t j = 0; j < nd; ++j) carry[pr.carry_index(b, c, n, d0 + j)] = s[n * kBlock + j];
    }
  }
}

template <typename scalar_t>
int64_t scratch_size(const Problem<scalar_t>& pr, int64_t per_head, int64_t per_channel) {
  return (per_head * pr.H + per_channel) * kBlock;
}

template <typename scalar_t>
void fwd_impl(const at::Tensor& x, const at::Tensor& pad, const at::Tensor& damping,
              const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
              const at::Tensor& omega, int64_t trunc_len, int64_t chunk, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = projection.size(1);
  Problem<scalar_t> pr;
  setup(pr, B, L, D, H, trunc_len, chunk, pad, omega);
  const Tables<acc_t> tab = make_tables<acc_t>(damping, decay, expansion, projection, trunc_len);
  pr.tab = &tab;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t xsb = x.stride(0), xst = x.stride(1), ysb = y.stride(0), yst = y.stride(1);
  const int64_t HD = H * D;
  std::vector<acc_t> carry(pr.NC > 1 ? B * pr.NC * HD : 0);
  const int64_t scratch = scratch_size(pr, 1, 4);

  if (pr.NC > 1) {
    // Phase 1: every chunk but the last (whose end state nobody reads).
    at::parallel_for(0, pr.num_tiles(), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(scratch);
      for (int64_t tile = begin; tile < end; ++tile) {
        int64_t b, c, db;
        pr.decode(tile, &b, &c, &db);
        if (c == pr.NC - 1) continue;
        fwd_tile<scalar_t, false>(pr, xp, xsb, xst, yp, ysb, yst, carry.data(), tile, buf.data());
      }
    });
    // Phase 2: serial over chunks per (b, n, d); chunks 0..NC-2 all have T steps.
    std::vector<acc_t> qT(HD);
    for (int64_t k = 0; k < HD; ++k) {
      acc_t unused;
      chunk_powers(tab.q[k], pr.T, &qT[k], &unused);
    }
    constexpr int64_t kSpan = 1024;
    const int64_t spans = ceil_div(HD, kSpan);
    at::parallel_for(0, B * spans, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> run(kSpan);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / spans, k0 = (task % spans) * kSpan;
        const int64_t nk = std::min(kSpan, HD - k0);
        std::fill(run.begin(), run.end(), acc_t(0));
        for (int64_t c = 0; c < pr.NC; ++c) {
          acc_t* cr = carry.data() + (b * pr.NC + c) * HD + k0;
          const bool compose = c < pr.NC - 1;  // phase 1 skipped the last chunk
#pragma omp simd
          for (int64_t k = 0; k < nk; ++k) {
            const acc_t local = compose ? cr[k] : acc_t(0);
            cr[k] = run[k];
            run[k] = carry_fwd(run[k], qT[k0 + k], local);
          }
        }
      }
    });
  }
  // Phase 3.
  at::parallel_for(0, pr.num_tiles(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(scratch);
    for (int64_t tile = begin; tile < end; ++tile) {
      fwd_tile<scalar_t, true>(pr, xp, xsb, xst, yp, ysb, yst, carry.data(), tile, buf.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

struct BwdBuffers {
  // All in acc_t, as void* to keep the tile signature short; see bwd_tile.
  void* carry_z;
  void* carry_zr;
  void* part_g;
  void* part_r;
  void* part_omega;
};

// kOut = false: phase 1, the chunk's (z, zr) at its first step from a zero state at its end.
// kOut = true:  phase 3, from the incoming (z, zr) (zero for the last chunk), writing dx and the
//               tile's partial sums of G = sum xm z, R = sum xm zr, and of dy * x for omega.
template <typename scalar_t, bool kOut>
void bwd_tile(const Problem<scalar_t>& pr, const scalar_t* dy, int64_t dsb, int64_t dst,
              const scalar_t* x, int64_t xsb, int64_t xst, scalar_t* dx, int64_t dxsb,
              int64_t dxst, const BwdBuffers& bufs, int64_t tile,
              at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t b, c, db;
  pr.decode(tile, &b, &c, &db);
  const int64_t d0 = db * kBlock, nd = std::min(kBlock, pr.D - d0);
  const int64_t t0 = c * pr.T, t1 = std::min(pr.L, t0 + pr.T);
  const int64_t D = pr.D, L = pr.L, Lk = pr.trunc_len, H = pr.H;
  acc_t* cz = static_cast<acc_t*>(bufs.carry_z);
  acc_t* czr = static_cast<acc_t*>(bufs.carry_zr);
  acc_t* z = scratch;              // (H, kBlock)
  acc_t* zr = z + H * kBlock;      // (H, kBlock)
  acc_t* G = zr + H * kBlock;      // (H, kBlock)
  acc_t* R = G + H * kBlock;       // (H, kBlock)
  acc_t* dyv = R + H * kBlock;     // dy_t
  acc_t* dyf = dyv + kBlock;       // dy_{t+Lk}, or 0
  acc_t* xraw = dyf + kBlock;      // unmasked x_t
  acc_t* xm = xraw + kBlock;       // masked x_t
  acc_t* dxacc = xm + kBlock;      // sum_n w z
  acc_t* om = dxacc + kBlock;      // sum dy x over the current kFlush steps
  acc_t* om_hi = om + kBlock;      // ... over the steps before
  const bool incoming = kOut && c < pr.NC - 1;
  for (int64_t n = 0; n < H; ++n) {
    for (int64_t j = 0; j < nd; ++j) {
      const int64_t i = pr.carry_index(b, c, n, d0 + j);
      z[n * kBlock + j] = incoming ? cz[i] : acc_t(0);
      zr[n * kBlock + j] = incoming ? czr[i] : acc_t(0);
    }
  }
  if constexpr (kOut) {
    std::fill(G, G + 2 * H * kBlock, acc_t(0));  // G and R
    std::fill(om, om + 2 * kBlock, acc_t(0));     // om and om_hi
  }
  std::fill(dyf, dyf + kBlock, acc_t(0));
  const Tables<acc_t>& tab = *pr.tab;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    load_row(dy + b * dsb + t * dst + d0, nd, false, dyv);
    // t + Lk < L stays true as t decreases: dyf is zero until then.
    if (Lk > 0 && t + Lk < L) load_row(dy + b * dsb + (t + Lk) * dst + d0, nd, false, dyf);
    const bool pad_t = pr.masked(b, t);
    if constexpr (kOut) {
      load_row(x + b * xsb + t * xst + d0, nd, false, xraw);
#pragma omp simd
      for (int64_t j = 0; j < nd; ++j) {
        xm[j] = pad_t ? acc_t(0) : xraw[j];
        dxacc[j] = acc_t(0);
      }
    }
    for (int64_t n = 0; n < H; ++n) {
      acc_t* zn = z + n * kBlock;
      acc_t* zrn = zr + n * kBlock;
      acc_t* Gn = G + n * kBlock;
      acc_t* Rn = R + n * kBlock;
      const acc_t* qn = tab.q.data() + n * D + d0;
      const acc_t* Qn = tab.Q.data() + n * D + d0;
      const acc_t* dQn = tab.dQ.data() + n * D + d0;
      const acc_t* wn = tab.w.data() + n * D + d0;
#pragma omp simd
      for (int64_t j = 0; j < nd; ++j) {
        acc_t zj = zn[j], zrj = zrn[j];
        scan_bwd(zj, zrj, qn[j], Qn[j], dQn[j], dyv[j], dyf[j]);
        zn[j] = zj;
        zrn[j] = zrj;
        if constexpr (kOut) {
          dxacc[j] += wn[j] * zj;
          Gn[j] += adjoint_term(xm[j], zj);
          Rn[j] += adjoint_term(xm[j], zrj);
        }
      }
    }
    if constexpr (kOut) {
      scalar_t* dxr = dx + b * dxsb + t * dxst + d0;
      if (pr.omega != nullptr) {
        const acc_t* omg = pr.omega + d0;
#pragma omp simd
        for (int64_t j = 0; j < nd; ++j) {
          dxr[j] = static_cast<scalar_t>((pad_t ? acc_t(0) : dxacc[j]) + omg[j] * dyv[j]);
          om[j] += dyv[j] * xraw[j];
        }
        if (((t1 - t) & (kFlush - 1)) == 0) {  // see kFlush
          for (int64_t j = 0; j < nd; ++j) {
            om_hi[j] += om[j];
            om[j] = acc_t(0);
          }
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < nd; ++j) dxr[j] = static_cast<scalar_t>(pad_t ? acc_t(0) : dxacc[j]);
      }
    }
  }
  if constexpr (!kOut) {
    for (int64_t n = 0; n < H; ++n) {
      for (int64_t j = 0; j < nd; ++j) {
        const int64_t i = pr.carry_index(b, c, n, d0 + j);
        cz[i] = z[n * kBlock + j];
        czr[i] = zr[n * kBlock + j];
      }
    }
  } else {
    acc_t* pg = static_cast<acc_t*>(bufs.part_g);
    acc_t* prr = static_cast<acc_t*>(bufs.part_r);
    for (int64_t n = 0; n < H; ++n) {
      for (int64_t j = 0; j < nd; ++j) {
        const int64_t i = pr.carry_index(b, c, n, d0 + j);  // (B * NC, H, D) slot of this tile
        pg[i] = G[n * kBlock + j];
        prr[i] = R[n * kBlock + j];
      }
    }
    if (pr.omega != nullptr) {
      acc_t* po = static_cast<acc_t*>(bufs.part_omega) + (b * pr.NC + c) * D + d0;
      for (int64_t j = 0; j < nd; ++j) po[j] = om_hi[j] + om[j];
    }
  }
}

template <typename scalar_t>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& pad,
              const at::Tensor& damping, const at::Tensor& decay, const at::Tensor& expansion,
              const at::Tensor& projection, const at::Tensor& omega, int64_t trunc_len,
              int64_t chunk, at::Tensor& dx, at::Tensor& ddamping, at::Tensor& ddecay,
              at::Tensor& dexpansion, at::Tensor& dprojection, at::Tensor& domega) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), H = projection.size(1);
  Problem<scalar_t> pr;
  setup(pr, B, L, D, H, trunc_len, chunk, pad, omega);
  const Tables<acc_t> tab = make_tables<acc_t>(damping, decay, expansion, projection, trunc_len);
  pr.tab = &tab;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const int64_t dsb = dy.stride(0), dst = dy.stride(1), xsb = x.stride(0), xst = x.stride(1);
  const int64_t dxsb = dx.stride(0), dxst = dx.stride(1);
  const int64_t HD = H * D, slots = B * pr.NC;
  std::vector<acc_t> cz(pr.NC > 1 ? slots * HD : 0), czr(cz.size());
  std::vector<acc_t> pg(slots * HD), prr(slots * HD);
  std::vector<acc_t> pom(omega.defined() ? slots * D : 0);
  const BwdBuffers bufs{cz.data(), czr.data(), pg.data(), prr.data(), pom.data()};
  const int64_t scratch = scratch_size(pr, 4, 7);

  if (pr.NC > 1) {
    // Phase 1: every chunk but the first (whose state at its start nobody reads).
    at::parallel_for(0, pr.num_tiles(), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(scratch);
      for (int64_t tile = begin; tile < end; ++tile) {
        int64_t b, c, db;
        pr.decode(tile, &b, &c, &db);
        if (c == 0) continue;
        bwd_tile<scalar_t, false>(pr, dyp, dsb, dst, xp, xsb, xst, dxp, dxsb, dxst, bufs, tile,
                                  buf.data());
      }
    });
    // Phase 2: serial from the last chunk to the first per (b, n, d). The last chunk (maybe
    // shorter than T) composes onto the zero state past the end, so only T-step powers appear.
    std::vector<acc_t> qT(HD), nqT(HD);
    for (int64_t k = 0; k < HD; ++k) chunk_powers(tab.q[k], pr.T, &qT[k], &nqT[k]);
    constexpr int64_t kSpan = 1024;
    const int64_t spans = ceil_div(HD, kSpan);
    at::parallel_for(0, B * spans, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rz(kSpan), rzr(kSpan);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / spans, k0 = (task % spans) * kSpan;
        const int64_t nk = std::min(kSpan, HD - k0);
        std::fill(rz.begin(), rz.end(), acc_t(0));
        std::fill(rzr.begin(), rzr.end(), acc_t(0));
        for (int64_t c = pr.NC - 1; c >= 0; --c) {
          acc_t* zc = cz.data() + (b * pr.NC + c) * HD + k0;
          acc_t* zrc = czr.data() + (b * pr.NC + c) * HD + k0;
          const acc_t* qn = qT.data() + k0;
          const acc_t* nqn = nqT.data() + k0;
          const bool compose = c > 0;
#pragma omp simd
          for (int64_t k = 0; k < nk; ++k) {
            const acc_t lz = zc[k], lzr = zrc[k];
            zc[k] = rz[k];
            zrc[k] = rzr[k];
            if (compose) {
              acc_t zk = rz[k], zrk = rzr[k];
              carry_bwd(zk, zrk, qn[k], nqn[k], lz, lzr);
              rz[k] = zk;
              rzr[k] = zrk;
            }
          }
        }
      }
    });
  }
  // Phase 3.
  at::parallel_for(0, pr.num_tiles(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(scratch);
    for (int64_t tile = begin; tile < end; ++tile) {
      bwd_tile<scalar_t, true>(pr, dyp, dsb, dst, xp, xsb, xst, dxp, dxsb, dxst, bufs, tile,
                               buf.data());
    }
  });
  // Reduce the per-tile partials in a fixed order, then the chain rule per (d, n).
  const acc_t scale = head_scale<acc_t>(H);
  acc_t* gd = ddamping.mutable_data_ptr<acc_t>();
  acc_t* gc = ddecay.mutable_data_ptr<acc_t>();
  acc_t* ge = dexpansion.mutable_data_ptr<acc_t>();
  acc_t* gp = dprojection.mutable_data_ptr<acc_t>();
  at::parallel_for(0, HD, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double g = 0, r = 0;
      for (int64_t s = 0; s < slots; ++s) {
        g += static_cast<double>(pg[s * HD + k]);
        r += static_cast<double>(prr[s * HD + k]);
      }
      const int64_t n = k / D, d = k % D, i = d * H + n;
      const Coeffs<acc_t> kk =
          coeffs_at<acc_t>(damping, decay, expansion, projection, i, scale, trunc_len);
      const ParamGrads<acc_t> pgr =
          param_grads(kk, expansion.const_data_ptr<acc_t>()[i], scale, static_cast<acc_t>(g),
                      static_cast<acc_t>(r));
      gd[i] = pgr.damping;
      gc[i] = pgr.decay;
      ge[i] = pgr.expansion;
      gp[i] = pgr.projection;
    }
  });
  if (omega.defined()) {
    acc_t* go = domega.mutable_data_ptr<acc_t>();
    for (int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (int64_t s = 0; s < slots; ++s) o += static_cast<double>(pom[s * D + d]);
      go[d] = static_cast<acc_t>(o);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One step

template <typename scalar_t>
void step_impl(const at::Tensor& x, const at::Tensor& state, const at::Tensor& damping,
               const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
               const at::Tensor& omega, at::Tensor& y, at::Tensor& new_state) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), D = x.size(1), H = projection.size(1);
  const acc_t scale = head_scale<acc_t>(H);
  std::vector<Coeffs<acc_t>> k(D * H);
  for (int64_t i = 0; i < D * H; ++i) {
    k[i] = coeffs_at<acc_t>(damping, decay, expansion, projection, i, scale, 0);
  }
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = state.defined() ? state.const_data_ptr<scalar_t>() : nullptr;
  const int64_t ssb = state.defined() && state.dim() == 3 ? D * H : 0;
  const acc_t* om = omega.defined() ? omega.const_data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  scalar_t* nsp = new_state.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * D, std::max<int64_t>(1, 8192 / H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / D, d = i % D;
      const acc_t xv = static_cast<acc_t>(xp[i]);
      acc_t yv = om != nullptr ? om[d] * xv : acc_t(0);
      for (int64_t n = 0; n < H; ++n) {
        const acc_t old = sp != nullptr ? static_cast<acc_t>(sp[b * ssb + d * H + n]) : acc_t(0);
        const Coeffs<acc_t>& kk = k[d * H + n];
        const acc_t s = step_state(kk, xv, old);
        nsp[i * H + n] = static_cast<scalar_t>(s);
        yv += kk.c * s;
      }
      yp[i] = static_cast<scalar_t>(yv);
    }
  });
}

}  // namespace

int64_t cpu_chunk(int64_t batch, int64_t seqlen, int64_t dim, int64_t chunk) {
  if (seqlen <= 0) return 1;
  if (chunk > 0) return std::min(chunk, seqlen);
  // One pass over time when the batch and channel blocks alone keep every thread busy (phases
  // 1-2 cost a second read of x); otherwise cut time into chunks of at least kAutoChunk steps.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t base = std::max<int64_t>(1, batch * ceil_div(dim, kBlock));
  if (base >= 2 * threads || seqlen <= kAutoChunk) return seqlen;
  const int64_t want = ceil_div(2 * threads, base);
  return std::max(kAutoChunk, ceil_div(seqlen, want));
}

void cpu_fwd(const at::Tensor& x, const at::Tensor& pad, const at::Tensor& damping,
             const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
             const at::Tensor& omega, int64_t trunc_len, int64_t chunk, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ema_fwd_cpu", [&] {
    fwd_impl<scalar_t>(x, pad, damping, decay, expansion, projection, omega, trunc_len, chunk, y);
  });
}

void cpu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& pad,
             const at::Tensor& damping, const at::Tensor& decay, const at::Tensor& expansion,
             const at::Tensor& projection, const at::Tensor& omega, int64_t trunc_len,
             int64_t chunk, at::Tensor& dx, at::Tensor& ddamping, at::Tensor& ddecay,
             at::Tensor& dexpansion, at::Tensor& dprojection, at::Tensor& domega) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ema_bwd_cpu", [&] {
    bwd_impl<scalar_t>(dy, x, pad, damping, decay, expansion, projection, omega, trunc_len, chunk,
                       dx, ddamping, ddecay, dexpansion, dprojection, domega);
  });
}

void cpu_step(const at::Tensor& x, const at::Tensor& state, const at::Tensor& damping,
              const at::Tensor& decay, const at::Tensor& expansion, const at::Tensor& projection,
              const at::Tensor& omega, at::Tensor& y, at::Tensor& new_state) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ema_step_cpu", [&] {
    step_impl<scalar_t>(x, state, damping, decay, expansion, projection, omega, y, new_state);
  });
}

}  // namespace ema
}  // namespace seqkern
