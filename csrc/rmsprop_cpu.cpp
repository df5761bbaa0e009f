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
#include "cpu/quantized_loops.h"
#include "cpu/variant_loops.h"
#include "quant_map.h"
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

// What a leaf's job reads: its walked arrays (grad, param, state...,
// [compensation]), the scales of a quantized leaf, the step's packed scalars
// and rounding key, and its outputs (param', the walked state', the scales').
// Held by value: the job runs on the stream's thread after eval_cpu has
// returned, when the primitive's input list may be gone (MLX keeps the
// buffers alive, not the lists).
struct LeafIO {
  std::vector<mx::array> walked;
  std::vector<mx::array> scales;
  mx::array packed;
  std::optional<mx::array> key;
  std::vector<mx::array> outputs;
  LeafConfig config;
};

// ---- A skipped step (a non-finite gradient, skip_nonfinite): every output
// equals its input. In place that is already so; otherwise copy, element by
// element in the two arrays' layouts (the outputs may have param's layout or
// a row-major one).
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

template <typename C>
bool skips(const LeafIO& io) {
  return io.packed.data<C>()[RMSPROP_STEP_SKIP] != C(0);
}

// The step's constants of a leaf's variant or quantized math, read on the
// stream's thread (the packed scalars are computed by then).
template <typename C>
RMSpropVariantStep<C> variant_step(const LeafIO& io, const RMSpropVariantConstants<C>& c) {
  const C* scalars = io.packed.data<C>();
  return rmsprop_variant_step<C>(
      scalars[RMSPROP_STEP_LR], scalars[RMSPROP_STEP_BIAS_CORRECTION],
      scalars[RMSPROP_STEP_CLIP], c);
}

// The leaf's stochastic rounding key, from the step's {seed, step} (read on
// the stream's thread: the job calls this).
RoundingKey rounding_key(const LeafIO& io) {
  RoundingKey key;
  key.offset = io.config.element_offset;
  if (io.key) {
    const uint32_t* words = io.key->data<uint32_t>();
    key.key = rmsprop_rounding_key(words[0], words[1], io.config.leaf);
  }
  return key;
}

// ---- The plain update: grad, param and v of one format F.
template <class F>
Job plain_job(LeafIO& io, const CpuDispatch& d, double alpha, double eps) {
  using S = typename F::Storage;
  using C = typename F::Compute;
  const S* g_ptr = reinterpret_cast<const S*>(io.walked[0].data<void>());
  const S* w_ptr = reinterpret_cast<const S*>(io.walked[1].data<void>());
  const S* v_ptr = reinterpret_cast<const S*>(io.walked[2].data<void>());
  const C* lr_ptr = io.packed.data<C>() + RMSPROP_STEP_LR;
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
    case CpuWalk::quantized_flat:
    case CpuWalk::quantized_general:
      break;
  }
  return {};
}

// ---- The variants: param and grad of format PF, the state of format SF.
template <class PF, class SF, bool kC, bool kM, unsigned kRound>
Job variant_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& options) {
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
  if constexpr (kRound == RMSPROP_ROUND_KAHAN) {
    job.comp = reinterpret_cast<const P*>(io.walked[2 + states].data<void>());
    job.comp_out = reinterpret_cast<P*>(io.outputs[1 + states].data<void>());
  }
  auto constants = make_variant_constants<C>(options);
  switch (d.walk) {
    case CpuWalk::flat:
      return [=, n = static_cast<int64_t>(io.walked[1].size()), bound = d.bound]() mutable {
        if (skips<C>(io)) {
          return copy_through(io);
        }
        job.k = variant_step<C>(io, constants);
        job.key = rounding_key(io);
        split_run(n, kSplitAlign, 1, bound, [&](int64_t b, int64_t e) {
          run_walk<VariantFlatWalk<PF, SF, kC, kM, kRound>>(job, b, e);
        });
      };
    case CpuWalk::transposed:
      job.rows = d.layout.shape[0];
      job.cols = d.layout.shape[1];
      return [=, bound = d.bound]() mutable {
        if (skips<C>(io)) {
          return copy_through(io);
        }
        job.k = variant_step<C>(io, constants);
        job.key = rounding_key(io);
        split_run(job.rows, kTileRows, job.cols, bound, [&](int64_t b, int64_t e) {
          run_walk<VariantTransposedWalk<PF, SF, kC, kM, kRound>>(job, b, e);
        });
      };
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      return [=, layout = d.layout, like_param = d.walk == CpuWalk::strided_like_param]() mutable {
        if (skips<C>(io)) {
          return copy_through(io);
        }
        job.k = variant_step<C>(io, constants);
        job.key = rounding_key(io);
        variant_strided<PF, SF, kC, kM, kRound>(job, layout, like_param);
      };
    case CpuWalk::quantized_flat:
    case CpuWalk::quantized_general:
      break;
  }
  return {};
}

