// The instruction-set builds of the CPU loops, in one place. A walk is a
// class with
//   using Job = ...;                     // what the loop reads and writes
//   static constexpr Isa kWidest = ...;  // the widest build worth having
//   template <Isa kIsa> static void run(const Job&, int64_t begin, int64_t end);
// (run always inlined); run_walk compiles it once per build -- baseline,
// and on x86-64 AVX2 + F16C and AVX-512 -- and calls the widest one this CPU
// runs (cpu_isa(), isa.h), capped at the walk's kWidest. Every build computes
// the same bits (tests/test_cpu_isa.py runs them all on the same inputs).
#pragma once

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace mlx_fused_rmsprop {

template <class Walk>
void walk_baseline(const typename Walk::Job& j, int64_t begin, int64_t end) {
  Walk::template run<Isa::baseline>(j, begin, end);
}

#if RMSPROP_HAVE_AVX2_F16C
template <class Walk>
RMSPROP_TARGET_AVX2_F16C void walk_avx2(
    const typename Walk::Job& j,
    int64_t begin,
    int64_t end) {
  Walk::template run<Isa::avx2>(j, begin, end);
}

template <class Walk>
RMSPROP_TARGET_AVX512 void walk_avx512(
    const typename Walk::Job& j,
    int64_t begin,
    int64_t end) {
  Walk::template run<Isa::avx512>(j, begin, end);
}
#endif

template <class Walk>
void run_walk(const typename Walk::Job& j, int64_t begin, int64_t end) {
#if RMSPROP_HAVE_AVX2_F16C
  Isa isa = std::min(cpu_isa(), Walk::kWidest);
  if constexpr (Walk::kWidest == Isa::avx512) {
    if (isa == Isa::avx512) {
      return walk_avx512<Walk>(j, begin, end);
    }
  }
  if (isa != Isa::baseline) {
    return walk_avx2<Walk>(j, begin, end);
  }
#endif
  walk_baseline<Walk>(j, begin, end);
}

} // namespace mlx_fused_rmsprop
