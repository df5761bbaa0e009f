// How many GPU threads a FusedRMSprop kernel is dispatched with, and which
// kernel. One definition, used by eval_gpu and by the Metal-as-C++ harness
// (tests/metal_harness), so the harness runs the exact grid the GPU would.
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

struct RMSpropGrid {
  uint32_t width; // threads per grid row (x)
  uint32_t height; // grid rows (y); > 1 only past RMSPROP_GRID_MAX_WIDTH threads
  uint32_t group_width; // threads per threadgroup (x)
};

// Elements one thread updates: a whole RMSPROP_BYTES_PER_THREAD chunk in the
// contiguous kernel, one element in the general one.
inline uint32_t rmsprop_elements_per_thread(bool contiguous, int itemsize) {
  return contiguous ? RMSPROP_BYTES_PER_THREAD / itemsize : 1;
}

// Grid of dispatch_threads for n elements. Thread (x, y) has the linear index
// y * width + x; threads whose first element is past the last one (the
// padding of the last row of a 2-D grid) return at once in the kernels.
inline RMSpropGrid rmsprop_grid(
    uint64_t n,
    uint32_t elements_per_thread,
    uint32_t max_threads_per_group) {
  const uint64_t max_width = RMSPROP_GRID_MAX_WIDTH;
  uint64_t threads = (n + elements_per_thread - 1) / elements_per_thread;
  uint64_t width = threads < max_width ? threads : max_width;
  uint64_t height = width == 0 ? 0 : (threads + width - 1) / width;
  uint64_t group = max_threads_per_group < width ? max_threads_per_group : width;
  return RMSpropGrid{
      static_cast<uint32_t>(width),
      static_cast<uint32_t>(height),
      static_cast<uint32_t>(group == 0 ? 1 : group)};
}

// Host name of the kernel instantiated in kernels/rmsprop.metal for a layout
// (flat -> contiguous kernel, otherwise general) and a dtype name
// ("float32", "float16", "bfloat16").
inline std::string rmsprop_kernel_name(bool contiguous, const std::string& dtype) {
  return std::string("rmsprop_") + (contiguous ? "contiguous_" : "general_") +
      dtype;
}

} // namespace mlx_fused_rmsprop
