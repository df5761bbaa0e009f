// Host construction of the 8-bit state's quantization maps (quant_map.h).
#include "quant_map.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace mlx_fused_rmsprop {

namespace {

constexpr int kExponentLevels = 7;

RMSpropQuantMap build_map(bool is_signed) {
  // The positive values, level by level (each level is above the last).
  std::vector<double> positive;
  for (int level = 0; level < kExponentLevels; ++level) {
    const int parts = is_signed ? (1 << level) : (1 << (level + 1));
    const double magnitude = std::pow(10.0, level - (kExponentLevels - 1));
    for (int k = 0; k < parts; ++k) {
      // Midpoint of the k-th of `parts` equal parts of [0.1, 1].
      double fraction = 0.1 + (k + 0.5) * 0.9 / parts;
      positive.push_back(magnitude * fraction);
    }
  }
  // Magnitudes from the zero code up: 0, the positive values, 1.
  std::vector<float> magnitudes{0.0f};
  for (double p : positive) {
    magnitudes.push_back(static_cast<float>(p));
  }
  magnitudes.push_back(1.0f);
  const unsigned int negatives = is_signed ? magnitudes.size() - 2 : 0u;

  RMSpropQuantMap map{};
  map.zero_code = negatives;
  map.negative_codes = negatives;
  // The negative values mirror the positive ones below 1 (there is no -1).
  for (unsigned int i = 0; i < negatives; ++i) {
    map.value[i] = -magnitudes[negatives - i];
  }
  for (size_t i = 0; i < magnitudes.size(); ++i) {
    map.value[negatives + i] = magnitudes[i];
  }
  if (negatives + magnitudes.size() != 256) {
    throw std::logic_error("[mlx_fused_rmsprop] a dynamic map must have 256 codes.");
  }
  for (int i = 0; i < 255; ++i) {
    if (!(map.value[i] < map.value[i + 1])) {
      throw std::logic_error("[mlx_fused_rmsprop] dynamic map values are not distinct.");
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  std::fill(std::begin(map.bound), std::end(map.bound), inf);
  for (size_t k = 0; k + 1 < magnitudes.size(); ++k) {
    double mid = (static_cast<double>(magnitudes[k]) + magnitudes[k + 1]) / 2.0;
    map.bound[k] = static_cast<float>(mid);
  }
  return map;
}

} // namespace

const RMSpropQuantMap& dynamic_map(bool is_signed) {
  static const RMSpropQuantMap unsigned_map = build_map(false);
  static const RMSpropQuantMap signed_map = build_map(true);
  return is_signed ? signed_map : unsigned_map;
}

} // namespace mlx_fused_rmsprop
