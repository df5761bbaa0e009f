// RMSprop in one fused pass per parameter buffer, on Apple GPUs.
//
// Kernels (instantiated by name at the bottom):
//   rmsprop_contiguous_<dtype>       the plain update on flat buffers; each
//                                    thread updates RMSPROP_BYTES_PER_THREAD
//                                    bytes of each input (4 float32 or 8
//                                    float16/bfloat16 elements), the last
//                                    thread what is left
//   rmsprop_general_idx32_<dtype>    any strides (transposed, sliced, reversed,
//   rmsprop_general_idx64_<dtype>    broadcast); each thread updates a run of
//                                    RMSPROP_GENERAL_ELEMENTS_PER_THREAD
//                                    elements of one row (innermost dim);
//                                    row-contiguous outputs. idx32 does its
//                                    index math in 32 bits (Apple GPUs emulate
//                                    64-bit / and % in software), chosen by
//                                    the host whenever every index and offset
//                                    fits (needs_64bit_index, csrc/rmsprop.h)
//   rmsprop_variant_<kind>_<param dtype>_<state dtype>
//                                    the same three kinds for the variants
//                                    (momentum, centered, ...), with a state
//                                    dtype that may be float32 beside half
//                                    parameters
// The math is kernels/rmsprop_math.h, shared with the CPU kernel.
//
// Each group of kernels below lists its buffers.
//
// In place: each output may be the very buffer of its input (eval_gpu
// donates them on the flat layout). A thread loads every element it updates
// before it stores it, and no thread touches another thread's elements, so
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

// Linear index of a thread in a (possibly 2-D) grid: row-major, as
// rmsprop_grid() lays the grid out.
inline ulong rmsprop_thread_index(uint2 gid, uint2 grid_dims) {
  return ulong(gid.y) * ulong(grid_dims.x) + ulong(gid.x);
}

// ---- The general kernels' walk, shared by the plain and variant ones.
//
// Thread t updates run (t % runs) of row (t / runs): elements [first, first
// + count) of the innermost dimension, count <= N. RMSpropRun holds, for each
// of the K walked arrays, the offset of the run's first element (signed:
// strides may be negative) and its innermost stride; `out` is the row-major
// index of that element in the (row-contiguous) outputs. The strides come as
// one buffer, array a's at [a * ndim, (a + 1) * ndim).
template <typename IdxT, int K>
struct RMSpropRun {
  IdxT offset[K];
  IdxT step[K];
  IdxT out;
  IdxT count; // 0: a padding thread of a 2-D grid
};

template <typename IdxT, int K>
inline RMSpropRun<IdxT, K> rmsprop_general_run(
    ulong thread_index,
    ulong size,
    constant int* shape,
    constant long* strides,
    int ndim) {
  RMSpropRun<IdxT, K> run;
  const IdxT N = RMSPROP_GENERAL_ELEMENTS_PER_THREAD;
  const int last = ndim - 1;
  const IdxT inner = IdxT(shape[last]);
  const IdxT runs = (inner + N - 1) / N;
  const IdxT t = IdxT(thread_index);
  const IdxT row = t / runs;
  run.count = 0;
  if (ulong(row) * ulong(inner) >= size) {
    return run; // padding thread of a 2-D grid
  }
  const IdxT first = (t - row * runs) * N;
  for (int a = 0; a < K; ++a) {
    run.step[a] = IdxT(strides[a * ndim + last]);
    run.offset[a] = first * run.step[a];
  }
  // One division per outer dimension, once per run.
  IdxT rest = row;
  for (int d = last - 1; d >= 0; --d) {
    const IdxT extent = IdxT(shape[d]);
    const IdxT coord = rest % extent;
    rest /= extent;
    for (int a = 0; a < K; ++a) {
      run.offset[a] += coord * IdxT(strides[a * ndim + d]);
    }
  }
  run.count = inner - first < N ? inner - first : N;
  run.out = row * inner + first;
  return run;
}

