// The chunked update: up to kChunk consecutive elements at a time, staged in
// float32 buffers on the stack, each stage a simple loop the compiler
// vectorizes (or SIMD conversions, simd.h):
//
//   load     grad, param and the state into float32 (16-bit formats widened
//            in registers; 8-bit state dequantized: map[code] * scale)
//   update   rmsprop_variant_element per element (every variant option and
//            the step's clip factor), into the buffers
//   round    the new parameter: to nearest, stochastically, or with Kahan
//            compensation (kernels/rmsprop_math.h)
//   store    the parameter and the state (8-bit: the chunk's new scale, its
//            absolute maximum, then the codes)
//
// The 8-bit state's walks (quantized_loops.h) take one block per chunk; the
// 16-bit parameters' variant walks (variant_loops.h) take any run of
// consecutive elements. The same per-element math as the scalar loops, in
// the same order: the bits do not depend on the chunking.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "formats.h"
#include "isa.h"
#include "quant_rank.h"
#include "simd.h"

namespace mlx_fused_rmsprop {

constexpr int64_t kChunk = RMSPROP_BLOCK;

// What stochastic rounding hashes besides the element's index: the leaf's
// key for this step (rmsprop_rounding_key of seed, step and leaf) and the
// index of this array's element 0 in the whole leaf.
struct RoundingKey {
  rmsprop_u32 key = 0;
  int64_t offset = 0;
};

// The 32 random bits of the element at row-major index `index` of this array.
RMSPROP_ALWAYS_INLINE rmsprop_u32 random_bits_at(const RoundingKey& key, int64_t index) {
  uint64_t at = static_cast<uint64_t>(key.offset + index);
  return rmsprop_random_bits(
      key.key, static_cast<rmsprop_u32>(at), static_cast<rmsprop_u32>(at >> 32));
}

#if RMSPROP_HAVE_AVX2_F16C
// The 16-bit conversions of a chunk in SIMD registers (simd.h), stamped out
// per target: float16's are target intrinsics, which GCC inlines only into
// a function compiled for that target, so these are real functions of their
// build (no vector arguments: callable from any build), one call per chunk.
#define RMSPROP_DEFINE_CHUNK_CONVERSIONS(SUFFIX, TARGET, L)                     \
  template <class F>                                                            \
  TARGET void load_chunk_##SUFFIX(const uint16_t* src, float* dst, int64_t n) { \
    int64_t i = 0;                                                              \
    for (; i + L <= n; i += L) {                                                \
      simd::Lanes<Float32Format, L>::store(dst + i, simd::Lanes<F, L>::load(src + i)); \
    }                                                                           \
    for (; i < n; ++i) {                                                        \
      dst[i] = F::load(src[i]);                                                 \
    }                                                                           \
  }                                                                             \
  template <class F>                                                            \
  TARGET void store_chunk_##SUFFIX(const float* src, uint16_t* dst, int64_t n) { \
    int64_t i = 0;                                                              \
    for (; i + L <= n; i += L) {                                                \
      simd::Lanes<F, L>::store(dst + i, simd::Lanes<Float32Format, L>::load(src + i)); \
    }                                                                           \
    for (; i < n; ++i) {                                                        \
      dst[i] = F::store(src[i]);                                                \
    }                                                                           \
  }
RMSPROP_DEFINE_CHUNK_CONVERSIONS(avx2, RMSPROP_TARGET_AVX2_F16C, 8)
RMSPROP_DEFINE_CHUNK_CONVERSIONS(avx512, RMSPROP_TARGET_AVX512, 16)
#undef RMSPROP_DEFINE_CHUNK_CONVERSIONS
#endif

// n elements of format F into float32 (n <= kChunk).
template <class F, Isa kIsa>
RMSPROP_ALWAYS_INLINE void load_chunk(
    const typename F::Storage* __restrict src,
    float* __restrict dst,
    int64_t n) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsHalf<F> && kIsa == Isa::avx2) {
    return load_chunk_avx2<F>(src, dst, n);
  } else if constexpr (kIsHalf<F> && kIsa == Isa::avx512) {
    return load_chunk_avx512<F>(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(F::load(src[i]));
  }
}

// n float32 values into format F, rounded to nearest even.
template <class F, Isa kIsa>
RMSPROP_ALWAYS_INLINE void store_chunk(
    const float* __restrict src,
    typename F::Storage* __restrict dst,
    int64_t n) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsHalf<F> && kIsa == Isa::avx2) {
    return store_chunk_avx2<F>(src, dst, n);
  } else if constexpr (kIsHalf<F> && kIsa == Isa::avx512) {
    return store_chunk_avx512<F>(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = F::store(src[i]);
  }
}

