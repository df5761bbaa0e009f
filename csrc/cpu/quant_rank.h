// The CPU's fast nearest-code search for the 8-bit state: the same answer as
// rmsprop_magnitude_rank (kernels/rmsprop_math.h, an 8-step binary search
// over a map's bounds) from one table lookup.
//
// A magnitude a in [0, 1] is a float32 pattern; the table cuts the patterns
// from 2^-25 up into buckets of 2^16 consecutive ones (exponent and 7
// fraction bits; bucket 0 also takes everything below, the last everything
// above 1). The maps are such that no bucket holds two bounds (checked when
// a table is built), so each entry holds how many bounds lie below its
// bucket and where inside the bucket the one bound that may lie there sits
// (the low 16 bits of its pattern, or 2^16 for none): the rank is the first,
// plus one if a's low bits are above the second (for non-negative floats
// the patterns order like the values). Both searches are monotone step
// functions of a, equal wherever either steps (tests compare them at every
// bound and every bucket edge, and at random).
#pragma once

#include <bit>
#include <cstdint>
#include <stdexcept>

#include "../quant_map.h"
#include "isa.h"
#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

struct QuantRankTable {
  static constexpr uint32_t kBase = 0x33000000u; // 2^-25
  static constexpr int kShift = 16; // keeps 7 fraction bits
  static constexpr uint32_t kLowMask = (1u << kShift) - 1u;
  static constexpr uint32_t kBuckets = ((0x3F800000u - kBase) >> kShift) + 1;
  static constexpr uint32_t kNoBound = 1u << kShift;
  // below | (the bound's low bits, or kNoBound) << 8
  uint32_t entry[kBuckets];

  // The offset of a magnitude's pattern from kBase (0 below it).
  static uint32_t offset(uint32_t magnitude) {
    return magnitude > kBase ? magnitude - kBase : 0u;
  }
  // Its bucket; patterns above 1 (only a q one ulp above 1, whose rank is
  // the top one anyway) land in the last one.
  static uint32_t bucket(uint32_t offset) {
    uint32_t b = offset >> kShift;
    return b < kBuckets ? b : kBuckets - 1;
  }
  static uint32_t rank(uint32_t entry, uint32_t offset) {
    return (entry & 0xFFu) + ((offset & kLowMask) > (entry >> 8) ? 1u : 0u);
  }
};

// The table of `map`; throws std::logic_error if a bucket would hold two
// bounds (the lookup would then be wrong).
inline QuantRankTable build_rank_table(const RMSpropQuantMap& map) {
  QuantRankTable t{};
  for (uint32_t b = 0; b < QuantRankTable::kBuckets; ++b) {
    uint32_t below = 0;
    uint32_t inside = 0;
    uint32_t low = QuantRankTable::kNoBound;
    for (int k = 0; k < 255; ++k) {
      // Values searched are at most 1: bounds above (the +Inf padding) never
      // count.
      if (!(map.bound[k] <= 1.0f)) {
        continue;
      }
      uint32_t offset = QuantRankTable::offset(std::bit_cast<uint32_t>(map.bound[k]));
      uint32_t at = QuantRankTable::bucket(offset);
      if (at < b) {
        ++below;
      } else if (at == b) {
        ++inside;
        low = offset & QuantRankTable::kLowMask;
      }
    }
    if (inside > 1) {
      throw std::logic_error("[mlx_fused_rmsprop] a rank-table bucket holds two bounds.");
    }
    t.entry[b] = below | (low << 8);
  }
  return t;
}

// The table of state_map(entry_is_v), built once.
inline const QuantRankTable& rank_table(bool entry_is_v) {
  static const QuantRankTable unsigned_table = build_rank_table(state_map(true));
  static const QuantRankTable signed_table = build_rank_table(state_map(false));
  return entry_is_v ? unsigned_table : signed_table;
}

// rmsprop_magnitude_rank(a, &map) for a magnitude a (sign bit clear) up to
// one ulp above 1.
RMSPROP_ALWAYS_INLINE uint32_t fast_magnitude_rank(float a, const QuantRankTable& table) {
  uint32_t offset = QuantRankTable::offset(std::bit_cast<uint32_t>(a));
  return QuantRankTable::rank(table.entry[QuantRankTable::bucket(offset)], offset);
}

} // namespace mlx_fused_rmsprop
