// SK_MULTIVERSION: compile a function once per x86-64 ISA level (AVX-512, AVX2, baseline) and
// pick the version at load time (GCC's target_clones), so one wheel runs everywhere at full
// vector width. Elsewhere (clang, other architectures) it compiles the function once.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SK_MULTIVERSION \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define SK_MULTIVERSION
#endif
