// The loops of the plain update (mlx.optimizers.RMSprop's math,
// rmsprop_element) over each walk: flat, transposed tiles, strided.
//
// What makes them fast (each measured by `python -m mlx_fused_rmsprop bench`):
//  - In place: in a training loop the old parameter and state are referenced
//    by nothing but this update, so the outputs take their buffers (no fresh
//    allocation, no page faults, no write-allocate traffic).
//  - One pass per run that the compiler vectorizes with the baseline flags
//    (SSE2, NEON): restrict-qualified pointers, in place versus separate
//    outputs decided once per call, branch-free half conversions (half.h);
//    an AVX2 build, and for float16 / bfloat16 an AVX-512 one, picked at run
//    time (builds.h), whose 16-bit loops convert in SIMD registers (simd.h).
// The math is unchanged; the extension is built with -ffp-contract=off.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "builds.h"
#include "chunks.h"
#include "formats.h"
#include "isa.h"
#include "simd.h"
#include "strided.h"
#include "transpose.h"
#include "variant_loops.h"

namespace mlx_fused_rmsprop {

// ---- The flat walk.
//
// In place (the outputs took the inputs' buffers) the loop reads and writes
// through the same restrict pointer, element i before element i, which is
// well-defined and vectorizes without run-time alias checks. Otherwise the
// outputs are fresh allocations that overlap nothing.

template <class F, bool kParamInPlace, bool kVInPlace>
RMSPROP_ALWAYS_INLINE void rmsprop_span(
    const typename F::Storage* __restrict grad,
    typename F::Storage* __restrict param,
    typename F::Storage* __restrict v,
    typename F::Storage* __restrict param_out,
    typename F::Storage* __restrict v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
  using C = typename F::Compute;
  for (int64_t i = 0; i < n; ++i) {
    C g = F::load(grad[i]);
    C w = F::load(param[i]);
    C s = F::load(v[i]);
    auto r = rmsprop_element<C>(g, w, s, k);
    (kParamInPlace ? param : param_out)[i] = F::store(r.param);
    (kVInPlace ? v : v_out)[i] = F::store(r.v);
  }
}

// One contiguous run of elements. Each output either is its input's buffer
// (donated: same pointer) or overlaps no input (a fresh allocation).
template <class F>
RMSPROP_ALWAYS_INLINE void span_any(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
  using S = typename F::Storage;
  S* p = const_cast<S*>(param);
  S* s = const_cast<S*>(v);
  bool p_in = param_out == param;
  bool v_in = v_out == v;
  if (p_in && v_in) {
    rmsprop_span<F, true, true>(grad, p, s, nullptr, nullptr, n, k);
  } else if (p_in) {
    rmsprop_span<F, true, false>(grad, p, s, nullptr, v_out, n, k);
  } else if (v_in) {
    rmsprop_span<F, false, true>(grad, p, s, param_out, nullptr, n, k);
  } else {
    rmsprop_span<F, false, false>(grad, p, s, param_out, v_out, n, k);
  }
}

#if RMSPROP_HAVE_AVX2_F16C
// L elements at a time in SIMD registers (simd.h): loaded and converted in
// registers, the same math on Vec<L>, converted back and stored; each
// element read before it is written, so in place is safe. The tail goes
// through the scalar loop.
//
// Written once and stamped out per target: the float16 conversions are
// target intrinsics, which GCC and clang inline only into a function
// compiled for that target, and these functions take no vector arguments,
// so calling them from any build is ABI-safe.
#define RMSPROP_DEFINE_SPAN_SIMD(NAME, TARGET, L)                              \
  template <class F>                                                         \
  TARGET void NAME(                                                          \
      const typename F::Storage* grad,                                       \
      const typename F::Storage* param,                                      \
      const typename F::Storage* v,                                          \
      typename F::Storage* param_out,                                        \
      typename F::Storage* v_out,                                            \
      int64_t n,                                                             \
      RMSpropCoefficients<float> k) {                                        \
    using Lanes = simd::Lanes<F, L>;                                         \
    const auto kv = simd::broadcast<L>(k);                                   \
    int64_t i = 0;                                                           \
    for (; i + L <= n; i += L) {                                             \
      auto r = rmsprop_element<simd::Vec<L>>(                                \
          Lanes::load(grad + i), Lanes::load(param + i), Lanes::load(v + i), \
          kv);                                                               \
      Lanes::store(param_out + i, r.param);                                  \
      Lanes::store(v_out + i, r.v);                                          \
    }                                                                        \
    span_any<F>(grad + i, param + i, v + i, param_out + i, v_out + i, n - i, \
                k);                                                          \
  }
RMSPROP_DEFINE_SPAN_SIMD(span_simd_avx2, RMSPROP_TARGET_AVX2_F16C, 8)
RMSPROP_DEFINE_SPAN_SIMD(span_simd_avx512, RMSPROP_TARGET_AVX512, 16)
#undef RMSPROP_DEFINE_SPAN_SIMD
#endif

// The run used by a given build: float16 and bfloat16 convert in registers
// in the AVX2 (8 lanes, F16C) and AVX-512 (16 lanes) builds; everything
// else is the loop the compiler vectorizes for the build's target.
template <class F, Isa kIsa>
RMSPROP_ALWAYS_INLINE void span_for(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsHalf<F> && kIsa == Isa::avx2) {
    return span_simd_avx2<F>(grad, param, v, param_out, v_out, n, k);
  } else if constexpr (kIsHalf<F> && kIsa == Isa::avx512) {
    return span_simd_avx512<F>(grad, param, v, param_out, v_out, n, k);
  }
#endif
  span_any<F>(grad, param, v, param_out, v_out, n, k);
}

