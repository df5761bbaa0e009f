// Instruction sets of the CPU kernel: the baseline build of every loop
// (SSE2 on x86-64, NEON on arm64, what the compiler targets by default) and,
// on x86-64, an AVX2 (+F16C) build of the same source and an AVX-512 build
// of the 16-bit loops, picked at run time.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// The x86-64 build target of the F16C conversions and of the AVX2 loops.
// FMA is not enabled: with -ffp-contract=off no a*b+c is fused either way.
#define RMSPROP_HAVE_AVX2_F16C 1
#define RMSPROP_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
// AVX-512 F (16 floats, float16 conversions), BW and VL (16-bit lanes).
#define RMSPROP_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#else
#define RMSPROP_HAVE_AVX2_F16C 0
#endif

// Loop bodies inlined into the function of their build (builds.h), so they
// compile for its target.
#if defined(__GNUC__) || defined(__clang__)
#define RMSPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#define RMSPROP_LAMBDA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define RMSPROP_ALWAYS_INLINE inline
#define RMSPROP_LAMBDA_ALWAYS_INLINE
#endif

namespace mlx_fused_rmsprop {

// The builds of the loops, widest last.
enum class Isa { baseline, avx2, avx512 };

// The widest build this CPU runs: AVX2 needs AVX2 and F16C (every x86-64 CPU
// with AVX2 has F16C), AVX-512 needs F, BW and VL. MLX_FUSED_RMSPROP_ISA=
// baseline or avx2 caps it (to test the narrower builds on a wide CPU).
inline Isa cpu_isa() {
#if RMSPROP_HAVE_AVX2_F16C
  static const Isa isa = [] {
    const char* cap = std::getenv("MLX_FUSED_RMSPROP_ISA");
    std::string limit = cap == nullptr ? "" : cap;
    __builtin_cpu_init();
    if (limit == "baseline" || !__builtin_cpu_supports("avx2") ||
        !__builtin_cpu_supports("f16c")) {
      return Isa::baseline;
    }
    if (limit == "avx2" || !__builtin_cpu_supports("avx512f") ||
        !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) {
      return Isa::avx2;
    }
    return Isa::avx512;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

inline bool use_avx2() {
  return cpu_isa() != Isa::baseline;
}

} // namespace mlx_fused_rmsprop
