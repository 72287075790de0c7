// AdaLN on the CPU: one row at a time, accumulated in fp32 (fp64 for fp64 inputs).
#include "adaln/adaln_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace seqkern {
namespace adaln {
namespace {

// Rows per parallel task: enough elements that waking a thread pays off.
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename scalar_t>
void fwd_impl(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps,
              at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2);
  const bool per_token = gamma.dim() == 3;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* rp = rstd.mutable_data_ptr<acc_t>();

  // `omp simd reduction` lets the compiler vectorize the row sums without -ffast-math.
  at::parallel_for(0, batch * seqlen, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = xp + row * dim;
      const int64_t mod = (per_token ? row : row / seqlen) * dim;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += static_cast<acc_t>(xr[d]);
      const acc_t mu = sum / static_cast<acc_t>(dim);
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t c = static_cast<acc_t>(xr[d]) - mu;
        sq += c * c;
      }
      const acc_t rs = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(dim) + static_cast<acc_t>(eps));
      scalar_t* yr = yp + row * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t n = (static_cast<acc_t>(xr[d]) - mu) * rs;
        yr[d] = static_cast<scalar_t>(static_cast<acc_t>(gp[mod + d]) * n +
                                      static_cast<acc_t>(bp[mod + d]));
      }
      mp[row] = mu;
      rp[row] = rs;
    }
  });
}

// One pass over x and dy. Task (b, c) owns rows [c * kChunk, (c + 1) * kChunk) of batch b: it
// writes dx for them and, for a per-batch gamma, the chunk's partial dgamma/dbeta; the partials
// are then summed across chunks in double. Summing at most kChunk rows per partial keeps the
// fp32 rounding error of long sequences at the level of a pairwise sum.
template <typename scalar_t>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dgamma,
              at::Tensor& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChunk = 64;
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2);
  const bool per_token = gamma.dim() == 3;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* rp = rstd.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  scalar_t* dgp = dgamma.mutable_data_ptr<scalar_t>();
  scalar_t* dbp = dbeta.mutable_data_ptr<scalar_t>();

  const int64_t chunks = (seqlen + kChunk - 1) / kChunk;
  // (batch, chunks, 2, dim) partial sums; only for a per-batch gamma.
  std::vector<acc_t> partial(per_token ? 0 : batch * chunks * 2 * dim, acc_t(0));

  // dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)),  g = dy * gamma, xhat = (x-mean)*rstd
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t t0 = (task % chunks) * kChunk;
      const int64_t t1 = std::min(seqlen, t0 + kChunk);
      acc_t* pg = per_token ? nullptr : partial.data() + task * 2 * dim;
      acc_t* pb = per_token ? nullptr : pg + dim;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = b * seqlen + t;
        const int64_t off = row * dim;
        const scalar_t* gr = gp + (per_token ? row : b) * dim;
        const acc_t mu = mp[row], rs = rp[row];
        // x - mean, centred once more on its own mean: the saved fp32 mean is rounded, and
        // where |mean| >> the row's spread that shifts every xhat alike, which dx (a difference
        // of near-equal terms) amplifies by rstd. xhat = ((x - mu) - shift) * rstd throughout.
        acc_t s_c = 0;
#pragma omp simd reduction(+ : s_c)
        for (int64_t d = 0; d < dim; ++d) s_c += static_cast<acc_t>(xp[off + d]) - mu;
        const acc_t shift = s_c / static_cast<acc_t>(dim);
        auto xhat_at = [&](int64_t d) {
          return (static_cast<acc_t>(xp[off + d]) - mu - shift) * rs;
        };
        acc_t s_g = 0, s_gx = 0;
#pragma omp simd reduction(+ : s_g, s_gx)
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t xhat = xhat_at(d);
          const acc_t g = static_cast<acc_t>(dyp[off + d]) * static_cast<acc_t>(gr[d]);
          s_g += g;
          s_gx += g * xhat;
        }
        const acc_t mean_g = s_g / static_cast<acc_t>(dim);
        const acc_t mean_gx = s_gx / static_cast<acc_t>(dim);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t xhat = xhat_at(d);
          const acc_t g = static_cast<acc_t>(dyp[off + d]) * static_cast<acc_t>(gr[d]);
          dxp[off + d] = static_cast<scalar_t>(rs * (g - mean_g - xhat * mean_gx));
        }
        if (per_token) {
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            const acc_t dyv = static_cast<acc_t>(dyp[off + d]);
            dgp[off + d] = static_cast<scalar_t>(dyv * xhat_at(d));
            dbp[off + d] = dyp[off + d];
          }
        } else {
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            const acc_t dyv = static_cast<acc_t>(dyp[off + d]);
            pg[d] += dyv * xhat_at(d);
            pb[d] += dyv;
          }
        }
      }
    }
  });
  if (per_token) return;

  at::parallel_for(0, batch * dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / dim, d = i % dim;
      double sg = 0, sb = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* p = partial.data() + ((b * chunks + c) * 2) * dim;
        sg += static_cast<double>(p[d]);
        sb += static_cast<double>(p[dim + d]);
      }
      dgp[i] = static_cast<scalar_t>(sg);
      dbp[i] = static_cast<scalar_t>(sb);
    }
  });
}

}  // namespace

void cpu_fwd(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps,
             at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_fwd_cpu", [&] {
    fwd_impl<scalar_t>(x, gamma, beta, eps, y, mean, rstd);
  });
}

void cpu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
             const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dgamma,
             at::Tensor& dbeta) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_bwd_cpu", [&] {
    bwd_impl<scalar_t>(dy, x, gamma, mean, rstd, dx, dgamma, dbeta);
  });
}

}  // namespace adaln
}  // namespace seqkern
