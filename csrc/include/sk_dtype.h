// Plain-C++ dtype tag shared by the nvcc-only launchers and the torch glue.
// Launchers take raw pointers plus this tag, so csrc/**/*.cu never includes a torch header.
#pragma once

namespace seqkern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// cudaError_t as an int, so headers shared with the glue need no CUDA include.
using Status = int;
constexpr Status kSuccess = 0;

// Defined in a .cu file: cudaGetErrorString for a Status returned by a launcher.
const char* cuda_status_string(Status status);

}  // namespace seqkern
