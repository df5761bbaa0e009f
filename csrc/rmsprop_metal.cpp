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

#include "quant_map.h"
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
  const auto in = split_inputs(inputs, options_, config_);
  const auto& walked = in.walked;
  const auto& param = walked[1];
  const auto& state_dtype = walked[2].dtype();
  const bool quantized = config_.quantized;
  const bool plain = runs_plain_kernels(options_, config_, param.dtype(), state_dtype);

  auto dispatch = choose_gpu_dispatch(walked, config_, in.scales);
  const bool flat = dispatch.kernel == RMSpropKernel::contiguous;
  if (quantized) {
    allocate_quantized_outputs(walked, in.scales, outputs, config_.compensated());
  } else {
    allocate_outputs(walked, outputs, flat);
  }
  if (param.size() == 0) {
    return;
  }

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  const auto dtype = dtype_name(param.dtype());
  const auto name = plain ? rmsprop_kernel_name(dispatch.kernel, dtype)
      : quantized         ? rmsprop_q8_kernel_name(dispatch.kernel, dtype)
                          : rmsprop_variant_kernel_name(
                        dispatch.kernel, dtype, dtype_name(state_dtype));
  auto* kernel = d.get_kernel(name, rmsprop_library(d));
  const auto max_group = static_cast<uint32_t>(kernel->maxTotalThreadsPerThreadgroup());
  if (quantized &&
      (kernel->threadExecutionWidth() != RMSPROP_SIMD_WIDTH ||
       max_group < RMSPROP_SIMD_WIDTH)) {
    // The 8-bit kernels give each block one SIMD-group of exactly
    // RMSPROP_SIMD_WIDTH lanes (simd_max over the block).
    throw std::runtime_error(
        "[FusedRMSprop] the 8-bit state kernel " + name + " needs SIMD-groups of " +
        std::to_string(RMSPROP_SIMD_WIDTH) + " threads; this GPU's pipeline has " +
        std::to_string(kernel->threadExecutionWidth()) + " (at most " +
        std::to_string(max_group) + " threads per threadgroup).");
  }

  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  // Buffers (kernels/rmsprop.metal lists them per family): the kernel's
  // arrays (gpu_array_slots), the 8-bit scales, the step's packed scalars,
  // the rounding key (variants and 8-bit; the packed scalars stand in
  // without stochastic rounding), the outputs, the 8-bit maps, the constants,
  // size; the general kernels add shape, strides, ndim (and the 8-bit
  // layout).
  const auto slots = gpu_array_slots(options_, plain, config_.compensated());
  const size_t walked_outputs = walked.size() - 1;
  int at = 0;
  for (size_t slot : slots) {
    encoder.set_input_array(walked[slot], at++);
  }
  if (quantized) {
    for (size_t e = 0; e < 3; ++e) {
      encoder.set_input_array(in.scales[slots[2 + e] - 2], at++);
    }
  }
  const auto& packed = *in.packed;
  encoder.set_input_array(packed, at++);
  if (!plain) {
    encoder.set_input_array(in.key ? *in.key : packed, at++);
  }
  for (size_t i = 1; i < slots.size(); ++i) {
    encoder.set_output_array(outputs[slots[i] - 1], at++);
  }
  if (quantized) {
    for (size_t e = 0; e < 3; ++e) {
      encoder.set_output_array(outputs[walked_outputs + slots[2 + e] - 2], at++);
    }
    encoder.set_bytes(state_map(true), at++);
    encoder.set_bytes(state_map(false), at++);
  }
  if (plain) {
    auto k = make_coefficients<float>(0.0f, options_.alpha, options_.eps);
    RMSpropDeviceScalars device_scalars{k.alpha, k.one_minus_alpha, k.eps};
    encoder.set_bytes(device_scalars, at++);
  } else {
    encoder.set_bytes(make_variant_constants<float>(options_), at++);
    const auto offset = static_cast<uint64_t>(config_.element_offset);
    RMSpropLeafConstants leaf{
        config_.rounding, config_.leaf, static_cast<uint32_t>(offset),
        static_cast<uint32_t>(offset >> 32)};
    encoder.set_bytes(leaf, at++);
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
    if (quantized) {
      RMSpropQuantizedLayout layout{};
      for (size_t e = 0; e < 3; ++e) {
        layout.scale_stride[e] = in.scales[slots[2 + e] - 2].strides()[0];
      }
      layout.outputs_like_param = dispatch.outputs_like_param ? 1u : 0u;
      encoder.set_bytes(layout, at++);
    }
  }

  RMSpropGrid grid;
  if (quantized) {
    grid = rmsprop_q8_grid(rmsprop_q8_threads(size), max_group);
  } else {
    uint64_t inner = flat ? 0 : static_cast<uint64_t>(collapsed.shape.back());
    grid = rmsprop_grid(
        rmsprop_threads(dispatch.kernel, size, param.itemsize(), inner), max_group);
  }
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
