// seqkern._C: the C++ CPU ops (always) and the CUDA ops (CUDA builds), plus build metadata.
#include <torch/extension.h>

#include "linear/skinny_gemm.h"
#include "sk_multiversion.h"

#ifndef SEQKERN_TORCH_VERSION
#define SEQKERN_TORCH_VERSION "unknown"
#endif
#ifndef SEQKERN_CUDA_VERSION
#define SEQKERN_CUDA_VERSION ""
#endif
#ifndef SEQKERN_CUDA_ARCHS
#define SEQKERN_CUDA_ARCHS ""
#endif

namespace seqkern {
namespace adaln {
void bind(pybind11::module_& m);
}
namespace ema {
void bind(pybind11::module_& m);
}
namespace emformer {
void bind(pybind11::module_& m);
}
namespace linear {
void bind(pybind11::module_& m);
}
namespace mega {
void bind(pybind11::module_& m);
}
}  // namespace seqkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqkern compiled ops";
  pybind11::dict info;
  info["torch"] = SEQKERN_TORCH_VERSION;
  info["cuda"] = SEQKERN_CUDA_VERSION;
  info["cuda_archs"] = SEQKERN_CUDA_ARCHS;
#ifdef SEQKERN_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  m.attr("build_info") = info;
  // Which CPU code the C++ ops run on this machine (seqkern info prints it).
  m.def("cpu_dispatch", [] {
    pybind11::dict d;
    d["multiversion_clone"] = seqkern::multiversion_clone();
    d["skinny_gemm"] = seqkern::linear::skinny_gemm_f32_available() ? "avx512f" : "blas";
    return d;
  });
  seqkern::adaln::bind(m);
  seqkern::ema::bind(m);
  seqkern::emformer::bind(m);
  seqkern::linear::bind(m);
  seqkern::mega::bind(m);
}
