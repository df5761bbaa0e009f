// The squared L2 norm of one gradient leaf, as mlx.optimizers.clip_grad_norm
// computes it (float16 widened to float32 first, then square().sum()), in one
// read-only pass: no leaf-sized temporary for the squares.
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_fused_rmsprop {

namespace mx = mlx::core;

/**
 * sum(g * g) of a floating gradient as a 0-d array: float32 for float32,
 * float16 and bfloat16 gradients (each element widened to float32, then
 * squared and summed in float32), float64 for float64 ones.
 *
 * float32 and float16 results are bit-identical to clip_grad_norm's
 * `g.astype(float32).square().sum()`: on the CPU stream of this Linux build
 * the fused primitive below adds the squares in MLX's own order for such a
 * reduction (one sequential float32 sum over the buffer in memory order, or
 * in row-major order for a layout that is not contiguous; over a broadcast
 * of contiguous data, in the order of MLX's reduction plan, a partial sum per
 * contiguous run); elsewhere (the GPU, or
 * a macOS CPU, whose MLX reduces in SIMD lanes of an order we do not
 * reproduce) it is those very MLX ops. bfloat16 gradients are summed in
 * float32 too (clip_grad_norm squares and sums them in bfloat16: ours is at
 * least as accurate, not bit-identical).
 */
mx::array squared_norm(const mx::array& g, mx::StreamOrDevice s = {});

/** Whether squared_norm runs the fused primitive on stream `s` (for tests). */
bool fused_squared_norm(const mx::Stream& s);

/** The fused pass of squared_norm on the CPU. */
class SquaredSum : public mx::UnaryPrimitive {
 public:
  explicit SquaredSum(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "SquaredSum";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const SquaredSum*>(&other) != nullptr;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>&) override {
    return {mx::Shape{}};
  }
};

} // namespace mlx_fused_rmsprop
