// One optimizer step over a whole tree in one native call (optimizer_step.cpp).
#pragma once

#include <optional>

#include <nanobind/nanobind.h>

#include "rmsprop.h"

namespace mlx_fused_rmsprop {

namespace nb = nanobind;

/** Where one gradient leaf given to optimizer_step sits in its whole leaf:
 * the whole leaf's position in the tree and the index of this array's
 * element 0 in it (the sharded step passes pieces of leaves). */
struct LeafPlace {
  uint32_t leaf;
  int64_t element_offset;
};

/**
 * The step RMSprop.apply_gradients takes: walks `gradients` (dicts, lists,
 * tuples of arrays) with `parameters` and the optimizer `state` beside them
 * and checks every leaf, raising ValueError / TypeError that names the first
 * bad leaf's path. A leaf's state is 8-bit when its "v" holds uint8 codes;
 * its entries are leaf_entry_names(). With `build`, then builds every leaf's
 * fused primitive (the step's values shared), writes each leaf's new state
 * entries into its state dict and returns the new parameters, shaped like
 * `gradients`; without, nothing is built and, with `allow_missing_state`, a
 * leaf may still lack its state (it is checked as init() would create it:
 * options.quantizes() decides 8-bit, `half_state_dtype` is the state's dtype
 * beside float16 / bfloat16 parameters otherwise). Leaves are numbered in
 * walk order (tree_flatten's) for stochastic rounding, unless `places` gives
 * each its whole leaf and offset. Nothing changes unless every leaf passes.
 */
nb::object optimizer_step(
    nb::handle gradients,
    nb::handle parameters,
    nb::handle state,
    const std::optional<StepValues>& values,
    const RMSpropOptions& options,
    std::optional<mx::Dtype> half_state_dtype,
    bool build,
    bool allow_missing_state,
    const std::optional<std::vector<LeafPlace>>& places);

/**
 * The sum of the squares of every gradient leaf, in tree_flatten order, as
 * mlx.optimizers.clip_grad_norm computes it before its square root:
 * 0.0 + s_1 + s_2 + ... with s_i = squared_norm(g_i) (grad_norm.h).
 */
mx::array tree_squared_norm(nb::handle gradients);

} // namespace mlx_fused_rmsprop
