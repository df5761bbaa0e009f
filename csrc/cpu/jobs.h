// What the CPU kernel's job files share (csrc/rmsprop_cpu*.cpp): one leaf's
// inputs and outputs as its job holds them, the step's scalars read on the
// stream's thread, and the choice of template instances for a leaf's
// centered / momentum options and rounding. Each family of jobs lives in its
// own file -- the plain update (rmsprop_cpu_plain.cpp), the variants
// (rmsprop_cpu_variant.cpp), the 8-bit state (rmsprop_cpu_quantized.cpp) --
// so they compile in parallel and a change rebuilds one.
#pragma once

#include <functional>
#include <optional>
#include <stdexcept>
#include <vector>

#include "../rmsprop.h"
#include "../rmsprop_cpu.h"
#include "chunks.h"
#include "parallel.h"

namespace mlx_fused_rmsprop {

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

// A skipped step (a non-finite gradient, skip_nonfinite): every output
// equals its input; copied where an output is another buffer
// (rmsprop_cpu.cpp).
void copy_through(LeafIO& io);

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
inline RoundingKey rounding_key(const LeafIO& io) {
  RoundingKey key;
  key.offset = io.config.element_offset;
  if (io.key) {
    const uint32_t* words = io.key->data<uint32_t>();
    key.key = rmsprop_rounding_key(words[0], words[1], io.config.leaf);
  }
  return key;
}

// The job for the leaf's centered / momentum options and rounding: Make is
// variant_job<PF, SF, ...> or quantized_job<PF, ...> behind a functor.
// Stochastic and Kahan rounding exist for 16-bit parameters only.
template <bool kHalf, class Make>
inline Job for_options(const RMSpropOptions& o, const LeafConfig& config, const Make& make) {
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

[[noreturn]] inline void unsupported_dtype() {
  throw std::invalid_argument("[FusedRMSprop] unsupported dtype reached the CPU kernel.");
}

// The job of each family for a leaf (the dispatch of rmsprop_cpu.cpp).
Job plain_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o);
Job rounded_plain_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o);
Job variant_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o);
Job quantized_leaf_job(LeafIO& io, const CpuDispatch& d, const RMSpropOptions& o);

} // namespace mlx_fused_rmsprop
