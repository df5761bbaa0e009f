// The CPU jobs of the plain update (mlx.optimizers.RMSprop's math, the
// state in the parameter's dtype; cpu/plain_loops.h): rounded to nearest, or
// for 16-bit leaves stochastically or with Kahan compensation.
#include "cpu/jobs.h"
#include "cpu/plain_loops.h"

namespace mlx_fused_rmsprop {

namespace {

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

// ---- The plain update of a 16-bit leaf rounded stochastically or with
// Kahan compensation, on the flat and transposed walks (plain_loops.h).
template <class F, unsigned kRound>
Job rounded_plain_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  using S = typename F::Storage;
  RoundedJob<F> job{};
  job.grad = reinterpret_cast<const S*>(io.walked[0].data<void>());
  job.param = reinterpret_cast<const S*>(io.walked[1].data<void>());
  job.v = reinterpret_cast<const S*>(io.walked[2].data<void>());
  job.param_out = reinterpret_cast<S*>(io.outputs[0].data<void>());
  job.v_out = reinterpret_cast<S*>(io.outputs[1].data<void>());
  if constexpr (kRound == RMSPROP_ROUND_KAHAN) {
    job.comp = reinterpret_cast<const S*>(io.walked[3].data<void>());
    job.comp_out = reinterpret_cast<S*>(io.outputs[2].data<void>());
  }
  const float* lr_ptr = io.packed.data<float>() + RMSPROP_STEP_LR;
  if (d.walk == CpuWalk::transposed) {
    job.rows = d.layout.shape[0];
    job.cols = d.layout.shape[1];
    return [=, alpha = o.alpha, eps = o.eps, bound = d.bound]() mutable {
      job.k = make_coefficients<float>(*lr_ptr, alpha, eps);
      job.key = rounding_key(io);
      split_run(job.rows, kTileRows, job.cols, bound, [&](int64_t b, int64_t e) {
        run_walk<RoundedTransposedWalk<F, kRound>>(job, b, e);
      });
    };
  }
  return [=, n = static_cast<int64_t>(io.walked[1].size()), alpha = o.alpha, eps = o.eps,
          bound = d.bound]() mutable {
    job.k = make_coefficients<float>(*lr_ptr, alpha, eps);
    job.key = rounding_key(io);
    split_run(n, kSplitAlign, 1, bound, [&](int64_t b, int64_t e) {
      run_walk<RoundedFlatWalk<F, kRound>>(job, b, e);
    });
  };
}

} // namespace

Job plain_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  switch (io.walked[1].dtype()) {
    case mx::float32:
      return plain_job<Float32Format>(io, d, o.alpha, o.eps);
    case mx::float16:
      return plain_job<Float16Format>(io, d, o.alpha, o.eps);
    case mx::bfloat16:
      return plain_job<BFloat16Format>(io, d, o.alpha, o.eps);
    case mx::float64:
      return plain_job<Float64Format>(io, d, o.alpha, o.eps);
    default:
      unsupported_dtype();
  }
}

Job rounded_plain_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  if (io.walked[1].dtype() == mx::float16) {
    return rounded_plain_job<Float16Format, RMSPROP_ROUND_KAHAN>(io, d, o);
  }
  return io.config.compensated()
      ? rounded_plain_job<BFloat16Format, RMSPROP_ROUND_KAHAN>(io, d, o)
      : rounded_plain_job<BFloat16Format, RMSPROP_ROUND_STOCHASTIC>(io, d, o);
}

} // namespace mlx_fused_rmsprop
