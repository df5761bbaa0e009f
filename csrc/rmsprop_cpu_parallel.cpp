// The CPU worker pool's process-wide parts: how many threads split a leaf of
// each bound, the pool itself, and its statistics (csrc/cpu/parallel.h).
#include "cpu/parallel.h"

#include <cstdlib>

#if defined(__linux__)
#include <sched.h>
#endif
#include <unistd.h>

namespace mlx_fused_rmsprop {

namespace {

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') {
    return fallback;
  }
  char* end = nullptr;
  long value = std::strtol(s, &end, 10);
  return (end != s && value > 0 && value < (1L << 30)) ? static_cast<int>(value)
                                                      : fallback;
}

// Cores this process may run on (the affinity mask, not the machine's total).
int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

} // namespace

// A memory-bound loop stops scaling once the cores it runs on saturate the
// memory bus (measured on a 16-core box: float32 at 8 threads moves 99.8 of
// the 109.2 GB/s 16 threads can), so more threads only add wake-ups; a
// compute-bound one (16-bit conversions) kept scaling: bfloat16 went from
// 44.8 GB/s on 8 threads to 82.1 on 16.
int threads_for(CpuBound bound, int cores) {
  cores = std::max(1, cores);
  return bound == CpuBound::memory ? std::min(cores, kMemoryBoundThreads) : cores;
}

int split_threads(CpuBound bound) {
  static const int fixed = env_int("MLX_FUSED_RMSPROP_NUM_THREADS", 0);
  static const int cores = available_cores();
  return fixed > 0 ? fixed : threads_for(bound, cores);
}

// Elements each thread must get at least before a leaf is split: below this
// the wake-up of a worker costs more than it saves (measured: a cache-resident
// float32 leaf of 256K elements is no faster on 2 threads than on 1; out of
// cache, 16M elements go from ~10 ms to ~7 ms).
// MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD overrides it (tests use tiny values).
int64_t min_elements_per_thread() {
  static const int64_t n = env_int("MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD", 1 << 17);
  return n;
}

// The process's pool, created on first use. It is never destroyed (its
// threads are detached and may outlive static destructors), and a forked
// child that inherited it without its threads makes a new one.
WorkerPool& worker_pool() {
  static std::mutex creation;
  static WorkerPool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(creation);
  pid_t pid = getpid();
  if (pool == nullptr || owner != pid) {
    pool = new WorkerPool(
        std::max(split_threads(CpuBound::memory), split_threads(CpuBound::compute)) - 1);
    owner = pid;
  }
  return *pool;
}

int split_parts(int64_t n, CpuBound bound) {
  int threads = split_threads(bound);
  if (threads <= 1) {
    return 1;
  }
  int64_t by_size = n / std::max<int64_t>(1, min_elements_per_thread());
  return static_cast<int>(std::clamp<int64_t>(by_size, 1, threads));
}

SplitStats split_stats() {
  return worker_pool().stats();
}

} // namespace mlx_fused_rmsprop
