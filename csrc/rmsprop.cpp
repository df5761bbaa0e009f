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

} // namespace

std::vector<std::string> RMSpropOptions::state_names() const {
  std::vector<std::string> names = {"v"};
  if (centered) {
    names.push_back("mean");
  }
  if (momentum > 0.0) {
    names.push_back("momentum_buffer");
  }
  return names;
}

bool is_half(mx::Dtype dtype) {
  return dtype == mx::float16 || dtype == mx::bfloat16;
}

LeafConfig leaf_config(
    const RMSpropOptions& options,
    mx::Dtype dtype,
    bool quantized,
    uint32_t leaf,
    int64_t element_offset) {
  LeafConfig config;
  config.quantized = quantized;
  config.rounding = is_half(dtype) ? options.rounding : RMSPROP_ROUND_NEAREST;
  config.leaf = leaf;
  config.element_offset = element_offset;
  return config;
}

std::vector<std::string> leaf_entry_names(
    const RMSpropOptions& options,
    const LeafConfig& config) {
  auto names = options.state_names();
  const size_t state = names.size();
  if (config.compensated()) {
    names.push_back("compensation");
  }
  if (config.quantized) {
    for (size_t i = 0; i < state; ++i) {
      names.push_back(names[i] + "_scale");
    }
  }
  return names;
}

EntryCounts entry_counts(const RMSpropOptions& options, const LeafConfig& config) {
  size_t state = options.state_count();
  return {state, config.compensated() ? 1u : 0u, config.quantized ? state : 0u};
}

namespace {

// Messages name the op: rmsprop_update (the plain step: only alpha and eps
// set) or rmsprop_step (any other option set, valid or not).
const char* op_name(const RMSpropOptions& options) {
  RMSpropOptions others = options;
  others.alpha = RMSpropOptions{}.alpha;
  others.eps = RMSpropOptions{}.eps;
  return others == RMSpropOptions{} ? "[rmsprop_update] " : "[rmsprop_step] ";
}

// Throws std::invalid_argument with the op's name and what `write` says. The
// message is only built here, on failure: the checks run once per leaf and
// step, so the passing path allocates nothing.
template <class Write>
[[noreturn]] void fail(const RMSpropOptions& options, const Write& write) {
  std::ostringstream msg;
  msg << op_name(options);
  write(msg);
  throw std::invalid_argument(msg.str());
}

// A single-element real array (lr, step).
void check_scalar(
    const mx::array& a,
    const char* what,
    const RMSpropOptions& options,
    bool is_flag = false) {
  if (a.size() != 1) {
    fail(options, [&](std::ostream& m) {
      m << what << " must be a scalar, got shape " << a.shape() << ".";
    });
  }
  if (mx::issubdtype(a.dtype(), mx::complexfloating)) {
    fail(options, [&](std::ostream& m) {
      m << what << " must be real, got " << a.dtype() << ".";
    });
  }
  // A bool array would count as 1 (a learning rate of 1, step 1); a flag
  // (the skip flag) is one.
  if (a.dtype() == mx::bool_ && !is_flag) {
    fail(options, [&](std::ostream& m) {
      m << what << " must be a number, got bool.";
    });
  }
}

} // namespace

void check_options(const RMSpropOptions& o) {
  auto must = [&](bool ok, const char* name, double value, const char* rule) {
    if (!ok) {
      fail(o, [&](std::ostream& m) {
        m << name << " must be a finite number " << rule << ", got " << value << ".";
      });
    }
  };
  must(o.alpha >= 0.0 && std::isfinite(o.alpha), "alpha", o.alpha, ">= 0");
  must(o.eps > 0.0 && std::isfinite(o.eps), "eps", o.eps, "> 0");
  must(o.momentum >= 0.0 && std::isfinite(o.momentum), "momentum", o.momentum, ">= 0");
  must(
      o.weight_decay >= 0.0 && std::isfinite(o.weight_decay),
      "weight_decay",
      o.weight_decay,
      ">= 0");
  if (o.state_bits != 0 && o.state_bits != 8) {
    fail(o, [&](std::ostream& m) {
      m << "state_bits must be 8 (or None), got " << o.state_bits << ".";
    });
  }
  if (o.min_8bit_size < 0) {
    fail(o, [&](std::ostream& m) {
      m << "min_8bit_size must be an int >= 0, got " << o.min_8bit_size << ".";
    });
  }
  if (o.rounding > RMSPROP_ROUND_KAHAN) {
    fail(o, [&](std::ostream& m) { m << "unknown rounding mode " << o.rounding << "."; });
  }
  if (o.nesterov && !(o.momentum > 0.0)) {
    fail(o, [&](std::ostream& m) {
      m << "nesterov needs momentum > 0, got momentum=" << o.momentum << ".";
    });
  }
}

