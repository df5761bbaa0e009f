// Python bindings: mlx_fused_rmsprop._ext
#include <sstream>

#include <nanobind/nanobind.h>
#include <nanobind/operators.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/transforms.h"
#include "mlx/version.h"

#include "cpu/quant_rank.h"
#include "grad_norm.h"
#include "optimizer_step.h"
#include "quant_map.h"
#include "quantize_state.h"
#include "rmsprop.h"
#include "rmsprop_cpu.h"
#include "rmsprop_metal_library.h"
#include "roofline.h"

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

// The step count may be an array (an optimizer's state) or a Python int.
using StepCount = std::variant<mx::array, int64_t>;

std::optional<mx::array> as_step(const std::optional<StepCount>& step) {
  if (!step) {
    return std::nullopt;
  }
  if (auto* value = std::get_if<int64_t>(&*step)) {
    return mx::array(static_cast<int32_t>(*value));
  }
  return std::get<mx::array>(*step);
}

std::string repr(const mlx_fused_rmsprop::RMSpropOptions& o) {
  std::ostringstream out;
  auto flag = [](bool b) { return b ? "True" : "False"; };
  out << "RMSpropOptions(alpha=" << o.alpha << ", eps=" << o.eps
      << ", momentum=" << o.momentum << ", weight_decay=" << o.weight_decay
      << ", centered=" << flag(o.centered) << ", nesterov=" << flag(o.nesterov)
      << ", decoupled_weight_decay=" << flag(o.decoupled_weight_decay)
      << ", eps_in_sqrt=" << flag(o.eps_in_sqrt)
      << ", bias_correction=" << flag(o.bias_correction)
      << ", maximize=" << flag(o.maximize)
      << ", lr_inside_momentum=" << flag(o.lr_inside_momentum)
      << ", rounding=" << o.rounding << ", guarded=" << flag(o.guarded)
      << ", state_bits=" << o.state_bits << ", min_8bit_size=" << o.min_8bit_size << ")";
  return out.str();
}

// The step's values from the bindings' arguments.
mlx_fused_rmsprop::StepValues step_values(
    const LearningRate& lr,
    const std::optional<StepCount>& step,
    const std::optional<mx::array>& clip,
    const std::optional<mx::array>& skip,
    const std::optional<mx::array>& seed) {
  return {as_array(lr), as_step(step), clip, skip, seed};
}

// A single leaf of the op bindings: its state list and config.
mlx_fused_rmsprop::LeafArrays leaf_arrays(
    const mx::array& grad,
    const mx::array& param,
    const std::vector<mx::array>& state,
    const mlx_fused_rmsprop::RMSpropOptions& options,
    bool quantized,
    uint32_t leaf,
    int64_t element_offset) {
  return {grad, param, state,
          mlx_fused_rmsprop::leaf_config(options, param.dtype(), quantized, leaf, element_offset)};
}

