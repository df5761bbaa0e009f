// The loops of the plain update (mlx.optimizers.RMSprop's math,
// rmsprop_element) over each walk: flat, transposed tiles, strided.
//
// What makes them fast (each measured by `python -m mlx_fused_rmsprop bench`):
//  - In place: in a training loop the old parameter and state are referenced
//    by nothing but this update, so the outputs take their buffers (no fresh
//    allocation, no page faults, no write-allocate traffic).
//  - One loop per run that the compiler vectorizes with the baseline flags:
//    restrict-qualified pointers, in place versus separate outputs decided
//    once per call, branch-free half conversions (half.h), and an AVX2 build
//    (float16 through F16C) picked at run time where the CPU has it (isa.h).
// The math is unchanged; the extension is built with -ffp-contract=off.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "formats.h"
#include "isa.h"
#include "strided.h"
#include "transpose.h"

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
// float16 with F16C (AVX2 build only): blocks converted by vcvtph2ps /
// vcvtps2ph (rmsprop_cpu_half.h, same bits as the portable conversions)
// around the same float32 loop. Every element of a block is read before any
// is written, so in place is safe.
constexpr int64_t kF16Block = 512;

RMSPROP_TARGET_AVX2_F16C inline void span_f16c(
    const uint16_t* grad,
    const uint16_t* param,
    const uint16_t* v,
    uint16_t* param_out,
    uint16_t* v_out,
    int64_t n,
    RMSpropCoefficients<float> k) {
  alignas(64) float g[kF16Block];
  alignas(64) float w[kF16Block];
  alignas(64) float s[kF16Block];
  for (int64_t start = 0; start < n; start += kF16Block) {
    int64_t len = std::min(kF16Block, n - start);
    half_bits::f16_to_f32_f16c(grad + start, g, len);
    half_bits::f16_to_f32_f16c(param + start, w, len);
    half_bits::f16_to_f32_f16c(v + start, s, len);
    rmsprop_span<Float32Format, true, true>(g, w, s, nullptr, nullptr, len, k);
    half_bits::f32_to_f16_f16c(w, param_out + start, len);
    half_bits::f32_to_f16_f16c(s, v_out + start, len);
  }
}
#endif

// The run used by a given build: kWide is the AVX2 (+F16C) build.
template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void span_for(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kWide && std::is_same_v<F, Float16Format>) {
    return span_f16c(grad, param, v, param_out, v_out, n, k);
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

template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void flat_body(const FlatJob<F>& j, int64_t begin, int64_t end) {
  span_for<F, kWide>(
      j.grad + begin, j.param + begin, j.v + begin, j.param_out + begin,
      j.v_out + begin, end - begin, j.k);
}

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

template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void transposed_body(
    const TransposedJob<F>& j,
    int64_t row_begin,
    int64_t row_end) {
  using S = typename F::Storage;
  alignas(64) S tile[kTileRows * kTileCols];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileRows) {
    int64_t nr = std::min(kTileRows, row_end - r0);
    for (int64_t c0 = 0; c0 < j.cols; c0 += kTileCols) {
      int64_t nc = std::min(kTileCols, j.cols - c0);
      fill_transposed_tile<S, kWide>(j.grad, j.rows, r0, nr, c0, nc, tile);
      for (int64_t r = 0; r < nr; ++r) {
        int64_t at = (r0 + r) * j.cols + c0;
        span_for<F, kWide>(
            tile + r * kTileCols, j.param + at, j.v + at, j.param_out + at,
            j.v_out + at, nc, j.k);
      }
    }
  }
}

template <class F>
void flat_baseline(const FlatJob<F>& j, int64_t begin, int64_t end) {
  flat_body<F, false>(j, begin, end);
}
template <class F>
void transposed_baseline(const TransposedJob<F>& j, int64_t begin, int64_t end) {
  transposed_body<F, false>(j, begin, end);
}

#if RMSPROP_HAVE_AVX2_F16C
// The same source compiled for AVX2 (8 floats per instruction) and F16C
// (float16 conversions in hardware).
template <class F>
RMSPROP_TARGET_AVX2_F16C void flat_avx2(const FlatJob<F>& j, int64_t begin, int64_t end) {
  flat_body<F, true>(j, begin, end);
}
template <class F>
RMSPROP_TARGET_AVX2_F16C void transposed_avx2(
    const TransposedJob<F>& j,
    int64_t begin,
    int64_t end) {
  transposed_body<F, true>(j, begin, end);
}
#endif

template <class F>
void run_flat(const FlatJob<F>& j, int64_t begin, int64_t end) {
#if RMSPROP_HAVE_AVX2_F16C
  if (use_avx2()) {
    return flat_avx2<F>(j, begin, end);
  }
#endif
  flat_baseline<F>(j, begin, end);
}

template <class F>
void run_transposed(const TransposedJob<F>& j, int64_t begin, int64_t end) {
#if RMSPROP_HAVE_AVX2_F16C
  if (use_avx2()) {
    return transposed_avx2<F>(j, begin, end);
  }
#endif
  transposed_baseline<F>(j, begin, end);
}

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