// The arrays of one chunk, each pointer at the chunk's first element (the
// outputs may be the inputs' buffers). State slots are v, mean, buffer;
// unused ones are null, as is the compensation without Kahan summation.
template <class PF, class SF>
struct ChunkArrays {
  const typename PF::Storage* grad;
  const typename PF::Storage* param;
  typename PF::Storage* param_out;
  const typename PF::Storage* comp;
  typename PF::Storage* comp_out;
  // float / half state
  const typename SF::Storage* state[3];
  typename SF::Storage* state_out[3];
};

// One 8-bit state entry of a chunk (a whole block): its codes at the block,
// its scale and where the new one goes, its map and rank table.
struct QuantizedChunkEntry {
  const uint8_t* codes = nullptr;
  uint8_t* codes_out = nullptr;
  float scale = 0.0f;
  float* scale_out = nullptr;
  const RMSpropQuantMap* map = nullptr;
  const QuantRankTable* table = nullptr;
};

// map[code] * scale for n codes.
RMSPROP_ALWAYS_INLINE void dequantize_scalar(
    const uint8_t* __restrict codes,
    const float* __restrict values,
    float scale,
    float* __restrict dst,
    int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = values[codes[i]] * scale;
  }
}

// The codes of n values q = src * inverse: rmsprop_code_from_rank with
// fast_magnitude_rank, spelled out on integers.
RMSPROP_ALWAYS_INLINE void codes_scalar(
    const float* __restrict src,
    int64_t n,
    float inverse,
    const uint32_t* __restrict table,
    int32_t zero,
    int32_t negatives,
    uint8_t* __restrict codes) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = std::bit_cast<uint32_t>(src[i] * inverse);
    uint32_t offset = QuantRankTable::offset(bits & 0x7FFFFFFFu);
    auto rank = static_cast<int32_t>(
        QuantRankTable::rank(table[QuantRankTable::bucket(offset)], offset));
    int32_t down = rank < negatives ? rank : negatives;
    int32_t code = (bits >> 31) != 0u ? zero - down : zero + rank;
    codes[i] = static_cast<uint8_t>(code);
  }
}

#if RMSPROP_HAVE_AVX2_F16C
// The same two loops in SIMD instructions (the compilers' generic tuning
// emits no gathers), per build; the tails go through the scalar loops.
// AVX-512 looks the 256 values up in registers: eight two-source permutes
// (32 values each, by the code's low 5 bits), then three levels of blends by
// its bits 5, 6 and 7 -- several times faster than a gather here.
RMSPROP_TARGET_AVX512 inline void dequantize_avx512(
    const uint8_t* codes,
    const float* values,
    float scale,
    float* dst,
    int64_t n) {
  __m512 table[16];
  for (int t = 0; t < 16; ++t) {
    table[t] = _mm512_loadu_ps(values + 16 * t);
  }
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  const __m512i bit7 = _mm512_set1_epi32(128);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    __m512 of32[8];
    for (int t = 0; t < 8; ++t) {
      of32[t] = _mm512_permutex2var_ps(table[2 * t], code, table[2 * t + 1]);
    }
    __mmask16 b5 = _mm512_test_epi32_mask(code, bit5);
    __mmask16 b6 = _mm512_test_epi32_mask(code, bit6);
    __mmask16 b7 = _mm512_test_epi32_mask(code, bit7);
    __m512 of64[4];
    for (int t = 0; t < 4; ++t) {
      of64[t] = _mm512_mask_blend_ps(b5, of32[2 * t], of32[2 * t + 1]);
    }
    __m512 low = _mm512_mask_blend_ps(b6, of64[0], of64[1]);
    __m512 high = _mm512_mask_blend_ps(b6, of64[2], of64[3]);
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mask_blend_ps(b7, low, high), s));
  }
  dequantize_scalar(codes + i, values, scale, dst + i, n - i);
}

RMSPROP_TARGET_AVX2_F16C inline void dequantize_avx2(
    const uint8_t* codes,
    const float* values,
    float scale,
    float* dst,
    int64_t n) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_i32gather_ps(values, index, 4), s));
  }
  dequantize_scalar(codes + i, values, scale, dst + i, n - i);
}

