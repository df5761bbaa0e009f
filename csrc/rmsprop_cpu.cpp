// CPU evaluation of FusedRMSprop: pick the walk over memory for the leaf's
// layout (flat, transposed tiles, strided), give the outputs their buffers
// (in place where the inputs are donatable), and run the plain loops
// (mlx.optimizers.RMSprop's math, cpu/plain_loops.h) or the variant loops
// (cpu/variant_loops.h) for the leaf's dtypes, split across cores
// (cpu/parallel.h). Each concern lives in its own header under csrc/cpu/.
#include <cstdint>
#include <functional>
#include <span>
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

// The work of one leaf, run on the CPU stream's thread.
using Job = std::function<void()>;

// What a leaf's job reads: its walked arrays (grad, param, state...), the
// step's scalars (lr, [bias correction]) and its outputs.
struct LeafIO {
  std::span<const mx::array> walked;
  std::span<const mx::array> scalars;
  std::span<mx::array> outputs;
};

// ---- The plain update: grad, param and v of one format F.
template <class F>
Job plain_job(const LeafIO& io, const CpuDispatch& d, double alpha, double eps) {
  using S = typename F::Storage;
  using C = typename F::Compute;
  const S* g_ptr = reinterpret_cast<const S*>(io.walked[0].data<void>());
  const S* w_ptr = reinterpret_cast<const S*>(io.walked[1].data<void>());
  const S* v_ptr = reinterpret_cast<const S*>(io.walked[2].data<void>());
  const C* lr_ptr = io.scalars[0].data<C>();
  S* w_out_ptr = reinterpret_cast<S*>(io.outputs[0].data<void>());
  S* v_out_ptr = reinterpret_cast<S*>(io.outputs[1].data<void>());

  switch (d.walk) {
    case CpuWalk::flat:
      // With the flat layout every array holds exactly size() elements.
      return [=, n = static_cast<int64_t>(io.walked[1].size()), bound = d.bound]() {
        FlatJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(n, kSplitAlign, 1, bound, [&](int64_t b, int64_t e) {
          run_walk<FlatWalk<F>>(job, b, e);
        });
      };
    case CpuWalk::transposed:
      return [=, rows = int64_t{d.layout.shape[0]}, cols = int64_t{d.layout.shape[1]},
              bound = d.bound]() {
        TransposedJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, rows, cols,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(rows, kTileRows, cols, bound, [&](int64_t b, int64_t e) {
          run_walk<TransposedWalk<F>>(job, b, e);
        });
      };
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      return [=, layout = d.layout, like_param = d.walk == CpuWalk::strided_like_param]() {
        auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
        rmsprop_strided<F>(
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, layout, like_param, k);
      };
  }
  return {};
}

// ---- The variants: param and grad of format PF, the state of format SF.
template <class PF, class SF, bool kC, bool kM>
Job variant_job(const LeafIO& io, const CpuDispatch& d, const RMSpropOptions& options) {
  using P = typename PF::Storage;
  using S = typename SF::Storage;
  using C = typename PF::Compute;
  const size_t states = 1 + (kC ? 1 : 0) + (kM ? 1 : 0);
  VariantJob<PF, SF> job{};
  job.grad = reinterpret_cast<const P*>(io.walked[0].data<void>());
  job.param = reinterpret_cast<const P*>(io.walked[1].data<void>());
  job.param_out = reinterpret_cast<P*>(io.outputs[0].data<void>());
  // State slots: 0 v, 1 mean, 2 buffer; the arrays are only those in use.
  const size_t slots[3] = {0, kC ? 1u : 2u, 2};
  for (size_t i = 0; i < states; ++i) {
    job.state[slots[i]] = reinterpret_cast<const S*>(io.walked[2 + i].data<void>());
    job.state_out[slots[i]] = reinterpret_cast<S*>(io.outputs[1 + i].data<void>());
  }
  const C* lr_ptr = io.scalars[0].data<C>();
  const C* bc_ptr = options.bias_correction ? io.scalars[1].data<C>() : nullptr;
  auto constants = make_variant_constants<C>(options);
  auto step = [=] {
    return rmsprop_variant_step<C>(*lr_ptr, bc_ptr ? *bc_ptr : C(1), constants);
  };
  switch (d.walk) {
    case CpuWalk::flat:
      return [=, n = static_cast<int64_t>(io.walked[1].size()), bound = d.bound]() mutable {
        job.k = step();
        split_run(n, kSplitAlign, 1, bound, [&](int64_t b, int64_t e) {
          run_walk<VariantFlatWalk<PF, SF, kC, kM>>(job, b, e);
        });
      };
    case CpuWalk::transposed:
      job.rows = d.layout.shape[0];
      job.cols = d.layout.shape[1];
      return [=, bound = d.bound]() mutable {
        job.k = step();
        split_run(job.rows, kTileRows, job.cols, bound, [&](int64_t b, int64_t e) {
          run_walk<VariantTransposedWalk<PF, SF, kC, kM>>(job, b, e);
        });
      };
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      return [=, layout = d.layout, like_param = d.walk == CpuWalk::strided_like_param]() mutable {
        job.k = step();
        variant_strided<PF, SF, kC, kM>(job, layout, like_param);
      };
  }
  return {};
}