// A leaf whose param, v and grad share one dense layout: elements
// [begin, end) of the flat buffers.
template <class F>
struct FlatJob {
  using S = typename F::Storage;
  const S* grad;
  const S* param;
  const S* v;
  S* param_out;
  S* v_out;
  RMSpropCoefficients<typename F::Compute> k;
};

// The walk (builds.h): elements [begin, end) of the flat buffers. The
// 16-bit formats have an AVX-512 build (16 lanes of conversions); float32
// and float64 are memory-bound, AVX2 is all they need.
template <class F>
struct FlatWalk {
  using Job = FlatJob<F>;
  static constexpr Isa kWidest = kIsHalf<F> ? Isa::avx512 : Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    span_for<F, kIsa>(
        j.grad + begin, j.param + begin, j.v + begin, j.param_out + begin,
        j.v_out + begin, end - begin, j.k);
  }
};

// ---- The transposed walk (transpose.h): param and v row-major [rows, cols],
// grad the same matrix column-major. Outputs have param's layout; rows
// [begin, end) are updated tile by tile.
template <class F>
struct TransposedJob {
  using S = typename F::Storage;
  const S* grad; // grad(r, c) = grad[c * rows + r]
  const S* param; // param(r, c) = param[r * cols + c], v likewise
  const S* v;
  S* param_out;
  S* v_out;
  int64_t rows;
  int64_t cols;
  RMSpropCoefficients<typename F::Compute> k;
};

// The walk (builds.h): rows [begin, end), tile by tile.
template <class F>
struct TransposedWalk {
  using Job = TransposedJob<F>;
  static constexpr Isa kWidest = kIsHalf<F> ? Isa::avx512 : Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t row_begin, int64_t row_end) {
    for_each_tile_run<typename F::Storage, kIsa != Isa::baseline>(
        j.grad, j.rows, j.cols, row_begin, row_end,
        [&](const typename F::Storage* grad, int64_t at, int64_t n)
            RMSPROP_LAMBDA_ALWAYS_INLINE {
              span_for<F, kIsa>(
                  grad, j.param + at, j.v + at, j.param_out + at, j.v_out + at, n, j.k);
            });
  }
};

// ---- The plain update of float16 / bfloat16 parameters rounded
// stochastically or with Kahan compensation (kernels/rmsprop_math.h): the
// same flat and transposed walks, rounding in SIMD registers (stochastic
// rounding for bfloat16, whose rounding is bit operations; float16's takes
// the chunked variant loops). Every element is read before it is written.

template <class F>
struct RoundedJob {
  using S = typename F::Storage;
  const S* grad;
  const S* param;
  const S* v;
  const S* comp; // Kahan only
  S* param_out;
  S* v_out;
  S* comp_out;
  RMSpropCoefficients<float> k;
  RoundingKey key;
  int64_t rows = 0; // the transposed walk
  int64_t cols = 0;
};

// The scalar run: the tail of a SIMD one, and the baseline build. n elements
// from `at` of every array but grad; `at` is their row-major index.
template <class F, unsigned kRound>
RMSPROP_ALWAYS_INLINE void rounded_span_scalar(
    const RoundedJob<F>& j,
    const typename F::Storage* grad,
    int64_t at,
    int64_t n) {
  constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = at + i;
    float w = F::load(j.param[e]);
    auto r = rmsprop_element<float>(F::load(grad[i]), w, F::load(j.v[e]), j.k);
    j.param_out[e] = store_param<F, kRound>(
        r.param, w, kKahan ? j.comp + e : nullptr, kKahan ? j.comp_out + e : nullptr, e, j.key);
    j.v_out[e] = F::store(r.v);
  }
}

