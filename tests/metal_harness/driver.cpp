// Runs the kernels of a Metal shader on the CPU, compiled as C++ under
// metal_shim.h, for every thread (x, y) of the grid eval_gpu would dispatch.
// The shader is kernels/rmsprop.metal, or with -DRMSPROP_SHADER_FILE="path"
// any other file: the test-suite passes the source embedded in the extension
// (rmsprop.metal with rmsprop_math.h inlined), the exact bytes a Mac compiles
// at run time.
//
//   driver list                    registered kernel names, one a line
//   driver grid KIND N ITEMSIZE INNER MAX_GROUP
//                                  rmsprop_threads(KIND, N, ITEMSIZE, INNER)
//                                  and rmsprop_grid() of it, as "threads width
//                                  height group_width max_width"
//   driver run MANIFEST            run the cases of MANIFEST (format below)
//
// A manifest is a list of cases, each a block of "key value..." lines ending
// with "end":
//   dtype float32|float16|bfloat16
//   kernel contiguous|general_idx32|general_idx64
//                       the kernel kind (eval_gpu's choose_gpu_dispatch, or a
//                       forced index width)
//   size N              elements of the update
//   alpha A / eps E     doubles in C99 hex-float notation (exact)
//   lr_bits H           the float32 lr buffer, as hex bits
//   order forward|reverse   the order threads are run in
//   inplace 0|1         param_out = param and v_out = v (donated buffers)
//   input PATH          grad, param and v base buffers, back to back
//   elements G W V      elements of each base buffer
//   offsets G W V       element offset of each array in its base buffer
//   shape ...           collapsed layout (general kernels only), as
//   strides_grad ...    collapse_layout() gives it to eval_gpu
//   strides_param ...
//   strides_v ...
//   output PATH         written: param_out then v_out; when in place, the
//                       whole param and v base buffers after the update
// Inputs are allocated at their exact size (AddressSanitizer catches reads
// past them); fresh outputs are filled with 0xff bytes first, so an element
// the kernels never write shows up as a mismatch, and sit between guard zones
// that must stay intact.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// The headers csrc/rmsprop.h includes, before the shim defines its macros.
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

// The shim, then the shader: the math header (inlined in an embedded source,
// included by the file) is first seen with the shim's __METAL_VERSION__, as in
// Metal. Host code (csrc/rmsprop.h) comes after the shader and finds the
// math header's include guard already set, so it uses the shader's copy.
#include "metal_shim.h"

#ifndef RMSPROP_SHADER_FILE
#define RMSPROP_SHADER_FILE "rmsprop.metal"
#endif

// Defined by the shader's copy of rmsprop_math.h.
struct RMSpropDeviceScalars;

namespace harness {

// Everything one dispatch binds, as eval_gpu binds it.
struct Dispatch {
  const void* grad;
  const void* param;
  const void* v;
  const float* lr;
  void* param_out;
  void* v_out;
  const RMSpropDeviceScalars* scalars;
  ulong size;
  std::vector<int> shape;
  std::vector<long> strides[3]; // grad, param, v
  int ndim;
};

// Calls the kernel as thread `gid` of a grid of `grid_dims` threads.
using Launcher =
    std::function<void(const Dispatch&, uint2 gid, uint2 grid_dims)>;

struct Kernel {
  bool contiguous;
  int itemsize;
  Launcher launch;
};

inline std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> kernels;
  return kernels;
}

// The two kernel signatures of the shader, after the shim's macros.
template <typename T>
using ContiguousKernel = void (*)(
    const T*, const T*, const T*, const float*, T*, T*,
    const RMSpropDeviceScalars&, const ulong&, uint2, uint2);
template <typename T>
using GeneralKernel = void (*)(
    const T*, const T*, const T*, const float*, T*, T*,
    const RMSpropDeviceScalars&, const ulong&, const int*, const long*,
    const long*, const long*, const int&, uint2, uint2);

