// The loops of the variant update (momentum, Nesterov, centered, weight
// decay, eps placement, bias correction, maximize; rmsprop_variant_element)
// over each walk: flat, transposed tiles, strided. The parameter's format PF
// and the state's SF may differ (float32 state for float16 / bfloat16
// parameters); the math runs in their common compute type. Centered and
// momentum are template parameters (they decide which state streams exist);
// the other options are uniform selects inside the element, so every loop
// stays branch-free and vectorizes like the plain ones (plain_loops.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "builds.h"
#include "formats.h"
#include "isa.h"
#include "strided.h"
#include "transpose.h"

namespace mlx_fused_rmsprop {

// The arrays of one variant update. State pointers are v, mean, buffer;
// the ones the options do not use are null. The outputs either are their
// inputs' buffers (donated: same pointers, the state all or none of it) or
// overlap nothing (fresh allocations).
template <class PF, class SF>
struct VariantJob {
  using P = typename PF::Storage;
  using S = typename SF::Storage;
  using C = typename PF::Compute;
  static_assert(std::is_same_v<C, typename SF::Compute>);
  const P* grad;
  const P* param;
  P* param_out;
  const S* state[3];
  S* state_out[3];
  RMSpropVariantStep<C> k;
  int64_t rows = 0; // the transposed walk: grad(r, c) = grad[c * rows + r]
  int64_t cols = 0;
};

// n consecutive elements, every array at the same index. In place, an output
// is written through its input's pointer (restrict stays true); element i is
// read before it is written.
template <class PF, class SF, bool kC, bool kM, bool kParamInPlace, bool kStateInPlace>
RMSPROP_ALWAYS_INLINE void variant_span(
    const typename PF::Storage* __restrict grad,
    typename PF::Storage* __restrict param,
    typename PF::Storage* __restrict param_out,
    typename SF::Storage* __restrict v,
    typename SF::Storage* __restrict mean,
    typename SF::Storage* __restrict buffer,
    typename SF::Storage* __restrict v_out,
    typename SF::Storage* __restrict mean_out,
    typename SF::Storage* __restrict buffer_out,
    int64_t n,
    RMSpropVariantStep<typename PF::Compute> k) {
  using C = typename PF::Compute;
  for (int64_t i = 0; i < n; ++i) {
    C m = C(0);
    C b = C(0);
    if constexpr (kC) {
      m = SF::load(mean[i]);
    }
    if constexpr (kM) {
      b = SF::load(buffer[i]);
    }
    auto r = rmsprop_variant_element<C, kC, kM>(
        PF::load(grad[i]), PF::load(param[i]), SF::load(v[i]), m, b, k);
    (kParamInPlace ? param : param_out)[i] = PF::store(r.param);
    (kStateInPlace ? v : v_out)[i] = SF::store(r.v);
    if constexpr (kC) {
      (kStateInPlace ? mean : mean_out)[i] = SF::store(r.mean);
    }
    if constexpr (kM) {
      (kStateInPlace ? buffer : buffer_out)[i] = SF::store(r.buffer);
    }
  }
}

// n elements from index `at` of every array (grad from its own pointer, e.g.
// a transposed tile), in place or not as the job's pointers say.
template <class PF, class SF, bool kC, bool kM>
RMSPROP_ALWAYS_INLINE void variant_span_at(
    const VariantJob<PF, SF>& j,
    const typename PF::Storage* grad,
    int64_t at,
    int64_t n) {
  using P = typename PF::Storage;
  using S = typename SF::Storage;
  P* p = const_cast<P*>(j.param) + at;
  P* p_out = j.param_out + at;
  S* s[3];
  S* s_out[3];
  for (int i = 0; i < 3; ++i) {
    s[i] = j.state[i] ? const_cast<S*>(j.state[i]) + at : nullptr;
    s_out[i] = j.state_out[i] ? j.state_out[i] + at : nullptr;
  }
  bool p_in = p_out == p;
  bool s_in = s_out[0] == s[0];
  if (p_in && s_in) {
    variant_span<PF, SF, kC, kM, true, true>(
        grad, p, nullptr, s[0], s[1], s[2], nullptr, nullptr, nullptr, n, j.k);
  } else if (p_in) {
    variant_span<PF, SF, kC, kM, true, false>(
        grad, p, nullptr, s[0], s[1], s[2], s_out[0], s_out[1], s_out[2], n, j.k);
  } else if (s_in) {
    variant_span<PF, SF, kC, kM, false, true>(
        grad, p, p_out, s[0], s[1], s[2], nullptr, nullptr, nullptr, n, j.k);
  } else {
    variant_span<PF, SF, kC, kM, false, false>(
        grad, p, p_out, s[0], s[1], s[2], s_out[0], s_out[1], s_out[2], n, j.k);
  }
}

// ---- The flat walk (builds.h): elements [begin, end) of every buffer.
template <class PF, class SF, bool kC, bool kM>
struct VariantFlatWalk {
  using Job = VariantJob<PF, SF>;
  static constexpr Isa kWidest = Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    variant_span_at<PF, SF, kC, kM>(j, j.grad + begin, begin, end - begin);
  }
};

// ---- The transposed walk (builds.h): rows [begin, end), tile by tile
// (transpose.h).
template <class PF, class SF, bool kC, bool kM>
struct VariantTransposedWalk {
  using Job = VariantJob<PF, SF>;
  static constexpr Isa kWidest = Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t row_begin, int64_t row_end) {
    for_each_tile_run<typename PF::Storage, kIsa != Isa::baseline>(
        j.grad, j.rows, j.cols, row_begin, row_end,
        [&](const typename PF::Storage* grad, int64_t at, int64_t n)
            RMSPROP_LAMBDA_ALWAYS_INLINE { variant_span_at<PF, SF, kC, kM>(j, grad, at, n); });
  }
};

// ---- The strided walk over the collapsed layout of grad, param, v, [mean],
// [buffer] (in that order). With outputs_like_param every output is written
// at param's offset of each element; otherwise in row-major order.
template <class PF, class SF, bool kC, bool kM>
void variant_strided(
    const VariantJob<PF, SF>& j,
    const CollapsedLayout& layout,
    bool outputs_like_param) {
  using C = typename PF::Compute;
  constexpr size_t kArrays = 3 + (kC ? 1 : 0) + (kM ? 1 : 0);
  constexpr size_t kMean = 3;
  constexpr size_t kBuffer = kC ? 4 : 3;
  walk_rows<kArrays>(layout, [&](const int64_t* at, const int64_t* step, int64_t n, int64_t out) {
    for (int64_t i = 0; i < n; ++i) {
      auto element = [&](size_t a) { return at[a] + i * step[a]; };
      C m = C(0);
      C b = C(0);
      if constexpr (kC) {
        m = SF::load(j.state[1][element(kMean)]);
      }
      if constexpr (kM) {
        b = SF::load(j.state[2][element(kBuffer)]);
      }
      // Every input is read before any output is written: an output may be
      // its input's buffer.
      auto r = rmsprop_variant_element<C, kC, kM>(
          PF::load(j.grad[element(0)]),
          PF::load(j.param[element(1)]),
          SF::load(j.state[0][element(2)]),
          m,
          b,
          j.k);
      int64_t o = outputs_like_param ? element(1) : out + i;
      j.param_out[o] = PF::store(r.param);
      j.state_out[0][o] = SF::store(r.v);
      if constexpr (kC) {
        j.state_out[1][o] = SF::store(r.mean);
      }
      if constexpr (kM) {
        j.state_out[2][o] = SF::store(r.buffer);
      }
    }
  });
}

} // namespace mlx_fused_rmsprop
