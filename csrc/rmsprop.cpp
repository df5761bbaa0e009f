// The op (validation, graph construction) and the backend-independent parts of
// the FusedRMSprop primitive. Kernels live in rmsprop_cpu.cpp / rmsprop_metal.cpp.
#include "rmsprop.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/ops.h"

namespace mlx_fused_rmsprop {

namespace {

bool is_supported_dtype(mx::Dtype dtype, bool on_gpu) {
  if (dtype == mx::float32 || dtype == mx::float16 || dtype == mx::bfloat16) {
    return true;
  }
  return dtype == mx::float64 && !on_gpu; // Metal has no double precision
}

[[noreturn]] void fail(const std::ostringstream& msg) {
  throw std::invalid_argument(msg.str());
}

} // namespace

void check_rmsprop_inputs(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v,
    const mx::array& lr,
    double alpha,
    double eps,
    const mx::Stream& stream) {
  bool on_gpu = stream.device == mx::Device::gpu;
  std::ostringstream msg;
  if (!is_supported_dtype(param.dtype(), on_gpu)) {
    msg << "[rmsprop_update] parameter dtype " << param.dtype()
        << " is not supported on " << stream.device
        << "; RMSprop updates float32, float16 and bfloat16 parameters"
        << (on_gpu ? "" : " (and float64 on the CPU)") << ".";
    fail(msg);
  }
  // grad and v must be laid over param element for element.
  auto check_dtype = [&](const mx::array& a, const char* what) {
    if (a.dtype() != param.dtype()) {
      msg << "[rmsprop_update] " << what << " dtype " << a.dtype()
          << " does not match parameter dtype " << param.dtype() << ".";
      fail(msg);
    }
  };
  check_dtype(grad, "gradient");
  check_dtype(v, "state 'v'");
  auto check_shape = [&](const mx::array& a, const char* what) {
    if (a.shape() != param.shape()) {
      msg << "[rmsprop_update] " << what << " shape " << a.shape()
          << " does not match parameter shape " << param.shape() << ".";
      fail(msg);
    }
  };
  check_shape(grad, "gradient");
  check_shape(v, "state 'v'");
  if (lr.size() != 1) {
    msg << "[rmsprop_update] learning rate must be a scalar, got shape "
        << lr.shape() << ".";
    fail(msg);
  }
  if (mx::issubdtype(lr.dtype(), mx::complexfloating)) {
    msg << "[rmsprop_update] learning rate must be real, got " << lr.dtype()
        << ".";
    fail(msg);
  }
  if (!(alpha >= 0.0) || !std::isfinite(alpha)) {
    msg << "[rmsprop_update] alpha must be a finite number >= 0, got " << alpha
        << ".";
    fail(msg);
  }
  if (!(eps > 0.0) || !std::isfinite(eps)) {
    msg << "[rmsprop_update] eps must be a finite number > 0, got " << eps
        << ".";
    fail(msg);
  }
}

std::vector<mx::array> rmsprop_update(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v,
    const mx::array& lr,
    double alpha,
    double eps,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check_rmsprop_inputs(grad, param, v, lr, alpha, eps, stream);

  // The kernel reads lr as its compute type: double for float64 leaves,
  // float otherwise (half leaves compute in float32).
  // Metal has no float64: a float64 lr (0-d, so the hop is free) is reshaped
  // and converted on the CPU, whatever stream the update runs on.
  auto lr_dtype = param.dtype() == mx::float64 ? mx::float64 : mx::float32;
  auto lr_stream = lr.dtype() == mx::float64 && lr_dtype != mx::float64
      ? mx::default_stream(mx::Device::cpu)
      : stream;
  auto lr_scalar = mx::reshape(lr, {}, lr_stream);
  if (lr_scalar.dtype() != lr_dtype) {
    lr_scalar = mx::astype(lr_scalar, lr_dtype, lr_stream);
  }

  return mx::array::make_arrays(
      {param.shape(), param.shape()},
      {param.dtype(), param.dtype()},
      std::make_shared<FusedRMSprop>(stream, alpha, eps),
      {grad, param, v, lr_scalar});
}

bool is_dense(const mx::array& a) {
  return a.flags().contiguous && a.data_size() == a.size();
}

bool laid_like(const mx::array& a, const mx::array& param) {
  if (a.flags().row_contiguous && param.flags().row_contiguous) {
    return true; // strides may differ only on size-1 dims
  }
  return is_dense(a) && a.strides() == param.strides();
}

bool is_flat_layout(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v) {
  return is_dense(param) && laid_like(grad, param) && laid_like(v, param);
}

CollapsedLayout collapse_layout(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v) {
  const mx::array* arrays[3] = {&grad, &param, &v};
  CollapsedLayout out;
  out.strides.resize(3);
  for (int d = 0; d < param.ndim(); ++d) {
    int extent = param.shape(d);
    if (extent == 1) {
      continue;
    }
    // Extents are int (mx::Shape): a merge past INT32_MAX would wrap (three
    // broadcast (2, 2^30, 2) views gave extent 0), so such dims stay apart,
    // as in MLX's own collapse_contiguous_dims.
    bool merges = !out.shape.empty() &&
        static_cast<int64_t>(out.shape.back()) * extent <=
            std::numeric_limits<int32_t>::max();
    for (int a = 0; a < 3 && merges; ++a) {
      merges = out.strides[a].back() ==
          arrays[a]->strides()[d] * static_cast<int64_t>(extent);
    }
    if (merges) {
      out.shape.back() *= extent;
      for (int a = 0; a < 3; ++a) {
        out.strides[a].back() = arrays[a]->strides()[d];
      }
    } else {
      out.shape.push_back(extent);
      for (int a = 0; a < 3; ++a) {
        out.strides[a].push_back(arrays[a]->strides()[d]);
      }
    }
  }
  if (out.shape.empty()) {
    out.shape.push_back(1);
    for (auto& s : out.strides) {
      s.push_back(0);
    }
  }
  return out;
}

bool needs_64bit_index(const CollapsedLayout& layout) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  int64_t size = 1;
  for (auto extent : layout.shape) {
    size *= extent;
  }
  if (size > kMax) {
    return true;
  }
  for (const auto& strides : layout.strides) {
    int64_t reach = 0;
    for (size_t d = 0; d < layout.shape.size(); ++d) {
      reach += (layout.shape[d] - 1) * std::abs(strides[d]);
      if (reach > kMax) {
        return true;
      }
    }
  }
  return false;
}

