// RMSprop in one fused pass per parameter buffer, on Apple GPUs.
//
// Kernels (instantiated by name at the bottom):
//   rmsprop_contiguous_<dtype>       flat buffers; each thread updates
//                                    RMSPROP_BYTES_PER_THREAD bytes of each
//                                    input (4 float32 or 8 float16/bfloat16
//                                    elements), the last thread what is left
//   rmsprop_general_idx32_<dtype>    any strides (transposed, sliced, reversed,
//   rmsprop_general_idx64_<dtype>    broadcast); each thread updates a run of
//                                    RMSPROP_GENERAL_ELEMENTS_PER_THREAD
//                                    elements of one row (innermost dim);
//                                    row-contiguous outputs. idx32 does its
//                                    index math in 32 bits (Apple GPUs emulate
//                                    64-bit / and % in software), chosen by
//                                    the host whenever every index and offset
//                                    fits (needs_64bit_index, csrc/rmsprop.h)
// The math is kernels/rmsprop_math.h, shared with the CPU kernel.
//
// Buffers: 0 grad, 1 param, 2 v, 3 lr (0-d float32), 4 param_out, 5 v_out,
// 6 RMSpropDeviceScalars, 7 size; general only: 8 shape, 9-11 the strides of
// grad, param, v (elements, may be 0 or negative), 12 ndim.
//
// In place: param_out / v_out may be the very buffers of param / v (eval_gpu
// donates them on the flat layout). Every thread loads all of its elements
// before it stores any, and no thread touches another thread's elements, so
// the result does not depend on the order threads run in.
//
// Past 2^31 threads the grid is 2-D (csrc/rmsprop_grid.h) and the padding
// threads of its last row return at once.
//
// Loads are scalar on purpose: an mlx array may start at any element offset
// inside its buffer, so a float4 / half4 view of it could be misaligned.
//
// This file is also compiled as C++ by tests/metal_harness (a shim header maps
// the Metal qualifiers, attributes and types), so it stays inside what that
// shim expresses: `device` / `constant` pointers and references, `uint2`,
// `ulong`, `long`, `half`, `bfloat`, and metal::precise::{sqrt, divide}. The
// build also embeds it, with rmsprop_math.h inlined, in the extension as the
// source eval_gpu compiles at run time when no metallib was built: keep it
// ASCII (Metal reads that string as ASCII).
#include <metal_stdlib>

// Bit-equality with the CPU needs a*b + c to round twice: no FMA contraction,
// with the pragma the Metal Shading Language specification documents. It
// applies to everything after it, rmsprop_math.h included; the metallib build
// also passes -ffp-contract=off (CMakeLists.txt). Compiled as C++ by the
// harness, whose compilers do not know this pragma, the driver is built with
// -ffp-contract=off instead (tests/metal_harness/metal_shim.h).
#ifndef RMSPROP_METAL_SHIM
#pragma METAL fp contract(off)
#endif

#include "rmsprop_math.h"

// bfloat is a Metal 3.1 type: CMakeLists.txt compiles with -std=metal3.1.
#if __METAL_VERSION__ >= 310
typedef bfloat bfloat16_t;
#else
#error "kernels/rmsprop.metal needs Metal 3.1 (-std=metal3.1) for bfloat."
#endif

// Update the element at offsets in_g / in_w / in_v of the inputs (signed:
// strides may be negative) and store it at index `out` of the outputs. IdxT
// is the kernel's index type (int, long or ulong).
template <typename T, typename IdxT>
inline void rmsprop_update_element(
    device const T* grad,
    device const T* param,
    device const T* v,
    device T* param_out,
    device T* v_out,
    IdxT in_g,
    IdxT in_w,
    IdxT in_v,
    IdxT out,
    RMSpropCoefficients<float> k) {
  RMSpropResult<float> r = rmsprop_element<float>(
      static_cast<float>(grad[in_g]),
      static_cast<float>(param[in_w]),
      static_cast<float>(v[in_v]),
      k);
  param_out[out] = static_cast<T>(r.param);
  v_out[out] = static_cast<T>(r.v);
}

// Linear index of a thread in a (possibly 2-D) grid: row-major, as
// rmsprop_grid() lays the grid out.
inline ulong rmsprop_thread_index(uint2 gid, uint2 grid_dims) {
  return ulong(gid.y) * ulong(grid_dims.x) + ulong(gid.x);
}

