// Metal Shading Language -> C++ shim: just enough of MSL for g++/clang++ to
// compile kernels/rmsprop.metal unchanged, so tests can call its kernels on
// the CPU. It proves indexing, tails, strides, aliasing and math; it does NOT
// prove that Apple's Metal compiler accepts the file (only a Mac can).
//
// Include it before anything that includes kernels/rmsprop_math.h, after all
// standard and mlx headers (its macros `device`, `constant`, `thread`,
// `kernel`, `buffer`, ... would break them), and #include
// "metal_shim_end.h" after the shader to drop those macros again.
// The file `metal_stdlib` beside it makes the shader's
// `#include <metal_stdlib>` land here (compile with -I tests/metal_harness).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if __cplusplus >= 201703L
// The CPU backend's half types: conversions from float round to nearest even
// exactly as MLX's CPU kernels round (the reference the harness compares to).
#include "mlx/types/half_types.h"
#define RMSPROP_SHIM_HALF mlx::core::float16_t
#define RMSPROP_SHIM_BFLOAT mlx::core::bfloat16_t
#else
// C++14 (the language Metal 3.1 is based on) is only used by the syntax gate,
// which compiles the shader and never runs it; mlx's headers need C++17, so
// 16-bit stand-ins that convert to and from float take their place.
struct RMSpropShimHalf16 {
  unsigned short bits;
  RMSpropShimHalf16() = default;
  RMSpropShimHalf16(float) : bits(0) {}
  operator float() const {
    return 0.0f;
  }
};
struct RMSpropShimBFloat16 {
  unsigned short bits;
  RMSpropShimBFloat16() = default;
  RMSpropShimBFloat16(float) : bits(0) {}
  operator float() const {
    return 0.0f;
  }
};
#define RMSPROP_SHIM_HALF RMSpropShimHalf16
#define RMSPROP_SHIM_BFLOAT RMSpropShimBFloat16
#endif

// The shader is compiled as Metal 3.1 (CMakeLists.txt: -std=metal3.1).
#define __METAL_VERSION__ 310

// Tells the shader it is compiled as C++: it then leaves out the Metal-only
// `#pragma METAL fp contract(off)`, whose C++ equivalent is the driver's
// -ffp-contract=off (tests/test_metal_emulation.py builds every variant so).
#define RMSPROP_METAL_SHIM 1

// ---- Scalar and vector types.
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
typedef unsigned char uchar;
static_assert(sizeof(uint) == 4, "Metal uint is 32-bit");
static_assert(sizeof(ulong) == 8, "Metal ulong is 64-bit");
static_assert(sizeof(long) == 8, "Metal long is 64-bit");

typedef RMSPROP_SHIM_HALF half;
typedef RMSPROP_SHIM_BFLOAT bfloat;
static_assert(sizeof(half) == 2 && sizeof(bfloat) == 2, "16-bit floats");

// uint2: the only vector type the shader uses (thread position and grid size).
struct uint2 {
  uint x;
  uint y;
  constexpr uint2() : x(0), y(0) {}
  constexpr uint2(uint x_, uint y_) : x(x_), y(y_) {}
};

// ---- The metal:: functions the shader uses, float only (precise = IEEE
// correctly rounded, like the CPU's std::sqrt and operator/). Other argument
// types are deleted so an accidental double or half overload fails to build.
namespace metal {
namespace precise {
inline float sqrt(float x) {
  return std::sqrt(x);
}
inline float divide(float x, float y) {
  return x / y;
}
template <typename T>
T sqrt(T) = delete;
template <typename T>
T divide(T, T) = delete;
} // namespace precise
} // namespace metal

// ---- Address spaces. `device` memory is plain memory; `constant` memory is
// read-only, so writing through a `constant` pointer fails to compile here as
// it does in Metal; `thread` is the default address space.
#define device
#define constant const
#define thread

// ---- Attributes. Each expands to nothing, so [[kernel]] becomes the empty
// attribute list [[]], which is valid C++ and needs no warning suppression.
#define kernel
#define buffer(index)
#define thread_position_in_grid
#define threads_per_grid
#define host_name(name)
