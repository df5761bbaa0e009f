// The fused RMSprop primitive: one graph node that updates a parameter and its
// optimizer state in a single pass over memory.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#include "rmsprop_grid.h"
#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

namespace mx = mlx::core;

/**
 * What one RMSprop variant computes (kernels/rmsprop_math.h has the math).
 * Defaults: mlx.optimizers.RMSprop's algorithm, which runs the plain kernel.
 */
struct RMSpropOptions {
  double alpha = 0.99;
  double eps = 1e-8;
  double momentum = 0.0; // > 0: a momentum buffer
  double weight_decay = 0.0;
  bool centered = false; // a running mean of the gradient
  bool nesterov = false; // needs momentum > 0
  bool decoupled_weight_decay = false; // w -= lr * wd * w, else g += wd * w
  bool eps_in_sqrt = false; // sqrt(var + eps), else sqrt(var) + eps
  bool bias_correction = false; // v (and the mean) / (1 - alpha^t)
  bool maximize = false;
  bool lr_inside_momentum = false; // the buffer accumulates lr * g / d
  // How float16 / bfloat16 parameters are rounded (RMSPROP_ROUND_*); other
  // dtypes are stored as computed whatever this says.
  unsigned int rounding = RMSPROP_ROUND_NEAREST;
  // The step's scalars carry a clip factor or a skip flag (global-norm
  // clipping, skipping non-finite steps): the leaves run the variant
  // kernels, which read them.
  bool guarded = false;
  // 8 for 8-bit block-wise state on leaves of at least min_8bit_size
  // elements (float64 leaves excepted), else 0. The optimizer's policy
  // (quantizes()); a leaf's primitive is told by its LeafConfig.
  int state_bits = 0;
  int64_t min_8bit_size = 4096;

  /** Whether a leaf of `size` elements of `dtype` keeps 8-bit state. */
  bool quantizes(int64_t size, mx::Dtype dtype) const {
    return state_bits == 8 && size >= min_8bit_size && dtype != mx::float64;
  }

  /** RMSPROP_OPTION_* bits of the options that take effect. */
  unsigned int flags() const {
    unsigned int f = 0u;
    f |= centered ? RMSPROP_OPTION_CENTERED : 0u;
    f |= momentum > 0.0 ? RMSPROP_OPTION_MOMENTUM : 0u;
    f |= nesterov ? RMSPROP_OPTION_NESTEROV : 0u;
    if (weight_decay > 0.0) {
      f |= decoupled_weight_decay ? RMSPROP_OPTION_DECOUPLED_WEIGHT_DECAY
                                  : RMSPROP_OPTION_COUPLED_WEIGHT_DECAY;
    }
    f |= eps_in_sqrt ? RMSPROP_OPTION_EPS_IN_SQRT : 0u;
    f |= maximize ? RMSPROP_OPTION_MAXIMIZE : 0u;
    if (lr_inside_momentum && momentum > 0.0) {
      f |= RMSPROP_OPTION_LR_INSIDE_MOMENTUM;
    }
    f |= bias_correction ? RMSPROP_OPTION_BIAS_CORRECTION : 0u;
    return f;
  }
  /** No option takes effect: mlx.optimizers.RMSprop's update. */
  bool is_plain() const {
    return flags() == 0u && rounding == RMSPROP_ROUND_NEAREST && !guarded;
  }
  /** Names of the state arrays, in the primitive's order: v, then mean
   * (centered), then momentum_buffer (momentum > 0). */
  std::vector<std::string> state_names() const;
  /** How many state arrays: state_names().size(), without allocating. */
  size_t state_count() const {
    return 1 + (centered ? 1 : 0) + (momentum > 0.0 ? 1 : 0);
  }
  bool operator==(const RMSpropOptions&) const = default;
};

/**
 * How one leaf's update is laid out beyond the options: whether its state is
 * 8-bit (every state entry uint8 codes of the parameter's shape, plus one
 * float32 scale per RMSPROP_BLOCK elements), how its parameter is rounded,
 * and where its elements sit in the whole leaf for stochastic rounding.
 */
struct LeafConfig {
  bool quantized = false;
  unsigned int rounding = RMSPROP_ROUND_NEAREST; // as this leaf's dtype allows
  uint32_t leaf = 0; // the leaf's position in the tree (tree_flatten order)
  int64_t element_offset = 0; // element 0's index in the whole leaf (a shard's piece)

