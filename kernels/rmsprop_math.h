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
typedef uint rmsprop_u32;
#define RMSPROP_FLOAT_BITS(x) as_type<uint>(x)
#define RMSPROP_BITS_FLOAT(u) as_type<float>(u)
// A bit cast between same-sized types (scalars, or the CPU's SIMD vectors).
template <typename To, typename From>
RMSPROP_INLINE To rmsprop_as(From x) {
  return as_type<To>(x);
}
#else
#include <bit>
#include <cmath>
#include <cstdint>
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
typedef uint32_t rmsprop_u32;
#define RMSPROP_FLOAT_BITS(x) std::bit_cast<uint32_t>(static_cast<float>(x))
#define RMSPROP_BITS_FLOAT(u) std::bit_cast<float>(static_cast<uint32_t>(u))
// A bit cast between same-sized types (scalars, or the CPU's SIMD vectors).
template <typename To, typename From>
RMSPROP_INLINE To rmsprop_as(From x) {
  return std::bit_cast<To>(x);
}
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
//   g  = c * g                                clip factor c of the step's
//                                             global norm (1 without clipping)
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
  // The gradient's factor: -1 to maximize, else 1, times the step's clip
  // factor (1 without clipping). A sign flip is exact, so g * (-c) is
  // -(g * c): the clipped gradient of mlx.optimizers.clip_grad_norm, negated.
  C grad_scale;
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
    C clip,
    RMSpropVariantConstants<C> c) {
  RMSpropVariantStep<C> k;
  bool eps_in_sqrt = (c.flags & RMSPROP_OPTION_EPS_IN_SQRT) != 0u;
  bool lr_inside = (c.flags & RMSPROP_OPTION_LR_INSIDE_MOMENTUM) != 0u;
  k.lr = lr;
  k.alpha = c.alpha;
  k.one_minus_alpha = c.one_minus_alpha;
  k.eps_inside = eps_in_sqrt ? c.eps : C(0);
  k.eps_outside = eps_in_sqrt ? C(0) : c.eps;
  k.grad_scale = (c.flags & RMSPROP_OPTION_MAXIMIZE) != 0u ? -clip : clip;
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
  C g = grad * k.grad_scale;
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

// ---- The step's scalars, as every variant kernel reads them: one array of
// RMSPROP_STEP_SCALARS values in the compute type (a single input, however
// many options are on), built once per step and shared by every leaf.
#define RMSPROP_STEP_LR 0
#define RMSPROP_STEP_BIAS_CORRECTION 1 // 1 - alpha^t, or 1
#define RMSPROP_STEP_CLIP 2 // min(max_norm / (norm + 1e-6), 1), or 1
#define RMSPROP_STEP_SKIP 3 // 1: a non-finite gradient, change nothing; else 0
#define RMSPROP_STEP_SCALARS 4

// ---- Rounding a float32 result into a 16-bit parameter.
//
// Round to nearest (the default) throws away an update smaller than half the
// parameter's spacing, every step. Two cures, for float16 / bfloat16
// parameters only (float32 and float64 results are stored as computed):
//
// Stochastic rounding: round x up (away from zero) to the next 16-bit value
// with probability (|x| - |lo|) / spacing, else down to lo: unbiased, so many
// small updates add up on average. Implemented by adding uniform random bits
// below the kept bits of x's magnitude and truncating. The random bits are a
// pure function of (seed, step, leaf, index of the element in the leaf,
// row-major) -- rmsprop_random_bits(rmsprop_rounding_key(seed, step, leaf),
// index) --, never of threads, tiles, SIMD lanes or the backend.
//
// Kahan-compensated summation: a state entry c (the parameter's dtype) keeps
// what rounding dropped, and adds it back the next step; with u the float32
// update of the stored parameter w (w - u is the float32 result):
//   c1 = c - u;  w' = round(w + c1);  c' = round(c1 - (w' - w))
// w' - w is exact (two nearby 16-bit values), so c' is what the parameter
// still owes (up to c's own rounding).

#define RMSPROP_ROUND_NEAREST 0u
#define RMSPROP_ROUND_STOCHASTIC 1u
#define RMSPROP_ROUND_KAHAN 2u

// The hash and bfloat16's rounding below are written for any U / F that
// carry the usual operators: 32-bit unsigned and float scalars, or the CPU's
// SIMD vectors of them (lane by lane, the same bits).

// One round of xxHash32: mixes a word into the running state h.
RMSPROP_INLINE rmsprop_u32 rmsprop_hash_round(rmsprop_u32 h, rmsprop_u32 word) {
  h += word * 0xC2B2AE3Du;
  h = (h << 17) | (h >> 15);
  return h * 0x27D4EB2Fu;
}

// MurmurHash3's 32-bit finalizer: a bijection that avalanches every bit.
template <typename U>
RMSPROP_INLINE U rmsprop_hash_finish(U h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The key of one leaf's stochastic rounding at one step: seed, step count
// (mod 2^32) and leaf number fully mixed, once per leaf and step.
RMSPROP_INLINE rmsprop_u32 rmsprop_rounding_key(
    rmsprop_u32 seed,
    rmsprop_u32 step,
    rmsprop_u32 leaf) {
  rmsprop_u32 h = seed + 0x165667B1u;
  h = rmsprop_hash_round(h, step);
  h = rmsprop_hash_round(h, leaf);
  return rmsprop_hash_finish(h);
}

// 32 uniform random bits for the element at `index` (row-major, within the
// whole leaf; its low and high 32-bit words) under a leaf's key: the
// finalizer of key + index * (an odd constant), so within one leaf and step
// no two elements below 2^32 get the same bits.
template <typename U>
RMSPROP_INLINE U rmsprop_random_bits(U key, U index_lo, U index_hi) {
  U h = (key ^ (index_hi * 0x27D4EB2Fu)) + index_lo * 0x9E3779B1u;
  return rmsprop_hash_finish(h);
}

// x rounded stochastically to a bfloat16 value (returned as the float32 that
// holds it exactly, so the store's round-to-nearest keeps it). bfloat16 is
// the top 16 bits of a float32: add 16 random bits to the lower 16 and drop
// them. A carry rounds the magnitude up (into the next binade, or past the
// largest finite value to infinity); Inf stays Inf; NaN stays NaN.
template <typename F, typename U>
RMSPROP_INLINE F rmsprop_stochastic_bfloat16(F x, U random) {
  U bits = rmsprop_as<U>(x);
  U rounded = (bits + (random >> 16)) & 0xFFFF0000u;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? x : rmsprop_as<F>(rounded);
}

// x rounded stochastically to a float16 value (as the float32 holding it).
// float16 keeps 10 fraction bits from 2^-14 up (13 of float32's 23 are
// dropped), fewer below (its subnormals are multiples of 2^-24: 13 + (-14 -
// E) dropped at exponent E), none from 2^16 (beyond 65504 every value
// rounds to infinity, as round to nearest does past 65520; between 65504
// and 65536 up to infinity with the probability of the carry). Below 2^-24
// the result is 0 or 2^-24 with probability |x| / 2^-24. NaN stays NaN.
RMSPROP_INLINE float rmsprop_stochastic_float16(float x, rmsprop_u32 random) {
  rmsprop_u32 bits = RMSPROP_FLOAT_BITS(x);
  rmsprop_u32 sign = bits & 0x80000000u;
  rmsprop_u32 magnitude = bits & 0x7FFFFFFFu;
  int exponent = int(magnitude >> 23) - 127;
  // Dropped bits: 13 for normal halves, up to 23 for subnormal ones.
  int dropped = exponent >= -14 ? 13 : -1 - exponent;
  dropped = dropped > 23 ? 23 : dropped;
  rmsprop_u32 mask = (1u << dropped) - 1u;
  rmsprop_u32 rounded = (magnitude + (random >> (32 - dropped))) & ~mask;
  // Below 2^-24: compare |x| / 2^-24 with a uniform [0, 1) of 24 bits (both
  // exact in float32).
  float fraction = RMSPROP_BITS_FLOAT(magnitude) * 16777216.0f;
  float uniform = float(random >> 8) * (1.0f / 16777216.0f);
  rmsprop_u32 tiny = uniform < fraction ? 0x33800000u : 0u; // 2^-24 or 0
  rounded = exponent < -24 ? tiny : rounded;
  rounded = exponent >= 16 ? 0x7F800000u : rounded; // |x| >= 2^16, Inf
  bool nan = magnitude > 0x7F800000u;
  return nan ? x : RMSPROP_BITS_FLOAT(sign | rounded);
}

// Kahan-compensated store, first half: the value to round into the parameter
// (w + c1) and the compensated change c1 = c - u = c + (updated - w).
template <typename C>
struct RMSpropKahan {
  C target;
  C change;
};

template <typename C>
RMSPROP_INLINE RMSpropKahan<C> rmsprop_kahan(C w, C compensation, C updated) {
  RMSpropKahan<C> k;
  k.change = compensation + (updated - w);
  k.target = w + k.change;
  return k;
}

// Second half, once the target was rounded to the parameter's dtype (w_new,
// read back as C): what the parameter still owes, the new compensation
// (before its own rounding to the parameter's dtype).
template <typename C>
RMSPROP_INLINE C rmsprop_kahan_remainder(C w, C w_new, C change) {
  return change - (w_new - w);
}

// What a leaf's kernel needs to round its parameter: the mode
// (RMSPROP_ROUND_*) and, for stochastic rounding, the leaf's identity and the
// index in the whole leaf of its element 0 (a shard's piece starts inside
// the leaf), as 32-bit words.
struct RMSpropLeafConstants {
  unsigned int rounding;
  unsigned int leaf;
  unsigned int offset_lo;
  unsigned int offset_hi;
};

// ---- 8-bit block-wise state (Dettmers et al., "8-bit Optimizers via
// Block-wise Quantization").
//
// A state entry of a quantized leaf is one uint8 code per element plus one
// float32 scale per block of RMSPROP_BLOCK consecutive elements (row-major
// order of the leaf; the last block may be partial). An element's value is
// map.value[code] * scale. Each step a block is dequantized, updated in
// float32 (the parameter from this fresh float32 state), and requantized:
//   scale = max |x| over the block (the new state's values), or NaN when any
//           of them is NaN or +-Inf (the whole block then reads back as NaN:
//           a non-finite state is never silently repaired);
//   code  = the map value nearest q = x * (1 / scale) (the inverse rounded
//           once per block), ties toward the smaller magnitude; every code
//           is the map's zero when scale is 0 or NaN.
// The maps are dynamic ("tree") quantization maps: decimal exponent levels,
// each with linearly spaced fractions, plus 0 and 1 (csrc/quant_map.cpp
// builds them on the host). v >= 0 uses the unsigned map (255 positive
// values and 0); mean and momentum_buffer the signed one.

#define RMSPROP_BLOCK 256

// A map as the kernels read it. value[] is sorted; the codes from zero_code
// up hold 0 and the positive values, the negative_codes codes below it the
// negative values, their magnitudes mirroring the first positive ones.
// bound[k] is the float32 midpoint between the k-th and (k+1)-th magnitude
// from zero_code up (padded with +Inf), so the code of |q| is zero_code +
// #{k : bound[k] < |q|}: nearest, ties toward the smaller magnitude.
struct RMSpropQuantMap {
  float value[256];
  float bound[256];
  unsigned int zero_code;
  unsigned int negative_codes;
};

// #{k : bound[k] < a}, for a in [0, 1]: an 8-step branch-free binary search
// (bound[255] is never read). MapPtr: a pointer to RMSpropQuantMap in any
// address space.
template <typename MapPtr>
RMSPROP_INLINE unsigned int rmsprop_magnitude_rank(float a, MapPtr map) {
  unsigned int rank = 0u;
  // (Not named `half`: that is a type in the Metal Shading Language.)
  for (unsigned int width = 128u; width > 0u; width >>= 1u) {
    rank += map->bound[rank + width - 1u] < a ? width : 0u;
  }
  return rank;
}

// The code of q = x * inverse in a block of this scale; `rank` is
// rmsprop_magnitude_rank(|q|) (passed in so the CPU can find it faster, bit
// for bit the same). |q| may exceed 1 by an ulp of the rounded inverse: the
// rank is then the top one, as for 1.
template <typename MapPtr>
RMSPROP_INLINE unsigned int rmsprop_code_from_rank(
    float q,
    unsigned int rank,
    float scale,
    MapPtr map) {
  bool negative = (RMSPROP_FLOAT_BITS(q) >> 31) != 0u;
  unsigned int below = rank < map->negative_codes ? rank : map->negative_codes;
  unsigned int code = negative ? map->zero_code - below : map->zero_code + rank;
  // !(scale > 0): an all-zero block, or a non-finite one (scale NaN).
  return scale > 0.0f ? code : map->zero_code;
}

// 1 / scale, rounded once per block; a code approximates x * (1 / scale).
RMSPROP_INLINE float rmsprop_inverse_scale(float scale) {
  return RMSPROP_DIVIDE(1.0f, scale);
}

RMSPROP_INLINE float rmsprop_magnitude(float x) {
  return RMSPROP_BITS_FLOAT(RMSPROP_FLOAT_BITS(x) & 0x7FFFFFFFu);
}

template <typename MapPtr>
RMSPROP_INLINE unsigned int rmsprop_quantize(
    float x,
    float scale,
    float inverse,
    MapPtr map) {
  float q = x * inverse;
  return rmsprop_code_from_rank(
      q, rmsprop_magnitude_rank(rmsprop_magnitude(q), map), scale, map);
}

template <typename MapPtr>
RMSPROP_INLINE float rmsprop_dequantize(unsigned int code, float scale, MapPtr map) {
  return map->value[code] * scale;
}

// What an element contributes to its block's scale: |x|, or +Inf when x is
// not finite (NaN included, so the maximum never meets a NaN).
RMSPROP_INLINE float rmsprop_scale_key(float x) {
  rmsprop_u32 magnitude = RMSPROP_FLOAT_BITS(x) & 0x7FFFFFFFu;
  return RMSPROP_BITS_FLOAT(magnitude >= 0x7F800000u ? 0x7F800000u : magnitude);
}

// The block's scale from the maximum key of its elements (0 for no element).
RMSPROP_INLINE float rmsprop_block_scale(float max_key) {
  return RMSPROP_FLOAT_BITS(max_key) == 0x7F800000u ? RMSPROP_BITS_FLOAT(0x7FC00000u)
                                                     : max_key;
}

// ---- What the Metal kernels and their host (eval_gpu, the C++ harness) share.

// Bytes of each input one thread of the contiguous kernel updates: one
// 128-bit access per buffer, i.e. 4 float32 or 8 float16/bfloat16 elements.
#define RMSPROP_BYTES_PER_THREAD 16

// Consecutive elements of one row (innermost dimension) one thread of the
// general kernel updates: its index math (a division per outer dimension) is
// paid once per run, and the run itself advances by adding strides.
#define RMSPROP_GENERAL_ELEMENTS_PER_THREAD 4

// The plain kernels' constant scalars as bound at buffer(6); lr is element
// RMSPROP_STEP_LR of the step's packed scalars (buffer(3)), an input array,
// so a schedule never changes the kernel's arguments.
struct RMSpropDeviceScalars {
  float alpha;
  float one_minus_alpha;
  float eps;
};

// The 8-bit state's kernels give each block of RMSPROP_BLOCK elements one
// SIMD-group of RMSPROP_SIMD_WIDTH threads (Apple GPUs' threadExecutionWidth;
// eval_gpu checks it), each thread RMSPROP_BLOCK / RMSPROP_SIMD_WIDTH
// elements: lane l takes elements l, l + RMSPROP_SIMD_WIDTH, ... of the block.
#define RMSPROP_SIMD_WIDTH 32
#define RMSPROP_Q8_ELEMENTS_PER_LANE (RMSPROP_BLOCK / RMSPROP_SIMD_WIDTH)

// What the general 8-bit kernels know of the layout beyond the walked
// arrays' collapsed one: each entry's scale stride (elements; v, mean,
// momentum buffer) and whether param' and the compensation' take param's
// layout (param dense: allocate_quantized_outputs) rather than row-major.
struct RMSpropQuantizedLayout {
  long scale_stride[3];
  unsigned int outputs_like_param;
};

#endif // MLX_FUSED_RMSPROP_MATH_H