template <typename T>
[[kernel]] void rmsprop_contiguous(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* lr [[buffer(3)]],
    device T* param_out [[buffer(4)]],
    device T* v_out [[buffer(5)]],
    constant RMSpropDeviceScalars& scalars [[buffer(6)]],
    constant ulong& size [[buffer(7)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  constexpr int N = RMSPROP_BYTES_PER_THREAD / sizeof(T);
  ulong start = rmsprop_thread_index(gid, grid_dims) * N;
  if (start >= size) {
    return; // padding thread of a 2-D grid
  }
  RMSpropCoefficients<float> k = {
      lr[0], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
  if (size - start >= ulong(N)) {
    // Full chunk: N consecutive elements, all loaded before any is stored.
    T g[N], w[N], s[N];
    for (int i = 0; i < N; ++i) {
      g[i] = grad[start + i];
      w[i] = param[start + i];
      s[i] = v[start + i];
    }
    for (int i = 0; i < N; ++i) {
      RMSpropResult<float> r = rmsprop_element<float>(
          static_cast<float>(g[i]),
          static_cast<float>(w[i]),
          static_cast<float>(s[i]),
          k);
      w[i] = static_cast<T>(r.param);
      s[i] = static_cast<T>(r.v);
    }
    for (int i = 0; i < N; ++i) {
      param_out[start + i] = w[i];
      v_out[start + i] = s[i];
    }
  } else {
    // Tail: the last thread covers the remaining size - start < N elements,
    // each loaded before it is stored.
    for (ulong i = start; i < size; ++i) {
      rmsprop_update_element<T, ulong>(
          grad, param, v, param_out, v_out, i, i, i, i, k);
    }
  }
}

template <typename T, typename IdxT>
[[kernel]] void rmsprop_general(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* lr [[buffer(3)]],
    device T* param_out [[buffer(4)]],
    device T* v_out [[buffer(5)]],
    constant RMSpropDeviceScalars& scalars [[buffer(6)]],
    constant ulong& size [[buffer(7)]],
    constant int* shape [[buffer(8)]],
    constant long* grad_strides [[buffer(9)]],
    constant long* param_strides [[buffer(10)]],
    constant long* v_strides [[buffer(11)]],
    constant int& ndim [[buffer(12)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  // Thread t updates run (t % runs) of row (t / runs): elements
  // [first, first + N) of the innermost dimension, clipped to the row.
  const IdxT N = RMSPROP_GENERAL_ELEMENTS_PER_THREAD;
  const int last = ndim - 1;
  const IdxT inner = IdxT(shape[last]);
  const IdxT runs = (inner + N - 1) / N;
  const IdxT t = IdxT(rmsprop_thread_index(gid, grid_dims));
  const IdxT row = t / runs;
  if (ulong(row) * ulong(inner) >= size) {
    return; // padding thread of a 2-D grid
  }
  const IdxT first = (t - row * runs) * N;
  // Offsets of (row, first) in each input: one division per outer dim.
  IdxT g_off = first * IdxT(grad_strides[last]);
  IdxT w_off = first * IdxT(param_strides[last]);
  IdxT v_off = first * IdxT(v_strides[last]);
  IdxT rest = row;
  for (int d = last - 1; d >= 0; --d) {
    const IdxT extent = IdxT(shape[d]);
    const IdxT coord = rest % extent;
    rest /= extent;
    g_off += coord * IdxT(grad_strides[d]);
    w_off += coord * IdxT(param_strides[d]);
    v_off += coord * IdxT(v_strides[d]);
  }
  RMSpropCoefficients<float> k = {
      lr[0], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
  const IdxT count = inner - first < N ? inner - first : N;
  const IdxT out = row * inner + first;
  for (IdxT i = 0; i < count; ++i) {
    rmsprop_update_element<T, IdxT>(
        grad, param, v, param_out, v_out, g_off, w_off, v_off, out + i, k);
    g_off += IdxT(grad_strides[last]);
    w_off += IdxT(param_strides[last]);
    v_off += IdxT(v_strides[last]);
  }
}

// RMSPROP_KERNEL(host, func, template arguments...) gives func<arguments>
// the host name `host` (the explicit-instantiation idiom of MLX's own
// kernels; the arguments come last, as __VA_ARGS__, because the comma between
// them would split a macro argument). The parameter is deliberately not
// called `kernel`: it would also replace the attribute [[kernel]] in the
// expansion. The C++ harness defines this macro first to register every
// instantiation by the same name.
#ifndef RMSPROP_KERNEL
#define RMSPROP_KERNEL(host, func, ...)                        \
  template [[host_name(host)]] [[kernel]] decltype(func<__VA_ARGS__>) \
      func<__VA_ARGS__>;
#endif

#define RMSPROP_INSTANTIATE(dtype_name, type)                                \
  RMSPROP_KERNEL("rmsprop_contiguous_" #dtype_name, rmsprop_contiguous, type) \
  RMSPROP_KERNEL(                                                            \
      "rmsprop_general_idx32_" #dtype_name, rmsprop_general, type, int)      \
  RMSPROP_KERNEL(                                                            \
      "rmsprop_general_idx64_" #dtype_name, rmsprop_general, type, long)

RMSPROP_INSTANTIATE(float32, float)
RMSPROP_INSTANTIATE(float16, half)
RMSPROP_INSTANTIATE(bfloat16, bfloat16_t)