template <typename T>
Kernel make_kernel(ContiguousKernel<T> fn) {
  return Kernel{true, sizeof(T), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(static_cast<const T*>(d.grad), static_cast<const T*>(d.param),
       static_cast<const T*>(d.v), d.lr, static_cast<T*>(d.param_out),
       static_cast<T*>(d.v_out), *d.scalars, d.size, gid, dims);
  }};
}

template <typename T>
Kernel make_kernel(GeneralKernel<T> fn) {
  return Kernel{false, sizeof(T), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(static_cast<const T*>(d.grad), static_cast<const T*>(d.param),
       static_cast<const T*>(d.v), d.lr, static_cast<T*>(d.param_out),
       static_cast<T*>(d.v_out), *d.scalars, d.size, d.shape.data(),
       d.strides[0].data(), d.strides[1].data(), d.strides[2].data(), d.ndim,
       gid, dims);
  }};
}

struct Registrar {
  template <typename Fn>
  Registrar(const char* name, Fn fn) {
    if (!registry().emplace(name, make_kernel(fn)).second) {
      std::fprintf(stderr, "kernel %s instantiated twice\n", name);
      std::abort();
    }
  }
};

} // namespace harness

// Every RMSPROP_KERNEL line of the shader registers its instantiation by the
// host name Metal would give it.
#define RMSPROP_HARNESS_CAT2(a, b) a##b
#define RMSPROP_HARNESS_CAT(a, b) RMSPROP_HARNESS_CAT2(a, b)
#define RMSPROP_KERNEL(host, func, ...)                                   \
  static ::harness::Registrar RMSPROP_HARNESS_CAT(                        \
      rmsprop_harness_registrar_, __COUNTER__)(host, &func<__VA_ARGS__>);

#include RMSPROP_SHADER_FILE

#include "metal_shim_end.h"

#include "rmsprop.h" // make_coefficients(): the scalars eval_gpu binds
#include "rmsprop_grid.h" // rmsprop_threads(), rmsprop_grid(), kernel names

namespace harness {

[[noreturn]] void fail(const std::string& msg) {
  throw std::runtime_error(msg);
}

using mlx_fused_rmsprop::RMSpropKernel;

struct Case {
  std::string dtype;
  RMSpropKernel kernel = RMSpropKernel::contiguous;
  uint64_t size = 0;
  double alpha = 0.0;
  double eps = 0.0;
  uint32_t lr_bits = 0;
  bool reverse = false;
  bool inplace = false;
  std::string input;
  std::string output;
  uint64_t elements[3] = {0, 0, 0};
  int64_t offsets[3] = {0, 0, 0};
  std::vector<int> shape;
  std::vector<long> strides[3];
};

int itemsize_of(const std::string& dtype) {
  if (dtype == "float32") {
    return 4;
  }
  if (dtype == "float16" || dtype == "bfloat16") {
    return 2;
  }
  fail("unknown dtype " + dtype);
}

RMSpropKernel parse_kernel(const std::string& kind) {
  for (auto k : {RMSpropKernel::contiguous, RMSpropKernel::general_idx32,
                 RMSpropKernel::general_idx64}) {
    if (mlx_fused_rmsprop::rmsprop_kernel_kind(k) == kind) {
      return k;
    }
  }
  fail("unknown kernel kind " + kind);
}

double parse_double(const std::string& text) {
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0') {
    fail("bad number " + text);
  }
  return value;
}

