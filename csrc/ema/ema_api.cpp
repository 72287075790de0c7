// MEGA multi-head damped EMA torch glue: argument checks, allocation, and the C++ entry points
// bound into seqkern._C. The CUDA entry points exist only in a CUDA build (SEQKERN_WITH_CUDA).
//
// Full sequence: x (B, L, D) any strides; damping, decay, expansion (D, h, 1); projection (D, h);
// pad_mask (B, L) bool (True = padding) or None; omega (D,) or None; truncation >= 0 (0 = none);
// chunk >= 0 (0 = auto). y and dx are allocated like x (empty_like); the parameter gradients
// in the accumulation dtype (fp64 for fp64 x, else fp32). The parameters may have any floating
// dtype: they are converted to the accumulation dtype here (small (D, h) tensors).
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "ema/ema.h"
#include "ema/ema_cpu.h"
#include "sk_checks.h"

#ifdef SEQKERN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace seqkern {
namespace ema {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The parameters, checked and converted: (D, h) contiguous in the accumulation dtype.
struct Params {
  at::Tensor damping, decay, expansion, projection;
  at::Tensor omega;  // (D,) or undefined
  int64_t heads = 0;
};

void check_param(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const at::Device& device) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape (", shape, "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

// dim: D (the last axis of x); acc: the dtype the kernels compute in.
Params check_params(int64_t dim, const at::Device& device, const at::Tensor& damping,
                    const at::Tensor& decay, const at::Tensor& expansion,
                    const at::Tensor& projection, const OptTensor& omega, at::ScalarType acc) {
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == dim,
              "projection must be (D, h) with D = ", dim, ", got ", projection.sizes());
  const int64_t H = projection.size(1);
  TORCH_CHECK(H >= 1, "projection must have at least one head, got ", projection.sizes());
  check_param("damping", damping, {dim, H, 1}, device);
  check_param("decay", decay, {dim, H, 1}, device);
  check_param("expansion", expansion, {dim, H, 1}, device);
  check_param("projection", projection, {dim, H}, device);
  Params p;
  p.heads = H;
  auto prep = [&](const at::Tensor& t) { return t.reshape({dim, H}).to(acc).contiguous(); };
  p.damping = prep(damping);
  p.decay = prep(decay);
  p.expansion = prep(expansion);
  p.projection = prep(projection);
  if (omega.has_value() && omega->defined()) {
    check_param("omega", *omega, {dim}, device);
    p.omega = omega->to(acc).contiguous();
  }
  return p;
}

void check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, fn, ": x must be (B, L, D), got ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()),
              fn, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

at::Tensor check_pad(const OptTensor& pad_mask_opt, const at::Tensor& x) {
  if (!pad_mask_opt.has_value() || !pad_mask_opt->defined()) return at::Tensor();
  const at::Tensor& pad_mask = *pad_mask_opt;
  SK_CHECK_DTYPE(pad_mask, at::kBool);
  SK_CHECK_SHAPE(pad_mask, x.size(0), x.size(1));
  SK_CHECK_DEVICE(pad_mask, x.device());
  return pad_mask.contiguous();
}

// Lk when truncation applies (0 < truncation < L), else 0.
int64_t trunc_len(int64_t truncation, int64_t seqlen) {
  TORCH_CHECK(truncation >= 0, "truncation must be >= 0 (0 = none), got ", truncation);
  return (truncation > 0 && truncation < seqlen) ? truncation : 0;
}

// A view the kernels can take: stride 1 along D (batch and time strides are free).
at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

bool unit_last_ok(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

void check_bwd(const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ",
              dy.sizes());
  SK_CHECK_DTYPE(dy, x.scalar_type());
  SK_CHECK_DEVICE(dy, x.device());
}

std::vector<at::Tensor> alloc_param_grads(const Params& p, const at::Tensor& x,
                                          at::ScalarType acc) {
  const int64_t D = p.projection.size(0), H = p.heads;
  const auto opts = x.options().dtype(acc);
  std::vector<at::Tensor> g;
  for (int i = 0; i < 3; ++i) g.push_back(at::zeros({D, H, 1}, opts));
  g.push_back(at::zeros({D, H}, opts));
  g.push_back(at::zeros({p.omega.defined() ? D : 0}, opts));
  return g;
}

void check_step(const at::Tensor& x, const OptTensor& state_opt, int64_t heads,
                at::Tensor* state) {
  if (!state_opt.has_value() || !state_opt->defined()) return;
  const at::Tensor& s = *state_opt;
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(s.sizes() == at::IntArrayRef({B, D, heads}) || s.sizes() == at::IntArrayRef({D, heads}),
              "state must be (B, D, h) = (", B, ", ", D, ", ", heads, ") or (D, h), got ",
              s.sizes());
  TORCH_CHECK(s.scalar_type() == x.scalar_type(), "state must have x's dtype ", x.scalar_type(),
              ", got ", s.scalar_type());
  SK_CHECK_DEVICE(s, x.device());
  *state = s.contiguous();
}

void check_step_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, fn, ": x must be (B, D), got ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()),
              fn, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// CPU

at::Tensor fwd_cpu(const at::Tensor& x_in, const at::Tensor& damping, const at::Tensor& decay,
                   const at::Tensor& expansion, const at::Tensor& projection,
                   const OptTensor& pad_mask, const OptTensor& omega, int64_t truncation,
                   int64_t chunk) {
  check_x("ema_fwd_cpu", x_in);
  TORCH_CHECK(x_in.is_cpu(), "ema_fwd_cpu: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0 = auto), got ", chunk);
  const at::ScalarType acc = acc_dtype(x_in);
  const Params p = check_params(x_in.size(2), x_in.device(), damping, decay, expansion,
                                projection, omega, acc);
  const at::Tensor pad = check_pad(pad_mask, x_in);
  const int64_t Lk = trunc_len(truncation, x_in.size(1));
  at::Tensor y = at::empty_like(x_in);
  if (y.numel() == 0) return y;
  const at::Tensor x = unit_last(x_in);
  at::Tensor out = unit_last_ok(y) ? y : at::empty(x.sizes(), x.options());
  const int64_t T = cpu_chunk(x.size(0), x.size(1), x.size(2), chunk);
  cpu_fwd(x, pad, p.damping, p.decay, p.expansion, p.projection, p.omega, Lk, T, out);
  if (!out.is_same(y)) y.copy_(out);
  return y;
}

std::vector<at::Tensor> bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                const at::Tensor& damping, const at::Tensor& decay,
                                const at::Tensor& expansion, const at::Tensor& projection,
                                const OptTensor& pad_mask, const OptTensor& omega,
                                int64_t truncation, int64_t chunk) {
  check_x("ema_bwd_cpu", x_in);
  TORCH_CHECK(x_in.is_cpu(), "ema_bwd_cpu: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0 = auto), got ", chunk);
  check_bwd(dy_in, x_in);
  const at::ScalarType acc = acc_dtype(x_in);
  const Params p = check_params(x_in.size(2), x_in.device(), damping, decay, expansion,
                                projection, omega, acc);
  const at::Tensor pad = check_pad(pad_mask, x_in);
  const int64_t Lk = trunc_len(truncation, x_in.size(1));
  at::Tensor dx = at::empty_like(x_in);
  std::vector<at::Tensor> g = alloc_param_grads(p, x_in, acc);
  if (dx.numel() == 0) {
    dx.zero_();
    return {dx, g[0], g[1], g[2], g[3], g[4]};
  }
  const at::Tensor x = unit_last(x_in), dy = unit_last(dy_in);
  at::Tensor out = unit_last_ok(dx) ? dx : at::empty(x.sizes(), x.options());
  const int64_t T = cpu_chunk(x.size(0), x.size(1), x.size(2), chunk);
  at::Tensor gd = g[0].view({-1, p.heads}), gc = g[1].view({-1, p.heads});
  at::Tensor ge = g[2].view({-1, p.heads});
  cpu_bwd(dy, x, pad, p.damping, p.decay, p.expansion, p.projection, p.omega, Lk, T, out, gd, gc,
          ge, g[3], g[4]);
  if (!out.is_same(dx)) dx.copy_(out);
  return {dx, g[0], g[1], g[2], g[3], g[4]};
}