void check_step_values(
    const StepValues& values,
    const RMSpropOptions& options,
    bool stochastic) {
  check_scalar(values.lr, "learning rate", options);
  auto needs = [&](const std::optional<mx::array>& value, bool needed,
                   const char* what, const char* why) {
    if (!needed) {
      return;
    }
    if (!value) {
      fail(options, [&](std::ostream& m) { m << why; });
    }
    check_scalar(*value, what, options);
  };
  needs(values.step, options.bias_correction, "step",
        "bias_correction needs the step count (step=...).");
  needs(values.step, stochastic, "step",
        "stochastic rounding needs the step count (step=...).");
  needs(values.seed, stochastic, "seed", "stochastic rounding needs a seed (seed=...).");
  if (values.clip) {
    check_scalar(*values.clip, "clip factor", options);
  }
  if (values.skip) {
    check_scalar(*values.skip, "skip flag", options, true);
  }
}

void check_leaf(
    const LeafArrays& leaf,
    const RMSpropOptions& options,
    const mx::Stream& stream) {
  const auto& grad = leaf.grad;
  const auto& param = leaf.param;
  const auto& state = leaf.state;
  const bool on_gpu = stream.device == mx::Device::gpu;
  if (!is_supported_dtype(param.dtype(), on_gpu)) {
    fail(options, [&](std::ostream& m) {
      m << "parameter dtype " << param.dtype() << " is not supported on "
        << stream.device
        << "; RMSprop updates float32, float16 and bfloat16 parameters"
        << (on_gpu ? "" : " (and float64 on the CPU)") << ".";
    });
  }
  const auto names = leaf_entry_names(options, leaf.config);
  const auto counts = entry_counts(options, leaf.config);
  if (state.size() != names.size()) {
    fail(options, [&](std::ostream& m) {
      m << "expected " << names.size() << " state array"
        << (names.size() == 1 ? "" : "s") << " (";
      for (size_t i = 0; i < names.size(); ++i) {
        m << (i ? ", " : "") << names[i];
      }
      m << ") for these options, got " << state.size() << ".";
    });
  }
  if (leaf.config.compensated() && !is_half(param.dtype())) {
    fail(options, [&](std::ostream& m) {
      m << "Kahan compensation is kept for float16 and bfloat16 parameters only, "
        << "not " << param.dtype() << ".";
    });
  }
  // grad and the state must be laid over param element for element.
  auto check_shape = [&](const mx::array& a, const mx::Shape& shape, auto&& what) {
    if (a.shape() != shape) {
      fail(options, [&](std::ostream& m) {
        what(m);
        m << " shape " << a.shape() << " does not match "
          << (&shape == &param.shape() ? "parameter shape " : "the expected shape ")
          << shape << ".";
      });
    }
  };
  if (grad.dtype() != param.dtype()) {
    fail(options, [&](std::ostream& m) {
      m << "gradient dtype " << grad.dtype() << " does not match parameter dtype "
        << param.dtype() << ".";
    });
  }
  check_shape(grad, param.shape(), [](std::ostream& m) { m << "gradient"; });
  auto entry = [&](size_t i) {
    return [&names, i](std::ostream& m) { m << "state '" << names[i] << "'"; };
  };
  auto require_dtype = [&](size_t i, mx::Dtype want, const char* rule) {
    if (state[i].dtype() != want) {
      fail(options, [&](std::ostream& m) {
        entry(i)(m);
        m << " dtype " << state[i].dtype() << " is not " << want << " (" << rule << ").";
      });
    }
  };
  if (leaf.config.quantized) {
    // 8-bit: codes of param's shape, a float32 scale per block.
    const mx::Shape blocks{static_cast<int>(quantized_blocks(param.size()))};
    for (size_t i = 0; i < counts.state; ++i) {
      require_dtype(i, mx::uint8, "8-bit state keeps uint8 codes");
      check_shape(state[i], param.shape(), entry(i));
    }
    for (size_t i = 0; i < counts.scales; ++i) {
      size_t at = counts.state + counts.compensation + i;
      require_dtype(at, mx::float32, "one float32 scale per block");
      check_shape(state[at], blocks, entry(at));
    }
  } else {
    // The state has param's dtype (as in mlx), or float32 beside float16 and
    // bfloat16 parameters (state_dtype=float32); all of it the same.
    const bool half_param = is_half(param.dtype());
    for (size_t i = 0; i < counts.state; ++i) {
      const auto& s = state[i];
      bool allowed =
          s.dtype() == param.dtype() || (half_param && s.dtype() == mx::float32);
      if (!allowed || s.dtype() != state[0].dtype()) {
        fail(options, [&](std::ostream& m) {
          entry(i)(m);
          m << " dtype " << s.dtype() << " does not match parameter dtype "
            << param.dtype();
          if (half_param) {
            m << " (nor float32, the other state dtype for " << param.dtype()
              << " parameters)";
          }
          if (s.dtype() != state[0].dtype() && allowed) {
            m << " the way state '" << names[0] << "' (" << state[0].dtype()
              << ") does";
          }
          m << ".";
        });
      }
      check_shape(s, param.shape(), entry(i));
    }
  }
  if (counts.compensation) {
    size_t at = counts.state;
    if (state[at].dtype() != param.dtype()) {
      fail(options, [&](std::ostream& m) {
        entry(at)(m);
        m << " dtype " << state[at].dtype() << " does not match parameter dtype "
          << param.dtype() << ".";
      });
    }
    check_shape(state[at], param.shape(), entry(at));
  }
}

