// The loops of the variant update (momentum, Nesterov, centered, weight
// decay, eps placement, bias correction, maximize, the step's clip factor;
// rmsprop_variant_element) over each walk: flat, transposed tiles, strided.
// The parameter's format PF and the state's SF may differ (float32 state for
// float16 / bfloat16 parameters); the math runs in their common compute type.
// Centered and momentum are template parameters (they decide which state
// streams exist), and so is how the parameter is rounded (kRound: nearest,
// stochastic, or Kahan-compensated with a compensation stream); the other
// options are uniform selects inside the element, so every loop stays
// branch-free and vectorizes like the plain ones (plain_loops.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "builds.h"
#include "chunks.h"
#include "formats.h"
#include "isa.h"
#include "strided.h"
#include "transpose.h"

namespace mlx_fused_rmsprop {

// The float32 (or float64) result `updated` of parameter w, stored into the
// parameter's format as kRound says; for Kahan, *comp_out takes the new
// compensation from *comp. `index` is the element's row-major index in this
// array (stochastic rounding only).
template <class PF, unsigned kRound>
RMSPROP_ALWAYS_INLINE typename PF::Storage store_param(
    typename PF::Compute updated,
    typename PF::Compute w,
    const typename PF::Storage* comp,
    typename PF::Storage* comp_out,
    int64_t index,
    const RoundingKey& key) {
  if constexpr (kRound == RMSPROP_ROUND_STOCHASTIC) {
    return PF::store(PF::stochastic(updated, random_bits_at(key, index)));
  } else if constexpr (kRound == RMSPROP_ROUND_KAHAN) {
    auto kahan = rmsprop_kahan(w, PF::load(*comp), updated);
    auto stored = PF::store(kahan.target);
    *comp_out = PF::store(rmsprop_kahan_remainder(w, PF::load(stored), kahan.change));
    return stored;
  } else {
    return PF::store(updated);
  }
}

// The arrays of one variant update. State pointers are v, mean, buffer;
// the ones the options do not use are null, as is the compensation without
// Kahan summation. The outputs either are their inputs' buffers (donated:
// same pointers, the state and compensation all or none of it) or overlap
// nothing (fresh allocations).
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
  const P* comp;
  P* comp_out;
  RMSpropVariantStep<C> k;
  RoundingKey key;
  int64_t rows = 0; // the transposed walk: grad(r, c) = grad[c * rows + r]
  int64_t cols = 0;
};

// n consecutive elements, every array at the same index, the first of them
// element `index` (row-major) of the leaf. In place, an output is written
// through its input's pointer (restrict stays true); element i is read
// before it is written.
template <
    class PF,
    class SF,
    bool kC,
    bool kM,
    unsigned kRound,
    bool kParamInPlace,
    bool kStateInPlace>