std::vector<at::Tensor> step_cpu(const at::Tensor& x_in, const OptTensor& state_in,
                                 const at::Tensor& damping, const at::Tensor& decay,
                                 const at::Tensor& expansion, const at::Tensor& projection,
                                 const OptTensor& omega) {
  check_step_x("ema_step_cpu", x_in);
  TORCH_CHECK(x_in.is_cpu(), "ema_step_cpu: x must be a CPU tensor, got ", x_in.device());
  const at::ScalarType acc = acc_dtype(x_in);
  const Params p = check_params(x_in.size(1), x_in.device(), damping, decay, expansion,
                                projection, omega, acc);
  at::Tensor state;
  check_step(x_in, state_in, p.heads, &state);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor new_state = at::empty({x.size(0), x.size(1), p.heads}, x.options());
  if (y.numel() > 0) {
    cpu_step(x, state, p.damping, p.decay, p.expansion, p.projection, p.omega, y, new_state);
  }
  return {y, new_state};
}

// ---------------------------------------------------------------------------------------------
// CUDA

#ifdef SEQKERN_WITH_CUDA
DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA EMA takes float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
}

void check_status(Status st, const char* what) {
  TORCH_CHECK(st == kSuccess, what, " failed: ", cuda_status_string(st));
}

void check_cuda_heads(int64_t heads) {
  TORCH_CHECK(heads <= kCudaMaxHeads, "the CUDA EMA keeps at most ", kCudaMaxHeads,
              " heads in registers, got h = ", heads);
}