  bool compensated() const {
    return rounding == RMSPROP_ROUND_KAHAN;
  }
  bool stochastic() const {
    return rounding == RMSPROP_ROUND_STOCHASTIC;
  }
  bool operator==(const LeafConfig&) const = default;
};

/** True for float16 and bfloat16, the dtypes the rounding options touch. */
bool is_half(mx::Dtype dtype);

/** The leaf's config for a parameter of `dtype`: options.rounding for 16-bit
 * parameters, round to nearest (stored as computed) for the others. */
LeafConfig leaf_config(
    const RMSpropOptions& options,
    mx::Dtype dtype,
    bool quantized,
    uint32_t leaf = 0,
    int64_t element_offset = 0);

/** Blocks of a quantized entry of `size` elements: ceil(size / RMSPROP_BLOCK). */
inline int64_t quantized_blocks(int64_t size) {
  return (size + RMSPROP_BLOCK - 1) / RMSPROP_BLOCK;
}

/**
 * Names of a leaf's state entries, in the primitive's order: the state
 * (options.state_names()), then "compensation" (Kahan), then with 8-bit
 * state "<name>_scale" for each state name.
 */
std::vector<std::string> leaf_entry_names(
    const RMSpropOptions& options,
    const LeafConfig& config);

/** A leaf of a step: its gradient, its parameter, its state entries in
 * leaf_entry_names() order (the state, [compensation], [the scales]) and
 * its config. */
struct LeafArrays {
  mx::array grad;
  mx::array param;
  std::vector<mx::array> state;
  LeafConfig config;
};

/**
 * What one step gives every leaf, as arrays (a new value is a new input, never
 * a retrace under mx.compile): the learning rate; the 1-based step count (read
 * for the bias correction and stochastic rounding); the clip factor and the
 * skip flag (a non-finite gradient somewhere: change nothing), when the step
 * has guards; the stochastic rounding seed.
 */
struct StepValues {
  mx::array lr;
  std::optional<mx::array> step;
  std::optional<mx::array> clip;
  std::optional<mx::array> skip;
  std::optional<mx::array> seed;
};

/**
 * Raise std::invalid_argument (ValueError in Python) unless the arguments
 * form a valid fused step on `stream`: grad of param's shape and dtype (a
 * floating dtype the device supports); the state entries of
 * leaf_entry_names(): each state entry of param's shape, all of one dtype
 * (param's, or float32 for float16 / bfloat16 parameters; uint8 codes when
 * quantized, each with a float32 scale of quantized_blocks(size) elements),
 * the compensation of param's shape and dtype; single-element real scalars
 * (lr; step with bias correction or stochastic rounding; seed with
 * stochastic rounding; clip and skip when the options are guarded); and
 * valid options (alpha >= 0, eps > 0, momentum >= 0, weight_decay >= 0, all
 * finite; nesterov needs momentum > 0).
 */
void check_rmsprop_inputs(
    const LeafArrays& leaf,
    const StepValues& values,
    const RMSpropOptions& options,
    const mx::Stream& stream);

/** The parts of check_rmsprop_inputs: one leaf's arrays, the step's values
 * (for leaves of these configs) and the options; each message is built on
 * failure only. */
void check_leaf(
    const LeafArrays& leaf,
    const RMSpropOptions& options,
    const mx::Stream& stream);
void check_step_values(
    const StepValues& values,
    const RMSpropOptions& options,
    bool stochastic);
void check_options(const RMSpropOptions& options);

/**
 * The scalar inputs one step gives every leaf's primitive, built once and
 * shared: per compute type the RMSPROP_STEP_SCALARS values (lr, the bias
 * correction 1 - alpha^t computed in double on the CPU from the step, the
 * clip factor, the skip flag as 1 or 0; kernels/rmsprop_math.h) as one
 * array, and for stochastic rounding the key {seed, step} as two uint32.
 */
class StepScalars {
 public:
  StepScalars(StepValues values, const RMSpropOptions& options, mx::Stream stream);
  const mx::array& packed(mx::Dtype compute);
  const mx::array& rounding_key();

 private:
  StepValues values_;
  RMSpropOptions options_;
  mx::Stream stream_;
  std::optional<mx::array> float32_;
  std::optional<mx::array> float64_;
  std::optional<mx::array> key_;
};

class FusedRMSprop;

/** The primitive updating `leaf` (checked by the caller) and its outputs:
 * param', then each state entry' in leaf.state's order. */
std::vector<mx::array> build_step(
    const LeafArrays& leaf,
    StepScalars& scalars,
    const RMSpropOptions& options,
    mx::Stream stream);

