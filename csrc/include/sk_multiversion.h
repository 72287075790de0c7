// SK_MULTIVERSION: compile a function once per x86-64 ISA level (x86-64-v4 = AVX-512
// F/BW/CD/DQ/VL, x86-64-v3 = AVX2 + FMA, baseline) and pick the version at load time (GCC's
// target_clones), so one wheel runs everywhere at full vector width. Elsewhere (clang, other
// architectures) it compiles the function once.
//
// The clones are named by ISA level, never by CPU model: GCC resolves "arch=<cpu>" clones with
// __builtin_cpu_is(<cpu>), a model test, so "arch=skylake-avx512" ran the baseline clone on
// AMD EPYC (Zen 4) and on Sapphire Rapids alike; "arch=x86-64-v4" is resolved with
// __builtin_cpu_supports("x86-64-v4"), an ISA test that holds on both.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SK_HAS_MULTIVERSION 1
#define SK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_HAS_MULTIVERSION 0
#define SK_MULTIVERSION
#endif

// SK_INLINE: for the bodies an SK_MULTIVERSION function calls. A body GCC does not inline is
// compiled once, for the baseline ISA, and every clone calls that one copy.
#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#else
#define SK_INLINE inline
#endif

namespace seqkern {

// The clone GCC's resolver picks for SK_MULTIVERSION functions on this CPU: it tests the same
// ISA levels in the same order.
inline const char* multiversion_clone() {
#if SK_HAS_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "default";
#else
  return "single";
#endif
}

}  // namespace seqkern
