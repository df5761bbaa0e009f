// One optimizer step over a whole tree in one native call (optimizer_step.cpp).
#pragma once

#include <optional>

#include <nanobind/nanobind.h>

#include "rmsprop.h"

namespace mlx_fused_rmsprop {

namespace nb = nanobind;

/**
 * The step RMSprop.apply_gradients takes: walks `gradients` (dicts, lists,
 * tuples of arrays) with `parameters` and the optimizer `state` beside them
 * and checks every leaf, raising ValueError / TypeError that names the first
 * bad leaf's path. With `build`, then builds every leaf's fused primitive
 * (lr and step shared), writes each leaf's new state arrays into its state
 * dict and returns the new parameters, shaped like `gradients`; without,
 * nothing is built and, with `allow_missing_state`, a leaf may still lack
 * its state (it is checked as init() would create it, in `half_state_dtype`
 * beside float16 / bfloat16 parameters when given). Nothing changes unless
 * every leaf passes.
 */
nb::object optimizer_step(
    nb::handle gradients,
    nb::handle parameters,
    nb::handle state,
    const std::optional<mx::array>& lr,
    const std::optional<mx::array>& step,
    const RMSpropOptions& options,
    std::optional<mx::Dtype> half_state_dtype,
    bool build,
    bool allow_missing_state);

} // namespace mlx_fused_rmsprop
