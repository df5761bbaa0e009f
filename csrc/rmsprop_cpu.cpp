// CPU evaluation of FusedRMSprop: one pass over grad, param and v.
//
// What makes it fast (each measured by `python -m mlx_fused_rmsprop bench`):
//  - In place: in a training loop the old parameter and state are referenced
//    by nothing but this update, so the outputs take their buffers (no fresh
//    allocation, no page faults, no write-allocate traffic).
//  - One loop per leaf that the compiler vectorizes with the baseline flags
//    (SSE2 on x86-64, NEON on arm64): restrict-qualified pointers, in place
//    versus separate outputs decided once per call, branch-free half
//    conversions (rmsprop_cpu_half.h). On x86-64 an AVX2 build of the same loop
//    (float16 through F16C) is picked at run time when the CPU has both.
//  - Large leaves are split across cores by a small persistent worker pool;
//    the split is element-wise, so it never changes a result.
// The math is rmsprop_element() from rmsprop_math.h, unchanged; this file is
// built with -ffp-contract=off like the rest of the extension.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#include <unistd.h>

#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "rmsprop_cpu.h"
#include "rmsprop_cpu_half.h"

namespace mlx_fused_rmsprop {

namespace {

// ---- Element formats: storage type in memory, compute type, conversions.

// float32 and float64 compute in their own type: loading is the identity.
template <typename T>
struct NativeFormat {
  using Storage = T;
  using Compute = T;
  static T load(T x) {
    return x;
  }
  static T store(T x) {
    return x;
  }
};
using Float32Format = NativeFormat<float>;
using Float64Format = NativeFormat<double>;
// float16 and bfloat16 are stored as their bits and computed in float32.
template <float (*kLoad)(uint16_t), uint16_t (*kStore)(float)>
struct HalfFormat {
  using Storage = uint16_t; // the bits of mx::float16_t / mx::bfloat16_t
  using Compute = float;
  static float load(uint16_t x) {
    return kLoad(x);
  }
  static uint16_t store(float x) {
    return kStore(x);
  }
};
using Float16Format = HalfFormat<half_bits::f16_to_f32, half_bits::f32_to_f16>;
using BFloat16Format = HalfFormat<half_bits::bf16_to_f32, half_bits::f32_to_bf16>;

// ---- The flat loop.
//
// In place (the outputs took the inputs' buffers) the loop reads and writes
// through the same restrict pointer, element i before element i, which is
// well-defined and vectorizes without run-time alias checks. Otherwise the
// outputs are fresh allocations that overlap nothing.

#if defined(__GNUC__) || defined(__clang__)
#define RMSPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RMSPROP_ALWAYS_INLINE inline
#endif

template <class F, bool kParamInPlace, bool kVInPlace>
RMSPROP_ALWAYS_INLINE void rmsprop_span(
    const typename F::Storage* __restrict grad,
    typename F::Storage* __restrict param,
    typename F::Storage* __restrict v,
    typename F::Storage* __restrict param_out,
    typename F::Storage* __restrict v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
  using C = typename F::Compute;
  for (int64_t i = 0; i < n; ++i) {
    C g = F::load(grad[i]);
    C w = F::load(param[i]);
    C s = F::load(v[i]);
    auto r = rmsprop_element<C>(g, w, s, k);
    (kParamInPlace ? param : param_out)[i] = F::store(r.param);
    (kVInPlace ? v : v_out)[i] = F::store(r.v);
  }
}

// One contiguous run of elements. Each output either is its input's buffer
// (donated: same pointer) or overlaps no input (a fresh allocation).
template <class F>
RMSPROP_ALWAYS_INLINE void span_any(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
  using S = typename F::Storage;
  S* p = const_cast<S*>(param);
  S* s = const_cast<S*>(v);
  bool p_in = param_out == param;
  bool v_in = v_out == v;
  if (p_in && v_in) {
    rmsprop_span<F, true, true>(grad, p, s, nullptr, nullptr, n, k);
  } else if (p_in) {
    rmsprop_span<F, true, false>(grad, p, s, nullptr, v_out, n, k);
  } else if (v_in) {
    rmsprop_span<F, false, true>(grad, p, s, param_out, nullptr, n, k);
  } else {
    rmsprop_span<F, false, false>(grad, p, s, param_out, v_out, n, k);
  }
}

#if RMSPROP_HAVE_AVX2_F16C
// float16 with F16C (AVX2 build only): blocks converted by vcvtph2ps /
// vcvtps2ph (rmsprop_cpu_half.h, same bits as the portable conversions)
// around the same float32 loop. Every element of a block is read before any
// is written, so in place is safe.
constexpr int64_t kF16Block = 512;

RMSPROP_TARGET_AVX2_F16C inline void span_f16c(
    const uint16_t* grad,
    const uint16_t* param,
    const uint16_t* v,
    uint16_t* param_out,
    uint16_t* v_out,
    int64_t n,
    RMSpropCoefficients<float> k) {
  alignas(64) float g[kF16Block];
  alignas(64) float w[kF16Block];
  alignas(64) float s[kF16Block];
  for (int64_t start = 0; start < n; start += kF16Block) {
    int64_t len = std::min(kF16Block, n - start);
    half_bits::f16_to_f32_f16c(grad + start, g, len);
    half_bits::f16_to_f32_f16c(param + start, w, len);
    half_bits::f16_to_f32_f16c(v + start, s, len);
    rmsprop_span<Float32Format, true, true>(g, w, s, nullptr, nullptr, len, k);
    half_bits::f32_to_f16_f16c(w, param_out + start, len);
    half_bits::f32_to_f16_f16c(s, v_out + start, len);
  }
}
#endif

// The run used by a given build: kWide is the AVX2 (+F16C) build.
template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void span_for(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    int64_t n,
    RMSpropCoefficients<typename F::Compute> k) {
#if RMSPROP_HAVE_AVX2_F16C
  if constexpr (kWide && std::is_same_v<F, Float16Format>) {
    return span_f16c(grad, param, v, param_out, v_out, n, k);
  }
#endif
  span_any<F>(grad, param, v, param_out, v_out, n, k);
}

// A leaf whose param, v and grad share one dense layout: elements
// [begin, end) of the flat buffers.
template <class F>
struct FlatJob {
  using S = typename F::Storage;
  const S* grad;
  const S* param;
  const S* v;
  S* param_out;
  S* v_out;
  RMSpropCoefficients<typename F::Compute> k;
};

template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void flat_body(const FlatJob<F>& j, int64_t begin, int64_t end) {
  span_for<F, kWide>(
      j.grad + begin, j.param + begin, j.v + begin, j.param_out + begin,
      j.v_out + begin, end - begin, j.k);
}

// A 2-D leaf (after collapsing dims) whose param and v are row-major
// [rows, cols] and whose gradient is the same matrix stored column-major:
// what autodiff returns for the weight of x @ W.T (every nn.Linear). Outputs
// have param's layout. Rows [begin, end) are updated tile by tile: a
// kTileRows x kTileCols block of the gradient is transposed into a local
// buffer (reading whole cache lines of it), then each row of the block is a
// contiguous run like the flat case.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 64;

template <class F>
struct TransposedJob {
  using S = typename F::Storage;
  const S* grad; // grad(r, c) = grad[c * rows + r]
  const S* param; // param(r, c) = param[r * cols + c], v likewise
  const S* v;
  S* param_out;
  S* v_out;
  int64_t rows;
  int64_t cols;
  RMSpropCoefficients<typename F::Compute> k;
};

#if RMSPROP_HAVE_AVX2_F16C
// Transposes an 8x8 block of floats: dst[r * ds + c] = src[c * ss + r].
RMSPROP_TARGET_AVX2_F16C inline void transpose8x8(
    const float* src,
    int64_t ss,
    float* dst,
    int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ss), r1 = _mm256_loadu_ps(src + 1 * ss);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

template <class F, bool kWide>
RMSPROP_ALWAYS_INLINE void transposed_body(
    const TransposedJob<F>& j,
    int64_t row_begin,
    int64_t row_end) {
  using S = typename F::Storage;
  alignas(64) S tile[kTileRows * kTileCols];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileRows) {
    int64_t nr = std::min(kTileRows, row_end - r0);
    for (int64_t c0 = 0; c0 < j.cols; c0 += kTileCols) {
      int64_t nc = std::min(kTileCols, j.cols - c0);
      bool done = false;
#if RMSPROP_HAVE_AVX2_F16C
      // Whole float32 tiles in the AVX2 build: 8x8 register transposes
      // (measured 1.5x faster than the element loop on cache-resident leaves).
      if constexpr (kWide && std::is_same_v<F, Float32Format>) {
        if (nr == kTileRows && nc == kTileCols) {
          for (int64_t c = 0; c < kTileCols; c += 8) {
            for (int64_t r = 0; r < kTileRows; r += 8) {
              transpose8x8(
                  j.grad + (c0 + c) * j.rows + r0 + r, j.rows,
                  tile + r * kTileCols + c, kTileCols);
            }
          }
          done = true;
        }
      }
#endif
      for (int64_t c = 0; c < nc && !done; ++c) {
        const S* column = j.grad + (c0 + c) * j.rows + r0;
        for (int64_t r = 0; r < nr; ++r) {
          tile[r * kTileCols + c] = column[r];
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        int64_t at = (r0 + r) * j.cols + c0;
        span_for<F, kWide>(
            tile + r * kTileCols, j.param + at, j.v + at, j.param_out + at,
            j.v_out + at, nc, j.k);
      }
    }
  }
}

template <class F>
void flat_baseline(const FlatJob<F>& j, int64_t begin, int64_t end) {
  flat_body<F, false>(j, begin, end);
}
template <class F>
void transposed_baseline(const TransposedJob<F>& j, int64_t begin, int64_t end) {
  transposed_body<F, false>(j, begin, end);
}

#if RMSPROP_HAVE_AVX2_F16C
// The same source compiled for AVX2 (8 floats per instruction) and F16C
// (float16 conversions in hardware); every x86-64 CPU with AVX2 has F16C.
// FMA is not enabled: with -ffp-contract=off no a*b+c is fused either way.
template <class F>
RMSPROP_TARGET_AVX2_F16C void flat_avx2(const FlatJob<F>& j, int64_t begin, int64_t end) {
  flat_body<F, true>(j, begin, end);
}
template <class F>
RMSPROP_TARGET_AVX2_F16C void transposed_avx2(
    const TransposedJob<F>& j,
    int64_t begin,
    int64_t end) {
  transposed_body<F, true>(j, begin, end);
}
#endif

// Which instruction set the flat loop uses; overridable for testing with
// MLX_FUSED_RMSPROP_ISA=baseline.
bool use_avx2() {
#if RMSPROP_HAVE_AVX2_F16C
  static const bool enabled = [] {
    const char* isa = std::getenv("MLX_FUSED_RMSPROP_ISA");
    if (isa != nullptr && std::string(isa) == "baseline") {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return enabled;
#else
  return false;
#endif
}

template <class F>
void run_flat(const FlatJob<F>& j, int64_t begin, int64_t end) {
#if RMSPROP_HAVE_AVX2_F16C
  if (use_avx2()) {
    return flat_avx2<F>(j, begin, end);
  }
#endif
  flat_baseline<F>(j, begin, end);
}

template <class F>
void run_transposed(const TransposedJob<F>& j, int64_t begin, int64_t end) {
#if RMSPROP_HAVE_AVX2_F16C
  if (use_avx2()) {
    return transposed_avx2<F>(j, begin, end);
  }
#endif
  transposed_baseline<F>(j, begin, end);
}

// ---- Splitting a leaf across cores.

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

// Threads that update one leaf (the caller's included). A memory-bound loop
// stops scaling after a few cores, hence the cap. MLX_FUSED_RMSPROP_NUM_THREADS
// overrides it (1 disables the split).
int split_threads() {
  static const int n =
      env_int("MLX_FUSED_RMSPROP_NUM_THREADS", std::min(available_cores(), 8));
  return n;
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
    pool = new WorkerPool(split_threads() - 1);
    owner = pid;
  }
  return *pool;
}

// How many parts a leaf of n elements is cut into.
int split_parts(int64_t n) {
  int threads = split_threads();
  if (threads <= 1) {
    return 1;
  }
  int64_t by_size = n / std::max<int64_t>(1, min_elements_per_thread());
  return static_cast<int>(std::clamp<int64_t>(by_size, 1, threads));
}

// Runs fn(begin, end) over [0, units) split into equal parts whose boundaries
// are multiples of `align` units (the last part takes the rest), one part per
// thread; `unit_elements` elements per unit decide how many threads pay off.
template <class Fn>
void split_run(int64_t units, int64_t align, int64_t unit_elements, const Fn& fn) {
  int parts = split_parts(units * unit_elements);
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

// ---- Any other layout: strided, transposed, broadcast inputs.
//
// Walks the joint collapsed layout of grad, param and v in row-major logical
// order. When the outputs have param's layout (param dense), element i of
// param' and v' is written at param's offset of element i; otherwise the
// outputs are fresh row-contiguous arrays written in order.

template <class F>
void rmsprop_strided(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    const mx::Shape& shape,
    const std::vector<mx::Strides>& strides,
    bool outputs_like_param,
    RMSpropCoefficients<typename F::Compute> k) {
  using C = typename F::Compute;
  int ndim = static_cast<int>(shape.size());
  int64_t inner = shape[ndim - 1];
  int64_t outer = 1;
  for (int d = 0; d < ndim - 1; ++d) {
    outer *= shape[d];
  }
  const auto& gs = strides[0];
  const auto& ws = strides[1];
  const auto& vs = strides[2];
  int64_t gi = gs[ndim - 1], wi = ws[ndim - 1], vi = vs[ndim - 1];
  std::vector<int64_t> pos(ndim, 0);
  int64_t g_off = 0, w_off = 0, v_off = 0, out = 0;
  for (int64_t row = 0; row < outer; ++row) {
    for (int64_t i = 0; i < inner; ++i) {
      // Read element i before writing it: param' / v' may be param / v.
      auto r = rmsprop_element<C>(
          F::load(grad[g_off + i * gi]),
          F::load(param[w_off + i * wi]),
          F::load(v[v_off + i * vi]),
          k);
      int64_t o = outputs_like_param ? w_off + i * wi : out + i;
      param_out[o] = F::store(r.param);
      v_out[o] = F::store(r.v);
    }
    out += inner;
    // Advance the outer position like an odometer.
    for (int d = ndim - 2; d >= 0; --d) {
      g_off += gs[d];
      w_off += ws[d];
      v_off += vs[d];
      if (++pos[d] < shape[d]) {
        break;
      }
      g_off -= gs[d] * shape[d];
      w_off -= ws[d] * shape[d];
      v_off -= vs[d] * shape[d];
      pos[d] = 0;
    }
  }
}

// The transposed case, seen on the collapsed layout.
bool is_transposed_pair(const CollapsedLayout& l) {
  if (l.shape.size() != 2) {
    return false;
  }
  int64_t rows = l.shape[0], cols = l.shape[1];
  const auto& g = l.strides[0];
  const auto& w = l.strides[1];
  const auto& v = l.strides[2];
  return w[0] == cols && w[1] == 1 && v == w && g[0] == 1 && g[1] == rows;
}

template <class F>
void dispatch_typed(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    CpuWalk walk,
    const CollapsedLayout& layout,
    double alpha,
    double eps,
    mx::cpu::CommandEncoder& encoder) {
  using S = typename F::Storage;
  using C = typename F::Compute;
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];
  const auto& lr = inputs[3];

  const S* g_ptr = reinterpret_cast<const S*>(grad.data<void>());
  const S* w_ptr = reinterpret_cast<const S*>(param.data<void>());
  const S* v_ptr = reinterpret_cast<const S*>(v.data<void>());
  const C* lr_ptr = lr.data<C>();
  S* w_out_ptr = reinterpret_cast<S*>(outputs[0].data<void>());
  S* v_out_ptr = reinterpret_cast<S*>(outputs[1].data<void>());

  switch (walk) {
    case CpuWalk::flat:
      // With the flat layout every array holds exactly size() elements.
      encoder.dispatch([=, n = static_cast<int64_t>(param.size())]() {
        FlatJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(n, kSplitAlign, 1, [&](int64_t b, int64_t e) {
          run_flat<F>(job, b, e);
        });
      });
      return;
    case CpuWalk::transposed:
      encoder.dispatch([=, rows = int64_t{layout.shape[0]}, cols = int64_t{layout.shape[1]}]() {
        TransposedJob<F> job{
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, rows, cols,
            make_coefficients<C>(*lr_ptr, alpha, eps)};
        split_run(rows, kTileRows, cols, [&](int64_t b, int64_t e) {
          run_transposed<F>(job, b, e);
        });
      });
      return;
    case CpuWalk::strided_like_param:
    case CpuWalk::strided:
      encoder.dispatch([=, like_param = walk == CpuWalk::strided_like_param]() {
        auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
        rmsprop_strided<F>(
            g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, layout.shape,
            layout.strides, like_param, k);
      });
      return;
  }
}

} // namespace

CpuDispatch choose_cpu_dispatch(
    const mx::array& grad,
    const mx::array& param,
    const mx::array& v) {
  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat path.
  if (is_flat_layout(grad, param, v)) {
    return {CpuWalk::flat, {}};
  }
  auto layout = collapse_layout(grad, param, v);
  CpuWalk walk = !is_dense(param)   ? CpuWalk::strided
      : is_transposed_pair(layout) ? CpuWalk::transposed
                                   : CpuWalk::strided_like_param;
  return {walk, std::move(layout)};
}

std::string cpu_walk_name(CpuWalk walk) {
  switch (walk) {
    case CpuWalk::flat:
      return "flat";
    case CpuWalk::transposed:
      return "transposed";
    case CpuWalk::strided_like_param:
      return "strided_like_param";
    case CpuWalk::strided:
      return "strided";
  }
  return "";
}

SplitStats split_stats() {
  return worker_pool().stats();
}

void FusedRMSprop::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];

  release_sibling_inputs(inputs, outputs);

  auto dispatch = choose_cpu_dispatch(grad, param, v);
  // Every walk but the plain strided one writes the outputs in param's layout.
  allocate_outputs(inputs, outputs, dispatch.walk != CpuWalk::strided);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(outputs[0]);
  encoder.set_output_array(outputs[1]);
  if (param.size() == 0) {
    return;
  }

  switch (param.dtype()) {
    case mx::float32:
      return dispatch_typed<Float32Format>(inputs, outputs, dispatch.walk, dispatch.layout, alpha_, eps_, encoder);
    case mx::float16:
      return dispatch_typed<Float16Format>(inputs, outputs, dispatch.walk, dispatch.layout, alpha_, eps_, encoder);
    case mx::bfloat16:
      return dispatch_typed<BFloat16Format>(inputs, outputs, dispatch.walk, dispatch.layout, alpha_, eps_, encoder);
    case mx::float64:
      return dispatch_typed<Float64Format>(inputs, outputs, dispatch.walk, dispatch.layout, alpha_, eps_, encoder);
    default:
      throw std::invalid_argument(
          "[FusedRMSprop] unsupported dtype reached the CPU kernel.");
  }
}

} // namespace mlx_fused_rmsprop
