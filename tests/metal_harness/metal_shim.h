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
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
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

// ---- as_type<T>(x): Metal's bit cast between types of one size.
template <typename To, typename From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of one size");
  static_assert(
      std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
      "as_type casts plain values");
  To to;
  std::memcpy(&to, &x, sizeof(To));
  return to;
}

// ---- SIMD-groups. A SIMD-group's lanes run concurrently on a GPU and a
// SIMD-group function (simd_max) combines the values of all of them. Here
// each lane of a SIMD-group is a real OS thread (the driver runs the lanes
// of the SIMD-groups of a dispatch on a pool of RMSPROP_SHIM_SIMD_WIDTH
// threads, tests/metal_harness/driver.cpp), and simd_max is a rendezvous:
// every lane leaves its value and waits until the last one of the SIMD-group
// has arrived, which computes the maximum for all of them.
//
// Stricter than Metal on purpose: every lane of the SIMD-group must call
// the same simd_max (same source line) in the same round. A lane that
// returned from the kernel while others wait in simd_max, or lanes meeting
// at different calls, abort the driver with a message: the kernels are
// written so that no SIMD-group function ever runs with inactive lanes.
#define RMSPROP_SHIM_SIMD_WIDTH 32

namespace rmsprop_shim {

struct SimdGroup {
  std::mutex mutex;
  std::condition_variable done;
  unsigned lanes = 0; // threads of this SIMD-group
  unsigned running = 0; // of them, those that have not returned yet
  unsigned arrived = 0; // of them, those waiting in the current round
  unsigned long long round = 0;
  unsigned char value[RMSPROP_SHIM_SIMD_WIDTH][8];
  int line[RMSPROP_SHIM_SIMD_WIDTH];
  bool here[RMSPROP_SHIM_SIMD_WIDTH];
  unsigned char result[8];
};

// The SIMD-group and lane the calling OS thread runs (set by the driver).
struct LaneContext {
  SimdGroup* group;
  unsigned lane;
};
inline LaneContext& current_lane() {
  static thread_local LaneContext context = {nullptr, 0};
  return context;
}

[[noreturn]] inline void simd_fail(const char* what, unsigned a, unsigned b) {
  std::fprintf(stderr, "metal shim: %s (%u, %u)\n", what, a, b);
  std::fflush(stderr);
  std::abort();
}

// Called by the driver when a lane's thread returns from the kernel.
inline void lane_returned() {
  LaneContext& me = current_lane();
  SimdGroup& g = *me.group;
  std::lock_guard<std::mutex> lock(g.mutex);
  --g.running;
  if (g.arrived > 0) {
    simd_fail(
        "a lane returned while others of its SIMD-group wait in simd_max "
        "(lanes waiting, lanes running)",
        g.arrived, g.running);
  }
  me.group = nullptr;
}

} // namespace rmsprop_shim

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

// The maximum of x over the lanes of the calling SIMD-group (see
// rmsprop_shim::SimdGroup). `line` (the caller's source line, filled in by
// the compiler) checks that every lane meets at the same call.
template <typename T>
T simd_max(T x, int line = __builtin_LINE()) {
  static_assert(std::is_arithmetic<T>::value && sizeof(T) <= 8, "simd_max of a scalar");
  rmsprop_shim::LaneContext& me = rmsprop_shim::current_lane();
  if (me.group == nullptr) {
    rmsprop_shim::simd_fail("simd_max called outside a SIMD-group (line, 0)", unsigned(line), 0);
  }
  rmsprop_shim::SimdGroup& g = *me.group;
  std::unique_lock<std::mutex> lock(g.mutex);
  std::memcpy(g.value[me.lane], &x, sizeof(T));
  g.line[me.lane] = line;
  g.here[me.lane] = true;
  const unsigned long long round = g.round;
  if (++g.arrived == g.running) {
    // The last lane to arrive: every lane of the SIMD-group must be here.
    if (g.running != g.lanes) {
      rmsprop_shim::simd_fail(
          "simd_max with inactive lanes (lanes calling, lanes of the SIMD-group)",
          g.running, g.lanes);
    }
    T best = x;
    for (unsigned l = 0; l < RMSPROP_SHIM_SIMD_WIDTH; ++l) {
      if (!g.here[l]) {
        continue;
      }
      if (g.line[l] != line) {
        rmsprop_shim::simd_fail(
            "lanes of a SIMD-group meet at different simd_max calls (lines)",
            unsigned(g.line[l]), unsigned(line));
      }
      T value;
      std::memcpy(&value, g.value[l], sizeof(T));
      best = value > best ? value : best;
      g.here[l] = false;
    }
    std::memcpy(g.result, &best, sizeof(T));
    g.arrived = 0;
    ++g.round;
    g.done.notify_all();
  } else {
    g.done.wait(lock, [&] { return g.round != round; });
  }
  // The next round cannot end before this lane arrives again: the result
  // stays until it is read.
  T result;
  std::memcpy(&result, g.result, sizeof(T));
  return result;
}
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
#define thread_index_in_simdgroup
#define host_name(name)
