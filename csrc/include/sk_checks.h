// Argument checks for the torch glue (*_api.cpp). Each names the argument and what was expected,
// so a bad call fails with a readable error instead of a crash or a silently wrong result.
#pragma once

#include <torch/extension.h>

#define SK_CHECK_DEVICE(t, dev)                                                            \
  TORCH_CHECK((t).device() == (dev), #t " must be on ", (dev), ", got ", (t).device())
#define SK_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define SK_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must be ", n, "-D, got ", (t).sizes())
#define SK_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define SK_CHECK_SHAPE(t, ...)                                                          \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape (", \
              at::IntArrayRef({__VA_ARGS__}), "), got ", (t).sizes())
