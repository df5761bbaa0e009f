// Runs the kernels of a Metal shader on the CPU, compiled as C++ under
// metal_shim.h, for every thread (x, y) of the grid eval_gpu would dispatch.
// The shader is kernels/rmsprop.metal, or with -DRMSPROP_SHADER_FILE="path"
// any other file: the test-suite passes the source embedded in the extension
// (rmsprop.metal with rmsprop_math.h inlined), the exact bytes a Mac compiles
// at run time.
//
//   driver list                    registered kernels, one a line: the host
//                                  name and sizeof each template argument
//   driver grid KIND N ITEMSIZE INNER MAX_GROUP
//                                  rmsprop_threads(KIND, N, ITEMSIZE, INNER)
//                                  and rmsprop_grid() of it, as "threads width
//                                  height group_width max_width"
//   driver run MANIFEST            run the cases of MANIFEST (format below)
//
// A manifest is a list of cases, each a block of "key value..." lines ending
// with "end":
//   dtype D [STATE_D]   float32|float16|bfloat16: the parameter's dtype and
//                       (variants) the state's
//   variant 0|1         the plain kernels, or the variant ones
//   kernel contiguous|general_idx32|general_idx64
//                       the kernel kind (eval_gpu's choose_gpu_dispatch, or a
//                       forced index width)
//   size N              elements of the update
//   alpha A / eps E / momentum M / weight_decay W
//                       doubles in C99 hex-float notation (exact)
//   flags F             the variant's RMSPROP_OPTION_* bits
//   lr_bits H / bc_bits H   the float32 lr and bias correction, as hex bits
//   order forward|reverse   the order threads are run in
//   inplace 0|1         outputs are the inputs' buffers (donated)
//   arrays K            the case's arrays: grad, param, then its K - 2 state
//   input PATH          their base buffers, back to back
//   elements E...       elements of each base buffer
//   offsets O...        element offset of each array in its base buffer
//   slots S...          which array each kernel buffer slot takes, as
//                       gpu_array_slots() gives eval_gpu
//   shape ...           collapsed layout (general kernels only), as
//   strides A ...       collapse_layout() gives it; one line per array A
//   output PATH         written: param_out then each state output; when in
//                       place, the whole param and state base buffers
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
template <typename C>
struct RMSpropVariantConstants;

namespace harness {

// Everything one dispatch binds, as eval_gpu binds it: the kernel's arrays
// (grad, param, then v for the plain kernels or v, mean, buffer for the
// variants) and their outputs (param', then the state's), by slot.
struct Dispatch {
  const void* in[5];
  void* out[4];
  const float* lr;
  const float* bias_correction; // variants
  const RMSpropDeviceScalars* scalars; // plain
  const RMSpropVariantConstants<float>* constants; // variants
  ulong size;
  std::vector<int> shape;
  std::vector<long> strides; // each slot's, back to back
  int ndim;
};

// Calls the kernel as thread `gid` of a grid of `grid_dims` threads.
using Launcher =
    std::function<void(const Dispatch&, uint2 gid, uint2 grid_dims)>;

struct Kernel {
  std::string template_sizes; // sizeof of each template argument, e.g. "2,4,4"
  bool variant;
  bool contiguous;
  int itemsize; // the parameter's
  int state_itemsize;
  Launcher launch;
};

inline std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> kernels;
  return kernels;
}

// The kernel signatures of the shader, after the shim's macros.
template <typename T>
using ContiguousKernel = void (*)(
    const T*, const T*, const T*, const float*, T*, T*,
    const RMSpropDeviceScalars&, const ulong&, uint2, uint2);
template <typename T>
using GeneralKernel = void (*)(
    const T*, const T*, const T*, const float*, T*, T*,
    const RMSpropDeviceScalars&, const ulong&, const int*, const long*,
    const int&, uint2, uint2);
template <typename T, typename S>
using VariantContiguousKernel = void (*)(
    const T*, const T*, const S*, const S*, const S*, const float*,
    const float*, T*, S*, S*, S*, const RMSpropVariantConstants<float>&,
    const ulong&, uint2, uint2);
template <typename T, typename S>
using VariantGeneralKernel = void (*)(
    const T*, const T*, const S*, const S*, const S*, const float*,
    const float*, T*, S*, S*, S*, const RMSpropVariantConstants<float>&,
    const ulong&, const int*, const long*, const int&, uint2, uint2);

template <typename T>
const T* in(const Dispatch& d, int slot) {
  return static_cast<const T*>(d.in[slot]);
}
template <typename T>
T* out(const Dispatch& d, int slot) {
  return static_cast<T*>(d.out[slot]);
}

template <typename T>
Kernel make_kernel(ContiguousKernel<T> fn) {
  return Kernel{"", false, true, sizeof(T), sizeof(T), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(in<T>(d, 0), in<T>(d, 1), in<T>(d, 2), d.lr, out<T>(d, 0), out<T>(d, 1),
       *d.scalars, d.size, gid, dims);
  }};
}

