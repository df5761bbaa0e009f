// Splitting one leaf's update across cores: a small persistent worker pool
// and the element-wise split it runs (which never changes a result).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "../rmsprop_cpu.h"

namespace mlx_fused_rmsprop {

// Elements each thread must get at least before a leaf is split (131072;
// MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD overrides it). Read once.
int64_t min_elements_per_thread();

// Chunk boundaries are multiples of this many elements (a multiple of every
// cache line and vector width), so no two threads write the same cache line.
constexpr int64_t kSplitAlign = 256;

// A few worker threads that stay alive for the whole process and run the
// parts of one split update at a time. The thread that submits (the CPU
// stream's thread) runs part 0 itself and waits for the others. When the pool
// is busy (another stream's update), the submitter just runs every part.
class WorkerPool {
 public:
  explicit WorkerPool(int workers) {
    for (int i = 0; i < workers; ++i) {
      std::thread([this, i] { work(i + 1); }).detach();
    }
    workers_ = workers;
  }

  int workers() const {
    return workers_;
  }

  SplitStats stats() const {
    return {pooled_.load(std::memory_order_relaxed),
            busy_fallbacks_.load(std::memory_order_relaxed)};
  }

  // Runs fn(part) for part in [0, parts); parts - 1 <= workers().
  template <class Fn>
  void run(int parts, const Fn& fn) {
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock() || parts <= 1) {
      if (parts > 1) {
        busy_fallbacks_.fetch_add(1, std::memory_order_relaxed);
      }
      for (int p = 0; p < parts; ++p) {
        fn(p);
      }
      return;
    }
    pooled_.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = [&fn](int p) { fn(p); };
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    start_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(int part) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (part >= parts_) {
        continue;
      }
      auto job = job_;
      lock.unlock();
      job(part);
      lock.lock();
      if (--pending_ == 0) {
        done_.notify_one();
      }
    }
  }

  int workers_ = 0;
  std::mutex submit_;
  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  std::function<void(int)> job_;
  int parts_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> pooled_{0};
  std::atomic<uint64_t> busy_fallbacks_{0};
};

// The process's pool, created on first use (rmsprop_cpu_parallel.cpp).
WorkerPool& worker_pool();

// Runs fn(begin, end) over [0, units) split into equal parts whose boundaries
// are multiples of `align` units (the last part takes the rest), one part per
// thread; `unit_elements` elements per unit and the leaf's bound decide how
// many threads pay off.
template <class Fn>
void split_run(
    int64_t units,
    int64_t align,
    int64_t unit_elements,
    CpuBound bound,
    const Fn& fn) {
  int parts = split_parts(units * unit_elements, bound);
  if (parts > 1) {
    parts = std::min<int64_t>(parts, (units + align - 1) / align);
  }
  if (parts <= 1) {
    fn(int64_t{0}, units);
    return;
  }
  int64_t per_part = (units + parts - 1) / parts;
  per_part = (per_part + align - 1) / align * align;
  auto& pool = worker_pool();
  parts = std::min(parts, pool.workers() + 1);
  pool.run(parts, [&](int p) {
    int64_t begin = std::min(units, p * per_part);
    int64_t end = p == parts - 1 ? units : std::min(units, begin + per_part);
    if (begin < end) {
      fn(begin, end);
    }
  });
}

} // namespace mlx_fused_rmsprop
