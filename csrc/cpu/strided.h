// The strided walk: any layout of the arrays of one update (transposed,
// sliced, reversed, broadcast), as their joint collapsed layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../rmsprop.h"
#include "isa.h"

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

// The offsets of one element in each of N arrays of `layout`, moving in
// row-major order: start(i) places it on element i (one division per
// dimension), next() moves to the following element (an odometer).
template <size_t N>
class LayoutCursor {
 public:
  explicit LayoutCursor(const CollapsedLayout& layout)
      : layout_(layout), pos_(layout.shape.size(), 0) {}

  void start(int64_t element) {
    const int ndim = static_cast<int>(layout_.shape.size());
    int64_t rest = element;
    for (size_t a = 0; a < N; ++a) {
      at[a] = 0;
    }
    for (int d = ndim - 1; d >= 0; --d) {
      pos_[d] = rest % layout_.shape[d];
      rest /= layout_.shape[d];
      for (size_t a = 0; a < N; ++a) {
        at[a] += pos_[d] * layout_.strides[a][d];
      }
    }
  }

  RMSPROP_ALWAYS_INLINE void next() {
    for (int d = static_cast<int>(layout_.shape.size()) - 1; d >= 0; --d) {
      for (size_t a = 0; a < N; ++a) {
        at[a] += layout_.strides[a][d];
      }
      if (++pos_[d] < layout_.shape[d]) {
        return;
      }
      for (size_t a = 0; a < N; ++a) {
        at[a] -= layout_.strides[a][d] * layout_.shape[d];
      }
      pos_[d] = 0;
    }
  }

  int64_t at[N] = {}; // the element's offset in each array

 private:
  const CollapsedLayout& layout_;
  std::vector<int64_t> pos_;
};

} // namespace mlx_fused_rmsprop
