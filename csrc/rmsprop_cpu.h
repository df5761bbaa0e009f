// What the CPU kernel decides per leaf, visible to tests: which walk over
// memory it takes, and how often leaves were split across the worker pool.
// eval_cpu uses exactly these (csrc/rmsprop_cpu.cpp); the bindings expose
// them as _ext._cpu_walk and _ext._split_stats.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rmsprop.h"

namespace mlx_fused_rmsprop {

// How the CPU kernel walks one leaf.
enum class CpuWalk {
  flat, // grad, param, v share one dense layout
  transposed, // param, state row-major 2-D (collapsed), grad its column-major twin:
              // the tiled walk (the weight gradient of every nn.Linear)
  strided_like_param, // param dense: outputs in param's layout
  strided, // anything else: fresh row-contiguous outputs
};

struct CpuDispatch {
  CpuWalk walk;
  CollapsedLayout layout; // empty for the flat walk
};

// The walk for a leaf's walked arrays (grad, param, state...; evaluated, so
// their layouts are known).
CpuDispatch choose_cpu_dispatch(const std::vector<mx::array>& arrays);

std::string cpu_walk_name(CpuWalk walk);

// Counts since the process started: leaves split across threads and run by
// the pool, and split leaves whose submitter found the pool busy (another
// stream's update) and ran every part itself.
struct SplitStats {
  uint64_t pooled;
  uint64_t busy_fallbacks;
};
SplitStats split_stats();

} // namespace mlx_fused_rmsprop
