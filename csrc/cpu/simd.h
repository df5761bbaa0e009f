// SIMD vectors of float for the x86-64 builds of the 16-bit loops: the plain
// math (rmsprop_element, kernels/rmsprop_math.h) instantiated with Vec<L> as
// its compute type runs L lanes at once -- IEEE add, multiply, divide and
// sqrt per lane, no contraction (-ffp-contract=off), so the same bits as the
// scalar loop -- and float16 / bfloat16 are converted in registers (F16C,
// AVX-512) in one pass over memory instead of through stack blocks.
// Conversions give exactly mlx's bits (half.h), NaN encodings included.
// Everything here is always inlined into the build's function: a vector
// passed to an out-of-line function compiled for another target would change
// calling convention.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "formats.h"
#include "isa.h"
#include "rmsprop_math.h"

#if RMSPROP_HAVE_AVX2_F16C

// The generic helpers below take and return vectors without a target of
// their own; GCC warns that such a signature's ABI depends on the target.
// They are always inlined into the per-target loops, never called across
// targets, so the warning does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlx_fused_rmsprop::simd {

// GCC / clang vector extensions: IEEE arithmetic lane by lane.
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
template <int L>
struct RawVec;
template <>
struct RawVec<8> {
  using type = f32x8;
};
template <>
struct RawVec<16> {
  using type = f32x16;
};

template <int L>
struct Vec {
  using Raw = typename RawVec<L>::type;
  Raw v;
};

template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> operator+(Vec<L> a, Vec<L> b) {
  return {a.v + b.v};
}
template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> operator-(Vec<L> a, Vec<L> b) {
  return {a.v - b.v};
}
template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> operator*(Vec<L> a, Vec<L> b) {
  return {a.v * b.v};
}
template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> operator/(Vec<L> a, Vec<L> b) {
  return {a.v / b.v};
}

// Found by argument-dependent lookup from rmsprop_sqrt (rmsprop_math.h).
// Lane by lane with no target attribute of its own, so it inlines into the
// generic math; inside an AVX2 / AVX-512 function the compiler turns the
// lanes into one vsqrtps (IEEE, like sqrtss).
template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> sqrt(Vec<L> a) {
  Vec<L> out;
  for (int i = 0; i < L; ++i) {
    out.v[i] = __builtin_sqrtf(a.v[i]);
  }
  return out;
}

template <int L>
RMSPROP_ALWAYS_INLINE Vec<L> broadcast(float x) {
  Vec<L> out;
  for (int i = 0; i < L; ++i) {
    out.v[i] = x;
  }
  return out;
}

template <int L>
RMSPROP_ALWAYS_INLINE RMSpropCoefficients<Vec<L>> broadcast(RMSpropCoefficients<float> k) {
  return {broadcast<L>(k.lr), broadcast<L>(k.alpha), broadcast<L>(k.one_minus_alpha),
          broadcast<L>(k.eps)};
}

// ---- Loads and stores of L elements of a format, per instruction set.

template <class F, int L>
struct Lanes;

// Bit casts between vectors (and scalars) of the same size.
template <class To, class From>
RMSPROP_ALWAYS_INLINE To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
template <int L>
struct IntVecs;
template <>
struct IntVecs<8> {
  using u16 = u16x8;
  using u32 = u32x8;
  using i32 = i32x8;
};
template <>
struct IntVecs<16> {
  using u16 = u16x16;
  using u32 = u32x16;
  using i32 = i32x16;
};

// float32: plain unaligned moves. Generic vector code: no target attribute,
// it compiles to the instruction set of the function it is inlined into.
template <int L>
struct Lanes<Float32Format, L> {
  RMSPROP_ALWAYS_INLINE static Vec<L> load(const float* p) {
    Vec<L> out;
    std::memcpy(&out.v, p, sizeof(out.v));
    return out;
  }
  RMSPROP_ALWAYS_INLINE static void store(float* p, Vec<L> x) {
    std::memcpy(p, &x.v, sizeof(x.v));
  }
};

// bfloat16: the upper half of a float's bits; stored rounded to nearest
// even, every NaN as 0x7FC0 (half.h's f32_to_bf16, lane by lane). Generic.
template <int L>
struct Lanes<BFloat16Format, L> {
  using U16 = typename IntVecs<L>::u16;
  using U32 = typename IntVecs<L>::u32;
  using I32 = typename IntVecs<L>::i32;
  RMSPROP_ALWAYS_INLINE static Vec<L> load(const uint16_t* p) {
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    return {bits_as<typename Vec<L>::Raw>(__builtin_convertvector(h, U32) << 16)};
  }
  RMSPROP_ALWAYS_INLINE static void store(uint16_t* p, Vec<L> x) {
    U32 u = bits_as<U32>(x.v);
    U32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    I32 nan = x.v != x.v;
    U32 bits = nan ? U32{} + 0x7FC0u : rounded;
    U16 out = __builtin_convertvector(bits, U16);
    std::memcpy(p, &out, sizeof(out));
  }
};

// float16: vcvtph2ps / vcvtps2ph (round to nearest even), then NaN lanes
// rewritten to mlx's sign | 0x7D00 (the instruction keeps the payload).
// Intrinsics, so each width carries its target; only the spans below,
// compiled for that target, use them.
template <>
struct Lanes<Float16Format, 8> {
  RMSPROP_TARGET_AVX2_F16C RMSPROP_ALWAYS_INLINE static Vec<8> load(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {reinterpret_cast<Vec<8>::Raw>(_mm256_cvtph_ps(h))};
  }
  RMSPROP_TARGET_AVX2_F16C RMSPROP_ALWAYS_INLINE static void store(uint16_t* p, Vec<8> x) {
    __m256 f = reinterpret_cast<__m256>(x.v);
    __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    __m128i nan16 = _mm_packs_epi32(
        _mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    __m128i fixed = _mm_or_si128(
        _mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))),
        _mm_set1_epi16(0x7D00));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, fixed, nan16));
  }
};
template <>
struct Lanes<Float16Format, 16> {
  RMSPROP_TARGET_AVX512 RMSPROP_ALWAYS_INLINE static Vec<16> load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {reinterpret_cast<Vec<16>::Raw>(_mm512_cvtph_ps(h))};
  }
  RMSPROP_TARGET_AVX512 RMSPROP_ALWAYS_INLINE static void store(uint16_t* p, Vec<16> x) {
    __m512 f = reinterpret_cast<__m512>(x.v);
    __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    __m256i fixed = _mm256_or_si256(
        _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0x8000))),
        _mm256_set1_epi16(0x7D00));
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(p), _mm256_mask_blend_epi16(nan, h, fixed));
  }
};

} // namespace mlx_fused_rmsprop::simd

#pragma GCC diagnostic pop

#endif // RMSPROP_HAVE_AVX2_F16C
