// GPU evaluation of FusedRMSprop: dispatch the kernels of kernels/rmsprop.metal
// from the metallib installed beside this extension. Built for real only where
// MLX has Metal (macOS); elsewhere eval_gpu raises.
#include <stdexcept>
#include <string>

#include "rmsprop.h"

#ifdef _METAL_

#include <dlfcn.h>

#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

#include "rmsprop_grid.h"

namespace mlx_fused_rmsprop {

namespace {

// The folder holding this shared library; rmsprop.metallib is installed there.
std::string extension_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&extension_dir), &info) == 0 ||
      info.dli_fname == nullptr) {
    throw std::runtime_error(
        "[FusedRMSprop] cannot locate the extension to load rmsprop.metallib.");
  }
  std::string path(info.dli_fname);
  return path.substr(0, path.find_last_of('/'));
}

std::string dtype_name(mx::Dtype dtype) {
  switch (dtype) {
    case mx::float32:
      return "float32";
    case mx::float16:
      return "float16";
    case mx::bfloat16:
      return "bfloat16";
    default:
      throw std::invalid_argument(
          "[FusedRMSprop] unsupported dtype reached the GPU kernel.");
  }
}

} // namespace

void FusedRMSprop::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];
  const auto& lr = inputs[3];

  release_sibling_inputs(inputs, outputs);
  bool flat = is_flat_layout(grad, param, v);
  allocate_outputs(inputs, outputs, flat);
  if (param.size() == 0) {
    return;
  }

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* library = d.get_library("rmsprop", extension_dir());
  auto* kernel = d.get_kernel(
      rmsprop_kernel_name(flat, dtype_name(param.dtype())), library);

  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  encoder.set_input_array(grad, 0);
  encoder.set_input_array(param, 1);
  encoder.set_input_array(v, 2);
  encoder.set_input_array(lr, 3);
  encoder.set_output_array(outputs[0], 4);
  encoder.set_output_array(outputs[1], 5);
  auto k = make_coefficients<float>(0.0f, alpha_, eps_);
  RMSpropDeviceScalars scalars{k.alpha, k.one_minus_alpha, k.eps};
  encoder.set_bytes(scalars, 6);
  uint64_t size = param.size();
  encoder.set_bytes(size, 7);
  if (!flat) {
    auto layout = collapse_layout(grad, param, v);
    int ndim = static_cast<int>(layout.shape.size());
    encoder.set_vector_bytes(layout.shape, 8);
    encoder.set_vector_bytes(layout.strides[0], 9);
    encoder.set_vector_bytes(layout.strides[1], 10);
    encoder.set_vector_bytes(layout.strides[2], 11);
    encoder.set_bytes(ndim, 12);
  }

  auto grid = rmsprop_grid(
      size,
      rmsprop_elements_per_thread(flat, param.itemsize()),
      static_cast<uint32_t>(kernel->maxTotalThreadsPerThreadgroup()));
  encoder.dispatch_threads(
      MTL::Size(grid.width, grid.height, 1),
      MTL::Size(grid.group_width, 1, 1));
}

} // namespace mlx_fused_rmsprop

#else // MLX without Metal: the GPU path does not exist in this build.

namespace mlx_fused_rmsprop {

void FusedRMSprop::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[FusedRMSprop] this build of mlx_fused_rmsprop has no GPU kernels "
      "(MLX was built without Metal); run the update on the CPU stream.");
}

} // namespace mlx_fused_rmsprop

#endif
