// The step-pattern roofline (roofline.h): 64-bit words, so the same code is
// the limit of every dtype (bytes are bytes) with no conversion cost.
#include "roofline.h"

#include <algorithm>
#include <stdexcept>

#include "cpu/parallel.h"

namespace mlx_fused_rmsprop {

namespace {

constexpr uint64_t kGradWord = 0x0101010101010101;
constexpr int64_t kUnitsPerBlock = 256 / 8; // an 8-bit state's block of 256 elements

template <class T>
std::unique_ptr<T[]> filled(int64_t count, T value) {
  std::unique_ptr<T[]> out(new T[count]);
  std::fill_n(out.get(), count, value); // touches every page
  return out;
}

} // namespace

StepPatternRoofline::StepPatternRoofline(int64_t bytes_per_array)
    : units_(std::max<int64_t>(1, (bytes_per_array + 7) / 8)),
      param_words_(1),
      state_words_(1),
      scales_(0),
      grad_(filled(units_, kGradWord)),
      param_(filled(units_, uint64_t{2})),
      v_(filled(units_, uint64_t{3})) {}

StepPatternRoofline::StepPatternRoofline(
    int64_t elements,
    int param_bytes,
    int state_bytes,
    bool block_scales)
    : units_(std::max<int64_t>(1, (elements + 7) / 8)),
      param_words_(param_bytes),
      state_words_(state_bytes),
      scales_(block_scales ? (units_ + kUnitsPerBlock - 1) / kUnitsPerBlock : 0) {
  if (elements < 0 || param_bytes < 1 || param_bytes > 8 || state_bytes < 1 ||
      state_bytes > 8) {
    throw std::invalid_argument(
        "StepPatternRoofline: elements must be >= 0 and param_bytes, state_bytes in 1..8");
  }
  grad_ = filled(units_ * param_words_, kGradWord);
  param_ = filled(units_ * param_words_, uint64_t{2});
  v_ = filled(units_ * state_words_, uint64_t{3});
  scale_ = filled(std::max<int64_t>(scales_, 1), uint32_t{5});
}

int64_t StepPatternRoofline::bytes_moved() const {
  return units_ * 8 * (3 * param_words_ + 2 * state_words_) + scales_ * 4 * 2;
}

namespace {

// Reads every word of g, w and v, writes w and v: the plain step's traffic
// (arrays of one width). Pass k leaves w = 2 ^ (k odd ? g : 0) and
// v = 3 + k * g in every word.
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

// The same per block of `units` units for arrays of different widths, plus
// the block's scale when there is one: what a block-wise (8-bit) step reads
// and writes, in its order.
void block_pattern(
    const uint64_t* __restrict g,
    uint64_t* __restrict w,
    uint64_t* __restrict v,
    uint32_t* __restrict scale,
    int64_t param_words,
    int64_t state_words) {
  for (int64_t i = 0; i < param_words; ++i) {
    w[i] ^= g[i];
  }
  for (int64_t i = 0; i < state_words; ++i) {
    v[i] += kGradWord;
  }
  if (scale != nullptr) {
    *scale += 1;
  }
}

} // namespace

void StepPatternRoofline::run(int threads) {
  auto& pool = worker_pool();
  int parts = std::clamp(threads, 1, pool.workers() + 1);
  if (param_words_ == state_words_ && scales_ == 0) {
    int64_t words = units_ * param_words_;
    // Parts of whole cache lines (8 words), like the kernel's split.
    int64_t per_part = ((words + parts - 1) / parts + 7) / 8 * 8;
    pool.run(parts, [&](int p) {
      int64_t begin = std::min(words, p * per_part);
      int64_t end = p == parts - 1 ? words : std::min(words, begin + per_part);
      step_pattern(grad_.get() + begin, param_.get() + begin, v_.get() + begin, end - begin);
    });
    return;
  }
  // Parts of whole blocks, like the quantized kernel's split.
  int64_t blocks = (units_ + kUnitsPerBlock - 1) / kUnitsPerBlock;
  int64_t per_part = (blocks + parts - 1) / parts;
  pool.run(parts, [&](int p) {
    int64_t first = std::min(blocks, p * per_part);
    int64_t last = p == parts - 1 ? blocks : std::min(blocks, first + per_part);
    for (int64_t b = first; b < last; ++b) {
      int64_t unit = b * kUnitsPerBlock;
      int64_t units = std::min(kUnitsPerBlock, units_ - unit);
      block_pattern(
          grad_.get() + unit * param_words_,
          param_.get() + unit * param_words_,
          v_.get() + unit * state_words_,
          scales_ ? scale_.get() + b : nullptr,
          units * param_words_,
          units * state_words_);
    }
  });
}

std::pair<uint64_t, uint64_t> StepPatternRoofline::sums() const {
  uint64_t param = 0, v = 0;
  for (int64_t i = 0; i < units_ * param_words_; ++i) {
    param += param_[i];
  }
  for (int64_t i = 0; i < units_ * state_words_; ++i) {
    v += v_[i];
  }
  return {param, v};
}

uint64_t StepPatternRoofline::scale_sum() const {
  uint64_t sum = 0;
  for (int64_t b = 0; b < scales_; ++b) {
    sum += scale_[b];
  }
  return sum;
}

} // namespace mlx_fused_rmsprop