const float* fptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

at::Tensor fwd_cuda(const at::Tensor& x_in, const at::Tensor& damping, const at::Tensor& decay,
                    const at::Tensor& expansion, const at::Tensor& projection,
                    const OptTensor& pad_mask, const OptTensor& omega, int64_t truncation,
                    int64_t chunk) {
  check_x("ema_fwd_cuda", x_in);
  TORCH_CHECK(x_in.is_cuda(), "ema_fwd_cuda: x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0 = auto), got ", chunk);
  const DType tag = dtype_tag(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Params p = check_params(x_in.size(2), x_in.device(), damping, decay, expansion,
                                projection, omega, at::kFloat);
  check_cuda_heads(p.heads);
  const at::Tensor pad = check_pad(pad_mask, x_in);
  const int64_t B = x_in.size(0), L = x_in.size(1), D = x_in.size(2);
  const int64_t Lk = trunc_len(truncation, L);
  at::Tensor y = at::empty_like(x_in);
  if (y.numel() == 0) return y;
  const at::Tensor x = unit_last(x_in);
  at::Tensor out = unit_last_ok(y) ? y : at::empty(x.sizes(), x.options());
  const int64_t T = cuda_chunk(B, L, D, chunk, x.get_device());
  const int64_t NC = (L + T - 1) / T;
  at::Tensor carry;
  if (NC > 1) carry = at::empty({B, NC, p.heads, D}, x.options().dtype(at::kFloat));
  FwdParams fp{x.const_data_ptr(), x.stride(0), x.stride(1), out.mutable_data_ptr(),
               out.stride(0), out.stride(1),
               pad.defined() ? pad.const_data_ptr<bool>() : nullptr, fptr(p.damping),
               fptr(p.decay), fptr(p.expansion), fptr(p.projection), fptr(p.omega),
               carry.defined() ? carry.mutable_data_ptr<float>() : nullptr, B, L, D, p.heads, Lk,
               T};
  check_status(cuda_fwd(tag, fp, c10::cuda::getCurrentCUDAStream().stream()), "ema_fwd_cuda");
  if (!out.is_same(y)) y.copy_(out);
  return y;
}

std::vector<at::Tensor> bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                 const at::Tensor& damping, const at::Tensor& decay,
                                 const at::Tensor& expansion, const at::Tensor& projection,
                                 const OptTensor& pad_mask, const OptTensor& omega,
                                 int64_t truncation, int64_t chunk) {
  check_x("ema_bwd_cuda", x_in);
  TORCH_CHECK(x_in.is_cuda(), "ema_bwd_cuda: x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0 = auto), got ", chunk);
  check_bwd(dy_in, x_in);
  const DType tag = dtype_tag(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Params p = check_params(x_in.size(2), x_in.device(), damping, decay, expansion,
                                projection, omega, at::kFloat);
  check_cuda_heads(p.heads);
  const at::Tensor pad = check_pad(pad_mask, x_in);
  const int64_t B = x_in.size(0), L = x_in.size(1), D = x_in.size(2), H = p.heads;
  const int64_t Lk = trunc_len(truncation, L);
  at::Tensor dx = at::empty_like(x_in);
  std::vector<at::Tensor> g = alloc_param_grads(p, x_in, at::kFloat);
  if (dx.numel() == 0) {
    dx.zero_();
    return {dx, g[0], g[1], g[2], g[3], g[4]};
  }
  const at::Tensor x = unit_last(x_in), dy = unit_last(dy_in);
  at::Tensor out = unit_last_ok(dx) ? dx : at::empty(x.sizes(), x.options());
  const int64_t T = cuda_chunk(B, L, D, chunk, x.get_device());
  const int64_t NC = (L + T - 1) / T;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor cz, czr, pom;
  if (NC > 1) {
    cz = at::empty({B, NC, H, D}, f32);
    czr = at::empty({B, NC, H, D}, f32);
  }
  at::Tensor pg = at::empty({B * NC, H, D}, f32), pr = at::empty({B * NC, H, D}, f32);
  if (p.omega.defined()) pom = at::empty({B * NC, D}, f32);
  BwdParams bp{dy.const_data_ptr(), dy.stride(0), dy.stride(1), x.const_data_ptr(), x.stride(0),
               x.stride(1), out.mutable_data_ptr(), out.stride(0), out.stride(1),
               pad.defined() ? pad.const_data_ptr<bool>() : nullptr, fptr(p.damping),
               fptr(p.decay), fptr(p.expansion), fptr(p.projection), fptr(p.omega),
               cz.defined() ? cz.mutable_data_ptr<float>() : nullptr,
               czr.defined() ? czr.mutable_data_ptr<float>() : nullptr,
               pg.mutable_data_ptr<float>(), pr.mutable_data_ptr<float>(),
               pom.defined() ? pom.mutable_data_ptr<float>() : nullptr,
               g[0].mutable_data_ptr<float>(), g[1].mutable_data_ptr<float>(),
               g[2].mutable_data_ptr<float>(), g[3].mutable_data_ptr<float>(),
               p.omega.defined() ? g[4].mutable_data_ptr<float>() : nullptr, B, L, D, H, Lk, T};
  check_status(cuda_bwd(tag, bp, c10::cuda::getCurrentCUDAStream().stream()), "ema_bwd_cuda");
  if (!out.is_same(dx)) dx.copy_(out);
  return {dx, g[0], g[1], g[2], g[3], g[4]};
}

std::vector<at::Tensor> step_cuda(const at::Tensor& x_in, const OptTensor& state_in,
                                  const at::Tensor& damping, const at::Tensor& decay,
                                  const at::Tensor& expansion, const at::Tensor& projection,
                                  const OptTensor& omega) {
  check_step_x("ema_step_cuda", x_in);
  TORCH_CHECK(x_in.is_cuda(), "ema_step_cuda: x must be a CUDA tensor, got ", x_in.device());
  const DType tag = dtype_tag(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Params p = check_params(x_in.size(1), x_in.device(), damping, decay, expansion,
                                projection, omega, at::kFloat);
  at::Tensor state;
  check_step(x_in, state_in, p.heads, &state);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1), H = p.heads;
  at::Tensor y = at::empty({B, D}, x.options());
  at::Tensor new_state = at::empty({B, D, H}, x.options());
  if (y.numel() == 0) return {y, new_state};
  StepParams sp{x.const_data_ptr(), state.defined() ? state.const_data_ptr() : nullptr,
                state.defined() && state.dim() == 3 ? D * H : 0, y.mutable_data_ptr(),
                new_state.mutable_data_ptr(), fptr(p.damping), fptr(p.decay), fptr(p.expansion),
                fptr(p.projection), fptr(p.omega), B, D, H};
  check_status(cuda_step(tag, sp, c10::cuda::getCurrentCUDAStream().stream()), "ema_step_cuda");
  return {y, new_state};
}
#endif

}  // namespace

