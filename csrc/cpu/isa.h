// Instruction sets of the CPU kernel: the baseline build of every loop
// (SSE2 on x86-64, NEON on arm64, what the compiler targets by default) and,
// on x86-64, an AVX2 (+F16C) build of the same source picked at run time.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// The x86-64 build target of the F16C conversions and of the AVX2 loops.
// FMA is not enabled: with -ffp-contract=off no a*b+c is fused either way.
#define RMSPROP_HAVE_AVX2_F16C 1
#define RMSPROP_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
#else
#define RMSPROP_HAVE_AVX2_F16C 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RMSPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RMSPROP_ALWAYS_INLINE inline
#endif

namespace mlx_fused_rmsprop {

// Whether the loops run their AVX2 build: the CPU has AVX2 and F16C (every
// x86-64 CPU with AVX2 has F16C), unless MLX_FUSED_RMSPROP_ISA=baseline
// (for testing the baseline build on such a CPU).
inline bool use_avx2() {
#if RMSPROP_HAVE_AVX2_F16C
  static const bool enabled = [] {
    const char* isa = std::getenv("MLX_FUSED_RMSPROP_ISA");
    if (isa != nullptr && std::string(isa) == "baseline") {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return enabled;
#else
  return false;
#endif
}

} // namespace mlx_fused_rmsprop