void check_rmsprop_inputs(
    const LeafArrays& leaf,
    const StepValues& values,
    const RMSpropOptions& options,
    const mx::Stream& stream) {
  check_leaf(leaf, options, stream);
  check_step_values(values, options, leaf.config.stochastic());
  check_options(options);
}

StepScalars::StepScalars(
    StepValues values,
    const RMSpropOptions& options,
    mx::Stream stream)
    : values_(std::move(values)), options_(options), stream_(stream) {}

const mx::array& StepScalars::packed(mx::Dtype compute) {
  auto& cached = compute == mx::float64 ? float64_ : float32_;
  if (cached) {
    return *cached;
  }
  // The kernels read the step's scalars in their compute type: double for
  // float64 leaves, float otherwise (half leaves compute in float32). Metal
  // has no float64: a float64 scalar (0-d, so the hop is free) is reshaped
  // and converted on the CPU, whatever stream the update runs on.
  auto cpu = mx::default_stream(mx::Device::cpu);
  auto as_compute = [&](const mx::array& a) {
    auto on = a.dtype() == mx::float64 && compute != mx::float64 ? cpu : stream_;
    auto x = mx::reshape(a, {1}, on);
    return x.dtype() == compute ? x : mx::astype(x, compute, on);
  };
  // A 0-d constant, reshaped: mx.compile merges equal 0-d constants, so two
  // updates of the same inputs share this array and compile's CSE asks
  // is_equivalent whether their options let them merge.
  auto constant = [&](double value) {
    return mx::reshape(mx::array(value, compute), {1}, stream_);
  };
  std::vector<mx::array> parts;
  parts.push_back(as_compute(values_.lr));
  if (options_.bias_correction) {
    // 1 - alpha^t in double on the CPU from the step array (a new step is a
    // new input value, never a retrace), rounded once to the compute type.
    auto t = mx::astype(mx::reshape(*values_.step, {1}, cpu), mx::float64, cpu);
    auto power = mx::power(mx::array(options_.alpha, mx::float64), t, cpu);
    auto bc = mx::subtract(mx::array(1.0, mx::float64), power, cpu);
    parts.push_back(compute == mx::float64 ? bc : mx::astype(bc, compute, cpu));
  } else {
    parts.push_back(constant(1.0));
  }
  parts.push_back(values_.clip ? as_compute(*values_.clip) : constant(1.0));
  parts.push_back(values_.skip ? as_compute(*values_.skip) : constant(0.0));
  cached = mx::concatenate(parts, 0, stream_);
  return *cached;
}

