// The strided walk: any layout of the arrays of one update (transposed,
// sliced, reversed, broadcast), as their joint collapsed layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../rmsprop.h"

namespace mlx_fused_rmsprop {

// Calls fn(at, step, n, out) for every row (innermost dimension) of `layout`
// in row-major logical order: at[a] is the offset of the row's first element
// in array a, step[a] that array's innermost stride, n the row's length and
// out the row-major index of its first element. N = the number of arrays.
template <size_t N, class Fn>
void walk_rows(const CollapsedLayout& layout, const Fn& fn) {
  const auto& shape = layout.shape;
  const int ndim = static_cast<int>(shape.size());
  const int64_t inner = shape[ndim - 1];
  int64_t outer = 1;
  for (int d = 0; d < ndim - 1; ++d) {
    outer *= shape[d];
  }
  int64_t at[N] = {};
  int64_t step[N];
  for (size_t a = 0; a < N; ++a) {
    step[a] = layout.strides[a][ndim - 1];
  }
  std::vector<int64_t> pos(ndim, 0);
  int64_t out = 0;
  for (int64_t row = 0; row < outer; ++row) {
    fn(at, step, inner, out);
    out += inner;
    // Advance the outer position like an odometer.
    for (int d = ndim - 2; d >= 0; --d) {
      for (size_t a = 0; a < N; ++a) {
        at[a] += layout.strides[a][d];
      }
      if (++pos[d] < shape[d]) {
        break;
      }
      for (size_t a = 0; a < N; ++a) {
        at[a] -= layout.strides[a][d] * shape[d];
      }
      pos[d] = 0;
    }
  }
}

} // namespace mlx_fused_rmsprop