RMSPROP_TARGET_AVX512 inline void codes_avx512(
    const float* src,
    int64_t n,
    float inverse,
    const uint32_t* table,
    int32_t zero,
    int32_t negatives,
    uint8_t* codes) {
  using T = QuantRankTable;
  const __m512 inv = _mm512_set1_ps(inverse);
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(T::kBase));
  const __m512i last = _mm512_set1_epi32(static_cast<int>(T::kBuckets - 1));
  const __m512i low_mask = _mm512_set1_epi32(static_cast<int>(T::kLowMask));
  const __m512i byte = _mm512_set1_epi32(0xFF);
  const __m512i zeros = _mm512_set1_epi32(zero);
  const __m512i negs = _mm512_set1_epi32(negatives);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv));
    __m512i offset = _mm512_sub_epi32(
        _mm512_max_epu32(_mm512_and_si512(bits, magnitude_mask), base), base);
    __m512i bucket = _mm512_min_epu32(_mm512_srli_epi32(offset, T::kShift), last);
    __m512i entry = _mm512_i32gather_epi32(bucket, table, 4);
    __mmask16 up = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(offset, low_mask), _mm512_srli_epi32(entry, 8));
    __m512i below = _mm512_and_si512(entry, byte);
    __m512i rank = _mm512_mask_add_epi32(below, up, below, one);
    __mmask16 negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    __m512i code = _mm512_mask_sub_epi32(
        _mm512_add_epi32(zeros, rank), negative, zeros, _mm512_min_epi32(rank, negs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code));
  }
  codes_scalar(src + i, n - i, inverse, table, zero, negatives, codes + i);
}

RMSPROP_TARGET_AVX2_F16C inline void codes_avx2(
    const float* src,
    int64_t n,
    float inverse,
    const uint32_t* table,
    int32_t zero,
    int32_t negatives,
    uint8_t* codes) {
  using T = QuantRankTable;
  const __m256 inv = _mm256_set1_ps(inverse);
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i base = _mm256_set1_epi32(static_cast<int>(T::kBase));
  const __m256i last = _mm256_set1_epi32(static_cast<int>(T::kBuckets - 1));
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(T::kLowMask));
  const __m256i byte = _mm256_set1_epi32(0xFF);
  const __m256i zeros = _mm256_set1_epi32(zero);
  const __m256i negs = _mm256_set1_epi32(negatives);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(src + i), inv));
    __m256i offset = _mm256_sub_epi32(
        _mm256_max_epu32(_mm256_and_si256(bits, magnitude_mask), base), base);
    __m256i bucket = _mm256_min_epu32(_mm256_srli_epi32(offset, T::kShift), last);
    __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), bucket, 4);
    // Both sides are below 2^17: a signed compare is an unsigned one. up is
    // all ones (-1) where a's low bits are above the bound's: subtracting it
    // adds one.
    __m256i up = _mm256_cmpgt_epi32(
        _mm256_and_si256(offset, low_mask), _mm256_srli_epi32(entry, 8));
    __m256i rank = _mm256_sub_epi32(_mm256_and_si256(entry, byte), up);
    __m256i positive_code = _mm256_add_epi32(zeros, rank);
    __m256i negative_code = _mm256_sub_epi32(zeros, _mm256_min_epi32(rank, negs));
    __m256i code = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(positive_code), _mm256_castsi256_ps(negative_code),
        _mm256_castsi256_ps(bits)));
    __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(words, words));
  }
  codes_scalar(src + i, n - i, inverse, table, zero, negatives, codes + i);
}
#endif

// map[code] * scale for n codes, in the build's instructions.
template <Isa kIsa>
RMSPROP_ALWAYS_INLINE void dequantize_chunk(
    const QuantizedChunkEntry& e,
    float* __restrict dst,
    int64_t n) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsa == Isa::avx512) {
    return dequantize_avx512(e.codes, e.map->value, e.scale, dst, n);
  } else if constexpr (kIsa == Isa::avx2) {
    return dequantize_avx2(e.codes, e.map->value, e.scale, dst, n);
  }
#endif
  dequantize_scalar(e.codes, e.map->value, e.scale, dst, n);
}

// The new scale (absolute maximum; NaN when a value is not finite) and the
// codes of n new values, in the build's instructions.
template <Isa kIsa>
RMSPROP_ALWAYS_INLINE void quantize_chunk(
    const QuantizedChunkEntry& e,
    const float* __restrict src,
    int64_t n) {
  // Scales are maxima of non-negative keys: compare their bits as integers
  // (the same order, and a reduction the compiler vectorizes).
  uint32_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    max_key = std::max(max_key, std::bit_cast<uint32_t>(rmsprop_scale_key(src[i])));
  }
  const float scale = rmsprop_block_scale(std::bit_cast<float>(max_key));
  *e.scale_out = scale;
  const RMSpropQuantMap& map = *e.map;
  if (!(scale > 0.0f)) {
    std::memset(e.codes_out, static_cast<int>(map.zero_code), static_cast<size_t>(n));
    return;
  }
  const float inverse = rmsprop_inverse_scale(scale);
  const auto zero = static_cast<int32_t>(map.zero_code);
  const auto negatives = static_cast<int32_t>(map.negative_codes);
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kIsa == Isa::avx512) {
    return codes_avx512(src, n, inverse, e.table->entry, zero, negatives, e.codes_out);
  } else if constexpr (kIsa == Isa::avx2) {
    return codes_avx2(src, n, inverse, e.table->entry, zero, negatives, e.codes_out);
  }