const mx::array& StepScalars::rounding_key() {
  if (!key_) {
    // The hash takes 32-bit words: the seed and the step count (mod 2^32).
    auto word = [&](const mx::array& a) {
      return mx::astype(mx::reshape(a, {1}, stream_), mx::uint32, stream_);
    };
    key_ = mx::concatenate({word(*values_.seed), word(*values_.step)}, 0, stream_);
  }
  return *key_;
}

std::vector<mx::array> build_step(
    const LeafArrays& leaf,
    StepScalars& scalars,
    const RMSpropOptions& options,
    mx::Stream stream) {
  auto compute = leaf.param.dtype() == mx::float64 ? mx::float64 : mx::float32;
  std::vector<mx::array> inputs;
  inputs.reserve(4 + leaf.state.size());
  inputs.push_back(leaf.grad);
  inputs.push_back(leaf.param);
  inputs.insert(inputs.end(), leaf.state.begin(), leaf.state.end());
  inputs.push_back(scalars.packed(compute));
  if (leaf.config.stochastic()) {
    inputs.push_back(scalars.rounding_key());
  }
  std::vector<mx::Shape> shapes{leaf.param.shape()};
  std::vector<mx::Dtype> dtypes{leaf.param.dtype()};
  for (const auto& a : leaf.state) {
    shapes.push_back(a.shape());
    dtypes.push_back(a.dtype());
  }
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<FusedRMSprop>(stream, options, leaf.config),
      std::move(inputs));
}

StepInputs split_inputs(
    const std::vector<mx::array>& inputs,
    const RMSpropOptions& options,
    const LeafConfig& config) {
  std::span<const mx::array> all(inputs);
  const auto counts = entry_counts(options, config);
  const size_t walked = counts.walked();
  StepInputs out;
  out.walked = all.first(walked);
  out.scales = all.subspan(walked, counts.scales);
  out.packed = &inputs[walked + counts.scales];
  out.key = config.stochastic() ? &inputs[walked + counts.scales + 1] : nullptr;
  return out;
}

std::vector<mx::array> rmsprop_step(
    const LeafArrays& leaf,
    const StepValues& values,
    const RMSpropOptions& options,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check_rmsprop_inputs(leaf, values, options, stream);
  StepScalars scalars(values, options, stream);
  return build_step(leaf, scalars, options, stream);
}