/**
 * One RMSprop step of a single leaf as ONE primitive with an output per
 * array updated: {param', *entries'} (the state entries in
 * leaf_entry_names() order). The step's values are input arrays, so a
 * schedule or a new step never retraces under mx.compile; the options and
 * the leaf's config are fixed properties.
 */
std::vector<mx::array> rmsprop_step(
    const LeafArrays& leaf,
    const StepValues& values,
    const RMSpropOptions& options,
    mx::StreamOrDevice s = {});

/**
 * mlx.optimizers.RMSprop's step (the plain options), as ONE two-output
 * primitive:
 *
 *   v'     = alpha * v + (1 - alpha) * grad^2
 *   param' = param - lr * grad / (sqrt(v') + eps)
 *
 * Returns {param', v'}, both with param's shape and dtype.
 */
std::vector<mx::array> rmsprop_update(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v,
    const mx::array& lr,
    double alpha,
    double eps,
    mx::StreamOrDevice s = {});

/**
 * The step's scalars rounded to the compute type C. alpha, 1 - alpha and eps
 * are rounded from double, exactly as the Python reference rounds them.
 */
template <typename C>
RMSpropCoefficients<C> make_coefficients(C lr, double alpha, double eps) {
  return RMSpropCoefficients<C>{
      lr, static_cast<C>(alpha), static_cast<C>(1.0 - alpha), static_cast<C>(eps)};
}

/** The variant's fixed scalars rounded to C, as make_coefficients rounds. */
template <typename C>
RMSpropVariantConstants<C> make_variant_constants(const RMSpropOptions& o) {
  return RMSpropVariantConstants<C>{
      static_cast<C>(o.alpha),
      static_cast<C>(1.0 - o.alpha),
      static_cast<C>(o.eps),
      static_cast<C>(o.momentum),
      static_cast<C>(o.weight_decay),
      o.flags()};
}

/** Whether a leaf runs the plain kernels (mlx.optimizers.RMSprop's math with
 * the state in the parameter's dtype) rather than the variant or quantized
 * ones. */
inline bool runs_plain_kernels(
    const RMSpropOptions& options,
    const LeafConfig& config,
    mx::Dtype param_dtype,
    mx::Dtype state_dtype) {
  return options.is_plain() && !config.quantized && state_dtype == param_dtype;
}

/** True when `a` covers exactly size() consecutive elements (no gaps, no
 * broadcast): flags().contiguous and data_size() == size(). */
bool is_dense(const mx::array& a);

/** True when element i of `a` sits at the same buffer offset as element i of
 * `param` (both row-contiguous, or `a` dense with param's strides). */
bool laid_like(const mx::array& a, const mx::array& param);

/**
 * The primitive's inputs, in order: the walked arrays (param-shaped: grad,
 * param, the state entries -- float, or uint8 codes when quantized --, then
 * the compensation with Kahan summation); the scales of the quantized
 * entries (1-D float32, one per block); the packed step scalars
 * (StepScalars::packed); the rounding key with stochastic rounding. Its
 * outputs: param', each walked state array', then the scales'.
 */
struct StepInputs {
  std::span<const mx::array> walked;
  std::span<const mx::array> scales;
  const mx::array* packed;
  const mx::array* key; // null without stochastic rounding
};
StepInputs split_inputs(
    const std::vector<mx::array>& inputs,
    const RMSpropOptions& options,
    const LeafConfig& config);

/** How many state entries of each kind one leaf has. */
struct EntryCounts {
  size_t state; // v, mean, momentum_buffer as the options keep them
  size_t compensation; // 0 or 1
  size_t scales; // 0, or state when quantized
  size_t walked() const {
    return 2 + state + compensation;
  }
  size_t entries() const {
    return state + compensation + scales;
  }
};
EntryCounts entry_counts(const RMSpropOptions& options, const LeafConfig& config);

/**
 * True when the walked arrays (grad, param, state...) can be walked as one
 * flat buffer each with the same index meaning the same element: param
 * dense, every other array laid like it. Both backends use it.
 */
bool is_flat_layout(std::span<const mx::array> arrays);

/**
 * The joint layout of the walked arrays (index 1 is param) with size-1 dims
 * dropped and dims merged wherever all of them are contiguous across them and
 * the merged extent stays <= INT32_MAX (at least one dim is kept). Feeds the
 * strided CPU loops and the general GPU kernels.
 */
struct CollapsedLayout {
  mx::Shape shape;
  std::vector<mx::Strides> strides; // one per walked array
};
CollapsedLayout collapse_layout(std::span<const mx::array> arrays);