// ---- The plain update (mlx.optimizers.RMSprop's math).
//
// Buffers: 0 grad, 1 param, 2 v, 3 lr (0-d float32), 4 param_out, 5 v_out,
// 6 RMSpropDeviceScalars, 7 size; general only: 8 shape, 9 the strides of
// grad, param and v (elements, may be 0 or negative), 10 ndim.

// Update the element at offsets in_g / in_w / in_v of the inputs and store it
// at index `out` of the outputs. IdxT is the kernel's index type.
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
    constant long* strides [[buffer(9)]],
    constant int& ndim [[buffer(10)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  RMSpropRun<IdxT, 3> run = rmsprop_general_run<IdxT, 3>(
      rmsprop_thread_index(gid, grid_dims), size, shape, strides, ndim);
  RMSpropCoefficients<float> k = {
      lr[0], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
  for (IdxT i = 0; i < run.count; ++i) {
    rmsprop_update_element<T, IdxT>(
        grad, param, v, param_out, v_out, run.offset[0] + i * run.step[0],
        run.offset[1] + i * run.step[1], run.offset[2] + i * run.step[2],
        run.out + i, k);
  }
}

// ---- The variants (momentum, Nesterov, centered, weight decay, eps
// placement, bias correction, maximize: rmsprop_variant_element). The
// parameter's type T and the state's type S may differ (float32 state for
// half parameters). The options are uniform across the grid: no divergence.
//
// Buffers: 0 grad, 1 param, 2 v, 3 mean, 4 momentum buffer, 5 lr and 6 bias
// correction (0-d float32), 7 param_out, 8 v_out, 9 mean_out, 10
// buffer_out, 11 RMSpropVariantConstants<float>, 12 size; general only: 13
// shape, 14 the strides of grad, param, v, mean and buffer, 15 ndim. State
// the options do not keep (mean, buffer) is never read or written; eval_gpu
// binds v's buffers in its place.

template <typename T, typename S, typename IdxT>
inline void rmsprop_variant_update_element(
    device const T* grad,
    device const T* param,
    device const S* v,
    device const S* mean,
    device const S* buffer,
    device T* param_out,
    device S* v_out,
    device S* mean_out,
    device S* buffer_out,
    IdxT in_g,
    IdxT in_w,
    IdxT in_v,
    IdxT in_m,
    IdxT in_b,
    IdxT out,
    RMSpropVariantStep<float> k,
    unsigned int flags) {
  const bool centered = (flags & RMSPROP_OPTION_CENTERED) != 0u;
  const bool momentum = (flags & RMSPROP_OPTION_MOMENTUM) != 0u;
  float g = static_cast<float>(grad[in_g]);
  float w = static_cast<float>(param[in_w]);
  float s = static_cast<float>(v[in_v]);
  float m = centered ? static_cast<float>(mean[in_m]) : 0.0f;
  float b = momentum ? static_cast<float>(buffer[in_b]) : 0.0f;
  RMSpropVariantResult<float> r;
  if (centered && momentum) {
    r = rmsprop_variant_element<float, true, true>(g, w, s, m, b, k);
  } else if (centered) {
    r = rmsprop_variant_element<float, true, false>(g, w, s, m, b, k);
  } else if (momentum) {
    r = rmsprop_variant_element<float, false, true>(g, w, s, m, b, k);
  } else {
    r = rmsprop_variant_element<float, false, false>(g, w, s, m, b, k);
  }
  param_out[out] = static_cast<T>(r.param);
  v_out[out] = static_cast<S>(r.v);
  if (centered) {
    mean_out[out] = static_cast<S>(r.mean);
  }
  if (momentum) {
    buffer_out[out] = static_cast<S>(r.buffer);
  }
}

template <typename T, typename S>
[[kernel]] void rmsprop_variant_contiguous(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const S* v [[buffer(2)]],
    device const S* mean [[buffer(3)]],
    device const S* buffer [[buffer(4)]],
    device const float* lr [[buffer(5)]],
    device const float* bias_correction [[buffer(6)]],
    device T* param_out [[buffer(7)]],
    device S* v_out [[buffer(8)]],
    device S* mean_out [[buffer(9)]],
    device S* buffer_out [[buffer(10)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(11)]],
    constant ulong& size [[buffer(12)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  // RMSPROP_BYTES_PER_THREAD bytes of the parameter per thread; each element
  // is loaded before it is stored, and in place too (the outputs may be the
  // inputs' buffers) no thread touches another's elements.
  const ulong N = RMSPROP_BYTES_PER_THREAD / sizeof(T);
  const ulong start = rmsprop_thread_index(gid, grid_dims) * N;
  if (start >= size) {
    return; // padding thread of a 2-D grid
  }
  const ulong end = size - start < N ? size : start + N;
  RMSpropVariantStep<float> k =
      rmsprop_variant_step<float>(lr[0], bias_correction[0], constants);
  for (ulong i = start; i < end; ++i) {
    rmsprop_variant_update_element<T, S, ulong>(
        grad, param, v, mean, buffer, param_out, v_out, mean_out, buffer_out,
        i, i, i, i, i, i, k, constants.flags);
  }
}

template <typename T, typename S, typename IdxT>
[[kernel]] void rmsprop_variant_general(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const S* v [[buffer(2)]],
    device const S* mean [[buffer(3)]],
    device const S* buffer [[buffer(4)]],
    device const float* lr [[buffer(5)]],
    device const float* bias_correction [[buffer(6)]],
    device T* param_out [[buffer(7)]],
    device S* v_out [[buffer(8)]],
    device S* mean_out [[buffer(9)]],
    device S* buffer_out [[buffer(10)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(11)]],
    constant ulong& size [[buffer(12)]],
    constant int* shape [[buffer(13)]],
    constant long* strides [[buffer(14)]],
    constant int& ndim [[buffer(15)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  RMSpropRun<IdxT, 5> run = rmsprop_general_run<IdxT, 5>(
      rmsprop_thread_index(gid, grid_dims), size, shape, strides, ndim);
  RMSpropVariantStep<float> k =
      rmsprop_variant_step<float>(lr[0], bias_correction[0], constants);
  for (IdxT i = 0; i < run.count; ++i) {
    rmsprop_variant_update_element<T, S, IdxT>(
        grad, param, v, mean, buffer, param_out, v_out, mean_out, buffer_out,
        run.offset[0] + i * run.step[0], run.offset[1] + i * run.step[1],
        run.offset[2] + i * run.step[2], run.offset[3] + i * run.step[3],
        run.offset[4] + i * run.step[4], run.out + i, k, constants.flags);
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

// The variants, by parameter and state dtype.
#define RMSPROP_INSTANTIATE_VARIANT(names, type, state_type)              \
  RMSPROP_KERNEL(                                                         \
      "rmsprop_variant_contiguous_" #names,                               \
      rmsprop_variant_contiguous,                                         \
      type,                                                               \
      state_type)                                                         \
  RMSPROP_KERNEL(                                                         \
      "rmsprop_variant_general_idx32_" #names,                            \
      rmsprop_variant_general,                                            \
      type,                                                               \
      state_type,                                                         \
      int)                                                                \
  RMSPROP_KERNEL(                                                         \
      "rmsprop_variant_general_idx64_" #names,                            \
      rmsprop_variant_general,                                            \
      type,                                                               \
      state_type,                                                         \
      long)

RMSPROP_INSTANTIATE_VARIANT(float32_float32, float, float)
RMSPROP_INSTANTIATE_VARIANT(float16_float16, half, half)
RMSPROP_INSTANTIATE_VARIANT(float16_float32, half, float)
RMSPROP_INSTANTIATE_VARIANT(bfloat16_bfloat16, bfloat16_t, bfloat16_t)
RMSPROP_INSTANTIATE_VARIANT(bfloat16_float32, bfloat16_t, float)
