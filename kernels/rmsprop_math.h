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
#define RMSPROP_INLINE inline
#else
#include <cmath>
// Always inlined on the CPU: the SIMD builds (csrc/cpu/simd.h) instantiate
// these with vector types inside functions compiled for AVX2 / AVX-512, and
// an out-of-line copy compiled for the baseline target would pass those
// vectors with another calling convention.
#define RMSPROP_INLINE inline __attribute__((always_inline))
// std::sqrt for float and double; for the CPU kernel's SIMD vector types
// their own sqrt, found by argument-dependent lookup.
template <typename T>
RMSPROP_INLINE T rmsprop_sqrt(T x) {
  using std::sqrt;
  return sqrt(x);
}
#define RMSPROP_SQRT(x) rmsprop_sqrt(x)
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
RMSPROP_INLINE RMSpropResult<C> rmsprop_element(
    C grad,
    C param,
    C v,
    RMSpropCoefficients<C> k) {
  RMSpropResult<C> out;
  out.v = (k.alpha * v) + (k.one_minus_alpha * (grad * grad));
  out.param = param - RMSPROP_DIVIDE(k.lr * grad, RMSPROP_SQRT(out.v) + k.eps);
  return out;
}

// ---- The variants of the field (torch, optax, Keras), one algorithm.
//
// With these options, per element (t is the step, 1 on the first):
//
//   g  = -g                                   maximize
//   g  = g + wd * w                           coupled weight decay (torch)
//   w  = w - (lr * wd) * w                    decoupled weight decay (Keras, AdamW)
//   v' = (alpha * v) + ((1 - alpha) * (g * g))
//   m' = (alpha * m) + ((1 - alpha) * g)      centered
//   var = v' / bc  [- (m' / bc)^2 centered]   bc = 1 - alpha^t with bias
//                                             correction, else 1
//   d  = sqrt(var + eps)  (eps_in_sqrt)  or  sqrt(var) + eps
//   without momentum:  w' = w - (lr * g) / d
//   with momentum mu:  u  = (g / d) * (lr if the lr is inside the buffer,
//                                      else 1)           (optax, Keras / torch)
//                      b' = (mu * b) + u
//                      w' = w - (nesterov ? u + mu * b' : b') * (1 or lr)
//
// Every option is a uniform select or a multiply by an exact 1, -1 or 0 (no
// branch per element, so loops vectorize): with all of them off this is
// rmsprop_element bit for bit (x * 1, x / 1, -x * -1 and sqrt(x + 0) + eps are
// exact). Centered and momentum change which state exists, so they are
// template parameters.

// The primitive's fixed options, rounded to the compute type C by the host
// from doubles (one_minus_alpha as for RMSpropCoefficients).
template <typename C>
struct RMSpropVariantConstants {
  C alpha;
  C one_minus_alpha;
  C eps;
  C momentum;
  C weight_decay;
  unsigned int flags; // RMSPROP_OPTION_* bits
};

#define RMSPROP_OPTION_CENTERED 1u
#define RMSPROP_OPTION_MOMENTUM 2u
#define RMSPROP_OPTION_NESTEROV 4u
#define RMSPROP_OPTION_COUPLED_WEIGHT_DECAY 8u
#define RMSPROP_OPTION_DECOUPLED_WEIGHT_DECAY 16u
#define RMSPROP_OPTION_EPS_IN_SQRT 32u
#define RMSPROP_OPTION_MAXIMIZE 64u
#define RMSPROP_OPTION_LR_INSIDE_MOMENTUM 128u
#define RMSPROP_OPTION_BIAS_CORRECTION 256u

