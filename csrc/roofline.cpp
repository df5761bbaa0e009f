// The step-pattern roofline (roofline.h): 64-bit words, so the same code is
// the limit of every dtype (bytes are bytes) with no conversion cost.
#include "roofline.h"

#include <algorithm>

#include "cpu/parallel.h"

namespace mlx_fused_rmsprop {

StepPatternRoofline::StepPatternRoofline(int64_t bytes_per_array)
    : words_(std::max<int64_t>(1, (bytes_per_array + 7) / 8)),
      grad_(new uint64_t[words_]),
      param_(new uint64_t[words_]),
      v_(new uint64_t[words_]) {
  std::fill_n(grad_.get(), words_, uint64_t{0x0101010101010101});
  std::fill_n(param_.get(), words_, uint64_t{2});
  std::fill_n(v_.get(), words_, uint64_t{3});
}

namespace {

// Reads every word of g, w and v, writes w and v: the fused step's traffic.
// (Pass k leaves w = 2 ^ (k odd ? g : 0) and v = 3 + k * g in every word.)
void step_pattern(
    const uint64_t* __restrict g,
    uint64_t* __restrict w,
    uint64_t* __restrict v,
    int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint64_t gi = g[i];
    w[i] ^= gi;
    v[i] += gi;
  }
}

} // namespace

void StepPatternRoofline::run(int threads) {
  auto& pool = worker_pool();
  int parts = std::clamp(threads, 1, pool.workers() + 1);
  // Parts of whole cache lines (8 words), like the kernel's split.
  int64_t per_part = ((words_ + parts - 1) / parts + 7) / 8 * 8;
  pool.run(parts, [&](int p) {
    int64_t begin = std::min(words_, p * per_part);
    int64_t end = p == parts - 1 ? words_ : std::min(words_, begin + per_part);
    step_pattern(grad_.get() + begin, param_.get() + begin, v_.get() + begin, end - begin);
  });
}

std::pair<uint64_t, uint64_t> StepPatternRoofline::sums() const {
  uint64_t param = 0, v = 0;
  for (int64_t i = 0; i < words_; ++i) {
    param += param_[i];
    v += v_[i];
  }
  return {param, v};
}

} // namespace mlx_fused_rmsprop