template <typename T>
Kernel make_kernel(GeneralKernel<T> fn) {
  return Kernel{"", false, false, sizeof(T), sizeof(T), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(in<T>(d, 0), in<T>(d, 1), in<T>(d, 2), d.lr, out<T>(d, 0), out<T>(d, 1),
       *d.scalars, d.size, d.shape.data(), d.strides.data(), d.ndim, gid, dims);
  }};
}

template <typename T, typename S>
Kernel make_kernel(VariantContiguousKernel<T, S> fn) {
  return Kernel{"", true, true, sizeof(T), sizeof(S), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(in<T>(d, 0), in<T>(d, 1), in<S>(d, 2), in<S>(d, 3), in<S>(d, 4), d.lr,
       d.bias_correction, out<T>(d, 0), out<S>(d, 1), out<S>(d, 2),
       out<S>(d, 3), *d.constants, d.size, gid, dims);
  }};
}

template <typename T, typename S>
Kernel make_kernel(VariantGeneralKernel<T, S> fn) {
  return Kernel{"", true, false, sizeof(T), sizeof(S), [fn](const Dispatch& d, uint2 gid, uint2 dims) {
    fn(in<T>(d, 0), in<T>(d, 1), in<S>(d, 2), in<S>(d, 3), in<S>(d, 4), d.lr,
       d.bias_correction, out<T>(d, 0), out<S>(d, 1), out<S>(d, 2),
       out<S>(d, 3), *d.constants, d.size, d.shape.data(), d.strides.data(),
       d.ndim, gid, dims);
  }};
}

// "sizeof(A1),sizeof(A2),..." of a kernel's template arguments, so a test can
// check that each host name instantiates the types it names (the index width
// of a general kernel, the parameter and state types of a variant).
template <typename... A>
std::string template_sizes() {
  std::string out;
  for (size_t size : {sizeof(A)...}) {
    out += (out.empty() ? "" : ",") + std::to_string(size);
  }
  return out;
}

