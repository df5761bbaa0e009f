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
//    is picked at run time when the CPU has AVX2.
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
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#include <unistd.h>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "rmsprop.h"
#include "rmsprop_cpu_half.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RMSPROP_X86_DISPATCH 1
#define RMSPROP_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define RMSPROP_X86_DISPATCH 0
#endif

namespace mlx_fused_rmsprop {

namespace {

// ---- Element formats: storage type in memory, compute type, conversions.

struct Float32Format {
  using Storage = float;
  using Compute = float;
  static float load(float x) {
    return x;
  }
  static float store(float x) {
    return x;
  }
};
struct Float64Format {
  using Storage = double;
  using Compute = double;
  static double load(double x) {
    return x;
  }
  static double store(double x) {
    return x;
  }
};
struct Float16Format {
  using Storage = uint16_t; // the bits of mx::float16_t
  using Compute = float;
  static float load(uint16_t x) {
    return half_bits::f16_to_f32(x);
  }
  static uint16_t store(float x) {
    return half_bits::f32_to_f16(x);
  }
};
struct BFloat16Format {
  using Storage = uint16_t; // the bits of mx::bfloat16_t
  using Compute = float;
  static float load(uint16_t x) {
    return half_bits::bf16_to_f32(x);
  }
  static uint16_t store(float x) {
    return half_bits::f32_to_bf16(x);
  }
};

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

// A contiguous range of one leaf: pointers already offset to its start.
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

template <class F>
inline void run_span_baseline(const FlatJob<F>& j, int64_t begin, int64_t end) {
  using S = typename F::Storage;
  // Outputs either are their input's buffer or overlap no input.
  bool p_in = j.param_out == j.param;
  bool v_in = j.v_out == j.v;
  S* p = const_cast<S*>(j.param) + begin;
  S* s = const_cast<S*>(j.v) + begin;
  const S* g = j.grad + begin;
  S* po = j.param_out + begin;
  S* so = j.v_out + begin;
  int64_t n = end - begin;
  if (p_in && v_in) {
    rmsprop_span<F, true, true>(g, p, s, nullptr, nullptr, n, j.k);
  } else if (p_in) {
    rmsprop_span<F, true, false>(g, p, s, nullptr, so, n, j.k);
  } else if (v_in) {
    rmsprop_span<F, false, true>(g, p, s, po, nullptr, n, j.k);
  } else {
    rmsprop_span<F, false, false>(g, p, s, po, so, n, j.k);
  }
}

#if RMSPROP_X86_DISPATCH
// The same source compiled for AVX2 (8 floats per instruction). Only AVX2 is
// enabled, not FMA: with -ffp-contract=off no a*b+c is fused either way.
template <class F>
RMSPROP_TARGET_AVX2 void run_span_avx2(const FlatJob<F>& j, int64_t begin, int64_t end) {
  using S = typename F::Storage;
  bool p_in = j.param_out == j.param;
  bool v_in = j.v_out == j.v;
  S* p = const_cast<S*>(j.param) + begin;
  S* s = const_cast<S*>(j.v) + begin;
  const S* g = j.grad + begin;
  S* po = j.param_out + begin;
  S* so = j.v_out + begin;
  int64_t n = end - begin;
  if (p_in && v_in) {
    rmsprop_span<F, true, true>(g, p, s, nullptr, nullptr, n, j.k);
  } else if (p_in) {
    rmsprop_span<F, true, false>(g, p, s, nullptr, so, n, j.k);
  } else if (v_in) {
    rmsprop_span<F, false, true>(g, p, s, po, nullptr, n, j.k);
  } else {
    rmsprop_span<F, false, false>(g, p, s, po, so, n, j.k);
  }
}
#endif

// Which instruction set the flat loop uses; overridable for testing with
// MLX_FUSED_RMSPROP_ISA=baseline.
bool use_avx2() {
#if RMSPROP_X86_DISPATCH
  static const bool enabled = [] {
    const char* isa = std::getenv("MLX_FUSED_RMSPROP_ISA");
    if (isa != nullptr && std::string(isa) == "baseline") {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

template <class F>
void run_span(const FlatJob<F>& j, int64_t begin, int64_t end) {
#if RMSPROP_X86_DISPATCH
  if (use_avx2()) {
    return run_span_avx2<F>(j, begin, end);
  }
#endif
  run_span_baseline<F>(j, begin, end);
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
// the wake-up of a worker costs more than it saves.
// MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD overrides it (tests use tiny values).
int64_t min_elements_per_thread() {
  static const int64_t n = env_int("MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD", 1 << 16);
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

  // Runs fn(part) for part in [0, parts); parts - 1 <= workers().
  template <class Fn>
  void run(int parts, const Fn& fn) {
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock() || parts <= 1) {
      for (int p = 0; p < parts; ++p) {
        fn(p);
      }
      return;
    }
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

template <class F>
void rmsprop_flat(const FlatJob<F>& job, int64_t n) {
  int parts = split_parts(n);
  if (parts <= 1) {
    run_span<F>(job, 0, n);
    return;
  }
  // Equal parts, boundaries rounded up to kSplitAlign; the last takes the rest.
  int64_t per_part = (n + parts - 1) / parts;
  per_part = (per_part + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  auto& pool = worker_pool();
  parts = std::min(parts, pool.workers() + 1);
  pool.run(parts, [&](int p) {
    int64_t begin = std::min(n, p * per_part);
    int64_t end = p == parts - 1 ? n : std::min(n, begin + per_part);
    if (begin < end) {
      run_span<F>(job, begin, end);
    }
  });
}

// ---- Any layout: strided, transposed, broadcast. Outputs are row-contiguous.

template <class F>
void rmsprop_strided(
    const typename F::Storage* grad,
    const typename F::Storage* param,
    const typename F::Storage* v,
    typename F::Storage* param_out,
    typename F::Storage* v_out,
    const mx::Shape& shape,
    const std::vector<mx::Strides>& strides,
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
  std::vector<int64_t> pos(ndim, 0);
  int64_t g_off = 0, w_off = 0, v_off = 0, out = 0;
  for (int64_t row = 0; row < outer; ++row) {
    for (int64_t i = 0; i < inner; ++i, ++out) {
      auto r = rmsprop_element<C>(
          F::load(grad[g_off + i * gs[ndim - 1]]),
          F::load(param[w_off + i * ws[ndim - 1]]),
          F::load(v[v_off + i * vs[ndim - 1]]),
          k);
      param_out[out] = F::store(r.param);
      v_out[out] = F::store(r.v);
    }
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

template <class F>
void dispatch_typed(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    bool flat,
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

  if (flat) {
    // With the flat layout every array holds exactly size() elements.
    encoder.dispatch([=, n = static_cast<int64_t>(param.size())]() {
      FlatJob<F> job{
          g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr,
          make_coefficients<C>(*lr_ptr, alpha, eps)};
      rmsprop_flat<F>(job, n);
    });
    return;
  }
  encoder.dispatch([=, layout = collapse_layout(grad, param, v)]() {
    auto k = make_coefficients<C>(*lr_ptr, alpha, eps);
    rmsprop_strided<F>(
        g_ptr, w_ptr, v_ptr, w_out_ptr, v_out_ptr, layout.shape, layout.strides, k);
  });
}

// MLX gives each output of a multi-output primitive its own copy of the
// inputs, so an old parameter that nothing else references is still held
// twice (by param' and by v') and array::is_donatable() could never hold:
// every step would allocate (and page-fault) two fresh leaf-sized buffers.
// Drop the siblings' copies; eval_cpu's `inputs` (the evaluated array's own)
// keeps every input alive until the step is done, and MLX clears all of them
// when it detaches the evaluated arrays anyway. Under a transformation that
// keeps the graph (tracers), nothing is touched and nothing is donated.
void release_sibling_inputs(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (const auto& out : outputs) {
    if (out.is_tracer()) {
      return;
    }
  }
  for (auto& out : outputs) {
    if (&out.inputs() != &inputs) {
      out.inputs().clear();
    }
  }
}

} // namespace

void FusedRMSprop::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& grad = inputs[0];
  const auto& param = inputs[1];
  const auto& v = inputs[2];

  // Empty leaves and 0-d leaves are row-contiguous, so they take the flat path.
  bool flat = is_flat_layout(grad, param, v);
  release_sibling_inputs(inputs, outputs);
  allocate_outputs(inputs, outputs, flat);

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
      return dispatch_typed<Float32Format>(inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::float16:
      return dispatch_typed<Float16Format>(inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::bfloat16:
      return dispatch_typed<BFloat16Format>(inputs, outputs, flat, alpha_, eps_, encoder);
    case mx::float64:
      return dispatch_typed<Float64Format>(inputs, outputs, flat, alpha_, eps_, encoder);
    default:
      throw std::invalid_argument(
          "[FusedRMSprop] unsupported dtype reached the CPU kernel.");
  }
}

} // namespace mlx_fused_rmsprop
