// The quantization maps of the 8-bit state (kernels/rmsprop_math.h,
// RMSpropQuantMap), built once on the host and read by both backends.
#pragma once

#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

/**
 * The dynamic ("tree") quantization map of Dettmers et al. with 7 decimal
 * exponent levels, written from the published description: level i (0..6)
 * holds the midpoints of n equal parts of [0.1, 1] scaled by 10^(i - 6),
 * with n = 2^i for the signed map (then also their negatives) and 2^(i + 1)
 * for the unsigned one; plus 0 and 1. Values are computed in double and
 * rounded once to float32; 256 distinct sorted values either way. The
 * unsigned map's smallest positive value is 10^-6 * 0.325 = 3.25e-7.
 * bound[] holds the float32 midpoints of consecutive magnitudes from the
 * zero code up, computed in double from the float32 values.
 */
const RMSpropQuantMap& dynamic_map(bool is_signed);

/** The map a state entry uses: unsigned for v (never negative), signed for
 * mean and momentum_buffer. */
inline const RMSpropQuantMap& state_map(bool entry_is_v) {
  return dynamic_map(!entry_is_v);
}

} // namespace mlx_fused_rmsprop