#endif
  codes_scalar(src, n, inverse, e.table->entry, zero, negatives, e.codes_out);
}

// The update of one chunk of n elements, the first of them at row-major
// index `index` of the arrays (for stochastic rounding). kQ: 8-bit state
// (q[] holds the entries; a.state unused).
template <class PF, class SF, bool kC, bool kM, unsigned kRound, bool kQ, Isa kIsa>
RMSPROP_ALWAYS_INLINE void update_chunk(
    const ChunkArrays<PF, SF>& a,
    const QuantizedChunkEntry* q,
    int64_t n,
    int64_t index,
    const RMSpropVariantStep<float>& k,
    const RoundingKey& key) {
  static_assert(std::is_same_v<typename PF::Compute, float>);
  // float32 parameters are read and written where they are (no staging
  // copy: their loads are the leaf's memory traffic); 16-bit ones convert.
  constexpr bool kDirect = std::is_same_v<PF, Float32Format>;
  alignas(64) float g_buffer[kDirect ? 1 : kChunk];
  alignas(64) float w_buffer[kDirect ? 1 : kChunk];
  alignas(64) float updated[kChunk];
  alignas(64) float s[3][kChunk];
  const float* g = g_buffer;
  const float* w = w_buffer;
  if constexpr (kDirect) {
    g = reinterpret_cast<const float*>(a.grad);
    w = reinterpret_cast<const float*>(a.param);
  } else {
    load_chunk<PF, kIsa>(a.grad, g_buffer, n);
    load_chunk<PF, kIsa>(a.param, w_buffer, n);
  }
  constexpr int kStates = 1 + (kC ? 1 : 0) + (kM ? 1 : 0);
  // Slot of each state entry in s[]: v, [mean], [buffer] in order.
  constexpr int kMean = 1;
  constexpr int kBuffer = kC ? 2 : 1;
  for (int e = 0; e < kStates; ++e) {
    if constexpr (kQ) {
      dequantize_chunk<kIsa>(q[e], s[e], n);
    } else {
      load_chunk<SF, kIsa>(a.state[e], s[e], n);
    }
  }
  // The element loop, writing the new parameter to `out`: float32 ones
  // straight to the output (through the very pointer they are read from
  // when in place, so the compiler sees element i read before written),
  // 16-bit ones to the buffer their rounding reads.
  auto update = [&](float* out) RMSPROP_LAMBDA_ALWAYS_INLINE {
    for (int64_t i = 0; i < n; ++i) {
      auto r = rmsprop_variant_element<float, kC, kM>(
          g[i], w[i], s[0][i], kC ? s[kMean][i] : 0.0f, kM ? s[kBuffer][i] : 0.0f, k);
      out[i] = r.param;
      s[0][i] = r.v;
      if constexpr (kC) {
        s[kMean][i] = r.mean;
      }
      if constexpr (kM) {
        s[kBuffer][i] = r.buffer;
      }
    }
  };
  if constexpr (kDirect) {
    float* out = reinterpret_cast<float*>(a.param_out);
    if (static_cast<const void*>(out) == static_cast<const void*>(w)) {
      update(const_cast<float*>(w));
    } else {
      update(out);
    }
  } else {
    update(updated);
  }
  if constexpr (kRound == RMSPROP_ROUND_STOCHASTIC) {
    // The stochastically rounded values are exact in PF: the store keeps them.
    for (int64_t i = 0; i < n; ++i) {
      updated[i] = PF::stochastic(updated[i], random_bits_at(key, index + i));
    }
    store_chunk<PF, kIsa>(updated, a.param_out, n);
  } else if constexpr (kRound == RMSPROP_ROUND_KAHAN) {
    alignas(64) float c[kChunk];
    alignas(64) float change[kChunk];
    load_chunk<PF, kIsa>(a.comp, c, n);
    for (int64_t i = 0; i < n; ++i) {
      auto kahan = rmsprop_kahan(w[i], c[i], updated[i]);
      updated[i] = kahan.target;
      change[i] = kahan.change;
    }
    store_chunk<PF, kIsa>(updated, a.param_out, n);
    // The stored (rounded) parameter, read back: what the compensation owes.
    load_chunk<PF, kIsa>(a.param_out, updated, n);
    for (int64_t i = 0; i < n; ++i) {
      c[i] = rmsprop_kahan_remainder(w[i], updated[i], change[i]);
    }
    store_chunk<PF, kIsa>(c, a.comp_out, n);
  } else if constexpr (!kDirect) {
    store_chunk<PF, kIsa>(updated, a.param_out, n);
  }
  for (int e = 0; e < kStates; ++e) {
    if constexpr (kQ) {
      quantize_chunk<kIsa>(q[e], s[e], n);
    } else {
      store_chunk<SF, kIsa>(s[e], a.state_out[e], n);
    }
  }
}

} // namespace mlx_fused_rmsprop