RMSPROP_ALWAYS_INLINE void variant_span(
    const typename PF::Storage* __restrict grad,
    typename PF::Storage* __restrict param,
    typename PF::Storage* __restrict param_out,
    typename SF::Storage* __restrict v,
    typename SF::Storage* __restrict mean,
    typename SF::Storage* __restrict buffer,
    typename PF::Storage* __restrict comp,
    typename SF::Storage* __restrict v_out,
    typename SF::Storage* __restrict mean_out,
    typename SF::Storage* __restrict buffer_out,
    typename PF::Storage* __restrict comp_out,
    int64_t n,
    int64_t index,
    RMSpropVariantStep<typename PF::Compute> k,
    RoundingKey key) {
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
    C w = PF::load(param[i]);
    auto r = rmsprop_variant_element<C, kC, kM>(
        PF::load(grad[i]), w, SF::load(v[i]), m, b, k);
    // The compensation exists with Kahan summation only (no offset of a
    // null pointer otherwise).
    constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
    (kParamInPlace ? param : param_out)[i] = store_param<PF, kRound>(
        r.param, w, kKahan ? comp + i : nullptr,
        kKahan ? (kStateInPlace ? comp : comp_out) + i : nullptr, index + i, key);
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
// a transposed tile), in place or not as the job's pointers say. `at` is
// also the elements' row-major index (param is row-contiguous on these walks
// whenever stochastic rounding reads it). 16-bit parameters take the chunked
// update (chunks.h): their conversions and rounding vectorize there.
template <class PF, class SF, bool kC, bool kM, unsigned kRound, Isa kIsa>
RMSPROP_ALWAYS_INLINE void variant_span_at(
    const VariantJob<PF, SF>& j,
    const typename PF::Storage* grad,
    int64_t at,
    int64_t n) {
  using P = typename PF::Storage;
  using S = typename SF::Storage;
  if constexpr (kIsHalf<PF>) {
    constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t e = at + c;
      ChunkArrays<PF, SF> a{};
      a.grad = grad + c;
      a.param = j.param + e;
      a.param_out = j.param_out + e;
      a.comp = kKahan ? j.comp + e : nullptr;
      a.comp_out = kKahan ? j.comp_out + e : nullptr;
      // v, [mean], [buffer] in order, as update_chunk reads them.
      int slot = 0;
      for (int i = 0; i < 3; ++i) {
        if (j.state[i] != nullptr) {
          a.state[slot] = j.state[i] + e;
          a.state_out[slot] = j.state_out[i] + e;
          ++slot;
        }
      }
      update_chunk<PF, SF, kC, kM, kRound, false, kIsa>(
          a, nullptr, std::min(kChunk, n - c), e, j.k, j.key);
    }
    return;
  }
  P* p = const_cast<P*>(j.param) + at;
  P* p_out = j.param_out + at;
  S* s[3];
  S* s_out[3];
  for (int i = 0; i < 3; ++i) {
    s[i] = j.state[i] ? const_cast<S*>(j.state[i]) + at : nullptr;
    s_out[i] = j.state_out[i] ? j.state_out[i] + at : nullptr;
  }
  P* c = j.comp ? const_cast<P*>(j.comp) + at : nullptr;
  P* c_out = j.comp_out ? j.comp_out + at : nullptr;
  bool p_in = p_out == p;
  bool s_in = s_out[0] == s[0];
  if (p_in && s_in) {
    variant_span<PF, SF, kC, kM, kRound, true, true>(
        grad, p, nullptr, s[0], s[1], s[2], c, nullptr, nullptr, nullptr, nullptr, n,
        at, j.k, j.key);
  } else if (p_in) {
    variant_span<PF, SF, kC, kM, kRound, true, false>(
        grad, p, nullptr, s[0], s[1], s[2], c, s_out[0], s_out[1], s_out[2], c_out, n,
        at, j.k, j.key);
  } else if (s_in) {
    variant_span<PF, SF, kC, kM, kRound, false, true>(
        grad, p, p_out, s[0], s[1], s[2], c, nullptr, nullptr, nullptr, nullptr, n,
        at, j.k, j.key);
  } else {
    variant_span<PF, SF, kC, kM, kRound, false, false>(
        grad, p, p_out, s[0], s[1], s[2], c, s_out[0], s_out[1], s_out[2], c_out, n,
        at, j.k, j.key);
  }
}

// ---- The flat walk (builds.h): elements [begin, end) of every buffer.
template <class PF, class SF, bool kC, bool kM, unsigned kRound>
struct VariantFlatWalk {
  using Job = VariantJob<PF, SF>;
  // 16-bit parameters convert in AVX-512 registers too (chunks.h).
  static constexpr Isa kWidest = kIsHalf<PF> ? Isa::avx512 : Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    variant_span_at<PF, SF, kC, kM, kRound, kIsa>(j, j.grad + begin, begin, end - begin);
  }
};

// ---- The transposed walk (builds.h): rows [begin, end), tile by tile
// (transpose.h).
template <class PF, class SF, bool kC, bool kM, unsigned kRound>
struct VariantTransposedWalk {
  using Job = VariantJob<PF, SF>;
  static constexpr Isa kWidest = kIsHalf<PF> ? Isa::avx512 : Isa::avx2;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t row_begin, int64_t row_end) {
    for_each_tile_run<typename PF::Storage, kIsa != Isa::baseline>(
        j.grad, j.rows, j.cols, row_begin, row_end,
        [&](const typename PF::Storage* grad, int64_t at, int64_t n)
            RMSPROP_LAMBDA_ALWAYS_INLINE {
              variant_span_at<PF, SF, kC, kM, kRound, kIsa>(j, grad, at, n);
            });
  }
};

// ---- The strided walk over the collapsed layout of grad, param, v, [mean],
// [buffer], [compensation] (in that order). With outputs_like_param every
// output is written at param's offset of each element; otherwise in
// row-major order.
template <class PF, class SF, bool kC, bool kM, unsigned kRound>
void variant_strided(
    const VariantJob<PF, SF>& j,
    const CollapsedLayout& layout,
    bool outputs_like_param) {
  using C = typename PF::Compute;
  constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
  constexpr size_t kMean = 3;
  constexpr size_t kBuffer = kC ? 4 : 3;
  constexpr size_t kComp = 3 + (kC ? 1 : 0) + (kM ? 1 : 0);
  constexpr size_t kArrays = kComp + (kKahan ? 1 : 0);
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
      C w = PF::load(j.param[element(1)]);
      auto r = rmsprop_variant_element<C, kC, kM>(
          PF::load(j.grad[element(0)]),
          w,
          SF::load(j.state[0][element(2)]),
          m,
          b,
          j.k);
      int64_t o = outputs_like_param ? element(1) : out + i;
      const typename PF::Storage* comp = kKahan ? j.comp + element(kComp) : nullptr;
      typename PF::Storage* comp_out = kKahan ? j.comp_out + o : nullptr;
      j.param_out[o] = store_param<PF, kRound>(r.param, w, comp, comp_out, out + i, j.key);
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
