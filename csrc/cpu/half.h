// float16 / bfloat16 <-> float32 conversions for the CPU kernel.
//
// Bit-identical to mlx's own conversions (mlx/types/fp16.h and bf16.h, i.e.
// mlx::core::float16_t / bfloat16_t on x86), for every input bit pattern:
// round-to-nearest-even, subnormals, infinities, and mlx's NaN encodings
// (float16: sign | 0x7D00; bfloat16: 0x7FC0 whatever the NaN's sign).
// Unlike mlx's versions they have no branches (a select replaces each `if`),
// so a loop over them vectorizes with plain SSE2 / NEON and no F16C.
// tests/test_cpu_kernel.py compiles this header against mlx's and compares all
// 65536 half patterns and millions of float32 patterns.
//
// Plain integer and float operations only; no dependency on mlx. The x86-64
// SIMD builds convert in registers instead (cpu/simd.h), with the same
// results.
#pragma once

#include <bit>
#include <cstdint>


namespace mlx_fused_rmsprop::half_bits {

// All ones when c, else zero.
inline uint32_t select_mask(bool c) {
  return 0u - static_cast<uint32_t>(c);
}

// float16 bits -> float32 (Maratyszcza's FP16, as in mlx::core::_MLX_Float16).
inline float f16_to_f32(uint16_t h) {
  uint32_t w = static_cast<uint32_t>(h) << 16;
  uint32_t sign = w & 0x80000000u;
  uint32_t two_w = w + w;
  // Normal numbers, Inf and NaN: shift exponent and mantissa into place, then
  // rebias the exponent with one exact multiply by 2^-112.
  float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) *
      std::bit_cast<float>(0x07800000u);
  // Subnormals (and zero): mantissa as the low bits of 0.5's float, minus 0.5.
  float denormalized =
      std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  // Pick one by a mask (a select on integers, never a branch around float
  // operations, which compilers will not if-convert): two_w < 2^27 means the
  // exponent field is zero.
  uint32_t subnormal = select_mask((two_w >> 27) == 0);
  uint32_t bits = (std::bit_cast<uint32_t>(denormalized) & subnormal) |
      (std::bit_cast<uint32_t>(normalized) & ~subnormal);
  return std::bit_cast<float>(sign | bits);
}

// float32 -> float16 bits, round to nearest even (as mlx::core::_MLX_Float16).
inline uint16_t f32_to_f16(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t abs_bits = static_cast<int32_t>(u & 0x7FFFFFFFu);
  // Exponent, clamped below to the smallest normal half's, plus the rebias.
  int32_t expo = static_cast<int32_t>(u & 0x7F800000u);
  expo = expo < 0x38800000 ? 0x38800000 : expo;
  uint32_t magic_bits = static_cast<uint32_t>(expo) + (15u << 23);
  // The addition of the scaled magnitude to the magic number rounds (RNE) at
  // the half's precision; overflow reaches Inf through the 2^112 scale.
  float scaled = (std::bit_cast<float>(abs_bits) * 0x1p+112f) * 0x1p-110f;
  uint32_t magic = std::bit_cast<uint32_t>(std::bit_cast<float>(magic_bits) + scaled);
  uint32_t bits = ((magic >> 13) & 0x7C00u) + (magic & 0x0FFFu);
  uint32_t nan = select_mask(abs_bits > 0x7F800000); // NaN keeps only its sign
  bits = (0x7D00u & nan) | (bits & ~nan);
  return static_cast<uint16_t>(sign | bits);
}

// bfloat16 bits -> float32: exact, the upper half of the float's bits.
inline float bf16_to_f32(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

// float32 -> bfloat16 bits, round to nearest even; every NaN becomes 0x7FC0
// (as mlx::core::_MLX_BFloat16).
inline uint16_t f32_to_bf16(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

} // namespace mlx_fused_rmsprop::half_bits