std::vector<mx::array> rmsprop_update(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v,
    const mx::array& lr,
    double alpha,
    double eps,
    mx::StreamOrDevice s) {
  RMSpropOptions options;
  options.alpha = alpha;
  options.eps = eps;
  LeafArrays leaf{grad, param, {v}, leaf_config(options, param.dtype(), false)};
  return rmsprop_step(leaf, StepValues{lr}, options, s);
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

bool is_flat_layout(std::span<const mx::array> arrays) {
  const auto& param = arrays[1];
  if (!is_dense(param)) {
    return false;
  }
  for (const auto& a : arrays) {
    if (!laid_like(a, param)) {
      return false;
    }
  }
  return true;
}

CollapsedLayout collapse_layout(std::span<const mx::array> arrays) {
  const auto& param = arrays[1];
  const size_t n = arrays.size();
  CollapsedLayout out;
  out.strides.resize(n);
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
    for (size_t a = 0; a < n && merges; ++a) {
      merges = out.strides[a].back() ==
          arrays[a].strides()[d] * static_cast<int64_t>(extent);
    }
    if (merges) {
      out.shape.back() *= extent;
      for (size_t a = 0; a < n; ++a) {
        out.strides[a].back() = arrays[a].strides()[d];
      }
    } else {
      out.shape.push_back(extent);
      for (size_t a = 0; a < n; ++a) {
        out.strides[a].push_back(arrays[a].strides()[d]);
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
    std::span<const mx::array> arrays,
    const LeafConfig& config,
    std::span<const mx::array> scales) {
  const auto& param = arrays[1];
  bool flat;
  if (config.quantized) {
    flat = true;
    for (const auto& a : arrays) {
      flat = flat && a.flags().row_contiguous;
    }
    for (const auto& a : scales) {
      flat = flat && a.flags().row_contiguous;
    }
  } else {
    flat = is_flat_layout(arrays) &&
        (!config.stochastic() || param.flags().row_contiguous);
  }
  const bool like_param = is_dense(param);
  if (flat) {
    return {RMSpropKernel::contiguous, {}, like_param};
  }
  auto layout = collapse_layout(arrays);
  auto kernel = needs_64bit_index(layout) ? RMSpropKernel::general_idx64
                                          : RMSpropKernel::general_idx32;
  return {kernel, std::move(layout), like_param};
}

std::vector<size_t> gpu_array_slots(
    const RMSpropOptions& options,
    bool plain,
    bool compensated) {
  if (plain) {
    return {0, 1, 2};
  }
  size_t next = 3;
  size_t mean = options.centered ? next++ : 2;
  size_t buffer = options.momentum > 0.0 ? next++ : 2;
  size_t compensation = compensated ? next++ : 1;
  return {0, 1, 2, mean, buffer, compensation};
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

std::vector<bool> quantized_outputs_fit(
    std::span<const mx::array> walked,
    std::span<const mx::array> scales,
    bool compensated) {
  const auto& param = walked[1];
  const bool like_param = is_dense(param);
  const size_t walked_outputs = walked.size() - 1;
  std::vector<bool> fit(walked_outputs + scales.size());
  for (size_t i = 0; i < fit.size(); ++i) {
    const bool is_scale = i >= walked_outputs;
    const auto& in = is_scale ? scales[i - walked_outputs] : walked[1 + i];
    // param' and the compensation follow param's layout; the codes and the
    // scales are row-major.
    const bool param_shaped = i == 0 || (compensated && i == walked_outputs - 1);
    fit[i] = param_shaped ? like_param && laid_like(in, param)
                          : in.flags().row_contiguous;
  }
  return fit;
}

void allocate_quantized_outputs(
    std::span<const mx::array> walked,
    std::span<const mx::array> scales,
    std::span<mx::array> outputs,
    bool compensated) {
  const auto& param = walked[1];
  const bool like_param = is_dense(param);
  const size_t walked_outputs = walked.size() - 1;
  const auto fits = quantized_outputs_fit(walked, scales, compensated);
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto& out = outputs[i];
    const bool is_scale = i >= walked_outputs;
    const auto& in = is_scale ? scales[i - walked_outputs] : walked[1 + i];
    const bool param_shaped = i == 0 || (compensated && i == walked_outputs - 1);
    if (fits[i] && mx::is_donatable(in, out)) {
      out.copy_shared_buffer(in);
    } else if (param_shaped && like_param) {
      out.set_data(
          mx::allocator::malloc(out.nbytes()), param.data_size(), param.strides(),
          param.flags());
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }
}

void allocate_outputs(
    std::span<const mx::array> walked,
    std::span<mx::array> outputs,
    bool like_param) {
  const auto& param = walked[1];
  // The kernels read element i of an input before writing element i of the
  // output that shares its buffer, so donation is safe.
  auto donates = [&](size_t i) {
    return like_param && laid_like(walked[1 + i], param) &&
        mx::is_donatable(walked[1 + i], outputs[i]);
  };
  bool state_donated = true;
  for (size_t i = 1; i < outputs.size(); ++i) {
    state_donated = state_donated && donates(i);
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto& out = outputs[i];
    if (i == 0 ? donates(0) : state_donated) {
      out.copy_shared_buffer(walked[1 + i]);
    } else if (like_param) {
      out.set_data(
          mx::allocator::malloc(out.nbytes()),
          param.data_size(),
          param.strides(),
          param.flags());
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }
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
  return o != nullptr && options_ == o->options_ && config_ == o->config_;
}

std::vector<mx::Shape> FusedRMSprop::output_shapes(
    const std::vector<mx::array>& inputs) {
  // param, then every state entry, each shaped like its input.
  const size_t entries = entry_counts(options_, config_).entries();
  std::vector<mx::Shape> shapes;
  for (size_t i = 1; i <= 1 + entries; ++i) {
    shapes.push_back(inputs[i].shape());
  }
  return shapes;
}

} // namespace mlx_fused_rmsprop
