// Converting a state entry between full precision and the 8-bit block-wise
// layout of kernels/rmsprop_math.h, with the kernels' own math: what
// RMSprop.full_precision_state() and loading a full-precision state into an
// 8-bit optimizer use. Checkpoint-time conversions, run on the CPU stream
// (Apple silicon shares its memory with the GPU).
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_fused_rmsprop {

namespace mx = mlx::core;

/**
 * {codes, scales} of `x` (any floating dtype; its values in float32), in
 * the leaf's row-major order: codes uint8 of x's shape, scales float32 of
 * ceil(size / RMSPROP_BLOCK) elements. `is_v` picks the unsigned map (v),
 * else the signed one (mean, momentum_buffer).
 */
std::vector<mx::array> quantize_state(const mx::array& x, bool is_v);

/** map[code] * scale per element, float32 of codes' shape. */
mx::array dequantize_state(const mx::array& codes, const mx::array& scales, bool is_v);

class QuantizeState : public mx::Primitive {
 public:
  QuantizeState(mx::Stream stream, bool is_v) : mx::Primitive(stream), is_v_(is_v) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "QuantizeState";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool is_v_;
};

class DequantizeState : public mx::UnaryPrimitive {
 public:
  DequantizeState(mx::Stream stream, bool is_v) : mx::UnaryPrimitive(stream), is_v_(is_v) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DequantizeState";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool is_v_;
};

} // namespace mlx_fused_rmsprop
