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
//                                    parameters; they also take the step's
//                                    guards (clip factor, skip flag) and
//                                    round 16-bit parameters stochastically
//                                    or with Kahan compensation
//   rmsprop_q8_<kind>_<dtype>        8-bit block-wise state (uint8 codes and
//                                    a float32 scale per block of 256), every
//                                    variant option, guard and rounding: one
//                                    SIMD-group per block, the block's new
//                                    scale by simd_max
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
// shim expresses: `device` / `constant` / `thread` pointers and references,
// `uint2`, `ulong`, `long`, `uchar`, `half`, `bfloat`, as_type<T>,
// metal::precise::{sqrt, divide}, metal::simd_max (every lane of the
// SIMD-group calling it together: the shim runs lanes as threads) and the
// attributes thread_position_in_grid, threads_per_grid and
// thread_index_in_simdgroup. The
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
// Buffers: 0 grad, 1 param, 2 v, 3 the step's packed scalars (float32,
// RMSPROP_STEP_*: only the learning rate is read), 4 param_out, 5 v_out, 6
// RMSpropDeviceScalars, 7 size; general only: 8 shape, 9 the strides of
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
    device const float* step [[buffer(3)]],
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
      step[RMSPROP_STEP_LR], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
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
    device const float* step [[buffer(3)]],
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
      step[RMSPROP_STEP_LR], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
  for (IdxT i = 0; i < run.count; ++i) {
    rmsprop_update_element<T, IdxT>(
        grad, param, v, param_out, v_out, run.offset[0] + i * run.step[0],
        run.offset[1] + i * run.step[1], run.offset[2] + i * run.step[2],
        run.out + i, k);
  }
}

// ---- What the variant and 8-bit kernels share: the step's guards and how a
// 16-bit parameter is rounded.

// The step skips (a non-finite gradient somewhere, skip_nonfinite): every
// output equals its input.
inline bool rmsprop_skips(device const float* step) {
  return step[RMSPROP_STEP_SKIP] != 0.0f;
}

// Elements [begin, end) of `in` into `out`, unless `out` is `in` (in place:
// already equal).
template <typename T>
inline void rmsprop_copy_range(
    device const T* in,
    device T* out,
    ulong begin,
    ulong end) {
  if (out == in) {
    return;
  }
  for (ulong i = begin; i < end; ++i) {
    out[i] = in[i];
  }
}

// How a leaf's parameter is rounded (RMSpropLeafConstants): the mode, and for
// stochastic rounding the leaf's key at this step and the index in the whole
// leaf of the array's element 0. The key words {seed, step} are read
// whatever the mode: without stochastic rounding eval_gpu binds the packed
// step scalars (at least two words) in their place.
struct RMSpropRounding {
  uint mode;
  uint key;
  ulong offset;
};

inline RMSpropRounding rmsprop_leaf_rounding(
    constant RMSpropLeafConstants& leaf,
    device const uint* seed_and_step) {
  RMSpropRounding r;
  r.mode = leaf.rounding;
  r.key = rmsprop_rounding_key(seed_and_step[0], seed_and_step[1], leaf.leaf);
  r.offset = (ulong(leaf.offset_hi) << 32) | ulong(leaf.offset_lo);
  return r;
}

// Stochastic rounding to a 16-bit type T (the float32 that holds the result).
template <typename T>
struct RMSpropHalfRounding;

template <>
struct RMSpropHalfRounding<half> {
  static float stochastic(float x, uint random) {
    return rmsprop_stochastic_float16(x, random);
  }
};

template <>
struct RMSpropHalfRounding<bfloat16_t> {
  static float stochastic(float x, uint random) {
    return rmsprop_stochastic_bfloat16(x, random);
  }
};

