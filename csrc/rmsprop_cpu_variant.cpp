// The CPU jobs of the variant update (every option of the variants table,
// the guards, the rounding of 16-bit parameters; cpu/variant_loops.h), with
// the state in the parameter's dtype or float32.
#include "cpu/jobs.h"
#include "cpu/variant_loops.h"

namespace mlx_fused_rmsprop {

namespace {

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

template <class PF, class SF>
Job variant_job_for_options(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  return for_options<kIsHalf<PF>>(o, io.config, [&]<bool kC, bool kM, unsigned kRound>() {
    return variant_job<PF, SF, kC, kM, kRound>(io, d, o);
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

} // namespace

Job variant_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  switch (io.walked[1].dtype()) {
    case mx::float32:
      return variant_job_for_options<Float32Format, Float32Format>(io, d, o);
    case mx::float16:
      return half_variant_job<Float16Format>(io, d, o);
    case mx::bfloat16:
      return half_variant_job<BFloat16Format>(io, d, o);
    case mx::float64:
      return variant_job_for_options<Float64Format, Float64Format>(io, d, o);
    default:
      unsupported_dtype();
  }
}

} // namespace mlx_fused_rmsprop
