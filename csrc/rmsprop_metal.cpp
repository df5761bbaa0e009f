// GPU evaluation of FusedRMSprop: dispatch the kernels of kernels/rmsprop.metal,
// from the metallib installed beside this extension or, where none was built
// (no Metal compiler at build time) or MLX_FUSED_RMSPROP_METAL_JIT is set,
// from the shader source embedded in the extension, compiled once per process
// (rmsprop_metal_library.h). Built for real only where MLX has Metal (macOS);
// elsewhere eval_gpu raises.
#include <stdexcept>
#include <string>

#include "rmsprop.h"

#ifdef _METAL_

#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

#include "rmsprop_grid.h"
#include "rmsprop_metal_library.h"

namespace mlx_fused_rmsprop {

namespace {

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

// The library, loaded or compiled on first use; MLX caches it by name.
MTL::Library* rmsprop_library(mx::metal::Device& device) {
  static const MetalLibraryPlan plan = plan_metal_library(extension_dir());
  if (plan.from_metallib) {
    return device.get_library(kMetalLibraryName, plan.metallib_path);
  }
  // Safe math: no fast-math; the source's own pragma turns FMA contraction off.
  mx::CompileOptions options;
  options.math_mode = mx::MathMode::Safe;
  return device.get_library(kMetalLibraryName, options, [] {
    return std::string(kEmbeddedMetalSource);
  });
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
  auto dispatch = choose_gpu_dispatch(grad, param, v);
  bool flat = dispatch.kernel == RMSpropKernel::contiguous;
  allocate_outputs(inputs, outputs, flat);
  if (param.size() == 0) {
    return;
  }

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* kernel = d.get_kernel(
      rmsprop_kernel_name(dispatch.kernel, dtype_name(param.dtype())),
      rmsprop_library(d));

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
  uint64_t inner = 0;
  if (!flat) {
    const auto& layout = dispatch.layout;
    int ndim = static_cast<int>(layout.shape.size());
    encoder.set_vector_bytes(layout.shape, 8);
    encoder.set_vector_bytes(layout.strides[0], 9);
    encoder.set_vector_bytes(layout.strides[1], 10);
    encoder.set_vector_bytes(layout.strides[2], 11);
    encoder.set_bytes(ndim, 12);
    inner = static_cast<uint64_t>(layout.shape.back());
  }

  auto grid = rmsprop_grid(
      rmsprop_threads(dispatch.kernel, size, param.itemsize(), inner),
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
