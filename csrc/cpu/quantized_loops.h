// The 8-bit state's walks: block by block (RMSPROP_BLOCK elements in the
// leaf's row-major order), each block one chunk of the chunked update
// (chunks.h): dequantize every state entry, update in float32 (every variant
// option, the clip factor), store the parameter from that fresh float32
// state (rounded as kRound says), take each entry's new scale and
// requantize (kernels/rmsprop_math.h has the contract; quant_rank.h finds
// codes fast).
//
// Codes and scales are row-major (the op makes them so). grad, param and the
// compensation either are all row-contiguous (the flat walk, the usual case:
// everything in place) or are gathered per block through their collapsed
// layout (e.g. the column-major gradient of an nn.Linear weight) and the
// outputs scattered back, at param's offsets when param is dense, else in
// row-major order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../rmsprop.h"
#include "builds.h"
#include "chunks.h"
#include "formats.h"
#include "isa.h"
#include "quant_rank.h"
#include "strided.h"

namespace mlx_fused_rmsprop {

// One quantized state entry's arrays, its map and the map's rank table.
struct QuantizedEntry {
  const uint8_t* codes = nullptr;
  uint8_t* codes_out = nullptr;
  const float* scale = nullptr;
  float* scale_out = nullptr;
  const RMSpropQuantMap* map = nullptr;
  const QuantRankTable* table = nullptr;
};

template <class PF>
struct QuantizedJob {
  using P = typename PF::Storage;
  const P* grad;
  const P* param;
  P* param_out;
  const P* comp; // Kahan only
  P* comp_out;
  QuantizedEntry entry[3]; // v, [mean], [momentum buffer], in order
  int states;
  RMSpropVariantStep<float> k;
  RoundingKey key;
  int64_t size; // elements of the leaf
  // The general walk: the collapsed layout of the walked arrays, each
  // scale's stride, and where param' and the compensation' go.
  const CollapsedLayout* layout = nullptr;
  int64_t scale_stride[3] = {1, 1, 1};
  bool outputs_like_param = false;
};

// Block `block` (n elements); grad, param, comp and each entry's codes
// (codes[e]) point at its first element (in the arrays, or gathered), as do
// param_out and comp_out; scales[e] is each entry's scale.
template <class PF, bool kC, bool kM, unsigned kRound, Isa kIsa>
RMSPROP_ALWAYS_INLINE void quantized_block(
    const QuantizedJob<PF>& j,
    int64_t block,
    const typename PF::Storage* grad,
    const typename PF::Storage* param,
    typename PF::Storage* param_out,
    const typename PF::Storage* comp,
    typename PF::Storage* comp_out,
    const uint8_t* const* codes,
    const float* scales,
    int64_t n) {
  const int64_t first = block * RMSPROP_BLOCK;
  QuantizedChunkEntry q[3];
  for (int e = 0; e < j.states; ++e) {
    const auto& entry = j.entry[e];
    q[e] = {codes[e], entry.codes_out + first, scales[e], entry.scale_out + block,
            entry.map, entry.table};
  }
  ChunkArrays<PF, Float32Format> a{};
  a.grad = grad;
  a.param = param;
  a.param_out = param_out;
  a.comp = comp;
  a.comp_out = comp_out;
  update_chunk<PF, Float32Format, kC, kM, kRound, true, kIsa>(a, q, n, first, j.k, j.key);
}

// Ask for the next block's lines while this one computes: the update of a
// block is long enough that the hardware prefetcher, which follows the
// loads, starts too late and the first loads of each block wait for memory.
template <class PF>
RMSPROP_ALWAYS_INLINE void prefetch_block(const QuantizedJob<PF>& j, int64_t first) {
  constexpr int64_t kLine = 64;
  const int64_t bytes = RMSPROP_BLOCK * static_cast<int64_t>(sizeof(typename PF::Storage));
  auto lines = [&](const void* p, int64_t n) {
    for (int64_t at = 0; at < n; at += kLine) {
      __builtin_prefetch(static_cast<const char*>(p) + at, 0, 3);
    }
  };
  lines(j.grad + first, bytes);
  lines(j.param + first, bytes);
  for (int e = 0; e < j.states; ++e) {
    lines(j.entry[e].codes + first, RMSPROP_BLOCK);
  }
}

// ---- The flat walk (builds.h): blocks [begin, end), every array
// row-contiguous, so a block's elements are consecutive in each.
template <class PF, bool kC, bool kM, unsigned kRound>
struct QuantizedFlatWalk {
  using Job = QuantizedJob<PF>;
  static constexpr Isa kWidest = Isa::avx512;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
    for (int64_t block = begin; block < end; ++block) {
      int64_t first = block * RMSPROP_BLOCK;
      int64_t n = std::min<int64_t>(RMSPROP_BLOCK, j.size - first);
      if (block + 1 < end) {
        prefetch_block(j, first + RMSPROP_BLOCK);
      }
      const uint8_t* codes[3];
      float scales[3];
      for (int e = 0; e < j.states; ++e) {
        codes[e] = j.entry[e].codes + first;
        scales[e] = j.entry[e].scale[block];
      }
      quantized_block<PF, kC, kM, kRound, kIsa>(
          j, block, j.grad + first, j.param + first, j.param_out + first,
          kKahan ? j.comp + first : nullptr, kKahan ? j.comp_out + first : nullptr, codes,
          scales, n);
    }
  }
};

