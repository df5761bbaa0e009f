// CPU evaluation of FusedRMSprop: one pass over grad, param and v.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "rmsprop.h"

namespace mlx_fused_rmsprop {

namespace {

// Elements per block of the flat kernel. Each block is converted into local
// arrays, updated, and written back, so the compiler sees no aliasing between
// inputs and outputs (they may share a buffer when donated) and vectorizes the
// math loop.
constexpr int64_t kBlock = 256;

template <typename T>
struct ComputeType {
  using type = float; // float32 and the half types compute in float32
};
template <>
struct ComputeType<double> {
  using type = double;
};

template <typename T, typename C = typename ComputeType<T>::type>
void rmsprop_flat(
    const T* grad,
    const T* param,
    const T* v,
    T* param_out,
    T* v_out,
    int64_t n,
    RMSpropCoefficients<C> k) {
  C g[kBlock], w[kBlock], s[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    int64_t len = std::min(kBlock, n - start);
    for (int64_t i = 0; i < len; ++i) {
      g[i] = static_cast<C>(grad[start + i]);
      w[i] = static_cast<C>(param[start + i]);
      s[i] = static_cast<C>(v[start + i]);
    }
    for (int64_t i = 0; i < len; ++i) {
      auto r = rmsprop_element<C>(g[i], w[i], s[i], k);
      w[i] = r.param;
      s[i] = r.v;
    }
    for (int64_t i = 0; i < len; ++i) {
      param_out[start + i] = static_cast<T>(w[i]);
      v_out[start + i] = static_cast<T>(s[i]);
    }
  }
}

// Any layout: strided, transposed, broadcast. Outputs are row-contiguous.
template <typename T, typename C = typename ComputeType<T>::type>
void rmsprop_strided(
    const T* grad,
    const T* param,
    const T* v,
    T* param_out,
    T* v_out,
    const mx::Shape& shape,
    const std::vector<mx::Strides>& strides,
    RMSpropCoefficients<C> k) {
  int ndim = static_cast<int>(shape.size());
  int64_t inner = shape[ndim - 1];
  int64_t outer = 1;
  for (int d = 0; d < ndim - 1; ++d) {
    outer *= shape[d];
  }
  const auto& gs = strides[0];
  const auto& ws = strides[1];
  const auto& vs = strides[2];
  std::vector<int64_t> pos(ndim, 0);
  int64_t g_off = 0, w_off = 0, v_off = 0, out = 0;
  for (int64_t row = 0; row < outer; ++row) {
    for (int64_t i = 0; i < inner; ++i, ++out) {
      auto r = rmsprop_element<C>(
          static_cast<C>(grad[g_off + i * gs[ndim - 1]]),
          static_cast<C>(param[w_off + i * ws[ndim - 1]]),
          static_cast<C>(v[v_off + i * vs[ndim - 1]]),
          k);
      param_out[out] = static_cast<T>(r.param);
      v_out[out] = static_cast<T>(r.v);
    }
    // Advance the outer position like an odometer.
    for (int d = ndim - 2; d >= 0; --d) {
      g_off += gs[d];
      w_off += ws[d];
      v_off += vs[d];
      if (++pos[d] < shape[d]) {
        break;
      }
      g_off -= gs[d] * shape[d];
      w_off -= ws[d] * shape[d];
      v_off -= vs[d] * shape[d];
      pos[d] = 0;
    }
  }
}

template <typename T>
void dispatch_typed(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    bool flat,
    double alpha,
    double eps,
    mx::cpu::CommandEncoder& encoder) {
  using C = typename ComputeType<T>::type;
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];
  const auto& lr = inputs[3];
  auto& param_out = outputs[0];
  auto& v_out = outputs[1];

  const T* g_ptr = grad.data<T>();
  const T* w_ptr = param.data<T>();
  const T* v_ptr = v.data<T>();
  const C* lr_ptr = lr.data<C>();
  T* w_out_ptr = param_out.data<T>();
  T* v_out_ptr = v_out.data<T>();

  if (flat) {
    // With the flat layout every array holds exactly size() elements.
    encoder.dispatch([=, n = static_cast<int64_t>(param.size())]() {
      auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
      rmsprop_flat<T>(g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, n, k);
    });
    return;
  }
  encoder.dispatch([=, layout = collapse_layout(grad, param, v)]() {
    auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
    rmsprop_strided<T>(
        g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, layout.shape, layout.strides, k);
  });
}

} // namespace

void FusedRMSprop::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];

  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat path.
  bool flat = is_flat_layout(grad, param, v);
  allocate_outputs(inputs, outputs, flat);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  if (param.size() == 0) {
    return;
  }

  switch (param.dtype()) {
    case mx::float32:
      return dispatch_typed<float>(inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::float16:
      return dispatch_typed<mx::float16_t>(
          inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::bfloat16:
      return dispatch_typed<mx::bfloat16_t>(
          inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::float64:
      return dispatch_typed<double>(inputs, outputs, flat, alpha_, eps_, encoder);
    default:
      throw std::invalid_argument(
          "[FusedRMSprop] unsupported dtype reached the CPU kernel.");
  }
}

} // namespace mlx_fused_rmsprop