// The scalars of one step in the compute type C: the constants, plus the
// step's learning rate and bias correction 1 - alpha^t (inputs of the
// primitive; the latter read only with RMSPROP_OPTION_BIAS_CORRECTION).
template <typename C>
struct RMSpropVariantStep {
  C lr;
  C alpha;
  C one_minus_alpha;
  C eps_inside; // eps under the square root, else 0
  C eps_outside; // eps after it, else 0
  C grad_sign; // -1 to maximize, else 1
  C weight_decay;
  C momentum;
  C lr_inside; // lr when it enters the momentum buffer, else 1
  C lr_outside; // 1 when it does, else lr
  C bias_correction; // 1 - alpha^t, or 1
  // 1 or 0. Compute-type selectors, not bools: a select on a comparison of
  // floats vectorizes, one on a loop-invariant bool does not (GCC).
  C coupled;
  C decoupled;
  C nesterov;
};

template <typename C>
inline RMSpropVariantStep<C> rmsprop_variant_step(
    C lr,
    C bias_correction,
    RMSpropVariantConstants<C> c) {
  RMSpropVariantStep<C> k;
  bool eps_in_sqrt = (c.flags & RMSPROP_OPTION_EPS_IN_SQRT) != 0u;
  bool lr_inside = (c.flags & RMSPROP_OPTION_LR_INSIDE_MOMENTUM) != 0u;
  k.lr = lr;
  k.alpha = c.alpha;
  k.one_minus_alpha = c.one_minus_alpha;
  k.eps_inside = eps_in_sqrt ? c.eps : C(0);
  k.eps_outside = eps_in_sqrt ? C(0) : c.eps;
  k.grad_sign = (c.flags & RMSPROP_OPTION_MAXIMIZE) != 0u ? C(-1) : C(1);
  k.weight_decay = c.weight_decay;
  k.momentum = c.momentum;
  k.lr_inside = lr_inside ? lr : C(1);
  k.lr_outside = lr_inside ? C(1) : lr;
  k.bias_correction =
      (c.flags & RMSPROP_OPTION_BIAS_CORRECTION) != 0u ? bias_correction : C(1);
  k.coupled = (c.flags & RMSPROP_OPTION_COUPLED_WEIGHT_DECAY) != 0u ? C(1) : C(0);
  k.decoupled = (c.flags & RMSPROP_OPTION_DECOUPLED_WEIGHT_DECAY) != 0u ? C(1) : C(0);
  k.nesterov = (c.flags & RMSPROP_OPTION_NESTEROV) != 0u ? C(1) : C(0);
  return k;
}

template <typename C>
struct RMSpropVariantResult {
  C param;
  C v;
  C mean; // centered only
  C buffer; // momentum only
};

template <typename C, bool kCentered, bool kMomentum>
inline RMSpropVariantResult<C> rmsprop_variant_element(
    C grad,
    C param,
    C v,
    C mean,
    C buffer,
    RMSpropVariantStep<C> k) {
  RMSpropVariantResult<C> out;
  C g = grad * k.grad_sign;
  C g_decayed = g + (k.weight_decay * param);
  g = k.coupled != C(0) ? g_decayed : g;
  C w_decayed = param - ((k.lr * k.weight_decay) * param);
  C w = k.decoupled != C(0) ? w_decayed : param;
  out.v = (k.alpha * v) + (k.one_minus_alpha * (g * g));
  C variance = RMSPROP_DIVIDE(out.v, k.bias_correction);
  out.mean = mean;
  if (kCentered) {
    out.mean = (k.alpha * mean) + (k.one_minus_alpha * g);
    C m = RMSPROP_DIVIDE(out.mean, k.bias_correction);
    variance = variance - (m * m);
  }
  C d = RMSPROP_SQRT(variance + k.eps_inside) + k.eps_outside;
  out.buffer = buffer;
  if (kMomentum) {
    C u = RMSPROP_DIVIDE(g, d) * k.lr_inside;
    out.buffer = (k.momentum * buffer) + u;
    C nesterov = u + (k.momentum * out.buffer);
    out.param = w - ((k.nesterov != C(0) ? nesterov : out.buffer) * k.lr_outside);
  } else {
    out.param = w - RMSPROP_DIVIDE(k.lr * g, d);
  }
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
