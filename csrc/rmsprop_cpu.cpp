// CPU evaluation of FusedRMSprop: pick the walk over memory for the leaf's
// layout (flat, transposed tiles, strided), give the outputs their buffers
// (in place where the inputs are donatable), and run the plain loops
// (mlx.optimizers.RMSprop's math, cpu/plain_loops.h) or the variant loops
// (cpu/variant_loops.h) for the leaf's dtypes, split across cores
// (cpu/parallel.h). Each concern lives in its own header under csrc/cpu/.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"

#include "cpu/formats.h"
#include "cpu/parallel.h"
#include "cpu/plain_loops.h"
#include "cpu/variant_loops.h"
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

// ---- The plain update: grad, param and v of one format F.
template <class F>
void dispatch_typed(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    CpuWalk walk,
    const CollapsedLayout& layout,
    double alpha,
    double eps,
    mx::cpu::CommandEncoder& encoder) {
  using S = typename F::Storage;
  using C = typename F::Compute;
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];
  const auto& lr = inputs[3];

  const S* g_ptr = reinterpret_cast<const S*>(grad.data<void>());
  const S* w_ptr = reinterpret_cast<const S*>(param.data<void>());
  const S* v_ptr = reinterpret_cast<const S*>(v.data<void>());
  const C* lr_ptr = lr.data<C>();
  S* w_out_ptr = reinterpret_cast<S*>(outputs[0].data<void>());
  S* v_out_ptr = reinterpret_cast<S*>(outputs[1].data<void>());

  switch (walk) {
    case CpuWalk::flat:
      // With the flat layout every array holds exactly size() elements.
      encoder.dispatch([=, n = static_cast<int64_t>(param.size())]() {
        FlatJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(n, kSplitAlign, 1, [&](int64_t b, int64_t e) {
          run_flat<F>(job, b, e);
        });
      });
      return;
    case CpuWalk::transposed:
      encoder.dispatch([=, rows = int64_t{layout.shape[0]}, cols = int64_t{layout.shape[1]}]() {
        TransposedJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, rows, cols,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(rows, kTileRows, cols, [&](int64_t b, int64_t e) {
          run_transposed<F>(job, b, e);
        });
      });
      return;
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      encoder.dispatch([=, like_param = walk == CpuWalk::strided_like_param]() {
        auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
        rmsprop_strided<F>(
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, layout, like_param, k);
      });
      return;
  }
}

// ---- The variants: param and grad of format PF, the state of format SF.
template <class PF, class SF, bool kC, bool kM>
void dispatch_variant(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    CpuWalk walk,
    const CollapsedLayout& layout,
    const RMSpropOptions& options,
    mx::cpu::CommandEncoder& encoder) {
  using P = typename PF::Storage;
  using S = typename SF::Storage;
  using C = typename PF::Compute;
  const size_t states = 1 + (kC ? 1 : 0) + (kM ? 1 : 0);
  VariantJob<PF, SF> job{};
  job.grad = reinterpret_cast<const P*>(inputs[0].data<void>());
  job.param = reinterpret_cast<const P*>(inputs[1].data<void>());
  job.param_out = reinterpret_cast<P*>(outputs[0].data<void>());
  // State slots: 0 v, 1 mean, 2 buffer; the inputs list only those in use.
  const size_t slots[3] = {0, kC ? 1u : 2u, 2};
  for (size_t i = 0; i < states; ++i) {
    job.state[slots[i]] = reinterpret_cast<const S*>(inputs[2 + i].data<void>());
    job.state_out[slots[i]] = reinterpret_cast<S*>(outputs[1 + i].data<void>());
  }
  const C* lr_ptr = inputs[2 + states].data<C>();
  const C* bc_ptr = options.bias_correction ? inputs[3 + states].data<C>() : nullptr;
  auto constants = make_variant_constants<C>(options);
  auto step = [=] {
    return rmsprop_variant_step<C>(*lr_ptr, bc_ptr ? *bc_ptr : C(1), constants);
  };
  switch (walk) {
    case CpuWalk::flat:
      encoder.dispatch([=, n = static_cast<int64_t>(inputs[1].size())]() mutable {
        job.k = step();
        split_run(n, kSplitAlign, 1, [&](int64_t b, int64_t e) {
          run_variant_flat<PF, SF, kC, kM>(job, b, e);
        });
      });
      return;
    case CpuWalk::transposed:
      job.rows = layout.shape[0];
      job.cols = layout.shape[1];
      encoder.dispatch([=]() mutable {
        job.k = step();
        split_run(job.rows, kTileRows, job.cols, [&](int64_t b, int64_t e) {
          run_variant_transposed<PF, SF, kC, kM>(job, b, e);
        });
      });
      return;
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      encoder.dispatch([=, like_param = walk == CpuWalk::strided_like_param]() mutable {
        job.k = step();
        variant_strided<PF, SF, kC, kM>(job, layout, like_param);
      });
      return;
  }
}