/**
 * True unless every index the general GPU kernel forms over `layout` fits in
 * int32: the element count, and each array's largest offset from its first
 * element (sum of (extent - 1) * |stride|).
 */
bool needs_64bit_index(const CollapsedLayout& layout);

/**
 * The GPU kernel for a leaf and, for the general kernels, the layout it walks
 * (empty for the contiguous kernel). eval_gpu binds exactly this; the
 * harness asks for it through the extension. The contiguous kernel runs
 * where every walked array can be indexed by one flat index: the flat layout
 * (is_flat_layout), with param row-contiguous too under stochastic rounding
 * (the index is then the row-major one the random bits hash); for 8-bit
 * state every walked array and scale row-contiguous (as the CPU's flat
 * walk). outputs_like_param: param is dense, so a quantized leaf's param'
 * and compensation' take its layout (allocate_quantized_outputs).
 */
struct GpuDispatch {
  RMSpropKernel kernel;
  CollapsedLayout layout;
  bool outputs_like_param = false;
};
GpuDispatch choose_gpu_dispatch(
    std::span<const mx::array> arrays,
    const LeafConfig& config = {},
    std::span<const mx::array> scales = {});

/**
 * The arrays a GPU kernel takes, as indices into the walked arrays: the plain
 * kernels {grad, param, v}; the variant and 8-bit ones {grad, param, v, mean,
 * buffer, compensation}, where state the options do not keep is v and a
 * missing compensation (no Kahan summation) is param (bound, never read or
 * written). Output i of the kernel is the primitive's output slots[i] - 1
 * (i >= 1). For 8-bit state, state slot 2 + e takes scales[slots[2 + e] - 2]
 * and writes the primitive's output (walked outputs) + slots[2 + e] - 2.
 */
std::vector<size_t> gpu_array_slots(
    const RMSpropOptions& options,
    bool plain,
    bool compensated = false);

/**
 * make_arrays gives each output its own copy of the input list, so every
 * input is referenced once per output and never is_donatable(): each step
 * would allocate (and page-fault) leaf-sized buffers. MLX clears those lists
 * when it detaches the evaluated outputs anyway (unless they are tracers), so
 * both backends call this first in eval: for non-tracers it drops the
 * siblings' copies, and an input referenced by nothing else becomes
 * donatable. The evaluated output's own list keeps every input alive.
 */
void release_sibling_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs);

/**
 * Give one leaf's outputs their buffers; output 0 pairs with walked array 1
 * (param) and output 1 + i with walked array 2 + i (state i). like_param
 * (param must be dense): every output takes param's layout, param' takes
 * param's very buffer when param is donatable, and the state's outputs take
 * the state's buffers when every state array is laid like param and
 * donatable (all or none: the loops run a leaf's state in place or not).
 * Otherwise: fresh row-contiguous buffers.
 */
void allocate_outputs(
    std::span<const mx::array> walked,
    std::span<mx::array> outputs,
    bool like_param);

/**
 * The outputs of a quantized leaf (param', the codes', [compensation'], the
 * scales'): param' and the compensation' in param's layout when param is
 * dense (else row-major), the codes' and scales' row-major; each takes its
 * input's buffer when that is laid out so and donatable.
 */
void allocate_quantized_outputs(
    std::span<const mx::array> walked,
    std::span<const mx::array> scales,
    std::span<mx::array> outputs,
    bool compensated);

/**
 * For each output of a quantized leaf, in allocate_quantized_outputs' order:
 * whether its input is laid out as the output is (param' and compensation'
 * laid like a dense param, the codes' and scales' row-contiguous), i.e. may
 * give it its buffer (when donatable).
 */
std::vector<bool> quantized_outputs_fit(
    std::span<const mx::array> walked,
    std::span<const mx::array> scales,
    bool compensated);

class FusedRMSprop : public mx::Primitive {
 public:
  FusedRMSprop(mx::Stream stream, RMSpropOptions options, LeafConfig config)
      : mx::Primitive(stream), options_(options), config_(config) {}

  // Inputs and outputs: see StepInputs.
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  // An optimizer step is not something to differentiate or vectorize.
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override {
    return "FusedRMSprop";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const RMSpropOptions& options() const {
    return options_;
  }
  const LeafConfig& config() const {
    return config_;
  }

 private:
  RMSpropOptions options_;
  LeafConfig config_;
};

} // namespace mlx_fused_rmsprop
