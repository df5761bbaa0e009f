// CPU evaluation of FusedRMSprop: pick the walk over memory for the leaf's
// layout (flat, transposed tiles, strided; block by block for 8-bit state),
// give the outputs their buffers (in place where the inputs are donatable),
// and hand the leaf to the job of its family -- the plain update, the
// variants, the 8-bit state (csrc/rmsprop_cpu_{plain,variant,quantized}.cpp)
// -- split across cores (cpu/parallel.h). Each concern lives in its own
// header under csrc/cpu/.
#include <cstdint>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/isa.h"
#include "cpu/jobs.h"
#include "cpu/strided.h"
#include "rmsprop_cpu.h"

namespace mlx_fused_rmsprop {

namespace {

// The transposed case, seen on the collapsed layout: param and the state
// row-major [rows, cols], grad its column-major twin.
bool is_transposed_pair(const CollapsedLayout& l) {
  if (l.shape.size() != 2) {
    return false;
  }
  int64_t rows = l.shape[0], cols = l.shape[1];
  const auto& g = l.strides[0];
  const auto& w = l.strides[1];
  for (size_t a = 2; a < l.strides.size(); ++a) {
    if (l.strides[a] != w) {
      return false;
    }
  }
  return w[0] == cols && w[1] == 1 && g[0] == 1 && g[1] == rows;
}

// Whether a leaf takes rounded_plain_job: mlx's math (no variant option, no
// guards) with the state in the parameter's dtype, Kahan or (bfloat16)
// stochastic rounding, on the flat or transposed walk.
bool takes_rounded_plain(const LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  const auto dtype = io.walked[1].dtype();
  RMSpropOptions math = o;
  math.rounding = RMSPROP_ROUND_NEAREST;
  bool rounding = io.config.compensated() ||
      (io.config.stochastic() && dtype == mx::bfloat16);
  return rounding && math.is_plain() && !io.config.quantized &&
      io.walked[2].dtype() == dtype &&
      (d.walk == CpuWalk::flat || d.walk == CpuWalk::transposed);
}

Job leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  if (io.config.quantized) {
    return quantized_leaf_job(io, d, o);
  }
  if (takes_rounded_plain(io, d, o)) {
    return rounded_plain_leaf_job(io, d, o);
  }
  if (runs_plain_kernels(o, io.config, io.walked[1].dtype(), io.walked[2].dtype())) {
    return plain_leaf_job(io, d, o);
  }
  return variant_leaf_job(io, d, o);
}

} // namespace

// ---- A skipped step (a non-finite gradient, skip_nonfinite): every output
// equals its input. In place that is already so; otherwise copy, element by
// element in the two arrays' layouts (the outputs may have param's layout or
// a row-major one).
namespace {

template <size_t kItem>
void copy_elements(const mx::array& in, mx::array& out) {
  struct Item {
    unsigned char bytes[kItem];
  };
  const Item* src = in.data<Item>();
  Item* dst = out.data<Item>();
  if (static_cast<const void*>(src) == static_cast<void*>(dst)) {
    return;
  }
  std::vector<mx::array> pair{in, out};
  auto layout = collapse_layout(pair);
  walk_rows<2>(layout, [&](const int64_t* at, const int64_t* step, int64_t n, int64_t) {
    for (int64_t i = 0; i < n; ++i) {
      dst[at[1] + i * step[1]] = src[at[0] + i * step[0]];
    }
  });
}

} // namespace

void copy_through(LeafIO& io) {
  auto copy = [](const mx::array& in, mx::array& out) {
    switch (in.itemsize()) {
      case 1:
        return copy_elements<1>(in, out);
      case 2:
        return copy_elements<2>(in, out);
      case 4:
        return copy_elements<4>(in, out);
      default:
        return copy_elements<8>(in, out);
    }
  };
  const size_t walked_outputs = io.walked.size() - 1;
  for (size_t i = 0; i < walked_outputs; ++i) {
    copy(io.walked[1 + i], io.outputs[i]);
  }
  for (size_t i = 0; i < io.scales.size(); ++i) {
    copy(io.scales[i], io.outputs[walked_outputs + i]);
  }
}

CpuDispatch choose_cpu_dispatch(
    std::span<const mx::array> arrays,
    const LeafConfig& config,
    std::span<const mx::array> scales) {
  auto param_dtype = arrays[1].dtype();
  CpuBound bound = is_half(param_dtype) ? CpuBound::compute : CpuBound::memory;
  if (config.quantized) {
    // Dequantizing, searching codes and requantizing: compute-bound. The
    // flat walk reads every array in row-major order, the scales too.
    bool row_major = true;
    for (const auto& a : arrays) {
      row_major = row_major && a.flags().row_contiguous;
    }
    for (const auto& a : scales) {
      row_major = row_major && a.flags().row_contiguous;
    }
    if (row_major) {
      return {CpuWalk::quantized_flat, CpuBound::compute, {}};
    }
    return {CpuWalk::quantized_general, CpuBound::compute, collapse_layout(arrays)};
  }
  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat
  // path. Stochastic rounding hashes each element's row-major index, which
  // the flat walk knows only when param is row-contiguous.
  bool flat = is_flat_layout(arrays) &&
      (!config.stochastic() || arrays[1].flags().row_contiguous);
  if (flat) {
    return {CpuWalk::flat, bound, {}};
  }
  auto layout = collapse_layout(arrays);
  CpuWalk walk = !is_dense(arrays[1])   ? CpuWalk::strided
      : is_transposed_pair(layout) ? CpuWalk::transposed
                                   : CpuWalk::strided_like_param;
  return {walk, bound, std::move(layout)};
}

std::string cpu_bound_name(CpuBound bound) {
  return bound == CpuBound::memory ? "memory" : "compute";
}

std::string cpu_walk_name(CpuWalk walk) {
  switch (walk) {
    case CpuWalk::flat:
      return "flat";
    case CpuWalk::transposed:
      return "transposed";
    case CpuWalk::strided_like_param:
      return "strided_like_param";
    case CpuWalk::strided:
      return "strided";
    case CpuWalk::quantized_flat:
      return "quantized_flat";
    case CpuWalk::quantized_general:
      return "quantized_general";
  }
  return "";
}

std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::baseline:
      return "baseline";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
  }
  return "";
}

void FusedRMSprop::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  release_sibling_inputs(inputs, outputs);
  auto in = split_inputs(inputs, options_, config_);
  auto dispatch = choose_cpu_dispatch(in.walked, config_, in.scales);
  if (config_.quantized) {
    allocate_quantized_outputs(in.walked, in.scales, outputs, config_.compensated());
  } else {
    // Every walk but the plain strided one writes the outputs in param's
    // layout.
    allocate_outputs(in.walked, outputs, dispatch.walk != CpuWalk::strided);
  }

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  if (in.walked[1].size() != 0) {
    LeafIO io{
        {in.walked.begin(), in.walked.end()},
        {in.scales.begin(), in.scales.end()},
        *in.packed,
        in.key ? std::optional<mx::array>(*in.key) : std::nullopt,
        outputs,
        config_};
    encoder.dispatch(leaf_job(io, dispatch, options_));
  }
}

} // namespace mlx_fused_rmsprop
