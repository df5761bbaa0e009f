// Full precision <-> 8-bit block-wise state (quantize_state.h).
#include "quantize_state.h"

#include <algorithm>
#include <bit>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

#include "quant_map.h"
#include "rmsprop.h"

namespace mlx_fused_rmsprop {

namespace {

mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device::cpu);
}

[[noreturn]] void cpu_only(const char* name) {
  throw std::runtime_error(
      std::string("[") + name + "] runs on the CPU stream only.");
}

} // namespace

std::vector<mx::array> quantize_state(const mx::array& x, bool is_v) {
  auto s = cpu_stream();
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("[quantize_state] the state entry must be floating.");
  }
  auto values = mx::contiguous(mx::astype(x, mx::float32, s), false, s);
  mx::Shape blocks{static_cast<int>(quantized_blocks(x.size()))};
  return mx::array::make_arrays(
      {x.shape(), blocks},
      {mx::uint8, mx::float32},
      std::make_shared<QuantizeState>(s, is_v),
      {values});
}

mx::array dequantize_state(const mx::array& codes, const mx::array& scales, bool is_v) {
  auto s = cpu_stream();
  if (codes.dtype() != mx::uint8 || scales.dtype() != mx::float32 ||
      scales.ndim() != 1 || scales.size() != static_cast<size_t>(quantized_blocks(codes.size()))) {
    throw std::invalid_argument(
        "[dequantize_state] needs uint8 codes and one float32 scale per block.");
  }
  return mx::array(
      codes.shape(),
      mx::float32,
      std::make_shared<DequantizeState>(s, is_v),
      {mx::contiguous(codes, false, s), mx::contiguous(scales, false, s)});
}

void QuantizeState::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  const float* data = x.data<float>();
  uint8_t* codes = outputs[0].data<uint8_t>();
  float* scales = outputs[1].data<float>();
  const int64_t n = static_cast<int64_t>(x.size());
  const RMSpropQuantMap* map = &state_map(is_v_);
  encoder.dispatch([=]() {
    for (int64_t first = 0; first < n; first += RMSPROP_BLOCK) {
      int64_t count = std::min<int64_t>(RMSPROP_BLOCK, n - first);
      uint32_t max_key = 0;
      for (int64_t i = 0; i < count; ++i) {
        max_key = std::max(max_key, std::bit_cast<uint32_t>(rmsprop_scale_key(data[first + i])));
      }
      float scale = rmsprop_block_scale(std::bit_cast<float>(max_key));
      float inverse = rmsprop_inverse_scale(scale);
      for (int64_t i = 0; i < count; ++i) {
        codes[first + i] =
            static_cast<uint8_t>(rmsprop_quantize(data[first + i], scale, inverse, map));
      }
      scales[first / RMSPROP_BLOCK] = scale;
    }
  });
}

void QuantizeState::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  cpu_only("QuantizeState");
}

bool QuantizeState::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const QuantizeState*>(&other);
  return o != nullptr && o->is_v_ == is_v_;
}

void DequantizeState::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_input_array(inputs[1]);
  encoder.set_output_array(out);
  const uint8_t* codes = inputs[0].data<uint8_t>();
  const float* scales = inputs[1].data<float>();
  float* values = out.data<float>();
  const int64_t n = static_cast<int64_t>(out.size());
  const RMSpropQuantMap* map = &state_map(is_v_);
  encoder.dispatch([=]() {
    for (int64_t i = 0; i < n; ++i) {
      values[i] = rmsprop_dequantize(codes[i], scales[i / RMSPROP_BLOCK], map);
    }
  });
}

void DequantizeState::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  cpu_only("DequantizeState");
}

bool DequantizeState::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const DequantizeState*>(&other);
  return o != nullptr && o->is_v_ == is_v_;
}

} // namespace mlx_fused_rmsprop