std::vector<Case> read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    fail("cannot open manifest " + path);
  }
  std::vector<Case> cases;
  Case c;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string key;
    if (!(words >> key)) {
      continue;
    }
    if (key == "end") {
      cases.push_back(c);
      c = Case{};
    } else if (key == "dtype") {
      words >> c.dtype;
    } else if (key == "kernel") {
      std::string kind;
      words >> kind;
      c.kernel = parse_kernel(kind);
    } else if (key == "size") {
      words >> c.size;
    } else if (key == "alpha" || key == "eps") {
      std::string text;
      words >> text;
      (key == "alpha" ? c.alpha : c.eps) = parse_double(text);
    } else if (key == "lr_bits") {
      words >> std::hex >> c.lr_bits >> std::dec;
    } else if (key == "order") {
      std::string order;
      words >> order;
      c.reverse = order == "reverse";
    } else if (key == "inplace") {
      words >> c.inplace;
    } else if (key == "input") {
      words >> c.input;
    } else if (key == "output") {
      words >> c.output;
    } else if (key == "elements") {
      words >> c.elements[0] >> c.elements[1] >> c.elements[2];
    } else if (key == "offsets") {
      words >> c.offsets[0] >> c.offsets[1] >> c.offsets[2];
    } else if (key == "shape") {
      for (int x; words >> x;) {
        c.shape.push_back(x);
      }
    } else if (key.rfind("strides_", 0) == 0) {
      int a = key == "strides_grad" ? 0 : key == "strides_param" ? 1 : 2;
      for (long x; words >> x;) {
        c.strides[a].push_back(x);
      }
    } else {
      fail("unknown manifest key " + key);
    }
    if (words.fail() && !words.eof()) {
      fail("bad manifest line: " + line);
    }
  }
  return cases;
}

// A buffer of exactly `bytes` bytes (at least one byte, so that size-0
// arrays still get a distinct pointer).
struct Buffer {
  std::vector<unsigned char> bytes;
  explicit Buffer(size_t n) : bytes(std::max<size_t>(n, 1)) {}
  unsigned char* data() {
    return bytes.data();
  }
};

// A fresh output: `n` bytes of 0xff between two guard zones of a known
// pattern, so a write before or past the output is caught even in a build
// without AddressSanitizer.
struct GuardedBuffer {
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xa5;
  std::vector<unsigned char> bytes;
  size_t n;
  explicit GuardedBuffer(size_t n_) : bytes(n_ + 2 * kGuard, kPattern), n(n_) {
    std::memset(data(), 0xff, n);
  }
  unsigned char* data() {
    return bytes.data() + kGuard;
  }
  void check(const std::string& what) const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (bytes[i] != kPattern || bytes[kGuard + n + i] != kPattern) {
        fail(what + " written outside its " + std::to_string(n) + " bytes");
      }
    }
  }
};

