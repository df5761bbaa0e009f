// The benchmark's memory limit for the step's own access pattern: read
// grad, param and v, write param and v back in place, with trivial math, on
// as many threads as the fused step splits the same leaf across. `python -m
// mlx_fused_rmsprop bench` reports each step's GB/s as a fraction of it.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

namespace mlx_fused_rmsprop {

class StepPatternRoofline {
 public:
  // Three buffers of `bytes_per_array` bytes each, every page touched.
  explicit StepPatternRoofline(int64_t bytes_per_array);
  // One pass over the buffers, split into `threads` parts on the kernel's
  // worker pool (capped at its size; 1 runs on the calling thread).
  void run(int threads);
  int64_t bytes_per_array() const {
    return words_ * 8;
  }
  // Bytes one pass moves: 3 arrays read, 2 written.
  int64_t bytes_moved() const {
    return 5 * bytes_per_array();
  }
  // Sums (mod 2^64) of param's and v's words: what the passes wrote, for
  // tests.
  std::pair<uint64_t, uint64_t> sums() const;

 private:
  int64_t words_;
  std::unique_ptr<uint64_t[]> grad_, param_, v_;
};

} // namespace mlx_fused_rmsprop