void bind(pybind11::module_& m) {
  m.def("ema_fwd_cpu", &fwd_cpu, "MEGA EMA forward on CPU -> y", py::arg("x"),
        py::arg("damping"), py::arg("decay"), py::arg("expansion"), py::arg("projection"),
        py::arg("pad_mask"), py::arg("omega"), py::arg("truncation"), py::arg("chunk"));
  m.def("ema_bwd_cpu", &bwd_cpu,
        "MEGA EMA backward on CPU -> (dx, ddamping, ddecay, dexpansion, dprojection, domega)",
        py::arg("dy"), py::arg("x"), py::arg("damping"), py::arg("decay"), py::arg("expansion"),
        py::arg("projection"), py::arg("pad_mask"), py::arg("omega"), py::arg("truncation"),
        py::arg("chunk"));
  m.def("ema_step_cpu", &step_cpu, "MEGA EMA step on CPU -> (y, new_state)", py::arg("x"),
        py::arg("state"), py::arg("damping"), py::arg("decay"), py::arg("expansion"),
        py::arg("projection"), py::arg("omega"));
  m.def("ema_chunk_cpu", &cpu_chunk, "steps per chunk the CPU EMA uses (chunk 0 = auto)",
        py::arg("batch"), py::arg("seqlen"), py::arg("dim"), py::arg("chunk"));
#ifdef SEQKERN_WITH_CUDA
  m.def("ema_fwd_cuda", &fwd_cuda, "MEGA EMA forward on CUDA -> y", py::arg("x"),
        py::arg("damping"), py::arg("decay"), py::arg("expansion"), py::arg("projection"),
        py::arg("pad_mask"), py::arg("omega"), py::arg("truncation"), py::arg("chunk"));
  m.def("ema_bwd_cuda", &bwd_cuda,
        "MEGA EMA backward on CUDA -> (dx, ddamping, ddecay, dexpansion, dprojection, domega)",
        py::arg("dy"), py::arg("x"), py::arg("damping"), py::arg("decay"), py::arg("expansion"),
        py::arg("projection"), py::arg("pad_mask"), py::arg("omega"), py::arg("truncation"),
        py::arg("chunk"));
  m.def("ema_step_cuda", &step_cuda, "MEGA EMA step on CUDA -> (y, new_state)", py::arg("x"),
        py::arg("state"), py::arg("damping"), py::arg("decay"), py::arg("expansion"),
        py::arg("projection"), py::arg("omega"));
  m.attr("ema_cuda_max_heads") = kCudaMaxHeads;
#endif
}

}  // namespace ema
}  // namespace seqkern