template <class PF, class SF>
Job variant_job_for_options(const LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  bool momentum = o.momentum > 0.0;
  if (o.centered && momentum) {
    return variant_job<PF, SF, true, true>(io, d, o);
  } else if (o.centered) {
    return variant_job<PF, SF, true, false>(io, d, o);
  } else if (momentum) {
    return variant_job<PF, SF, false, true>(io, d, o);
  }
  return variant_job<PF, SF, false, false>(io, d, o);
}

// A half parameter's state is of its own format or float32.
template <class PF>
Job half_variant_job(const LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  if (io.walked[2].dtype() == mx::float32) {
    return variant_job_for_options<PF, Float32Format>(io, d, o);
  }
  return variant_job_for_options<PF, PF>(io, d, o);
}

[[noreturn]] void unsupported_dtype() {
  throw std::invalid_argument("[FusedRMSprop] unsupported dtype reached the CPU kernel.");
}

Job leaf_job(const LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  const auto& param = io.walked[1];
  bool plain = runs_plain_kernels(o, param.dtype(), io.walked[2].dtype());
  switch (param.dtype()) {
    case mx::float32:
      return plain ? plain_job<Float32Format>(io, d, o.alpha, o.eps)
                   : variant_job_for_options<Float32Format, Float32Format>(io, d, o);
    case mx::float16:
      return plain ? plain_job<Float16Format>(io, d, o.alpha, o.eps)
                   : half_variant_job<Float16Format>(io, d, o);
    case mx::bfloat16:
      return plain ? plain_job<BFloat16Format>(io, d, o.alpha, o.eps)
                   : half_variant_job<BFloat16Format>(io, d, o);
    case mx::float64:
      return plain ? plain_job<Float64Format>(io, d, o.alpha, o.eps)
                   : variant_job_for_options<Float64Format, Float64Format>(io, d, o);
    default:
      unsupported_dtype();
  }
}

} // namespace

CpuDispatch choose_cpu_dispatch(std::span<const mx::array> arrays) {
  auto param_dtype = arrays[1].dtype();
  CpuBound bound = param_dtype == mx::float16 || param_dtype == mx::bfloat16
      ? CpuBound::compute
      : CpuBound::memory;
  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat path.
  if (is_flat_layout(arrays)) {
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
  auto [walked, scalars] = split_inputs(inputs, options_);
  auto dispatch = choose_cpu_dispatch(walked);
  // Every walk but the plain strided one writes the outputs in param's layout.
  allocate_outputs(walked, outputs, dispatch.walk != CpuWalk::strided);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  if (walked[1].size() != 0) {
    encoder.dispatch(leaf_job(LeafIO{walked, scalars, outputs}, dispatch, options_));
  }
}

} // namespace mlx_fused_rmsprop
