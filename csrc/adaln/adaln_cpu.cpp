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

  at::parallel_for(0, batch * seqlen, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = xp + row * dim;
      const int64_t mod = (per_token ? row : row / seqlen) * dim;
      acc_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) sum += static_cast<acc_t>(xr[d]);
      const acc_t mu = sum / static_cast<acc_t>(dim);
      acc_t sq = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t c = static_cast<acc_t>(xr[d]) - mu;
        sq += c * c;
      }
      const acc_t rs = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(dim) + static_cast<acc_t>(eps));
      scalar_t* yr = yp + row * dim;
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

template <typename scalar_t>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dgamma,
              at::Tensor& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
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

  // dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)),  g = dy * gamma, xhat = (x-mean)*rstd
  at::parallel_for(0, batch * seqlen, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * dim;
      const int64_t mod = (per_token ? row : row / seqlen) * dim;
      const acc_t mu = mp[row], rs = rp[row];
      acc_t s_g = 0, s_gx = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t xhat = (static_cast<acc_t>(xp[off + d]) - mu) * rs;
        const acc_t g = static_cast<acc_t>(dyp[off + d]) * static_cast<acc_t>(gp[mod + d]);
        s_g += g;
        s_gx += g * xhat;
      }
      const acc_t mean_g = s_g / static_cast<acc_t>(dim);
      const acc_t mean_gx = s_gx / static_cast<acc_t>(dim);
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t xhat = (static_cast<acc_t>(xp[off + d]) - mu) * rs;
        const acc_t dyv = static_cast<acc_t>(dyp[off + d]);
        const acc_t g = dyv * static_cast<acc_t>(gp[mod + d]);
        dxp[off + d] = static_cast<scalar_t>(rs * (g - mean_g - xhat * mean_gx));
        if (per_token) {
          dgp[off + d] = static_cast<scalar_t>(dyv * xhat);
          dbp[off + d] = static_cast<scalar_t>(dyv);
        }
      }
    }
  });
  if (per_token) return;

  // Per-batch gamma: dgamma[b, d] = sum_t dy * xhat, dbeta[b, d] = sum_t dy. Work is split over
  // (b, column block) so each output is owned by one task and rows are read contiguously.
  constexpr int64_t kCols = 256;
  const int64_t col_blocks = (dim + kCols - 1) / kCols;
  at::parallel_for(0, batch * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_g(kCols), acc_b(kCols);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * kCols;
      const int64_t c1 = std::min(dim, c0 + kCols);
      std::fill(acc_g.begin(), acc_g.end(), acc_t(0));
      std::fill(acc_b.begin(), acc_b.end(), acc_t(0));
      for (int64_t t = 0; t < seqlen; ++t) {
        const int64_t row = b * seqlen + t;
        const acc_t mu = mp[row], rs = rp[row];
        for (int64_t d = c0; d < c1; ++d) {
          const acc_t dyv = static_cast<acc_t>(dyp[row * dim + d]);
          acc_g[d - c0] += dyv * (static_cast<acc_t>(xp[row * dim + d]) - mu) * rs;
          acc_b[d - c0] += dyv;
        }
      }
      for (int64_t d = c0; d < c1; ++d) {
        dgp[b * dim + d] = static_cast<scalar_t>(acc_g[d - c0]);
        dbp[b * dim + d] = static_cast<scalar_t>(acc_b[d - c0]);
      }
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
