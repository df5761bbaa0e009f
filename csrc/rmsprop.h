// The fused RMSprop primitive: one graph node that updates a parameter and its
// running average of squared gradients in a single pass over memory.
#pragma once

#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#include "rmsprop_grid.h"
#include "rmsprop_math.h"

namespace mlx_fused_rmsprop {

namespace mx = mlx::core;

/**
 * Raise std::invalid_argument (ValueError in Python) unless grad, param and v
 * form a valid RMSprop leaf on `stream`: equal shapes, equal floating dtypes
 * the device supports, a single-element real lr, alpha >= 0 and eps > 0.
 */
void check_rmsprop_inputs(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v,
    const mx::array& lr,
    double alpha,
    double eps,
    const mx::Stream& stream);

/**
 * One RMSprop step for a single leaf, as ONE two-output primitive:
 *
 *   v'     = alpha * v + (1 - alpha) * grad^2
 *   param' = param - lr * grad / (sqrt(v') + eps)
 *
 * `lr` is an input array (a schedule changes it every step without
 * retracing); alpha and eps are fixed properties of the primitive.
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

/** True when `a` covers exactly size() consecutive elements (no gaps, no
 * broadcast): flags().contiguous and data_size() == size(). */
bool is_dense(const mx::array& a);

/** True when element i of `a` sits at the same buffer offset as element i of
 * `param` (both row-contiguous, or `a` dense with param's strides). */
bool laid_like(const mx::array& a, const mx::array& param);

/**
 * True when grad, param and v can be walked as one flat buffer each with the
 * same index meaning the same element: param dense, grad and v laid like it.
 * Both backends use it.
 */
bool is_flat_layout(const mx::array& grad, const mx::array& param, const mx::array& v);

/**
 * The joint layout of grad, param and v with size-1 dims dropped and dims
 * merged wherever all three arrays are contiguous across them and the merged
 * extent stays <= INT32_MAX (at least one dim is kept). Feeds the strided CPU
 * loop and the general GPU kernel.
 */
struct CollapsedLayout {
  mx::Shape shape;
  std::vector<mx::Strides> strides; // grad, param, v
};
CollapsedLayout collapse_layout(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v);

/**
 * True unless every index the general GPU kernel forms over `layout` fits in
 * int32: the element count, and each array's largest offset from its first
 * element (sum of (extent - 1) * |stride|).
 */
bool needs_64bit_index(const CollapsedLayout& layout);

/**
 * The GPU kernel for a leaf and, for the general kernels, the layout it walks
 * (empty for the contiguous kernel). eval_gpu binds exactly this; the
 * harness asks for it through the extension.
 */
struct GpuDispatch {
  RMSpropKernel kernel;
  CollapsedLayout layout;
};
GpuDispatch choose_gpu_dispatch(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v);

/**
 * make_arrays gives each of the two outputs its own copy of the input list,
 * so every input is referenced twice and never is_donatable(): each step
 * would allocate (and page-fault) two leaf-sized buffers. MLX clears those
 * lists when it detaches the evaluated outputs anyway (unless they are
 * tracers), so both backends call this first in eval: for non-tracers it drops
 * the sibling's copy, and an input referenced by nothing else becomes
 * donatable. The evaluated output's own list keeps every input alive.
 */
void release_sibling_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs);

/**
 * Give the two outputs their buffers. like_param (param must be dense): both
 * outputs take param's layout, and param' / v' take the very buffers of
 * param / v when those are donatable (v only when laid like param), so the
 * update is in place. Otherwise: fresh row-contiguous buffers.
 */
void allocate_outputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    bool like_param);

class FusedRMSprop : public mx::Primitive {
 public:
  FusedRMSprop(mx::Stream stream, double alpha, double eps)
      : mx::Primitive(stream), alpha_(alpha), eps_(eps) {}

  // Inputs: {grad, param, v, lr}. Outputs: {param', v'}.
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

  double alpha() const {
    return alpha_;
  }
  double eps() const {
    return eps_;
  }

 private:
  double alpha_;
  double eps_;
};

} // namespace mlx_fused_rmsprop