void run_case(const Case& c) {
  using namespace mlx_fused_rmsprop;
  const bool flat = c.kernel == RMSpropKernel::contiguous;
  const std::string name = rmsprop_kernel_name(c.kernel, c.dtype);
  auto it = registry().find(name);
  if (it == registry().end()) {
    fail("no kernel named " + name);
  }
  const Kernel& kernel = it->second;
  const int itemsize = itemsize_of(c.dtype);
  if (kernel.itemsize != itemsize || kernel.contiguous != flat) {
    fail("kernel " + name + " does not match its dtype / layout");
  }

  // Inputs, each in a buffer of its exact size.
  std::ifstream in(c.input, std::ios::binary);
  if (!in) {
    fail("cannot open input " + c.input);
  }
  std::vector<Buffer> bases;
  for (int a = 0; a < 3; ++a) {
    size_t bytes = c.elements[a] * itemsize;
    bases.emplace_back(bytes);
    if (!in.read(reinterpret_cast<char*>(bases[a].data()), bytes)) {
      fail("short input " + c.input);
    }
  }
  unsigned char* inputs[3];
  for (int a = 0; a < 3; ++a) {
    inputs[a] = bases[a].data() + c.offsets[a] * itemsize;
  }

  // Outputs: the input buffers themselves when donated, else fresh ones.
  GuardedBuffer fresh_param(c.size * itemsize), fresh_v(c.size * itemsize);

  // What eval_gpu binds.
  auto k = make_coefficients<float>(0.0f, c.alpha, c.eps);
  float lr;
  std::memcpy(&lr, &c.lr_bits, sizeof(lr));
  Dispatch d;
  d.grad = inputs[0];
  d.param = inputs[1];
  d.v = inputs[2];
  d.lr = &lr;
  d.param_out = c.inplace ? inputs[1] : fresh_param.data();
  d.v_out = c.inplace ? inputs[2] : fresh_v.data();
  const RMSpropDeviceScalars scalars{k.alpha, k.one_minus_alpha, k.eps};
  d.scalars = &scalars;
  d.size = c.size;
  d.shape = c.shape;
  for (int a = 0; a < 3; ++a) {
    d.strides[a] = c.strides[a];
  }
  d.ndim = static_cast<int>(c.shape.size());
  if (!flat) {
    for (int a = 0; a < 3; ++a) {
      if (c.strides[a].size() != c.shape.size() || c.shape.empty()) {
        fail("general kernel needs a shape and three strides of its length");
      }
    }
  }

  // eval_gpu returns before dispatching an empty update; so does this. The
  // grid of a size-0 update is 0 x 0 threads anyway.
  // 1024 is maxTotalThreadsPerThreadgroup of these kernels on Apple GPUs; it
  // only sets the threadgroup width, which no kernel index depends on.
  const uint64_t inner = flat ? 0 : static_cast<uint64_t>(c.shape.back());
  RMSpropGrid grid = rmsprop_grid(
      rmsprop_threads(c.kernel, c.size, itemsize, inner), 1024);
  const uint2 dims(grid.width, grid.height);
  if (c.size > 0) {
    const uint64_t threads = uint64_t(grid.width) * grid.height;
    for (uint64_t t = 0; t < threads; ++t) {
      uint64_t linear = c.reverse ? threads - 1 - t : t;
      uint2 gid(
          static_cast<uint>(linear % grid.width),
          static_cast<uint>(linear / grid.width));
      kernel.launch(d, gid, dims);
    }
  }

  fresh_param.check("param_out");
  fresh_v.check("v_out");

  std::ofstream out(c.output, std::ios::binary);
  auto write = [&out](const void* p, size_t bytes) {
    out.write(static_cast<const char*>(p), bytes);
  };
  if (c.inplace) {
    write(bases[1].data(), c.elements[1] * itemsize);
    write(bases[2].data(), c.elements[2] * itemsize);
  } else {
    write(fresh_param.data(), c.size * itemsize);
    write(fresh_v.data(), c.size * itemsize);
  }
  if (!out) {
    fail("cannot write " + c.output);
  }
}

} // namespace harness

int main(int argc, char** argv) {
  try {
    std::string command = argc > 1 ? argv[1] : "";
    if (command == "list" && argc == 2) {
      for (const auto& [name, kernel] : harness::registry()) {
        std::printf("%s\n", name.c_str());
      }
      return 0;
    }
    if (command == "grid" && argc == 7) {
      const uint64_t threads = mlx_fused_rmsprop::rmsprop_threads(
          harness::parse_kernel(argv[2]),
          std::strtoull(argv[3], nullptr, 10),
          std::atoi(argv[4]),
          std::strtoull(argv[5], nullptr, 10));
      auto g = mlx_fused_rmsprop::rmsprop_grid(
          threads, static_cast<uint32_t>(std::strtoul(argv[6], nullptr, 10)));
      std::printf(
          "%llu %u %u %u %llu\n",
          static_cast<unsigned long long>(threads),
          g.width,
          g.height,
          g.group_width,
          static_cast<unsigned long long>(RMSPROP_GRID_MAX_WIDTH));
      return 0;
    }
    if (command == "run" && argc == 3) {
      for (const auto& c : harness::read_manifest(argv[2])) {
        harness::run_case(c);
      }
      return 0;
    }
    std::fprintf(
        stderr,
        "usage: driver list | grid KIND N ITEMSIZE INNER MAX_GROUP | run MANIFEST\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "driver: %s\n", e.what());
    return 1;
  }
}
