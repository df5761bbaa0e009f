// Which kernel of kernels/rmsprop.metal a FusedRMSprop update runs and how many
// GPU threads it is dispatched with. One definition, used by eval_gpu and by
// the Metal-as-C++ harness (tests/metal_harness), so the harness runs the
// exact kernels and grids the GPU would. Plain C++: no mlx types.
#pragma once

#include <cstdint>
#include <string>

#include "rmsprop_math.h"

// Widest 1-D grid row. Thread ids are 32-bit (`uint2` in the kernels), so a
// row stays at or below 2^31 threads and rows are added past that. The
// harness overrides this with a tiny width to run 2-D grids on small arrays;
// eval_gpu never defines it.
#ifndef RMSPROP_GRID_MAX_WIDTH
#define RMSPROP_GRID_MAX_WIDTH (uint64_t(1) << 31)
#endif

namespace mlx_fused_rmsprop {

// The kernels, by layout: flat buffers, or any strides with 32- or 64-bit
// index math (needs_64bit_index() in rmsprop.h decides).
enum class RMSpropKernel { contiguous, general_idx32, general_idx64 };

// The kernel's kind as its host names spell it.
inline std::string rmsprop_kernel_kind(RMSpropKernel kernel) {
  switch (kernel) {
    case RMSpropKernel::contiguous:
      return "contiguous";
    case RMSpropKernel::general_idx32:
      return "general_idx32";
    case RMSpropKernel::general_idx64:
      return "general_idx64";
  }
  return "";
}

// Host name of the kernel instantiated in kernels/rmsprop.metal for a dtype
// name ("float32", "float16", "bfloat16"), e.g. rmsprop_general_idx32_float16.
inline std::string rmsprop_kernel_name(RMSpropKernel kernel, const std::string& dtype) {
  return "rmsprop_" + rmsprop_kernel_kind(kernel) + "_" + dtype;
}

// Host name of the variant kernel for a parameter and a state dtype name,
// e.g. rmsprop_variant_contiguous_bfloat16_float32.
inline std::string rmsprop_variant_kernel_name(
    RMSpropKernel kernel,
    const std::string& param_dtype,
    const std::string& state_dtype) {
  return "rmsprop_variant_" + rmsprop_kernel_kind(kernel) + "_" + param_dtype +
      "_" + state_dtype;
}

// Host name of the 8-bit state's kernel for a parameter dtype name, e.g.
// rmsprop_q8_general_idx32_bfloat16 (the state is uint8 codes and float32
// scales whatever the parameter's dtype).
inline std::string rmsprop_q8_kernel_name(RMSpropKernel kernel, const std::string& dtype) {
  return "rmsprop_q8_" + rmsprop_kernel_kind(kernel) + "_" + dtype;
}

// Threads of a dispatch over n elements. The contiguous kernel: one thread per
// RMSPROP_BYTES_PER_THREAD chunk. The general kernel: one thread per run of
// RMSPROP_GENERAL_ELEMENTS_PER_THREAD elements of each row of `inner`
// elements (the innermost extent of the collapsed layout).
inline uint64_t rmsprop_threads(
    RMSpropKernel kernel,
    uint64_t n,
    int itemsize,
    uint64_t inner) {
  if (kernel == RMSpropKernel::contiguous) {
    uint64_t per_thread = RMSPROP_BYTES_PER_THREAD / itemsize;
    return (n + per_thread - 1) / per_thread;
  }
  if (n == 0 || inner == 0) {
    return 0;
  }
  const uint64_t per_thread = RMSPROP_GENERAL_ELEMENTS_PER_THREAD;
  return (n / inner) * ((inner + per_thread - 1) / per_thread);
}

struct RMSpropGrid {
  uint32_t width; // threads per grid row (x)
  uint32_t height; // grid rows (y); > 1 only past RMSPROP_GRID_MAX_WIDTH threads
  uint32_t group_width; // threads per threadgroup (x)
};

// Grid of dispatch_threads for `threads` threads. Thread (x, y) has the
// linear index y * width + x; threads past the last one (the padding of the
// last row of a 2-D grid) return at once in the kernels.
inline RMSpropGrid rmsprop_grid(uint64_t threads, uint32_t max_threads_per_group) {
  const uint64_t max_width = RMSPROP_GRID_MAX_WIDTH;
  uint64_t width = threads < max_width ? threads : max_width;
  uint64_t height = width == 0 ? 0 : (threads + width - 1) / width;
  uint64_t group = max_threads_per_group < width ? max_threads_per_group : width;
  return RMSpropGrid{
      static_cast<uint32_t>(width),
      static_cast<uint32_t>(height),
      static_cast<uint32_t>(group == 0 ? 1 : group)};
}

// Threads of an 8-bit state's dispatch over n elements (any kind): one
// SIMD-group of RMSPROP_SIMD_WIDTH threads per block of RMSPROP_BLOCK
// elements, the last block possibly partial.
inline uint64_t rmsprop_q8_threads(uint64_t n) {
  return (n + RMSPROP_BLOCK - 1) / RMSPROP_BLOCK * RMSPROP_SIMD_WIDTH;
}

static_assert(
    RMSPROP_GRID_MAX_WIDTH % RMSPROP_SIMD_WIDTH == 0,
    "grid rows must be whole SIMD-groups");

// Grid of an 8-bit state's dispatch (threads: rmsprop_q8_threads): grid rows
// and threadgroups are whole SIMD-groups -- `threads` is a multiple of
// RMSPROP_SIMD_WIDTH, so is the widest row, and the threadgroup width is
// rounded down to one (max_threads_per_group >= RMSPROP_SIMD_WIDTH, which
// eval_gpu checks) -- so the SIMD-group of a thread is its linear index /
// RMSPROP_SIMD_WIDTH, as the kernels assume, and the padding threads of a 2-D
// grid fill whole SIMD-groups.
inline RMSpropGrid rmsprop_q8_grid(uint64_t threads, uint32_t max_threads_per_group) {
  return rmsprop_grid(threads, max_threads_per_group / RMSPROP_SIMD_WIDTH * RMSPROP_SIMD_WIDTH);
}

} // namespace mlx_fused_rmsprop