// ---- 8-bit state: param and grad of format PF, every state entry uint8
// codes with float32 block scales (quantized_loops.h).
template <class PF, bool kC, bool kM, unsigned kRound>
Job quantized_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& options) {
  using P = typename PF::Storage;
  const size_t states = 1 + (kC ? 1 : 0) + (kM ? 1 : 0);
  QuantizedJob<PF> job{};
  job.grad = reinterpret_cast<const P*>(io.walked[0].data<void>());
  job.param = reinterpret_cast<const P*>(io.walked[1].data<void>());
  job.param_out = reinterpret_cast<P*>(io.outputs[0].data<void>());
  if constexpr (kRound == RMSPROP_ROUND_KAHAN) {
    job.comp = reinterpret_cast<const P*>(io.walked[2 + states].data<void>());
    job.comp_out = reinterpret_cast<P*>(io.outputs[1 + states].data<void>());
  }
  const size_t walked_outputs = io.walked.size() - 1;
  job.states = static_cast<int>(states);
  for (size_t i = 0; i < states; ++i) {
    auto& e = job.entry[i];
    e.codes = io.walked[2 + i].data<uint8_t>();
    e.codes_out = io.outputs[1 + i].data<uint8_t>();
    e.scale = io.scales[i].data<float>();
    e.scale_out = io.outputs[walked_outputs + i].data<float>();
    e.map = &state_map(i == 0);
    e.table = &rank_table(i == 0);
    job.scale_stride[i] = io.scales[i].ndim() == 1 ? io.scales[i].strides()[0] : 1;
  }
  job.size = static_cast<int64_t>(io.walked[1].size());
  job.outputs_like_param = is_dense(io.walked[1]);
  auto constants = make_variant_constants<float>(options);
  const int64_t blocks = quantized_blocks(job.size);
  return [=, layout = d.layout, walk = d.walk, bound = d.bound]() mutable {
    if (skips<float>(io)) {
      return copy_through(io);
    }
    job.k = variant_step<float>(io, constants);
    job.key = rounding_key(io);
    job.layout = &layout;
    split_run(blocks, 1, RMSPROP_BLOCK, bound, [&](int64_t b, int64_t e) {
      if (walk == CpuWalk::quantized_flat) {
        run_walk<QuantizedFlatWalk<PF, kC, kM, kRound>>(job, b, e);
      } else {
        run_walk<QuantizedGeneralWalk<PF, kC, kM, kRound>>(job, b, e);
      }
    });
  };
}

// The job for the leaf's centered / momentum options and rounding: Make is
// variant_job<PF, SF, ...> or quantized_job<PF, ...> behind a functor.
// Stochastic and Kahan rounding exist for 16-bit parameters only.
template <bool kHalf, class Make>
Job for_options(const RMSpropOptions& o, const LeafConfig& config, const Make& make) {
  auto with = [&]<bool kC, bool kM>() -> Job {
    if constexpr (kHalf) {
      switch (config.rounding) {
        case RMSPROP_ROUND_STOCHASTIC:
          return make.template operator()<kC, kM, RMSPROP_ROUND_STOCHASTIC>();
        case RMSPROP_ROUND_KAHAN:
          return make.template operator()<kC, kM, RMSPROP_ROUND_KAHAN>();
        default:
          break;
      }
    }
    return make.template operator()<kC, kM, RMSPROP_ROUND_NEAREST>();
  };
  bool momentum = o.momentum > 0.0;
  if (o.centered && momentum) {
    return with.template operator()<true, true>();
  } else if (o.centered) {
    return with.template operator()<true, false>();
  } else if (momentum) {
    return with.template operator()<false, true>();
  }
  return with.template operator()<false, false>();
}

template <class PF, class SF>
Job variant_job_for_options(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  return for_options<kIsHalf<PF>>(o, io.config, [&]<bool kC, bool kM, unsigned kRound>() {
    return variant_job<PF, SF, kC, kM, kRound>(io, d, o);
  });
}

template <class PF>
Job quantized_job_for_options(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  return for_options<kIsHalf<PF>>(o, io.config, [&]<bool kC, bool kM, unsigned kRound>() {
    return quantized_job<PF, kC, kM, kRound>(io, d, o);
  });
}

// A half parameter's state is of its own format or float32.
template <class PF>
Job half_variant_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  if (io.walked[2].dtype() == mx::float32) {
    return variant_job_for_options<PF, Float32Format>(io, d, o);
  }
  return variant_job_for_options<PF, PF>(io, d, o);
}

[[noreturn]] void unsupported_dtype() {
  throw std::invalid_argument("[FusedRMSprop] unsupported dtype reached the CPU kernel.");
}

Job leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  const auto& param = io.walked[1];
  if (io.config.quantized) {
    switch (param.dtype()) {
      case mx::float32:
        return quantized_job_for_options<Float32Format>(io, d, o);
      case mx::float16:
        return quantized_job_for_options<Float16Format>(io, d, o);
      case mx::bfloat16:
        return quantized_job_for_options<BFloat16Format>(io, d, o);
      default:
        unsupported_dtype();
    }
  }
  bool plain = runs_plain_kernels(o, io.config, param.dtype(), io.walked[2].dtype());
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
