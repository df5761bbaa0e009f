// What the CPU kernel decides per leaf, visible to tests: which walk over
// memory it takes, what bounds it and so how many threads split it, which
// instruction-set build of the loops runs, and how often leaves were split
// across the worker pool. eval_cpu uses exactly these (csrc/rmsprop_cpu.cpp,
// csrc/rmsprop_cpu_parallel.cpp); the bindings expose them as
// _ext._cpu_walk, _ext._cpu_bound, _ext._split_threads, _ext._cpu_isa and
// _ext._split_stats.
#pragma once

#include <cstdint>
#include <span>
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
  quantized_flat, // 8-bit state; every array row-contiguous
  quantized_general, // 8-bit state; each block gathered through the layouts
};

// What limits a leaf's loop, which decides how many threads it gets.
enum class CpuBound {
  memory, // float32 / float64: stops scaling near the memory limit
  compute, // float16 / bfloat16 parameters: conversions and math per byte
           // moved, keeps scaling to every core
};

struct CpuDispatch {
  CpuWalk walk;
  CpuBound bound;
  CollapsedLayout layout; // empty for the flat walk
};

// The walk for a leaf's walked arrays (grad, param, state...,
// [compensation]; evaluated, so their layouts are known), its config and
// (8-bit state) its scales.
CpuDispatch choose_cpu_dispatch(
    std::span<const mx::array> arrays,
    const LeafConfig& config,
    std::span<const mx::array> scales = {});

std::string cpu_walk_name(CpuWalk walk);
std::string cpu_bound_name(CpuBound bound);

// Threads a leaf of each bound is split across: MLX_FUSED_RMSPROP_NUM_THREADS
// when set, else threads_for(bound, the cores this process may run on).
int split_threads(CpuBound bound);
// The policy itself: compute-bound leaves take every core, memory-bound
// ones at most kMemoryBoundThreads.
constexpr int kMemoryBoundThreads = 8;
int threads_for(CpuBound bound, int cores);
// How many parts a leaf of n elements with this bound is cut into: up to
// split_threads(bound), each at least min_elements_per_thread() elements.
int split_parts(int64_t n, CpuBound bound);

// The build of the loops this process runs: "baseline", "avx2" or "avx512"
// (cpu/isa.h; MLX_FUSED_RMSPROP_ISA caps it).
std::string cpu_isa_name();

// Counts since the process started: leaves split across threads and run by
// the pool, and split leaves whose submitter found the pool busy (another
// stream's update) and ran every part itself.
struct SplitStats {
  uint64_t pooled;
  uint64_t busy_fallbacks;
};
SplitStats split_stats();

} // namespace mlx_fused_rmsprop
