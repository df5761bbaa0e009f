// The tiles of the transposed walk: the weight gradient of every nn.Linear
// (x @ W.T) comes column-major while W and its state are row-major, so the
// walk transposes a kTileRows x kTileCols block of the gradient into a local
// buffer (reading whole cache lines of it), then updates each row of the
// block as a contiguous run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "isa.h"

namespace mlx_fused_rmsprop {

constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 64;

#if RMSPROP_HAVE_AVX2_F16C
// Transposes an 8x8 block of floats: dst[r * ds + c] = src[c * ss + r].
RMSPROP_TARGET_AVX2_F16C inline void transpose8x8(
    const float* src,
    int64_t ss,
    float* dst,
    int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ss), r1 = _mm256_loadu_ps(src + 1 * ss);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// tile[r * kTileCols + c] = grad(r0 + r, c0 + c) for r < nr, c < nc, where
// grad(r, c) = grad[c * rows + r] (column-major, `rows` rows).
template <class S, bool kWide>
RMSPROP_ALWAYS_INLINE void fill_transposed_tile(
    const S* grad,
    int64_t rows,
    int64_t r0,
    int64_t nr,
    int64_t c0,
    int64_t nc,
    S* tile) {
#if RMSPROP_HAVE_AVX2_F16C
  // Whole float32 tiles in the AVX2 build: 8x8 register transposes
  // (measured 1.5x faster than the element loop on cache-resident leaves).
  if constexpr (kWide && std::is_same_v<S, float>) {
    if (nr == kTileRows && nc == kTileCols) {
      for (int64_t c = 0; c < kTileCols; c += 8) {
        for (int64_t r = 0; r < kTileRows; r += 8) {
          transpose8x8(
              grad + (c0 + c) * rows + r0 + r, rows, tile + r * kTileCols + c,
              kTileCols);
        }
      }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < nc; ++c) {
    const S* column = grad + (c0 + c) * rows + r0;
    for (int64_t r = 0; r < nr; ++r) {
      tile[r * kTileCols + c] = column[r];
    }
  }
}

// Rows [row_begin, row_end) of the [rows, cols] matrix, tile by tile: each
// tile of the column-major grad is transposed into a local buffer, then
// run(grad_run, at, n) updates n consecutive elements of one row, from flat
// index `at` of the row-major arrays, with grad_run the row in the buffer.
template <class S, bool kWide, class Run>
RMSPROP_ALWAYS_INLINE void for_each_tile_run(
    const S* grad,
    int64_t rows,
    int64_t cols,
    int64_t row_begin,
    int64_t row_end,
    const Run& run) {
  alignas(64) S tile[kTileRows * kTileCols];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileRows) {
    int64_t nr = std::min(kTileRows, row_end - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += kTileCols) {
      int64_t nc = std::min(kTileCols, cols - c0);
      fill_transposed_tile<S, kWide>(grad, rows, r0, nr, c0, nc, tile);
      for (int64_t r = 0; r < nr; ++r) {
        run(tile + r * kTileCols, (r0 + r) * cols + c0, nc);
      }
    }
  }
}

} // namespace mlx_fused_rmsprop
