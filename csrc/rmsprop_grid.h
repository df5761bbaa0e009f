// How many GPU threads a FusedRMSprop kernel is dispatched with. One function,
// used by eval_gpu and by the Metal-as-C++ harness, so the harness runs the
// exact grid the GPU would.
#pragma once

#include <cstdint>

#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

struct RMSpropGrid {
  uint32_t width; // threads per grid row (x)
  uint32_t height; // grid rows (y); > 1 only past 2^31 threads
  uint32_t group_width; // threads per threadgroup (x)
};

// Elements one thread updates: a whole 16-byte chunk in the contiguous
// kernel, one element in the general one.
inline uint32_t rmsprop_elements_per_thread(bool contiguous, int itemsize) {
  return contiguous ? RMSPROP_BYTES_PER_THREAD / itemsize : 1;
}

// Grid of dispatch_threads for n elements. Threads past the last element (the
// padding of a 2-D grid) return at once in the kernels.
inline RMSpropGrid rmsprop_grid(
    uint64_t n,
    uint32_t elements_per_thread,
    uint32_t max_threads_per_group) {
  // A 1-D grid dimension stays below 2^31 so 32-bit thread ids never wrap.
  const uint64_t max_width = uint64_t(1) << 31;
  uint64_t threads = (n + elements_per_thread - 1) / elements_per_thread;
  uint64_t width = threads < max_width ? threads : max_width;
  uint64_t height = width == 0 ? 0 : (threads + width - 1) / width;
  uint64_t group = max_threads_per_group < width ? max_threads_per_group : width;
  return RMSpropGrid{
      static_cast<uint32_t>(width),
      static_cast<uint32_t>(height),
      static_cast<uint32_t>(group == 0 ? 1 : group)};
}

} // namespace mlx_fused_rmsprop