// Store the float32 result `updated` of the parameter w at param_out[out]:
// rounded to nearest; stochastically, with the random bits of the element
// at row-major `index` of this array (offset + index in the whole leaf);
// or Kahan-compensated, the compensation read at compensation[at_c] and
// written at compensation_out[out]. Float16 and bfloat16 parameters only:
// a float32 parameter is stored as computed (the specialization below).
template <typename T>
struct RMSpropParamStore {
  template <typename IdxT>
  static void store(
      float updated,
      float w,
      device const T* compensation,
      IdxT at_c,
      device T* param_out,
      device T* compensation_out,
      IdxT out,
      ulong index,
      RMSpropRounding r) {
    if (r.mode == RMSPROP_ROUND_STOCHASTIC) {
      const ulong at = r.offset + index;
      const uint random = rmsprop_random_bits(r.key, uint(at), uint(at >> 32));
      // Exact in T: the conversion keeps it.
      param_out[out] =
          static_cast<T>(RMSpropHalfRounding<T>::stochastic(updated, random));
    } else if (r.mode == RMSPROP_ROUND_KAHAN) {
      RMSpropKahan<float> kahan = rmsprop_kahan<float>(
          w, static_cast<float>(compensation[at_c]), updated);
      const T stored = static_cast<T>(kahan.target);
      param_out[out] = stored;
      compensation_out[out] = static_cast<T>(rmsprop_kahan_remainder<float>(
          w, static_cast<float>(stored), kahan.change));
    } else {
      param_out[out] = static_cast<T>(updated);
    }
  }
};

template <>
struct RMSpropParamStore<float> {
  template <typename IdxT>
  static void store(
      float updated,
      float,
      device const float*,
      IdxT,
      device float* param_out,
      device float*,
      IdxT out,
      ulong,
      RMSpropRounding) {
    param_out[out] = updated;
  }
};

// ---- The variants (momentum, Nesterov, centered, weight decay, eps
// placement, bias correction, maximize: rmsprop_variant_element), the
// step's guards (clip factor, skip flag) and the rounding of 16-bit
// parameters (stochastic, Kahan). The parameter's type T and the state's
// type S may differ (float32 state for half parameters). The options are
// uniform across the grid: no divergence.
//
// Buffers: 0 grad, 1 param, 2 v, 3 mean, 4 momentum buffer, 5 compensation
// (T), 6 the step's packed scalars (float32, RMSPROP_STEP_*), 7 the
// rounding key {seed, step} (uint32), 8 param_out, 9 v_out, 10 mean_out, 11
// buffer_out, 12 compensation_out, 13 RMSpropVariantConstants<float>, 14
// RMSpropLeafConstants, 15 size; general only: 16 shape, 17 the strides of
// grad, param, v, mean, buffer and compensation, 18 ndim. What the options
// do not keep is never read or written: eval_gpu binds v's buffers for
// mean and buffer, param's for the compensation, the packed scalars for
// the key (gpu_array_slots).

