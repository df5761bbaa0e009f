// The benchmark's memory limit for the step's own access pattern: read
// grad, param and the state, write param and the state back in place, with
// trivial math, on as many threads as the fused step splits the same leaf
// across. `python -m mlx_fused_rmsprop bench` reports each step's GB/s as a
// fraction of it.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

namespace mlx_fused_rmsprop {

class StepPatternRoofline {
 public:
  // The plain step's pattern: three buffers (grad, param, v) of
  // `bytes_per_array` bytes each, every page touched.
  explicit StepPatternRoofline(int64_t bytes_per_array);
  // The pattern of a leaf of `elements` elements (rounded up to a multiple of
  // 8): grad and param of `param_bytes` bytes per element, one state entry of
  // `state_bytes` bytes per element (4: float32, 2: 16-bit, 1: 8-bit codes)
  // and, with `block_scales`, a float32 scale per block of 256 elements that
  // is read and written too (8-bit state). Walked block by block, as the
  // quantized kernel walks it.
  StepPatternRoofline(int64_t elements, int param_bytes, int state_bytes, bool block_scales);
  // One pass over the buffers, split into `threads` parts on the kernel's
  // worker pool (capped at its size; 1 runs on the calling thread).
  void run(int threads);
  // Bytes of grad (and of param).
  int64_t bytes_per_array() const {
    return units_ * param_words_ * 8;
  }
  // Bytes one pass moves: grad, param, state and scales read; param, state
  // and scales written.
  int64_t bytes_moved() const;
  // Sums (mod 2^64) of param's and of the state's words (codes included;
  // scales not): what the passes wrote, for tests.
  std::pair<uint64_t, uint64_t> sums() const;
  // Sum (mod 2^64) of the scales (0 without them), for tests.
  uint64_t scale_sum() const;

 private:
  // The unit of the layout: 8 elements, so one unit of 8-bit codes is one
  // 64-bit word and of param `param_bytes` words.
  int64_t units_;
  int64_t param_words_, state_words_; // per unit
  int64_t scales_; // 0, or one per 32 units
  std::unique_ptr<uint64_t[]> grad_, param_, v_;
  std::unique_ptr<uint32_t[]> scale_;
};

} // namespace mlx_fused_rmsprop