// ---- The general walk (builds.h): blocks [begin, end); each block's grad,
// param, codes and compensation gathered through the collapsed layout of the
// walked arrays (j.layout: grad, param, the codes, [compensation]) and each
// scale through its stride; param' and the compensation' scattered back,
// the codes' and scales' written in row-major order.
template <class PF, bool kC, bool kM, unsigned kRound>
struct QuantizedGeneralWalk {
  using Job = QuantizedJob<PF>;
  static constexpr Isa kWidest = Isa::avx512;
  template <Isa kIsa>
  RMSPROP_ALWAYS_INLINE static void run(const Job& j, int64_t begin, int64_t end) {
    using P = typename PF::Storage;
    constexpr bool kKahan = kRound == RMSPROP_ROUND_KAHAN;
    constexpr int kStates = 1 + (kC ? 1 : 0) + (kM ? 1 : 0);
    constexpr size_t kComp = 2 + kStates;
    P grad[RMSPROP_BLOCK], param[RMSPROP_BLOCK], comp[RMSPROP_BLOCK];
    P param_out[RMSPROP_BLOCK], comp_out[RMSPROP_BLOCK];
    uint8_t codes[kStates][RMSPROP_BLOCK];
    int64_t out_at[RMSPROP_BLOCK];
    LayoutCursor<kComp + (kKahan ? 1 : 0)> cursor(*j.layout);
    cursor.start(begin * RMSPROP_BLOCK);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * RMSPROP_BLOCK;
      const int64_t n = std::min<int64_t>(RMSPROP_BLOCK, j.size - first);
      for (int64_t i = 0; i < n; ++i, cursor.next()) {
        grad[i] = j.grad[cursor.at[0]];
        param[i] = j.param[cursor.at[1]];
        for (int e = 0; e < kStates; ++e) {
          codes[e][i] = j.entry[e].codes[cursor.at[2 + e]];
        }
        if constexpr (kKahan) {
          comp[i] = j.comp[cursor.at[kComp]];
        }
        out_at[i] = j.outputs_like_param ? cursor.at[1] : first + i;
      }
      const uint8_t* block_codes[3];
      float scales[3];
      for (int e = 0; e < kStates; ++e) {
        block_codes[e] = codes[e];
        scales[e] = j.entry[e].scale[block * j.scale_stride[e]];
      }
      quantized_block<PF, kC, kM, kRound, kIsa>(
          j, block, grad, param, param_out, kKahan ? comp : nullptr,
          kKahan ? comp_out : nullptr, block_codes, scales, n);
      for (int64_t i = 0; i < n; ++i) {
        j.param_out[out_at[i]] = param_out[i];
        if constexpr (kKahan) {
          j.comp_out[out_at[i]] = comp_out[i];
        }
      }
    }
  }
};

} // namespace mlx_fused_rmsprop