mlx_fused_rmsprop::CpuBound parse_bound(const std::string& bound) {
  if (bound == "memory") {
    return mlx_fused_rmsprop::CpuBound::memory;
  }
  if (bound == "compute") {
    return mlx_fused_rmsprop::CpuBound::compute;
  }
  throw std::invalid_argument("bound must be 'memory' or 'compute', not '" + bound + "'.");
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
      // The defaults of RMSprop's constructor (and mlx.optimizers.RMSprop's).
      "alpha"_a = 0.99,
      "eps"_a = 1e-8,
      "stream"_a = nb::none(),
      nb::sig(
          "def rmsprop_update(grad: mlx.core.array, param: mlx.core.array, "
          "v: mlx.core.array, lr: mlx.core.array | float, *, "
          "alpha: float = 0.99, eps: float = 1e-08, "
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
          alpha (float, optional): The smoothing constant :math:`\alpha`
            (>= 0). Default: ``0.99``
          eps (float, optional): :math:`\epsilon` added to the denominator
            (> 0). Default: ``1e-8``
          stream (Stream or Device, optional): Where to run the update.

      Returns:
          tuple(array, array): The updated parameter and ``v``.)");

  using mlx_fused_rmsprop::RMSpropOptions;
  nb::class_<RMSpropOptions>(
      m,
      "RMSpropOptions",
      "What one fused RMSprop variant computes (see RMSprop's docstring); "
      "the defaults are mlx.optimizers.RMSprop's algorithm.")
      .def(
          "__init__",
          [](RMSpropOptions* o,
             double alpha,
             double eps,
             double momentum,
             double weight_decay,
             bool centered,
             bool nesterov,
             bool decoupled_weight_decay,
             bool eps_in_sqrt,
             bool bias_correction,
             bool maximize,
             bool lr_inside_momentum,
             unsigned int rounding,
             bool guarded,
             int state_bits,
             int64_t min_8bit_size) {
            new (o) RMSpropOptions{
                alpha, eps, momentum, weight_decay, centered, nesterov,
                decoupled_weight_decay, eps_in_sqrt, bias_correction, maximize,
                lr_inside_momentum, rounding, guarded, state_bits, min_8bit_size};
          },
          nb::kw_only(),
          "alpha"_a = 0.99,
          "eps"_a = 1e-8,
          "momentum"_a = 0.0,
          "weight_decay"_a = 0.0,
          "centered"_a = false,
          "nesterov"_a = false,
          "decoupled_weight_decay"_a = false,
          "eps_in_sqrt"_a = false,
          "bias_correction"_a = false,
          "maximize"_a = false,
          "lr_inside_momentum"_a = false,
          "rounding"_a = RMSPROP_ROUND_NEAREST,
          "guarded"_a = false,
          "state_bits"_a = 0,
          "min_8bit_size"_a = 4096)
      .def_rw("alpha", &RMSpropOptions::alpha)
      .def_rw("eps", &RMSpropOptions::eps)
      .def_rw("momentum", &RMSpropOptions::momentum)
      .def_rw("weight_decay", &RMSpropOptions::weight_decay)
      .def_rw("centered", &RMSpropOptions::centered)
      .def_rw("nesterov", &RMSpropOptions::nesterov)
      .def_rw("decoupled_weight_decay", &RMSpropOptions::decoupled_weight_decay)
      .def_rw("eps_in_sqrt", &RMSpropOptions::eps_in_sqrt)
      .def_rw("bias_correction", &RMSpropOptions::bias_correction)
      .def_rw("maximize", &RMSpropOptions::maximize)
      .def_rw("lr_inside_momentum", &RMSpropOptions::lr_inside_momentum)
      .def_rw("rounding", &RMSpropOptions::rounding)
      .def_rw("guarded", &RMSpropOptions::guarded)
      .def_rw("state_bits", &RMSpropOptions::state_bits)
      .def_rw("min_8bit_size", &RMSpropOptions::min_8bit_size)
      .def(
          "quantizes",
          &RMSpropOptions::quantizes,
          "size"_a,
          "dtype"_a,
          "Whether a leaf of `size` elements of `dtype` keeps 8-bit state "
          "(state_bits == 8, size >= min_8bit_size, not float64).")
      .def(
          "is_plain",
          &RMSpropOptions::is_plain,
          "True when no option is on: mlx.optimizers.RMSprop's update.")
      .def(
          "flags",
          &RMSpropOptions::flags,
          "The RMSPROP_OPTION_* bits the kernels read (kernels/rmsprop_math.h).")
      .def(
          "state_names",
          &RMSpropOptions::state_names,
          "The state arrays these options keep, in order: 'v', then 'mean' "
          "(centered), then 'momentum_buffer' (momentum > 0).")
      .def(
          "entry_names",
          [](const RMSpropOptions& o, bool quantized, const mx::Dtype& dtype) {
            return mlx_fused_rmsprop::leaf_entry_names(
                o, mlx_fused_rmsprop::leaf_config(o, dtype, quantized));
          },
          "quantized"_a,
          "dtype"_a,
          "The state entries of a leaf of `dtype` (8-bit or not): the state, "
          "'compensation' with Kahan summation of a 16-bit leaf, then the "
          "8-bit state's '<name>_scale' entries.")
      .def(nb::self == nb::self)
      .def("__repr__", &repr);

  m.attr("ROUND_NEAREST") = RMSPROP_ROUND_NEAREST;
  m.attr("ROUND_STOCHASTIC") = RMSPROP_ROUND_STOCHASTIC;
  m.attr("ROUND_KAHAN") = RMSPROP_ROUND_KAHAN;
  m.attr("BLOCK") = RMSPROP_BLOCK;

  m.def(
      "rmsprop_step",
      [](const mx::array& grad,
         const mx::array& param,
         const std::vector<mx::array>& state,
         const LearningRate& lr,
         const std::optional<StepCount>& step,
         const RMSpropOptions& options,
         mx::StreamOrDevice stream,
         bool quantized,
         uint32_t leaf,
         int64_t element_offset,
         const std::optional<mx::array>& clip,
         const std::optional<mx::array>& skip,
         const std::optional<mx::array>& seed) {
        return mlx_fused_rmsprop::rmsprop_step(
            leaf_arrays(grad, param, state, options, quantized, leaf, element_offset),
            step_values(lr, step, clip, skip, seed), options, stream);
      },
      "grad"_a,
      "param"_a,
      "state"_a,
      "lr"_a,
      "step"_a.none(),
      "options"_a,
      "stream"_a = nb::none(),
      nb::kw_only(),
      "quantized"_a = false,
      "leaf"_a = 0,
      "element_offset"_a = 0,
      "clip"_a = nb::none(),
      "skip"_a = nb::none(),
      "seed"_a = nb::none(),
      "One fused step of any RMSprop variant for a single leaf: ONE primitive "
      "whose outputs are [param', *state'], the state entries in "
      "options.entry_names() order (8-bit when `quantized`). `step` (the "
      "1-based step count) is needed for the bias correction and stochastic "
      "rounding, `seed` for the latter (with the leaf's `leaf` number and "
      "its `element_offset` in a larger leaf); `clip` (a 0-d clip factor) "
      "and `skip` (0-d, nonzero: change nothing) need options.guarded.");

  m.def(
      "optimizer_step",
      [](nb::handle gradients,
         nb::handle parameters,
         nb::handle state,
         const std::optional<LearningRate>& lr,
         const std::optional<StepCount>& step,
         const RMSpropOptions& options,
         std::optional<mx::Dtype> half_state_dtype,
         bool build,
         bool allow_missing_state,
         const std::optional<mx::array>& clip,
         const std::optional<mx::array>& skip,
         const std::optional<mx::array>& seed,
         const std::optional<std::vector<std::pair<uint32_t, int64_t>>>& places) {
        std::optional<mlx_fused_rmsprop::StepValues> values;
        if (lr) {
          values = step_values(*lr, step, clip, skip, seed);
        }
        std::optional<std::vector<mlx_fused_rmsprop::LeafPlace>> leaf_places;
        if (places) {
          leaf_places.emplace();
          for (const auto& [leaf, offset] : *places) {
            leaf_places->push_back({leaf, offset});
          }
        }
        return mlx_fused_rmsprop::optimizer_step(
            gradients, parameters, state, values, options, half_state_dtype, build,
            allow_missing_state, leaf_places);
      },
      "gradients"_a,
      "parameters"_a,
      "state"_a,
      "lr"_a.none(),
      "step"_a.none(),
      "options"_a,
      "half_state_dtype"_a.none(),
      "build"_a,
      "allow_missing_state"_a = false,
      nb::kw_only(),
      "clip"_a = nb::none(),
      "skip"_a = nb::none(),
      "seed"_a = nb::none(),
      "places"_a = nb::none(),
      "One optimizer step over a tree (RMSprop.apply_gradients): check every "
      "leaf, naming the first bad one's path; with build, build every leaf's "
      "primitive, write the new state into the state dicts and return the new "
      "parameters shaped like gradients. Nothing changes unless every leaf "
      "passes. `places` gives each gradient leaf (a list of pieces, sharded) "
      "its whole leaf's number and element offset for stochastic rounding.");

  m.def(
      "tree_squared_norm",
      &mlx_fused_rmsprop::tree_squared_norm,
      "gradients"_a,
      "The sum of the squares of every gradient leaf in tree_flatten order, "
      "as mlx.optimizers.clip_grad_norm sums them (float32; float64 with "
      "float64 leaves), one fused read-only pass per leaf on the CPU.");

  m.def(
      "squared_norm",
      [](const mx::array& g, mx::StreamOrDevice stream) {
        return mlx_fused_rmsprop::squared_norm(g, stream);
      },
      "g"_a,
      "stream"_a = nb::none(),
      "sum(g * g) of one gradient (float16 / bfloat16 widened to float32).");

  m.def(
      "_fused_squared_norm",
      [](mx::StreamOrDevice stream) {
        return mlx_fused_rmsprop::fused_squared_norm(mx::to_stream(stream));
      },
      "stream"_a = nb::none(),
      "For tests: whether squared_norm runs the fused pass on this stream.");

  m.def(
      "quantize_state",
      [](const mx::array& x, bool is_v) {
        auto out = mlx_fused_rmsprop::quantize_state(x, is_v);
        return nb::make_tuple(out[0], out[1]);
      },
      "x"_a,
      "is_v"_a,
      "(codes, scales) of a full-precision state entry in the 8-bit layout "
      "(the unsigned map for v, the signed one otherwise), as the kernels "
      "requantize; runs on the CPU stream.");

  m.def(
      "dequantize_state",
      &mlx_fused_rmsprop::dequantize_state,
      "codes"_a,
      "scales"_a,
      "is_v"_a,
      "The float32 values of an 8-bit state entry, map[code] * scale, as the "
      "kernels dequantize; runs on the CPU stream.");

  m.def(
      "dynamic_map",
      [](bool is_signed) {
        const auto& map = mlx_fused_rmsprop::dynamic_map(is_signed);
        nb::dict out;
        out["values"] = std::vector<float>(std::begin(map.value), std::end(map.value));
        out["bounds"] = std::vector<float>(std::begin(map.bound), std::end(map.bound));
        out["zero_code"] = map.zero_code;
        out["negative_codes"] = map.negative_codes;
        return out;
      },
      "signed"_a,
      "The 8-bit state's dynamic quantization map as the kernels read it: "
      "'values' (256, sorted), 'bounds' (the float32 midpoints between "
      "consecutive magnitudes from the zero code up, +inf padded), "
      "'zero_code', 'negative_codes'.");

  m.def(
      "_rank_search_mismatches",
      [](bool is_signed, int random_values) {
        // The CPU's table search against the shader's binary search, at
        // every bound and bucket edge (+-2 ulps) and at random values.
        const auto& map = mlx_fused_rmsprop::dynamic_map(is_signed);
        const auto& table = mlx_fused_rmsprop::rank_table(!is_signed);
        using T = mlx_fused_rmsprop::QuantRankTable;
        int64_t mismatches = 0;
        auto check = [&](uint32_t bits) {
          if (bits > 0x3F800000u) {
            return;
          }
          float a = std::bit_cast<float>(bits);
          mismatches += mlx_fused_rmsprop::fast_magnitude_rank(a, table) !=
              rmsprop_magnitude_rank(a, &map);
        };
        auto around = [&](uint32_t bits) {
          for (int d = -2; d <= 2; ++d) {
            check(bits + static_cast<uint32_t>(d));
          }
        };
        for (int k = 0; k < 255; ++k) {
          if (map.bound[k] <= 1.0f) {
            around(std::bit_cast<uint32_t>(map.bound[k]));
          }
        }
        for (uint32_t b = 0; b < T::kBuckets; ++b) {
          around(T::kBase + (b << T::kShift));
        }
        around(0u);
        uint32_t x = 12345u;
        for (int i = 0; i < random_values; ++i) {
          x = x * 1664525u + 1013904223u;
          check(x % 0x3F800001u);
        }
        return mismatches;
      },
      "signed"_a,
      "random_values"_a = 1000000,
      "For tests: how often the CPU's rank-table search differs from the "
      "binary search of kernels/rmsprop_math.h.");

  m.def(
      "_gpu_dispatch",
      [](const std::vector<mx::array>& arrays,
         const std::vector<mx::array>& scales,
         bool quantized,
         unsigned int rounding) {
        std::vector<mx::array> all(arrays);
        all.insert(all.end(), scales.begin(), scales.end());
        mx::eval(all); // layouts are known once evaluated
        mlx_fused_rmsprop::LeafConfig config;
        config.quantized = quantized;
        config.rounding = rounding;
        std::span<const mx::array> walked(arrays);
        auto dispatch = mlx_fused_rmsprop::choose_gpu_dispatch(walked, config, scales);
        nb::dict out;
        out["kernel"] = mlx_fused_rmsprop::rmsprop_kernel_kind(dispatch.kernel);
        out["shape"] =
            std::vector<int>(dispatch.layout.shape.begin(), dispatch.layout.shape.end());
        std::vector<std::vector<int64_t>> strides;
        for (const auto& st : dispatch.layout.strides) {
          strides.emplace_back(st.begin(), st.end());
        }
        out["strides"] = strides;
        out["outputs_like_param"] = dispatch.outputs_like_param;
        if (quantized) {
          out["outputs_fit"] = mlx_fused_rmsprop::quantized_outputs_fit(
              walked, scales, config.compensated());
        }
        return out;
      },
      "arrays"_a,
      "scales"_a = std::vector<mx::array>{},
      "quantized"_a = false,
      "rounding"_a = RMSPROP_ROUND_NEAREST,
      "For tests (the Metal-as-C++ harness): how eval_gpu dispatches a leaf "
      "whose walked arrays are `arrays` (grad, param, the state or codes, "
      "[compensation]) and, 8-bit, whose scales are `scales`, rounded as "
      "`rounding` says: 'kernel' ('contiguous', 'general_idx32', "
      "'general_idx64'), the general kernels' collapsed 'shape' and each "
      "array's 'strides', 'outputs_like_param' (param is dense), and for "
      "8-bit state 'outputs_fit': per output, whether its input's layout "
      "lets it take the input's buffer (allocate_quantized_outputs).");

  m.def(
      "_cpu_walk",
      [](nb::args args) {
        auto arrays = nb::cast<std::vector<mx::array>>(args);
        mx::eval(arrays); // layouts are known once evaluated
        return mlx_fused_rmsprop::cpu_walk_name(
            mlx_fused_rmsprop::choose_cpu_dispatch(arrays, {}).walk);
      },
      nb::sig(
          "def _cpu_walk(grad: mlx.core.array, param: mlx.core.array, "
          "*state: mlx.core.array) -> str"),
      "For tests: the walk eval_cpu takes for grad, param and the state "
      "arrays: 'flat', 'transposed' (tiled), 'strided_like_param' or "
      "'strided'.");

  m.def(
      "_cpu_bound",
      [](nb::args args, bool quantized) {
        auto arrays = nb::cast<std::vector<mx::array>>(args);
        mx::eval(arrays);
        mlx_fused_rmsprop::LeafConfig config;
        config.quantized = quantized;
        return mlx_fused_rmsprop::cpu_bound_name(
            mlx_fused_rmsprop::choose_cpu_dispatch(arrays, config).bound);
      },
      "state"_a,
      "quantized"_a = false,
      nb::sig(
          "def _cpu_bound(grad: mlx.core.array, param: mlx.core.array, "
          "*state: mlx.core.array, quantized: bool = False) -> str"),
      "For tests and the bench: what eval_cpu takes to bound the leaf's loop, "
      "'memory' or 'compute', which decides how many threads split it "
      "(`quantized`: the state is 8-bit codes).");

  m.def(
      "_split_threads",
      [](const std::string& bound, std::optional<int> cores) {
        auto b = parse_bound(bound);
        return cores ? mlx_fused_rmsprop::threads_for(b, *cores)
                     : mlx_fused_rmsprop::split_threads(b);
      },
      "bound"_a,
      "cores"_a = nb::none(),
      "For tests: the threads a leaf of this bound is split across in this "
      "process (MLX_FUSED_RMSPROP_NUM_THREADS or the policy on this machine's "
      "cores), or with `cores` what the policy gives on that many cores.");

  m.def(
      "_split_parts",
      [](int64_t elements, const std::string& bound) {
        return mlx_fused_rmsprop::split_parts(elements, parse_bound(bound));
      },
      "elements"_a,
      "bound"_a,
      "The threads the CPU kernel splits a leaf of `elements` elements with "
      "this bound ('memory' or 'compute', see _cpu_bound) across in this "
      "process.");

  nb::class_<mlx_fused_rmsprop::StepPatternRoofline>(
      m,
      "StepPatternRoofline",
      "The benchmark's memory limit for the fused step's own access pattern. "
      "StepPatternRoofline(bytes_per_array): the plain step, three buffers "
      "(grad, param, v) of `bytes_per_array` bytes. "
      "StepPatternRoofline(elements, param_bytes, state_bytes, block_scales): "
      "grad and param of `param_bytes` per element, one state entry of "
      "`state_bytes` per element and, with `block_scales`, a float32 scale per "
      "256 elements (8-bit state), walked block by block. run() reads every "
      "buffer and writes all but grad back in place with trivial math.")
      .def(nb::init<int64_t>(), "bytes_per_array"_a)
      .def(
          nb::init<int64_t, int, int, bool>(),
          "elements"_a,
          "param_bytes"_a,
          "state_bytes"_a,
          "block_scales"_a = false)
      .def(
          "run",
          &mlx_fused_rmsprop::StepPatternRoofline::run,
          "threads"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          "One pass, split into `threads` parts on the kernel's worker pool.")
      .def_prop_ro(
          "bytes_per_array",
          &mlx_fused_rmsprop::StepPatternRoofline::bytes_per_array,
          "Bytes of grad (and of param), rounded up to whole 64-bit words "
          "(to whole 8-element units with `elements`).")
      .def_prop_ro(
          "bytes_moved",
          &mlx_fused_rmsprop::StepPatternRoofline::bytes_moved,
          "Bytes one pass reads and writes: grad, param, state and scales read; "
          "param, state and scales written (5 x bytes_per_array for the plain step).")
      .def(
          "sums",
          &mlx_fused_rmsprop::StepPatternRoofline::sums,
          "For tests: sums (mod 2**64) of param's and of the state's 64-bit words.")
      .def(
          "scale_sum",
          &mlx_fused_rmsprop::StepPatternRoofline::scale_sum,
          "For tests: the sum of the block scales (0 without them).");

  m.def(
      "_cpu_isa",
      &mlx_fused_rmsprop::cpu_isa_name,
      "For tests: the instruction-set build of the CPU loops this process "
      "runs: 'baseline', 'avx2' or 'avx512' (the widest the CPU has, capped "
      "by MLX_FUSED_RMSPROP_ISA=baseline|avx2).");

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
      "_gpu_array_slots",
      &mlx_fused_rmsprop::gpu_array_slots,
      "options"_a,
      "plain"_a,
      "compensated"_a = false,
      "For tests (the harness): which walked array (0 grad, 1 param, 2... "
      "the state, then the compensation) each array buffer of the GPU kernel "
      "takes.");

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