#if RMSPROP_HAVE_AVX2_F16C
// L lanes at a time; stamped out per target like the plain spans above.
#define RMSPROP_DEFINE_ROUNDED_SIMD(SUFFIX, TARGET, L)                         \
  template <class F, unsigned kRound>                                        \
  TARGET void rounded_span_##SUFFIX(                                         \
      const RoundedJob<F>& j,                                                \
      const typename F::Storage* grad,                                       \
      int64_t at,                                                            \
      int64_t n) {                                                           \
    using Lanes = simd::Lanes<F, L>;                                         \
    using U = typename simd::IntVecs<L>::u32;                                \
    const auto kv = simd::broadcast<L>(j.k);                                 \
    U lane{};                                                                \
    for (int l = 0; l < L; ++l) {                                            \
      lane[l] = static_cast<uint32_t>(l);                                    \
    }                                                                        \
    int64_t i = 0;                                                           \
    for (; i + L <= n; i += L) {                                             \
      const int64_t e = at + i;                                              \
      auto w = Lanes::load(j.param + e);                                     \
      auto r = rmsprop_element<simd::Vec<L>>(                                \
          Lanes::load(grad + i), w, Lanes::load(j.v + e), kv);               \
      if constexpr (kRound == RMSPROP_ROUND_STOCHASTIC) {                    \
        static_assert(std::is_same_v<F, BFloat16Format>);                    \
        /* Each lane's 64-bit index in the whole leaf, as two words. */      \
        const uint64_t first = static_cast<uint64_t>(j.key.offset + e);      \
        U lo = lane + static_cast<uint32_t>(first);                          \
        U carry = lo < static_cast<uint32_t>(first) ? U{} + 1u : U{};       \
        U hi = carry + static_cast<uint32_t>(first >> 32);                   \
        U bits = rmsprop_random_bits<U>(U{} + j.key.key, lo, hi);            \
        r.param.v = rmsprop_stochastic_bfloat16(r.param.v, bits);            \
        Lanes::store(j.param_out + e, r.param);                              \
      } else {                                                               \
        auto kahan = rmsprop_kahan(w, Lanes::load(j.comp + e), r.param);     \
        Lanes::store(j.param_out + e, kahan.target);                         \
        /* The stored (rounded) parameter, read back. */                     \
        auto stored = Lanes::load(j.param_out + e);                          \
        Lanes::store(                                                        \
            j.comp_out + e, rmsprop_kahan_remainder(w, stored, kahan.change)); \
      }                                                                      \
      Lanes::store(j.v_out + e, r.v);                                        \
    }                                                                        \
    rounded_span_scalar<F, kRound>(j, grad + i, at + i, n - i);              \
  }
RMSPROP_DEFINE_ROUNDED_SIMD(avx2, RMSPROP_TARGET_AVX2_F16C, 8)
RMSPROP_DEFINE_ROUNDED_SIMD(avx512, RMSPROP_TARGET_AVX512, 16)
#undef RMSPROP_DEFINE_ROUNDED_SIMD
#endif

template <class F, unsigned kRound, Isa kIsa>
RMSPROP_ALWAYS_INLINE void rounded_span_for(
    const RoundedJob<F>& j,
    const typename F::Storage* grad,
    int64_t at,
    int64_t n) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsa == Isa::avx2) {
    return rounded_span_avx2<F, kRound>(j, grad, at, n);
  } else if constexpr (kIsa == Isa::avx512) {
    return rounded_span_avx512<F, kRound>(j, grad, at, n);
  }
#endif
  rounded_span_scalar<F, kRound>(j, grad, at, n);
}

// The walks (builds.h): the flat buffers' elements [begin, end), or the
// transposed pair's rows [begin, end) tile by tile.
template <class F, unsigned kRound>
struct RoundedFlatWalk {
  using Job = RoundedJob<F>;
  static constexpr Isa kWidest = Isa::avx512;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    rounded_span_for<F, kRound, kIsa>(j, j.grad + begin, begin, end - begin);
  }
};

template <class F, unsigned kRound>
struct RoundedTransposedWalk {
  using Job = RoundedJob<F>;
  static constexpr Isa kWidest = Isa::avx512;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t row_begin, int64_t row_end) {
    for_each_tile_run<typename F::Storage, kIsa != Isa::baseline>(
        j.grad, j.rows, j.cols, row_begin, row_end,
        [&](const typename F::Storage* grad, int64_t at, int64_t n)
            RMSPROP_LAMBDA_ALWAYS_INLINE { rounded_span_for<F, kRound, kIsa>(j, grad, at, n); });
  }
};

// ---- The strided walk: any other layout (strided, broadcast inputs).
// When the outputs have param's layout (param dense), element i of param' and
// v' is written at param's offset of element i; otherwise the outputs are
// fresh row-contiguous arrays written in order.
template <class F>
void rmsprop_strided(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    const CollapsedLayout& layout,
    bool outputs_like_param,
    RMSpropCoefficients<typename F::Compute> k) {
  using C = typename F::Compute;
  walk_rows<3>(layout, [&](const int64_t* at, const int64_t* step, int64_t n, int64_t out) {
    for (int64_t i = 0; i < n; ++i) {
      // Read element i before writing it: param' / v' may be param / v.
      auto r = rmsprop_element<C>(
          F::load(grad[at[0] + i * step[0]]),
          F::load(param[at[1] + i * step[1]]),
          F::load(v[at[2] + i * step[2]]),
          k);
      int64_t o = outputs_like_param ? at[1] + i * step[1] : out + i;
      param_out[o] = F::store(r.param);
      v_out[o] = F::store(r.v);
    }
  });
}

} // namespace mlx_fused_rmsprop