template <class PF, class SF>
void dispatch_variant_options(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    const CpuDispatch& d,
    const RMSpropOptions& o,
    mx::cpu::CommandEncoder& encoder) {
  bool momentum = o.momentum > 0.0;
  if (o.centered && momentum) {
    dispatch_variant<PF, SF, true, true>(inputs, outputs, d.walk, d.layout, o, encoder);
  } else if (o.centered) {
    dispatch_variant<PF, SF, true, false>(inputs, outputs, d.walk, d.layout, o, encoder);
  } else if (momentum) {
    dispatch_variant<PF, SF, false, true>(inputs, outputs, d.walk, d.layout, o, encoder);
  } else {
    dispatch_variant<PF, SF, false, false>(inputs, outputs, d.walk, d.layout, o, encoder);
  }
}

// A half parameter's state is of its own format or float32.
template <class PF>
void dispatch_half_variant(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    const CpuDispatch& d,
    const RMSpropOptions& o,
    mx::cpu::CommandEncoder& encoder) {
  if (inputs[2].dtype() == mx::float32) {
    dispatch_variant_options<PF, Float32Format>(inputs, outputs, d, o, encoder);
  } else {
    dispatch_variant_options<PF, PF>(inputs, outputs, d, o, encoder);
  }
}

[[noreturn]] void unsupported_dtype() {
  throw std::invalid_argument("[FusedRMSprop] unsupported dtype reached the CPU kernel.");
}

} // namespace

CpuDispatch choose_cpu_dispatch(const std::vector<mx::array>& arrays) {
  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat path.
  if (is_flat_layout(arrays)) {
    return {CpuWalk::flat, {}};
  }
  auto layout = collapse_layout(arrays);
  CpuWalk walk = !is_dense(arrays[1])   ? CpuWalk::strided
      : is_transposed_pair(layout) ? CpuWalk::transposed
                                   : CpuWalk::strided_like_param;
  return {walk, std::move(layout)};
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
  }
  return "";
}

void FusedRMSprop::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  release_sibling_inputs(inputs, outputs);
  auto dispatch = choose_cpu_dispatch(walked_arrays(inputs, options_));
  // Every walk but the plain strided one writes the outputs in param's layout.
  allocate_outputs(inputs, outputs, dispatch.walk != CpuWalk::strided);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  const auto& param = inputs[1];
  if (param.size() == 0) {
    return;
  }

  const auto& o = options_;
  const auto& walk = dispatch.walk;
  const auto& layout = dispatch.layout;
  bool plain = runs_plain_kernels(o, param.dtype(), inputs[2].dtype());
  switch (param.dtype()) {
    case mx::float32:
      return plain
          ? dispatch_typed<Float32Format>(inputs, outputs, walk, layout, o.alpha, o.eps, encoder)
          : dispatch_variant_options<Float32Format, Float32Format>(inputs, outputs, dispatch, o, encoder);
    case mx::float16:
      return plain
          ? dispatch_typed<Float16Format>(inputs, outputs, walk, layout, o.alpha, o.eps, encoder)
          : dispatch_half_variant<Float16Format>(inputs, outputs, dispatch, o, encoder);
    case mx::bfloat16:
      return plain
          ? dispatch_typed<BFloat16Format>(inputs, outputs, walk, layout, o.alpha, o.eps, encoder)
          : dispatch_half_variant<BFloat16Format>(inputs, outputs, dispatch, o, encoder);
    case mx::float64:
      return plain
          ? dispatch_typed<Float64Format>(inputs, outputs, walk, layout, o.alpha, o.eps, encoder)
          : dispatch_variant_options<Float64Format, Float64Format>(inputs, outputs, dispatch, o, encoder);
    default:
      unsupported_dtype();
  }
}

} // namespace mlx_fused_rmsprop
