// Python bindings: mlx_fused_rmsprop._ext
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/transforms.h"
#include "mlx/version.h"

#include "rmsprop.h"
#include "rmsprop_cpu.h"
#include "rmsprop_metal_library.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// lr may be an array or a Python number; a number becomes a float32 scalar,
// as mx.array(lr) and the optimizers' state would make it.
using LearningRate = std::variant<mx::array, double>;

mx::array as_array(const LearningRate& lr) {
  if (auto* value = std::get_if<double>(&lr)) {
    return mx::array(static_cast<float>(*value));
  }
  return std::get<mx::array>(lr);
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "The fused RMSprop primitive for MLX (C++ extension).";

  m.def(
      "rmsprop_update",
      [](const mx::array& grad,
         const mx::array& param,
         const mx::array& v,
         const LearningRate& lr,
         double alpha,
         double eps,
         mx::StreamOrDevice stream) {
        auto out = mlx_fused_rmsprop::rmsprop_update(
            grad, param, v, as_array(lr), alpha, eps, stream);
        return nb::make_tuple(out[0], out[1]);
      },
      "grad"_a,
      "param"_a,
      "v"_a,
      "lr"_a,
      nb::kw_only(),
      "alpha"_a,
      "eps"_a,
      "stream"_a = nb::none(),
      nb::sig(
          "def rmsprop_update(grad: mlx.core.array, param: mlx.core.array, "
          "v: mlx.core.array, lr: mlx.core.array | float, *, alpha: float, "
          "eps: float, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> tuple[mlx.core.array, mlx.core.array]"),
      R"(One fused RMSprop step for a single leaf.

      .. math::

          v' &= \alpha v + (1 - \alpha) g^2 \\
          w' &= w - \lambda \frac{g}{\sqrt{v'} + \epsilon}

      Builds ONE graph node (primitive ``FusedRMSprop``) with two outputs.

      Args:
          grad (array): The gradient :math:`g`.
          param (array): The parameter :math:`w` (same shape and dtype).
          v (array): The running average of squared gradients (same shape and dtype).
          lr (array or float): The learning rate :math:`\lambda`: a
            single-element array, or a number (taken as float32).
          alpha (float): The smoothing constant :math:`\alpha` (>= 0).
          eps (float): :math:`\epsilon` added to the denominator (> 0).
          stream (Stream or Device, optional): Where to run the update.

      Returns:
          tuple(array, array): The updated parameter and ``v``.)");

  m.def(
      "check_rmsprop_inputs",
      [](const mx::array& grad,
         const mx::array& param,
         const mx::array& v,
         const LearningRate& lr,
         double alpha,
         double eps,
         mx::StreamOrDevice stream) {
        mlx_fused_rmsprop::check_rmsprop_inputs(
            grad, param, v, as_array(lr), alpha, eps, mx::to_stream(stream));
      },
      "grad"_a,
      "param"_a,
      "v"_a,
      "lr"_a,
      nb::kw_only(),
      "alpha"_a,
      "eps"_a,
      "stream"_a = nb::none(),
      "Raise ValueError unless the arguments form a valid rmsprop_update call.");

  m.def(
      "_dispatch_layout",
      [](mx::array grad, mx::array param, mx::array v) {
        mx::eval({grad, param, v}); // layouts are known once evaluated
        auto dispatch = mlx_fused_rmsprop::choose_gpu_dispatch(grad, param, v);
        std::vector<int> shape(
            dispatch.layout.shape.begin(), dispatch.layout.shape.end());
        std::vector<std::vector<int64_t>> strides;
        for (const auto& s : dispatch.layout.strides) {
          strides.emplace_back(s.begin(), s.end());
        }
        return nb::make_tuple(
            mlx_fused_rmsprop::rmsprop_kernel_kind(dispatch.kernel), shape, strides);
      },
      "grad"_a,
      "param"_a,
      "v"_a,
      "For tests (the Metal-as-C++ harness): (kernel, shape, strides) as "
      "eval_gpu would choose them -- kernel 'contiguous', 'general_idx32' or "
      "'general_idx64'; for the general kernels the collapsed shape and the "
      "grad/param/v strides it walks (empty for 'contiguous').");

  m.def(
      "_cpu_walk",
      [](mx::array grad, mx::array param, mx::array v) {
        mx::eval({grad, param, v}); // layouts are known once evaluated
        return mlx_fused_rmsprop::cpu_walk_name(
            mlx_fused_rmsprop::choose_cpu_dispatch(grad, param, v).walk);
      },
      "grad"_a,
      "param"_a,
      "v"_a,
      "For tests: the walk eval_cpu takes for these arrays: 'flat', "
      "'transposed' (tiled), 'strided_like_param' or 'strided'.");

  m.def(
      "_split_stats",
      [] {
        auto stats = mlx_fused_rmsprop::split_stats();
        nb::dict out;
        out["pooled"] = stats.pooled;
        out["busy_fallbacks"] = stats.busy_fallbacks;
        return out;
      },
      "For tests: leaves split across the CPU worker pool so far, and split "
      "leaves that found the pool busy and ran every part on their own thread.");

  m.def(
      "_metal_library_plan",
      [](const std::string& extension_dir) {
        auto plan = mlx_fused_rmsprop::plan_metal_library(extension_dir);
        return nb::make_tuple(
            plan.from_metallib ? "metallib" : "source", plan.metallib_path);
      },
      "extension_dir"_a,
      "For tests: where eval_gpu would take its kernels from for an extension "
      "in `extension_dir`: ('metallib', path) or ('source', '') -- the "
      "embedded source, compiled at run time.");

  // kernels/rmsprop.metal with rmsprop_math.h inlined, as eval_gpu compiles
  // it when no metallib is installed.
  m.attr("metal_source") = std::string(mlx_fused_rmsprop::kEmbeddedMetalSource);
  m.attr("extension_dir") = mlx_fused_rmsprop::extension_dir();

  // What this binary was compiled against; the package compares it with the
  // mlx found at import time.
  m.attr("built_mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." +
      std::to_string(MLX_VERSION_MINOR) + "." +
      std::to_string(MLX_VERSION_PATCH);
#ifdef _METAL_
  m.attr("has_metal_kernels") = true;
#else
  m.attr("has_metal_kernels") = false;
#endif
}