struct Registrar {
  template <typename Fn>
  Registrar(const char* name, Fn fn, std::string sizes) {
    // (Not named `kernel`: the shim's macros are active here.)
    Kernel entry = make_kernel(fn);
    entry.template_sizes = std::move(sizes);
    if (!registry().emplace(name, entry).second) {
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
      rmsprop_harness_registrar_, __COUNTER__)(                         \
      host, &func<__VA_ARGS__>, ::harness::template_sizes<__VA_ARGS__>());

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
  std::string state_dtype; // variants
  bool variant = false;
  RMSpropKernel kernel = RMSpropKernel::contiguous;
  uint64_t size = 0;
  double alpha = 0.0;
  double eps = 0.0;
  double momentum = 0.0;
  double weight_decay = 0.0;
  unsigned int flags = 0;
  uint32_t lr_bits = 0;
  uint32_t bc_bits = 0;
  bool reverse = false;
  bool inplace = false;
  std::string input;
  std::string output;
  int arrays = 3; // grad, param, state...
  std::vector<uint64_t> elements;
  std::vector<int64_t> offsets;
  std::vector<int> slots;
  std::vector<int> shape;
  std::vector<std::vector<long>> strides; // per array
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

template <typename T>
std::vector<T> read_all(std::istringstream& words) {
  std::vector<T> values;
  for (T x; words >> x;) {
    values.push_back(x);
  }
  return values;
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
      if (!(words >> c.state_dtype)) {
        c.state_dtype = c.dtype;
      }
    } else if (key == "variant") {
      words >> c.variant;
    } else if (key == "kernel") {
      std::string kind;
      words >> kind;
      c.kernel = parse_kernel(kind);
    } else if (key == "size") {
      words >> c.size;
    } else if (key == "alpha" || key == "eps" || key == "momentum" ||
               key == "weight_decay") {
      std::string text;
      words >> text;
      double value = parse_double(text);
      (key == "alpha"          ? c.alpha
           : key == "eps"      ? c.eps
           : key == "momentum" ? c.momentum
                               : c.weight_decay) = value;
    } else if (key == "flags") {
      words >> c.flags;
    } else if (key == "lr_bits" || key == "bc_bits") {
      words >> std::hex >> (key == "lr_bits" ? c.lr_bits : c.bc_bits) >> std::dec;
    } else if (key == "order") {
      std::string order;
      words >> order;
      c.reverse = order == "reverse";
    } else if (key == "inplace") {
      words >> c.inplace;
    } else if (key == "arrays") {
      words >> c.arrays;
      c.strides.assign(c.arrays, {});
    } else if (key == "input") {
      words >> c.input;
    } else if (key == "output") {
      words >> c.output;
    } else if (key == "elements") {
      c.elements = read_all<uint64_t>(words);
    } else if (key == "offsets") {
      c.offsets = read_all<int64_t>(words);
    } else if (key == "slots") {
      c.slots = read_all<int>(words);
    } else if (key == "shape") {
      c.shape = read_all<int>(words);
    } else if (key == "strides") {
      int a = -1;
      words >> a;
      if (a < 0 || a >= c.arrays) {
        fail("bad strides line: " + line);
      }
      c.strides[a] = read_all<long>(words);
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
  const std::string name = c.variant
      ? rmsprop_variant_kernel_name(c.kernel, c.dtype, c.state_dtype)
      : rmsprop_kernel_name(c.kernel, c.dtype);
  auto it = registry().find(name);
  if (it == registry().end()) {
    fail("no kernel named " + name);
  }
  const Kernel& kernel = it->second;
  const int itemsize = itemsize_of(c.dtype);
  const int state_itemsize = itemsize_of(c.state_dtype);
  if (kernel.itemsize != itemsize || kernel.state_itemsize != state_itemsize ||
      kernel.contiguous != flat || kernel.variant != c.variant) {
    fail("kernel " + name + " does not match its dtypes / layout / family");
  }
  const size_t arrays = static_cast<size_t>(c.arrays);
  const size_t kernel_slots = c.variant ? 5 : 3;
  if (c.elements.size() != arrays || c.offsets.size() != arrays ||
      c.slots.size() != kernel_slots) {
    fail("a case needs elements and offsets per array and a slot per buffer");
  }
  auto item = [&](size_t a) { return a < 2 ? itemsize : state_itemsize; };

  // Inputs, each in a buffer of its exact size.
  std::ifstream in(c.input, std::ios::binary);
  if (!in) {
    fail("cannot open input " + c.input);
  }
  std::vector<Buffer> bases;
  std::vector<unsigned char*> inputs;
  for (size_t a = 0; a < arrays; ++a) {
    size_t bytes = c.elements[a] * item(a);
    bases.emplace_back(bytes);
    if (!in.read(reinterpret_cast<char*>(bases[a].data()), bytes)) {
      fail("short input " + c.input);
    }
  }
  for (size_t a = 0; a < arrays; ++a) {
    inputs.push_back(bases[a].data() + c.offsets[a] * item(a));
  }

  // Outputs (param', then the state's): the input buffers themselves when
  // donated, else fresh ones.
  std::vector<GuardedBuffer> fresh;
  for (size_t a = 1; a < arrays; ++a) {
    fresh.emplace_back(c.size * item(a));
  }
  auto output = [&](size_t a) -> void* {
    return c.inplace ? static_cast<void*>(inputs[a]) : fresh[a - 1].data();
  };

  // What eval_gpu binds.
  float lr, bc;
  std::memcpy(&lr, &c.lr_bits, sizeof(lr));
  std::memcpy(&bc, &c.bc_bits, sizeof(bc));
  RMSpropOptions options;
  options.alpha = c.alpha;
  options.eps = c.eps;
  options.momentum = c.momentum;
  options.weight_decay = c.weight_decay;
  auto k = make_coefficients<float>(0.0f, c.alpha, c.eps);
  const RMSpropDeviceScalars scalars{k.alpha, k.one_minus_alpha, k.eps};
  auto constants = make_variant_constants<float>(options);
  constants.flags = c.flags;
  Dispatch d;
  for (size_t i = 0; i < kernel_slots; ++i) {
    size_t a = static_cast<size_t>(c.slots[i]);
    if (a >= arrays || (i < 2 && a != i)) {
      fail("bad slots");
    }
    d.in[i] = inputs[a];
    if (i >= 1) {
      d.out[i - 1] = output(a);
    }
  }
  d.lr = &lr;
  d.bias_correction = &bc;
  d.scalars = &scalars;
  d.constants = &constants;
  d.size = c.size;
  d.shape = c.shape;
  d.ndim = static_cast<int>(c.shape.size());
  if (!flat) {
    for (size_t i = 0; i < kernel_slots; ++i) {
      const auto& st = c.strides[c.slots[i]];
      if (st.size() != c.shape.size() || c.shape.empty()) {
        fail("general kernels need a shape and strides of its length");
      }
      d.strides.insert(d.strides.end(), st.begin(), st.end());
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

  for (size_t a = 1; a < arrays; ++a) {
    fresh[a - 1].check("output " + std::to_string(a - 1));
  }

  std::ofstream out(c.output, std::ios::binary);
  for (size_t a = 1; a < arrays; ++a) {
    const void* p = c.inplace ? static_cast<const void*>(bases[a].data())
                              : fresh[a - 1].data();
    size_t bytes = (c.inplace ? c.elements[a] : c.size) * item(a);
    out.write(static_cast<const char*>(p), bytes);
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
        std::printf("%s %s\n", name.c_str(), kernel.template_sizes.c_str());
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