GpuDispatch choose_gpu_dispatch(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v) {
  if (is_flat_layout(grad, param, v)) {
    return {RMSpropKernel::contiguous, {}};
  }
  auto layout = collapse_layout(grad, param, v);
  auto kernel = needs_64bit_index(layout) ? RMSpropKernel::general_idx64
                                          : RMSpropKernel::general_idx32;
  return {kernel, std::move(layout)};
}

void release_sibling_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    if (out.is_tracer()) {
      return;
    }
  }
  for (auto& out : outputs) {
    if (&out.inputs() != &inputs) {
      out.inputs().clear();
    }
  }
}

void allocate_outputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    bool like_param) {
  const auto& param = inputs[1];
  const auto& v = inputs[2];
  auto& param_out = outputs[0];
  auto& v_out = outputs[1];
  if (!like_param) {
    param_out.set_data(mx::allocator::malloc(param_out.nbytes()));
    v_out.set_data(mx::allocator::malloc(v_out.nbytes()));
    return;
  }
  // The kernels read element i of an input before writing element i of the
  // output that shares its buffer, so donation is safe.
  auto take_or_allocate = [&param](const mx::array& in, mx::array& out) {
    if (laid_like(in, param) && mx::is_donatable(in, out)) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(
          mx::allocator::malloc(out.nbytes()),
          param.data_size(),
          param.strides(),
          param.flags());
    }
  };
  take_or_allocate(param, param_out);
  take_or_allocate(v, v_out);
}

std::vector<mx::array> FusedRMSprop::jvp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::invalid_argument(
      "[FusedRMSprop] an optimizer step has no jvp; differentiate the loss, "
      "not the update.");
}

std::vector<mx::array> FusedRMSprop::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  throw std::invalid_argument(
      "[FusedRMSprop] an optimizer step has no vjp; differentiate the loss, "
      "not the update.");
}

std::pair<std::vector<mx::array>, std::vector<int>> FusedRMSprop::vmap(
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::invalid_argument(
      "[FusedRMSprop] vmap over an optimizer step is not supported; apply it "
      "to each leaf instead.");
}

bool FusedRMSprop::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const FusedRMSprop*>(&other);
  return o != nullptr && alpha_ == o->alpha_ && eps_ == o->eps_;
}

std::vector<mx::Shape> FusedRMSprop::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[1].shape(), inputs[1].shape()};
}

} // namespace mlx_fused_rmsprop
