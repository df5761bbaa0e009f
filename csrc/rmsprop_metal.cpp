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
  release_sibling_inputs(inputs, outputs);
  auto [walked, scalars] = split_inputs(inputs, options_);
  const auto& param = walked[1];
  const auto& state_dtype = walked[2].dtype();
  const bool plain = runs_plain_kernels(options_, param.dtype(), state_dtype);

  auto dispatch = choose_gpu_dispatch(walked);
  bool flat = dispatch.kernel == RMSpropKernel::contiguous;
  allocate_outputs(walked, outputs, flat);
  if (param.size() == 0) {
    return;
  }

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto name = plain
      ? rmsprop_kernel_name(dispatch.kernel, dtype_name(param.dtype()))
      : rmsprop_variant_kernel_name(
            dispatch.kernel, dtype_name(param.dtype()), dtype_name(state_dtype));
  auto* kernel = d.get_kernel(name, rmsprop_library(d));

  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  // Buffers (kernels/rmsprop.metal): the kernel's arrays, the step's scalars
  // (lr, then the bias correction for the variants), the outputs, the
  // constants, size; the general kernels add shape, strides, ndim.
  auto slots = gpu_array_slots(options_, plain);
  int at = 0;
  for (size_t slot : slots) {
    encoder.set_input_array(walked[slot], at++);
  }
  const auto& lr = scalars[0];
  encoder.set_input_array(lr, at++);
  if (!plain) {
    // Read only with bias correction (RMSPROP_OPTION_BIAS_CORRECTION).
    encoder.set_input_array(options_.bias_correction ? scalars[1] : lr, at++);
  }
  for (size_t i = 1; i < slots.size(); ++i) {
    encoder.set_output_array(outputs[slots[i] - 1], at++);
  }
  if (plain) {
    auto k = make_coefficients<float>(0.0f, options_.alpha, options_.eps);
    RMSpropDeviceScalars device_scalars{k.alpha, k.one_minus_alpha, k.eps};
    encoder.set_bytes(device_scalars, at++);
  } else {
    encoder.set_bytes(make_variant_constants<float>(options_), at++);
  }
  uint64_t size = param.size();
  encoder.set_bytes(size, at++);
  const auto& collapsed = dispatch.layout;
  if (!flat) {
    std::vector<int64_t> strides;
    for (size_t slot : slots) {
      const auto& st = collapsed.strides[slot];
      strides.insert(strides.end(), st.begin(), st.end());
    }
    int ndim = static_cast<int>(collapsed.shape.size());
    encoder.set_vector_bytes(collapsed.shape, at++);
    encoder.set_vector_bytes(strides, at++);
    encoder.set_bytes(ndim, at++);
  }

  uint64_t inner = flat ? 0 : static_cast<uint64_t>(collapsed.shape.back());
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
