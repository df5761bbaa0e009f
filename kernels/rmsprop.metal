// RMSprop in one fused pass per parameter buffer, on Apple GPUs.
//
// Kernels (instantiated by name at the bottom):
//   rmsprop_contiguous_<dtype>  flat buffers; each thread updates
//                               RMSPROP_BYTES_PER_THREAD bytes of each input
//   rmsprop_general_<dtype>     any strides (transposed, sliced, broadcast);
//                               one element per thread, row-contiguous outputs
// The math is kernels/rmsprop_math.h, shared with the CPU kernel. Outputs may
// share the buffers of param / v (in-place): every thread reads an element
// before it writes that same element, and no thread touches another's.
// Indices are 64-bit; grids past 2^32 threads are 2-D (see csrc/rmsprop_grid.h).
#include <metal_stdlib>

#include "rmsprop_math.h"

#if __METAL_VERSION__ >= 310
typedef bfloat bfloat16_t;
#endif

template <typename T>
inline void rmsprop_store(
    device const T* grad,
    device const T* param,
    device const T* v,
    device T* param_out,
    device T* v_out,
    ulong in_g,
    ulong in_w,
    ulong in_v,
    ulong out,
    RMSpropCoefficients<float> k) {
  RMSpropResult<float> r = rmsprop_element<float>(
      static_cast<float>(grad[in_g]),
      static_cast<float>(param[in_w]),
      static_cast<float>(v[in_v]),
      k);
  param_out[out] = static_cast<T>(r.param);
  v_out[out] = static_cast<T>(r.v);
}

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
  if (start + N <= size) {
    // Full chunk: N consecutive elements, loaded together, stored together.
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
    // Tail: the last thread covers the remaining size - start < N elements.
    for (ulong i = start; i < size; ++i) {
      rmsprop_store<T>(grad, param, v, param_out, v_out, i, i, i, i, k);
    }
  }
}

template <typename T>
[[kernel]] void rmsprop_general(
    device const T* grad [[buffer(0)]],
    device const T* param [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* lr [[buffer(3)]],
    device T* param_out [[buffer(4)]],
    device T* v_out [[buffer(5)]],
    constant RMSpropDeviceScalars& scalars [[buffer(6)]],
    constant ulong& size [[buffer(7)]],
    constant const int* shape [[buffer(8)]],
    constant const long* grad_strides [[buffer(9)]],
    constant const long* param_strides [[buffer(10)]],
    constant const long* v_strides [[buffer(11)]],
    constant int& ndim [[buffer(12)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid_dims [[threads_per_grid]]) {
  ulong index = rmsprop_thread_index(gid, grid_dims);
  if (index >= size) {
    return;
  }
  // Row-major element index -> offset in each input.
  long g_off = 0, w_off = 0, v_off = 0;
  ulong rest = index;
  for (int d = ndim - 1; d >= 0; --d) {
    long coord = long(rest % ulong(shape[d]));
    rest /= ulong(shape[d]);
    g_off += coord * grad_strides[d];
    w_off += coord * param_strides[d];
    v_off += coord * v_strides[d];
  }
  RMSpropCoefficients<float> k = {
      lr[0], scalars.alpha, scalars.one_minus_alpha, scalars.eps};
  rmsprop_store<T>(
      grad, param, v, param_out, v_out, g_off, w_off, v_off, index, k);
}

// RMSPROP_KERNEL(name, kernel, type) gives kernel<type> the host name `name`.
// The C++ harness (tests/metal_harness) defines it to record the same list.
#ifndef RMSPROP_KERNEL
#define RMSPROP_KERNEL(name, kernel, type) \
  template [[host_name(name)]] [[kernel]] decltype(kernel<type>) kernel<type>;
#endif

#define RMSPROP_INSTANTIATE(dtype_name, type)                              \
  RMSPROP_KERNEL("rmsprop_contiguous_" #dtype_name, rmsprop_contiguous, type) \
  RMSPROP_KERNEL("rmsprop_general_" #dtype_name, rmsprop_general, type)

RMSPROP_INSTANTIATE(float32, float)
RMSPROP_INSTANTIATE(float16, half)
RMSPROP_INSTANTIATE(bfloat16, bfloat16_t)
