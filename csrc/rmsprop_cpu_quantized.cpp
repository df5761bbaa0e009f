// The CPU jobs of the 8-bit block-wise state (cpu/quantized_loops.h).
#include "cpu/jobs.h"
#include "cpu/quantized_loops.h"
#include "quant_map.h"

namespace mlx_fused_rmsprop {

namespace {

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

template <class PF>
Job quantized_job_for_options(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  return for_options<kIsHalf<PF>>(o, io.config, [&]<bool kC, bool kM, unsigned kRound>() {
    return quantized_job<PF, kC, kM, kRound>(io, d, o);
  });
}

} // namespace

Job quantized_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o) {
  switch (io.walked[1].dtype()) {
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

} // namespace mlx_fused_rmsprop
