// Element formats of the CPU kernel: how a dtype is stored in memory, the
// type the math runs in, and the conversions between the two.
#pragma once

#include <cstdint>

#include "half.h"

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

// float16 and bfloat16 are stored as their bits and computed in float32.
template <float (*kLoad)(uint16_t), uint16_t (*kStore)(float)>
struct HalfFormat {
  using Storage = uint16_t; // the bits of mx::float16_t / mx::bfloat16_t
  using Compute = float;
  static float load(uint16_t x) {
    return kLoad(x);
  }
  static uint16_t store(float x) {
    return kStore(x);
  }
};
using Float16Format = HalfFormat<half_bits::f16_to_f32, half_bits::f32_to_f16>;
using BFloat16Format = HalfFormat<half_bits::bf16_to_f32, half_bits::f32_to_bf16>;

} // namespace mlx_fused_rmsprop