// Update the element at offsets at[] of grad, param, v, mean, buffer and
// compensation, and store it at index `out` of the outputs; `index` is its
// row-major index in the arrays.
template <typename T, typename S, typename IdxT>
inline void rmsprop_variant_update_element(
    device const T* grad,
    device const T* param,
    device const S* v,
    device const S* mean,
    device const S* buffer,
    device const T* compensation,
    device T* param_out,
    device S* v_out,
    device S* mean_out,
    device S* buffer_out,
    device T* compensation_out,
    thread const IdxT* at,
    IdxT out,
    ulong index,
    RMSpropVariantStep<float> k,
    unsigned int flags,
    RMSpropRounding rounding) {
  const bool centered = (flags & RMSPROP_OPTION_CENTERED) != 0u;
  const bool momentum = (flags & RMSPROP_OPTION_MOMENTUM) != 0u;
  float g = static_cast<float>(grad[at[0]]);
  float w = static_cast<float>(param[at[1]]);
  float s = static_cast<float>(v[at[2]]);
  float m = centered ? static_cast<float>(mean[at[3]]) : 0.0f;
  float b = momentum ? static_cast<float>(buffer[at[4]]) : 0.0f;
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
  RMSpropParamStore<T>::store(
      r.param, w, compensation, at[5], param_out, compensation_out, out, index,
      rounding);
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
    device const T* compensation [[buffer(5)]],
    device const float* step [[buffer(6)]],
    device const uint* rounding_key [[buffer(7)]],
    device T* param_out [[buffer(8)]],
    device S* v_out [[buffer(9)]],
    device S* mean_out [[buffer(10)]],
    device S* buffer_out [[buffer(11)]],
    device T* compensation_out [[buffer(12)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(13)]],
    constant RMSpropLeafConstants& leaf [[buffer(14)]],
    constant ulong& size [[buffer(15)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  // RMSPROP_BYTES_PER_THREAD bytes of the parameter per thread; each element
  // is loaded before it is stored, and in place too (the outputs may be the
  // inputs' buffers) no thread touches another's elements. The arrays are
  // flat and param row-contiguous whenever stochastic rounding reads the
  // elements' row-major index (choose_gpu_dispatch), so that is i.
  const ulong N = RMSPROP_BYTES_PER_THREAD / sizeof(T);
  const ulong start = rmsprop_thread_index(gid, grid_dims) * N;
  if (start >= size) {
    return; // padding thread of a 2-D grid
  }
  const ulong end = size - start < N ? size : start + N;
  if (rmsprop_skips(step)) {
    // (State the options do not keep is bound as v, the compensation as
    // param: copied twice, harmlessly.)
    rmsprop_copy_range<T>(param, param_out, start, end);
    rmsprop_copy_range<S>(v, v_out, start, end);
    rmsprop_copy_range<S>(mean, mean_out, start, end);
    rmsprop_copy_range<S>(buffer, buffer_out, start, end);
    rmsprop_copy_range<T>(compensation, compensation_out, start, end);
    return;
  }
  RMSpropVariantStep<float> k = rmsprop_variant_step<float>(
      step[RMSPROP_STEP_LR], step[RMSPROP_STEP_BIAS_CORRECTION],
      step[RMSPROP_STEP_CLIP], constants);
  const RMSpropRounding rounding = rmsprop_leaf_rounding(leaf, rounding_key);
  for (ulong i = start; i < end; ++i) {
    const ulong at[6] = {i, i, i, i, i, i};
    rmsprop_variant_update_element<T, S, ulong>(
        grad, param, v, mean, buffer, compensation, param_out, v_out, mean_out,
        buffer_out, compensation_out, at, i, i, k, constants.flags, rounding);
  }
}

template <typename T, typename S, typename IdxT>
[[kernel]] void rmsprop_variant_general(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const S* v [[buffer(2)]],
    device const S* mean [[buffer(3)]],
    device const S* buffer [[buffer(4)]],
    device const T* compensation [[buffer(5)]],
    device const float* step [[buffer(6)]],
    device const uint* rounding_key [[buffer(7)]],
    device T* param_out [[buffer(8)]],
    device S* v_out [[buffer(9)]],
    device S* mean_out [[buffer(10)]],
    device S* buffer_out [[buffer(11)]],
    device T* compensation_out [[buffer(12)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(13)]],
    constant RMSpropLeafConstants& leaf [[buffer(14)]],
    constant ulong& size [[buffer(15)]],
    constant int* shape [[buffer(16)]],
    constant long* strides [[buffer(17)]],
    constant int& ndim [[buffer(18)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  // The outputs are fresh row-major buffers (allocate_outputs), never the
  // inputs': a skipped step copies every element.
  RMSpropRun<IdxT, 6> run = rmsprop_general_run<IdxT, 6>(
      rmsprop_thread_index(gid, grid_dims), size, shape, strides, ndim);
  if (rmsprop_skips(step)) {
    for (IdxT i = 0; i < run.count; ++i) {
      const IdxT out = run.out + i;
      param_out[out] = param[run.offset[1] + i * run.step[1]];
      v_out[out] = v[run.offset[2] + i * run.step[2]];
      mean_out[out] = mean[run.offset[3] + i * run.step[3]];
      buffer_out[out] = buffer[run.offset[4] + i * run.step[4]];
      compensation_out[out] = compensation[run.offset[5] + i * run.step[5]];
    }
    return;
  }
  RMSpropVariantStep<float> k = rmsprop_variant_step<float>(
      step[RMSPROP_STEP_LR], step[RMSPROP_STEP_BIAS_CORRECTION],
      step[RMSPROP_STEP_CLIP], constants);
  const RMSpropRounding rounding = rmsprop_leaf_rounding(leaf, rounding_key);
  for (IdxT i = 0; i < run.count; ++i) {
    IdxT at[6];
    for (int a = 0; a < 6; ++a) {
      at[a] = run.offset[a] + i * run.step[a];
    }
    rmsprop_variant_update_element<T, S, IdxT>(
        grad, param, v, mean, buffer, compensation, param_out, v_out, mean_out,
        buffer_out, compensation_out, at, run.out + i, ulong(run.out + i), k,
        constants.flags, rounding);
  }
}

// ---- 8-bit block-wise state (rmsprop_math.h): one SIMD-group per block of
// RMSPROP_BLOCK elements in the leaf's row-major order (the last block may
// be partial), RMSPROP_Q8_ELEMENTS_PER_LANE per lane: lane l takes elements
// l, l + RMSPROP_SIMD_WIDTH, ... of the block (coalesced). Each lane
// dequantizes every state entry of its elements (v: the unsigned map; mean
// and momentum buffer: the signed one), updates them with every variant
// option, stores the parameter from the fresh float32 state (rounded as the
// leaf says), then per entry the block's scale is the simd_max of the lanes'
// largest rmsprop_scale_key (compared as bits: the keys are never negative
// or NaN), and each lane requantizes its elements; lane 0 writes the scale.
// No threadgroup memory, no barrier.
//
// In place (eval_gpu donates param, the codes, the compensation and the
// scales where their layouts allow): a lane reads only its own elements
// before writing them, and every lane reads the block's scales before the
// first simd_max, which lane 0 must pass before it writes one.
//
// Buffers: 0 grad, 1 param, 2 v codes, 3 mean codes, 4 momentum buffer
// codes (uint8), 5 compensation (T), 6 v scales, 7 mean scales, 8 buffer
// scales (float32, one per block), 9 the step's packed scalars, 10 the
// rounding key, 11 param_out, 12 v codes_out, 13 mean codes_out, 14 buffer
// codes_out, 15 compensation_out, 16 v scales_out, 17 mean scales_out, 18
// buffer scales_out, 19 the unsigned map, 20 the signed map
// (RMSpropQuantMap), 21 RMSpropVariantConstants<float>, 22
// RMSpropLeafConstants, 23 size; general only: 24 shape, 25 the strides of
// grad, param, the three codes and the compensation, 26 ndim, 27
// RMSpropQuantizedLayout. Entries the options do not keep are bound as v's,
// the compensation as param (gpu_array_slots); never read or written.
//
// Codes' and scales' are row-major; param' and the compensation' too in
// the contiguous kernel (every array is row-contiguous there), and in the
// general one at param's offsets when param is dense (outputs_like_param).

// Where the elements of the contiguous kernel sit: every array row-major.
template <typename IdxT>
struct RMSpropQ8Flat {
  void locate(IdxT index, thread IdxT* at, thread IdxT& out) const {
    for (int a = 0; a < 6; ++a) {
      at[a] = index;
    }
    out = index;
  }
};

// Where the elements of the general kernel sit: the offsets in each walked
// array (grad, param, the codes, the compensation) of the element at
// row-major `index` through the collapsed layout (a division per dimension),
// and where param' and the compensation' take it.
template <typename IdxT>
struct RMSpropQ8General {
  constant int* shape;
  constant long* strides;
  int ndim;
  bool like_param;

  void locate(IdxT index, thread IdxT* at, thread IdxT& out) const {
    for (int a = 0; a < 6; ++a) {
      at[a] = 0;
    }
    IdxT rest = index;
    for (int d = ndim - 1; d >= 0; --d) {
      const IdxT extent = IdxT(shape[d]);
      const IdxT coord = rest % extent;
      rest /= extent;
      for (int a = 0; a < 6; ++a) {
        at[a] += coord * IdxT(strides[a * ndim + d]);
      }
    }
    out = like_param ? at[1] : index;
  }
};

// In place the output is its input, at the same element: nothing to copy.
template <typename T, typename IdxT>
inline void rmsprop_copy_element(
    device const T* in,
    device T* out,
    IdxT from,
    IdxT to) {
  if (out != in) {
    out[to] = in[from];
  }
}

// The new codes and scale of one entry from the lane's new values x[j]
// (element lane + RMSPROP_SIMD_WIDTH * j of the block, those past n are 0).
// Every lane of the SIMD-group calls this together (simd_max).
template <typename IdxT>
inline void rmsprop_q8_requantize(
    thread const float* x,
    IdxT first,
    IdxT n,
    uint lane,
    ulong block,
    device uchar* codes_out,
    device float* scale_out,
    constant RMSpropQuantMap* map) {
  uint max_key = 0u;
  for (int j = 0; j < RMSPROP_Q8_ELEMENTS_PER_LANE; ++j) {
    const uint key = RMSPROP_FLOAT_BITS(rmsprop_scale_key(x[j]));
    max_key = key > max_key ? key : max_key;
  }
  const float scale =
      rmsprop_block_scale(RMSPROP_BITS_FLOAT(metal::simd_max(max_key)));
  const float inverse = rmsprop_inverse_scale(scale);
  for (int j = 0; j < RMSPROP_Q8_ELEMENTS_PER_LANE; ++j) {
    const IdxT i = IdxT(lane) + IdxT(j * RMSPROP_SIMD_WIDTH);
    if (i < n) {
      codes_out[first + i] = uchar(rmsprop_quantize(x[j], scale, inverse, map));
    }
  }
  if (lane == 0u) {
    scale_out[block] = scale;
  }
}

// One block (elements [first, first + n) of the leaf, row-major; n <=
// RMSPROP_BLOCK) by the lane `lane` of its SIMD-group. scale_at[e] is where
// entry e's scale sits in its scales array.
template <typename T, typename IdxT, typename Layout>
inline void rmsprop_q8_block(
    device const T* grad,
    device const T* param,
    device const uchar* v_codes,
    device const uchar* mean_codes,
    device const uchar* buffer_codes,
    device const T* compensation,
    device const float* v_scale,
    device const float* mean_scale,
    device const float* buffer_scale,
    device const float* step,
    device const uint* rounding_key,
    device T* param_out,
    device uchar* v_codes_out,
    device uchar* mean_codes_out,
    device uchar* buffer_codes_out,
    device T* compensation_out,
    device float* v_scale_out,
    device float* mean_scale_out,
    device float* buffer_scale_out,
    constant RMSpropQuantMap& unsigned_map,
    constant RMSpropQuantMap& signed_map,
    constant RMSpropVariantConstants<float>& constants,
    constant RMSpropLeafConstants& leaf,
    Layout layout,
    thread const long* scale_at,
    ulong block,
    IdxT first,
    IdxT n,
    uint lane) {
  const bool centered = (constants.flags & RMSPROP_OPTION_CENTERED) != 0u;
  const bool momentum = (constants.flags & RMSPROP_OPTION_MOMENTUM) != 0u;
  IdxT at[6];
  IdxT out;
  if (rmsprop_skips(step)) {
    // Every output equals its input. (Entries the options do not keep are
    // bound as v, the compensation as param: copied twice, harmlessly.)
    for (int j = 0; j < RMSPROP_Q8_ELEMENTS_PER_LANE; ++j) {
      const IdxT i = IdxT(lane) + IdxT(j * RMSPROP_SIMD_WIDTH);
      if (i < n) {
        layout.locate(first + i, at, out);
        rmsprop_copy_element<T, IdxT>(param, param_out, at[1], out);
        rmsprop_copy_element<uchar, IdxT>(v_codes, v_codes_out, at[2], first + i);
        rmsprop_copy_element<uchar, IdxT>(
            mean_codes, mean_codes_out, at[3], first + i);
        rmsprop_copy_element<uchar, IdxT>(
            buffer_codes, buffer_codes_out, at[4], first + i);
        rmsprop_copy_element<T, IdxT>(compensation, compensation_out, at[5], out);
      }
    }
    if (lane == 0u) {
      rmsprop_copy_element<float, long>(v_scale, v_scale_out, scale_at[0], long(block));
      rmsprop_copy_element<float, long>(
          mean_scale, mean_scale_out, scale_at[1], long(block));
      rmsprop_copy_element<float, long>(
          buffer_scale, buffer_scale_out, scale_at[2], long(block));
    }
    return;
  }
  RMSpropVariantStep<float> k = rmsprop_variant_step<float>(
      step[RMSPROP_STEP_LR], step[RMSPROP_STEP_BIAS_CORRECTION],
      step[RMSPROP_STEP_CLIP], constants);
  const RMSpropRounding rounding = rmsprop_leaf_rounding(leaf, rounding_key);
  // Every lane reads the block's scales before any lane writes one.
  const float scale[3] = {
      v_scale[scale_at[0]], mean_scale[scale_at[1]], buffer_scale[scale_at[2]]};
  // The new state of the lane's elements: v, mean, buffer (0 past n).
  float s[3][RMSPROP_Q8_ELEMENTS_PER_LANE];
  for (int j = 0; j < RMSPROP_Q8_ELEMENTS_PER_LANE; ++j) {
    const IdxT i = IdxT(lane) + IdxT(j * RMSPROP_SIMD_WIDTH);
    s[0][j] = 0.0f;
    s[1][j] = 0.0f;
    s[2][j] = 0.0f;
    if (i < n) {
      layout.locate(first + i, at, out);
      const float g = static_cast<float>(grad[at[0]]);
      const float w = static_cast<float>(param[at[1]]);
      const float sv = rmsprop_dequantize(v_codes[at[2]], scale[0], &unsigned_map);
      const float sm = centered
          ? rmsprop_dequantize(mean_codes[at[3]], scale[1], &signed_map)
          : 0.0f;
      const float sb = momentum
          ? rmsprop_dequantize(buffer_codes[at[4]], scale[2], &signed_map)
          : 0.0f;
      RMSpropVariantResult<float> r;
      if (centered && momentum) {
        r = rmsprop_variant_element<float, true, true>(g, w, sv, sm, sb, k);
      } else if (centered) {
        r = rmsprop_variant_element<float, true, false>(g, w, sv, sm, sb, k);
      } else if (momentum) {
        r = rmsprop_variant_element<float, false, true>(g, w, sv, sm, sb, k);
      } else {
        r = rmsprop_variant_element<float, false, false>(g, w, sv, sm, sb, k);
      }
      // The parameter from the fresh float32 state, not the requantized one.
      RMSpropParamStore<T>::store(
          r.param, w, compensation, at[5], param_out, compensation_out, out,
          ulong(first + i), rounding);
      s[0][j] = r.v;
      s[1][j] = r.mean;
      s[2][j] = r.buffer;
    }
  }
  rmsprop_q8_requantize<IdxT>(
      s[0], first, n, lane, block, v_codes_out, v_scale_out, &unsigned_map);
  if (centered) {
    rmsprop_q8_requantize<IdxT>(
        s[1], first, n, lane, block, mean_codes_out, mean_scale_out, &signed_map);
  }
  if (momentum) {
    rmsprop_q8_requantize<IdxT>(
        s[2], first, n, lane, block, buffer_codes_out, buffer_scale_out,
        &signed_map);
  }
}

template <typename T>
[[kernel]] void rmsprop_q8_contiguous(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const uchar* v_codes [[buffer(2)]],
    device const uchar* mean_codes [[buffer(3)]],
    device const uchar* buffer_codes [[buffer(4)]],
    device const T* compensation [[buffer(5)]],
    device const float* v_scale [[buffer(6)]],
    device const float* mean_scale [[buffer(7)]],
    device const float* buffer_scale [[buffer(8)]],
    device const float* step [[buffer(9)]],
    device const uint* rounding_key [[buffer(10)]],
    device T* param_out [[buffer(11)]],
    device uchar* v_codes_out [[buffer(12)]],
    device uchar* mean_codes_out [[buffer(13)]],
    device uchar* buffer_codes_out [[buffer(14)]],
    device T* compensation_out [[buffer(15)]],
    device float* v_scale_out [[buffer(16)]],
    device float* mean_scale_out [[buffer(17)]],
    device float* buffer_scale_out [[buffer(18)]],
    constant RMSpropQuantMap& unsigned_map [[buffer(19)]],
    constant RMSpropQuantMap& signed_map [[buffer(20)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(21)]],
    constant RMSpropLeafConstants& leaf [[buffer(22)]],
    constant ulong& size [[buffer(23)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  // Grid rows and threadgroups are whole SIMD-groups (rmsprop_q8_grid), so
  // the SIMD-group of a thread is its linear index / RMSPROP_SIMD_WIDTH, and
  // padding threads of a 2-D grid fill whole SIMD-groups.
  const ulong block = rmsprop_thread_index(gid, grid_dims) / RMSPROP_SIMD_WIDTH;
  const ulong first = block * RMSPROP_BLOCK;
  if (first >= size) {
    return; // a padding SIMD-group of a 2-D grid
  }
  const ulong n = size - first < RMSPROP_BLOCK ? size - first : RMSPROP_BLOCK;
  const long scale_at[3] = {long(block), long(block), long(block)};
  RMSpropQ8Flat<ulong> layout;
  rmsprop_q8_block<T, ulong, RMSpropQ8Flat<ulong>>(
      grad, param, v_codes, mean_codes, buffer_codes, compensation, v_scale,
      mean_scale, buffer_scale, step, rounding_key, param_out, v_codes_out,
      mean_codes_out, buffer_codes_out, compensation_out, v_scale_out,
      mean_scale_out, buffer_scale_out, unsigned_map, signed_map, constants,
      leaf, layout, scale_at, block, first, n, lane);
}

template <typename T, typename IdxT>
[[kernel]] void rmsprop_q8_general(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const uchar* v_codes [[buffer(2)]],
    device const uchar* mean_codes [[buffer(3)]],
    device const uchar* buffer_codes [[buffer(4)]],
    device const T* compensation [[buffer(5)]],
    device const float* v_scale [[buffer(6)]],
    device const float* mean_scale [[buffer(7)]],
    device const float* buffer_scale [[buffer(8)]],
    device const float* step [[buffer(9)]],
    device const uint* rounding_key [[buffer(10)]],
    device T* param_out [[buffer(11)]],
    device uchar* v_codes_out [[buffer(12)]],
    device uchar* mean_codes_out [[buffer(13)]],
    device uchar* buffer_codes_out [[buffer(14)]],
    device T* compensation_out [[buffer(15)]],
    device float* v_scale_out [[buffer(16)]],
    device float* mean_scale_out [[buffer(17)]],
    device float* buffer_scale_out [[buffer(18)]],
    constant RMSpropQuantMap& unsigned_map [[buffer(19)]],
    constant RMSpropQuantMap& signed_map [[buffer(20)]],
    constant RMSpropVariantConstants<float>& constants [[buffer(21)]],
    constant RMSpropLeafConstants& leaf [[buffer(22)]],
    constant ulong& size [[buffer(23)]],
    constant int* shape [[buffer(24)]],
    constant long* strides [[buffer(25)]],
    constant int& ndim [[buffer(26)]],
    constant RMSpropQuantizedLayout& quantized_layout [[buffer(27)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  // As rmsprop_q8_contiguous; the element indices in IdxT (the host picks
  // 32 bits whenever the element count and every offset fit), the scales'
  // offsets in 64 bits.
  const ulong block = rmsprop_thread_index(gid, grid_dims) / RMSPROP_SIMD_WIDTH;
  if (block * RMSPROP_BLOCK >= size) {
    return; // a padding SIMD-group of a 2-D grid
  }
  const IdxT first = IdxT(block * RMSPROP_BLOCK);
  const IdxT rest = IdxT(size) - first;
  const IdxT n = rest < RMSPROP_BLOCK ? rest : IdxT(RMSPROP_BLOCK);
  const long scale_at[3] = {
      long(block) * quantized_layout.scale_stride[0],
      long(block) * quantized_layout.scale_stride[1],
      long(block) * quantized_layout.scale_stride[2]};
  RMSpropQ8General<IdxT> layout;
  layout.shape = shape;
  layout.strides = strides;
  layout.ndim = ndim;
  layout.like_param = quantized_layout.outputs_like_param != 0u;
  rmsprop_q8_block<T, IdxT, RMSpropQ8General<IdxT>>(
      grad, param, v_codes, mean_codes, buffer_codes, compensation, v_scale,
      mean_scale, buffer_scale, step, rounding_key, param_out, v_codes_out,
      mean_codes_out, buffer_codes_out, compensation_out, v_scale_out,
      mean_scale_out, buffer_scale_out, unsigned_map, signed_map, constants,
      leaf, layout, scale_at, block, first, n, lane);
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

// The 8-bit state's kernels, by parameter dtype (the state is uint8 codes
// and float32 scales for every dtype).
#define RMSPROP_INSTANTIATE_Q8(dtype_name, type)                                  \
  RMSPROP_KERNEL("rmsprop_q8_contiguous_" #dtype_name, rmsprop_q8_contiguous, type) \
  RMSPROP_KERNEL(                                                               \
      "rmsprop_q8_general_idx32_" #dtype_name, rmsprop_q8_general, type, int)   \
  RMSPROP_KERNEL(                                                               \
      "rmsprop_q8_general_idx64_" #dtype_name, rmsprop_q8_general, type, long)

RMSPROP_INSTANTIATE_Q8(float32, float)
RMSPROP_INSTANTIATE_Q8(float16, half)
RMSPROP_INSTANTIATE_Q8(bfloat16, bfloat16_t)
