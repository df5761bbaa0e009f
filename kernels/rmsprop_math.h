// The RMSprop numeric contract, written once.
//
// Included by the C++ CPU kernel (csrc/rmsprop_cpu.cpp) and by the Metal
// shader (kernels/rmsprop.metal), so both backends evaluate exactly the same
// expression. Keep this file in the subset of C++ that Metal accepts: no
// references, no exceptions, no std:: outside the #ifdef below.
//
//   v' = (alpha * v) + ((1 - alpha) * (g * g))
//   w' = w - ((lr * g) / (sqrt(v') + eps))
//
// The grouping is mlx.optimizers.RMSprop's; in floating point it matters.
// Builds must not contract a*b+c into an FMA (-ffp-contract=off on the CPU,
// no fast-math on Metal) or float32 results stop being bit-identical.
//
// An include guard, not #pragma once: the build inlines this file into the
// shader source embedded in the extension (cmake/embed_metal_source.cmake),
// and the guard still stops a second copy where the harness has already
// included it.
#ifndef MLX_FUSED_RMSPROP_MATH_H
#define MLX_FUSED_RMSPROP_MATH_H

#ifdef __METAL_VERSION__
#include <metal_stdlib>
#define RMSPROP_SQRT(x) metal::precise::sqrt(x)
#define RMSPROP_DIVIDE(a, b) metal::precise::divide((a), (b))
#else
#include <cmath>
#define RMSPROP_SQRT(x) std::sqrt(x)
#define RMSPROP_DIVIDE(a, b) ((a) / (b))
#endif

// Scalars of one step, already rounded to the compute type C by the host.
// one_minus_alpha is (1 - alpha) evaluated in double precision and rounded
// once, as the Python reference does; (C(1) - alpha) would round differently.
template <typename C>
struct RMSpropCoefficients {
  C lr;
  C alpha;
  C one_minus_alpha;
  C eps;
};

template <typename C>
struct RMSpropResult {
  C param;
  C v;
};

// One element of the update, in the compute type C (float for float32 and the
// half types, double for float64 on the CPU).
template <typename C>
inline RMSpropResult<C> rmsprop_element(
    C grad,
    C param,
    C v,
    RMSpropCoefficients<C> k) {
  RMSpropResult<C> out;
  out.v = (k.alpha * v) + (k.one_minus_alpha * (grad * grad));
  out.param = param - RMSPROP_DIVIDE(k.lr * grad, RMSPROP_SQRT(out.v) + k.eps);
  return out;
}

// ---- What the Metal kernels and their host (eval_gpu, the C++ harness) share.

// Bytes of each input one thread of the contiguous kernel updates: one
// 128-bit access per buffer, i.e. 4 float32 or 8 float16/bfloat16 elements.
#define RMSPROP_BYTES_PER_THREAD 16

// Consecutive elements of one row (innermost dimension) one thread of the
// general kernel updates: its index math (a division per outer dimension) is
// paid once per run, and the run itself advances by adding strides.
#define RMSPROP_GENERAL_ELEMENTS_PER_THREAD 4

// The step's constant scalars as bound at buffer(6); lr is a separate 0-d
// buffer so a schedule never changes the kernel's arguments' shape.
struct RMSpropDeviceScalars {
  float alpha;
  float one_minus_alpha;
  float eps;
};

#endif // MLX_FUSED_RMSPROP_MATH_H
