// AdaLN torch glue: argument checks, allocation, and the C++ entry points bound into seqkern._C.
// The CUDA entry points exist only in a CUDA build (SEQKERN_WITH_CUDA).
#include <torch/extension.h>

#include "adaln/adaln.h"
#include "adaln/adaln_cpu.h"
#include "sk_checks.h"

#ifdef SEQKERN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace seqkern {
namespace adaln {
namespace {

// x (B,T,D); gamma and beta both (B,D) or both (B,T,D); one dtype, one device.
void check_inputs(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta) {
  SK_CHECK_DIM(x, 3);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
  SK_CHECK_DTYPE(gamma, x.scalar_type());
  SK_CHECK_DTYPE(beta, x.scalar_type());
  SK_CHECK_DEVICE(gamma, x.device());
  SK_CHECK_DEVICE(beta, x.device());
  if (gamma.dim() == 2) {
    SK_CHECK_SHAPE(gamma, B, D);
  } else {
    TORCH_CHECK(gamma.dim() == 3, "gamma must be (B, D) or (B, T, D), got ", gamma.sizes());
    SK_CHECK_SHAPE(gamma, B, T, D);
  }
  TORCH_CHECK(beta.sizes() == gamma.sizes(), "beta must have the shape of gamma ", gamma.sizes(),
              ", got ", beta.sizes());
}

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bwd_inputs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                      const at::Tensor& mean, const at::Tensor& rstd) {
  check_inputs(x, gamma, gamma);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ",
              dy.sizes());
  SK_CHECK_DTYPE(dy, x.scalar_type());
  SK_CHECK_DEVICE(dy, x.device());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->sizes() == x.sizes().slice(0, 2), "mean and rstd must be (B, T) = ",
                x.sizes().slice(0, 2), ", got ", s->sizes());
    TORCH_CHECK(s->scalar_type() == stats_dtype(x), "mean and rstd must be ", stats_dtype(x),
                ", got ", s->scalar_type());
    SK_CHECK_DEVICE(*s, x.device());
  }
}

std::vector<at::Tensor> fwd_cpu(const at::Tensor& x_in, const at::Tensor& gamma_in,
                                const at::Tensor& beta_in, double eps) {
  check_inputs(x_in, gamma_in, beta_in);
  TORCH_CHECK(x_in.is_cpu(), "adaln_fwd_cpu: x must be a CPU tensor, got ", x_in.device());
  const at::Tensor x = x_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(stats_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  cpu_fwd(x, gamma, beta, eps, y, mean, rstd);
  return {y, mean, rstd};
}

std::vector<at::Tensor> bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                const at::Tensor& gamma_in, const at::Tensor& mean_in,
                                const at::Tensor& rstd_in) {
  check_bwd_inputs(dy_in, x_in, gamma_in, mean_in, rstd_in);
  TORCH_CHECK(x_in.is_cpu(), "adaln_bwd_cpu: x must be a CPU tensor, got ", x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dgamma = at::empty_like(gamma), dbeta = at::empty_like(gamma);
  cpu_bwd(dy, x, gamma, mean, rstd, dx, dgamma, dbeta);
  return {dx, dgamma, dbeta};
}

#ifdef SEQKERN_WITH_CUDA
DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA AdaLN takes float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
}

void check_status(Status st, const char* what, int64_t dim) {
  TORCH_CHECK(st == kSuccess, what, " failed: ", cuda_status_string(st),
              st == 1 ? " (invalid value: D = " + std::to_string(dim) +
                            " may exceed " + std::to_string(kCudaMaxDim) + ")"
                      : std::string());
}

std::vector<at::Tensor> fwd_cuda(const at::Tensor& x_in, const at::Tensor& gamma_in,
                                 const at::Tensor& beta_in, double eps) {
  check_inputs(x_in, gamma_in, beta_in);
  TORCH_CHECK(x_in.is_cuda(), "adaln_fwd_cuda: x must be a CUDA tensor, got ", x_in.device());
  const DType tag = dtype_tag(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  FwdParams p{x.const_data_ptr(), gamma.const_data_ptr(), beta.const_data_ptr(),
              y.mutable_data_ptr(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
              x.size(0), x.size(1), x.size(2), gamma.dim() == 3, static_cast<float>(eps)};
  check_status(cuda_fwd(tag, p, c10::cuda::getCurrentCUDAStream().stream()), "adaln_fwd_cuda",
               x.size(2));
  return {y, mean, rstd};
}

std::vector<at::Tensor> bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                 const at::Tensor& gamma_in, const at::Tensor& mean_in,
                                 const at::Tensor& rstd_in) {
  check_bwd_inputs(dy_in, x_in, gamma_in, mean_in, rstd_in);
  TORCH_CHECK(x_in.is_cuda(), "adaln_bwd_cuda: x must be a CUDA tensor, got ", x_in.device());
  const DType tag = dtype_tag(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dgamma = at::empty_like(gamma), dbeta = at::empty_like(gamma);
  const bool per_token = gamma.dim() == 3;
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t splits = cuda_bwd_num_splits(B, T, x.get_device());
  at::Tensor workspace;
  if (!per_token) workspace = at::empty({B, splits, 2, D}, x.options().dtype(at::kFloat));
  BwdParams p{dy.const_data_ptr(), x.const_data_ptr(), gamma.const_data_ptr(),
              mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), dx.mutable_data_ptr(),
              dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr(),
              per_token ? nullptr : workspace.mutable_data_ptr<float>(), B, T, D, splits,
              per_token};
  check_status(cuda_bwd(tag, p, c10::cuda::getCurrentCUDAStream().stream()), "adaln_bwd_cuda", D);
  return {dx, dgamma, dbeta};
}
#endif

}  // namespace

void bind(pybind11::module_& m) {
  m.def("adaln_fwd_cpu", &fwd_cpu, "AdaLN forward on CPU -> (y, mean, rstd)", py::arg("x"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"));
  m.def("adaln_bwd_cpu", &bwd_cpu, "AdaLN backward on CPU -> (dx, dgamma, dbeta)", py::arg("dy"),
        py::arg("x"), py::arg("gamma"), py::arg("mean"), py::arg("rstd"));
#ifdef SEQKERN_WITH_CUDA
  m.def("adaln_fwd_cuda", &fwd_cuda, "AdaLN forward on CUDA -> (y, mean, rstd)", py::arg("x"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"));
  m.def("adaln_bwd_cuda", &bwd_cuda, "AdaLN backward on CUDA -> (dx, dgamma, dbeta)",
        py::arg("dy"), py::arg("x"), py::arg("gamma"), py::arg("mean"), py::arg("rstd"));
  m.attr("adaln_cuda_max_dim") = kCudaMaxDim;
#endif
}

}  // namespace adaln
}  // namespace seqkern
