// Element formats of the CPU kernel: how a dtype is stored in memory, the
// type the math runs in, and the conversions between the two.
#pragma once

#include <cstdint>
#include <type_traits>

#include "half.h"
#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

// float32 and float64 compute in their own type: loading is the identity.
template <typename T>
struct NativeFormat {
  using Storage = T;
  using Compute = T;
  static T load(T x) {
    return x;
  }
  static T store(T x) {
    return x;
  }
};
using Float32Format = NativeFormat<float>;
using Float64Format = NativeFormat<double>;

// float16 and bfloat16 are stored as their bits and computed in float32;
// stochastic() rounds a float32 result stochastically to a value of the
// format (kernels/rmsprop_math.h), which store() then keeps exactly.
template <
    float (*kLoad)(uint16_t),
    uint16_t (*kStore)(float),
    float (*kStochastic)(float, rmsprop_u32)>
struct HalfFormat {
  using Storage = uint16_t; // the bits of mx::float16_t / mx::bfloat16_t
  using Compute = float;
  static float load(uint16_t x) {
    return kLoad(x);
  }
  static uint16_t store(float x) {
    return kStore(x);
  }
  static float stochastic(float x, rmsprop_u32 random) {
    return kStochastic(x, random);
  }
};

inline float stochastic_float16(float x, rmsprop_u32 random) {
  return rmsprop_stochastic_float16(x, random);
}
inline float stochastic_bfloat16(float x, rmsprop_u32 random) {
  return rmsprop_stochastic_bfloat16(x, random);
}

using Float16Format =
    HalfFormat<half_bits::f16_to_f32, half_bits::f32_to_f16, stochastic_float16>;
using BFloat16Format =
    HalfFormat<half_bits::bf16_to_f32, half_bits::f32_to_bf16, stochastic_bfloat16>;

template <class F>
constexpr bool kIsHalf =
    std::is_same_v<F, Float16Format> || std::is_same_v<F, BFloat16Format>;

} // namespace mlx_fused_rmsprop
