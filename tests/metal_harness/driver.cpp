// Runs the kernels of a Metal shader on the CPU, compiled as C++ under
// metal_shim.h, for every thread (x, y) of the grid eval_gpu would dispatch.
// The shader is kernels/rmsprop.metal, or with -DRMSPROP_SHADER_FILE="path"
// any other file: the test-suite passes the source embedded in the extension
// (rmsprop.metal with rmsprop_math.h inlined), the exact bytes a Mac compiles
// at run time.
//
// Execution model. The plain and variant kernels use no SIMD-group function:
// their threads run one after the other (forward or reverse), which is one
// legal GPU schedule. The 8-bit state's kernels (rmsprop_q8_*) combine the
// lanes of a SIMD-group with simd_max, so their threads run as a GPU runs
// them: each SIMD-group's lanes concurrently, as 32 OS threads (a pool; lane
// l of every SIMD-group is pool thread l, which walks the SIMD-groups in
// order, so different SIMD-groups also overlap), meeting in the shim's
// simd_max (metal_shim.h). SIMD-groups are formed as Metal forms them: the
// grid is cut into threadgroups of group_width threads along x, each cut
// into SIMD-groups of 32 consecutive threads; thread_index_in_simdgroup is
// the thread's position in its SIMD-group.
//
//   driver list                    registered kernels, one a line: the host
//                                  name and sizeof each template argument
//   driver grid KIND N ITEMSIZE INNER MAX_GROUP
//                                  rmsprop_threads(KIND, N, ITEMSIZE, INNER)
//                                  and rmsprop_grid() of it, as "threads width
//                                  height group_width max_width"
//   driver q8grid N MAX_GROUP      rmsprop_q8_threads(N) and rmsprop_q8_grid()
//                                  of it, in the same format
//   driver run MANIFEST            run the cases of MANIFEST (format below)
//
// A manifest is a list of cases, each a block of "key value..." lines ending
// with "end":
//   family plain|variant|q8   the kernel family
//   dtype D [STATE_D]   float32|float16|bfloat16: the parameter's dtype and
//                       (variants) the state's
//   kernel contiguous|general_idx32|general_idx64
//                       the kernel kind (eval_gpu's choose_gpu_dispatch, or a
//                       forced index width)
//   size N              elements of the update
//   max_group G         maxTotalThreadsPerThreadgroup (default 1024)
//   alpha A / eps E / momentum M / weight_decay W
//                       doubles in C99 hex-float notation (exact)
//   flags F             the variant's RMSPROP_OPTION_* bits
//   step_bits L B C S   the packed step scalars (lr, bias correction, clip
//                       factor, skip flag) as float32 hex bits
//   rounding R          RMSPROP_ROUND_* of the leaf
//   leaf L / offset O   the leaf's number and element offset
//   key SEED STEP       the rounding key words (bound with stochastic
//                       rounding; else the packed scalars are, as eval_gpu
//                       binds them)
//   order forward|reverse   the order threads (SIMD-groups) are run in
//   walked K            the walked arrays: grad, param, then the state (or
//                       codes), then the compensation
//   scales E            the 8-bit scale arrays after them (0 otherwise)
//   items I...          the itemsize of each array (walked, then scales)
//   input PATH          their base buffers, back to back
//   elements E...       elements of each base buffer
//   offsets O...        element offset of each array in its base buffer
//   donate D...         per output (param', each walked state', then the
//                       scales'): 1 when it is its input's buffer (in place)
//   slots S...          which walked array each kernel buffer slot takes, as
//                       gpu_array_slots() gives eval_gpu
//   shape ...           collapsed layout (general kernels only), as
//   strides A ...       collapse_layout() gives it; one line per walked array
//   scale_strides S...  each scale array's stride (8-bit general kernels)
//   like_param 0|1      param' and the compensation' in param's layout
//                       (8-bit general kernels: outputs_like_param)
//   output PATH         written: each output in order; a donated one as its
//                       whole input base buffer
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
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
struct RMSpropLeafConstants;
struct RMSpropQuantMap;
struct RMSpropQuantizedLayout;

namespace harness {

// Everything one dispatch binds, as eval_gpu binds it: the kernel's arrays
// by slot (grad, param, then v for the plain kernels or v, mean, buffer,
// compensation for the others), their outputs (param', then the rest), the
// 8-bit scales and their outputs, the step's scalars and the constants.
struct Dispatch {
  const void* in[6];
  void* out[5];
  const float* scale_in[3];
  float* scale_out[3];
  const float* step;
  const uint* key;
  const RMSpropDeviceScalars* scalars; // plain
  const RMSpropVariantConstants<float>* constants; // variants, 8-bit
  const RMSpropLeafConstants* leaf;
  const RMSpropQuantMap* unsigned_map;
  const RMSpropQuantMap* signed_map;
  const RMSpropQuantizedLayout* quantized_layout;
  ulong size;
  std::vector<int> shape;
  std::vector<long> strides; // each slot's, back to back
  int ndim;
};

// Calls the kernel as thread `gid` of a grid of `grid_dims` threads, lane
// `lane` of its SIMD-group.
using Launcher =
    std::function<void(const Dispatch&, uint2 gid, uint2 grid_dims, uint lane)>;

struct Kernel {
  std::string template_sizes; // sizeof of each template argument, e.g. "2,4,4"
  std::string family; // plain, variant, q8
  bool contiguous;
  int itemsize; // the parameter's
  int state_itemsize; // the state's (1: 8-bit codes)
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
    const T*, const T*, const S*, const S*, const S*, const T*, const float*,
    const uint*, T*, S*, S*, S*, T*, const RMSpropVariantConstants<float>&,
    const RMSpropLeafConstants&, const ulong&, uint2, uint2);
template <typename T, typename S>
using VariantGeneralKernel = void (*)(
    const T*, const T*, const S*, const S*, const S*, const T*, const float*,
    const uint*, T*, S*, S*, S*, T*, const RMSpropVariantConstants<float>&,
    const RMSpropLeafConstants&, const ulong&, const int*, const long*,
    const int&, uint2, uint2);
template <typename T>
using Q8ContiguousKernel = void (*)(
    const T*, const T*, const uchar*, const uchar*, const uchar*, const T*,
    const float*, const float*, const float*, const float*, const uint*, T*,
    uchar*, uchar*, uchar*, T*, float*, float*, float*, const RMSpropQuantMap&,
    const RMSpropQuantMap&, const RMSpropVariantConstants<float>&,
    const RMSpropLeafConstants&, const ulong&, uint2, uint2, uint);
template <typename T>
using Q8GeneralKernel = void (*)(
    const T*, const T*, const uchar*, const uchar*, const uchar*, const T*,
    const float*, const float*, const float*, const float*, const uint*, T*,
    uchar*, uchar*, uchar*, T*, float*, float*, float*, const RMSpropQuantMap&,
    const RMSpropQuantMap&, const RMSpropVariantConstants<float>&,
    const RMSpropLeafConstants&, const ulong&, const int*, const long*,
    const int&, const RMSpropQuantizedLayout&, uint2, uint2, uint);

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
  return Kernel{"", "plain", true, sizeof(T), sizeof(T),
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint) {
    fn(in<T>(d, 0), in<T>(d, 1), in<T>(d, 2), d.step, out<T>(d, 0), out<T>(d, 1),
       *d.scalars, d.size, gid, dims);
  }};
}

template <typename T>
Kernel make_kernel(GeneralKernel<T> fn) {
  return Kernel{"", "plain", false, sizeof(T), sizeof(T),
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint) {
    fn(in<T>(d, 0), in<T>(d, 1), in<T>(d, 2), d.step, out<T>(d, 0), out<T>(d, 1),
       *d.scalars, d.size, d.shape.data(), d.strides.data(), d.ndim, gid, dims);
  }};
}

template <typename T, typename S>
Kernel make_kernel(VariantContiguousKernel<T, S> fn) {
  return Kernel{"", "variant", true, sizeof(T), sizeof(S),
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint) {
    fn(in<T>(d, 0), in<T>(d, 1), in<S>(d, 2), in<S>(d, 3), in<S>(d, 4),
       in<T>(d, 5), d.step, d.key, out<T>(d, 0), out<S>(d, 1), out<S>(d, 2),
       out<S>(d, 3), out<T>(d, 4), *d.constants, *d.leaf, d.size, gid, dims);
  }};
}

template <typename T, typename S>
Kernel make_kernel(VariantGeneralKernel<T, S> fn) {
  return Kernel{"", "variant", false, sizeof(T), sizeof(S),
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint) {
    fn(in<T>(d, 0), in<T>(d, 1), in<S>(d, 2), in<S>(d, 3), in<S>(d, 4),
       in<T>(d, 5), d.step, d.key, out<T>(d, 0), out<S>(d, 1), out<S>(d, 2),
       out<S>(d, 3), out<T>(d, 4), *d.constants, *d.leaf, d.size,
       d.shape.data(), d.strides.data(), d.ndim, gid, dims);
  }};
}

template <typename T>
Kernel make_kernel(Q8ContiguousKernel<T> fn) {
  return Kernel{"", "q8", true, sizeof(T), 1,
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint lane) {
    fn(in<T>(d, 0), in<T>(d, 1), in<uchar>(d, 2), in<uchar>(d, 3),
       in<uchar>(d, 4), in<T>(d, 5), d.scale_in[0], d.scale_in[1], d.scale_in[2],
       d.step, d.key, out<T>(d, 0), out<uchar>(d, 1), out<uchar>(d, 2),
       out<uchar>(d, 3), out<T>(d, 4), d.scale_out[0], d.scale_out[1],
       d.scale_out[2], *d.unsigned_map, *d.signed_map, *d.constants, *d.leaf,
       d.size, gid, dims, lane);
  }};
}

template <typename T>
Kernel make_kernel(Q8GeneralKernel<T> fn) {
  return Kernel{"", "q8", false, sizeof(T), 1,
                [fn](const Dispatch& d, uint2 gid, uint2 dims, uint lane) {
    fn(in<T>(d, 0), in<T>(d, 1), in<uchar>(d, 2), in<uchar>(d, 3),
       in<uchar>(d, 4), in<T>(d, 5), d.scale_in[0], d.scale_in[1], d.scale_in[2],
       d.step, d.key, out<T>(d, 0), out<uchar>(d, 1), out<uchar>(d, 2),
       out<uchar>(d, 3), out<T>(d, 4), d.scale_out[0], d.scale_out[1],
       d.scale_out[2], *d.unsigned_map, *d.signed_map, *d.constants, *d.leaf,
       d.size, d.shape.data(), d.strides.data(), d.ndim, *d.quantized_layout,
       gid, dims, lane);
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

#include "quant_map.cpp" // dynamic_map(): the maps eval_gpu binds
#include "rmsprop.h" // make_coefficients(): the scalars eval_gpu binds
#include "rmsprop_grid.h" // rmsprop_threads(), rmsprop_grid(), kernel names

namespace harness {

[[noreturn]] void fail(const std::string& msg) {
  throw std::runtime_error(msg);
}

using mlx_fused_rmsprop::RMSpropKernel;

struct Case {
  std::string family = "plain";
  std::string dtype;
  std::string state_dtype; // variants
  RMSpropKernel kernel = RMSpropKernel::contiguous;
  uint64_t size = 0;
  uint32_t max_group = 1024;
  double alpha = 0.0;
  double eps = 0.0;
  double momentum = 0.0;
  double weight_decay = 0.0;
  unsigned int flags = 0;
  uint32_t step_bits[RMSPROP_STEP_SCALARS] = {};
  unsigned int rounding = RMSPROP_ROUND_NEAREST;
  uint32_t leaf = 0;
  int64_t offset = 0;
  uint32_t key[2] = {};
  bool reverse = false;
  std::string input;
  std::string output;
  int walked = 3; // grad, param, state..., [compensation]
  int scales = 0;
  std::vector<int> items;
  std::vector<uint64_t> elements;
  std::vector<int64_t> offsets;
  std::vector<int> donate;
  std::vector<int> slots;
  std::vector<int> shape;
  std::vector<std::vector<long>> strides; // per walked array
  std::vector<long> scale_strides; // per scale array
  bool like_param = false;
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
    } else if (key == "family") {
      words >> c.family;
      if (c.family != "plain" && c.family != "variant" && c.family != "q8") {
        fail("unknown family " + c.family);
      }
    } else if (key == "dtype") {
      words >> c.dtype;
      if (!(words >> c.state_dtype)) {
        c.state_dtype = c.dtype;
      }
    } else if (key == "kernel") {
      std::string kind;
      words >> kind;
      c.kernel = parse_kernel(kind);
    } else if (key == "size") {
      words >> c.size;
    } else if (key == "max_group") {
      words >> c.max_group;
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
    } else if (key == "step_bits") {
      words >> std::hex;
      for (auto& bits : c.step_bits) {
        words >> bits;
      }
      words >> std::dec;
    } else if (key == "rounding") {
      words >> c.rounding;
    } else if (key == "leaf") {
      words >> c.leaf;
    } else if (key == "offset") {
      words >> c.offset;
    } else if (key == "key") {
      words >> c.key[0] >> c.key[1];
    } else if (key == "order") {
      std::string order;
      words >> order;
      c.reverse = order == "reverse";
    } else if (key == "walked") {
      words >> c.walked;
      c.strides.assign(c.walked, {});
    } else if (key == "scales") {
      words >> c.scales;
    } else if (key == "items") {
      c.items = read_all<int>(words);
    } else if (key == "input") {
      words >> c.input;
    } else if (key == "output") {
      words >> c.output;
    } else if (key == "elements") {
      c.elements = read_all<uint64_t>(words);
    } else if (key == "offsets") {
      c.offsets = read_all<int64_t>(words);
    } else if (key == "donate") {
      c.donate = read_all<int>(words);
    } else if (key == "slots") {
      c.slots = read_all<int>(words);
    } else if (key == "shape") {
      c.shape = read_all<int>(words);
    } else if (key == "strides") {
      int a = -1;
      words >> a;
      if (a < 0 || a >= c.walked) {
        fail("bad strides line: " + line);
      }
      c.strides[a] = read_all<long>(words);
    } else if (key == "scale_strides") {
      c.scale_strides = read_all<long>(words);
    } else if (key == "like_param") {
      words >> c.like_param;
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

// One SIMD-group of a grid: threads x0 .. x0 + lanes - 1 of row y.
struct SimdGroupSpec {
  uint x0;
  uint y;
  uint lanes;
};

// The SIMD-groups of a grid as Metal forms them: each row cut into
// threadgroups of group_width threads (the last one of a row may be
// narrower), each threadgroup into SIMD-groups of 32 consecutive threads
// (the last one may be narrower).
std::vector<SimdGroupSpec> simd_groups(const mlx_fused_rmsprop::RMSpropGrid& grid) {
  std::vector<SimdGroupSpec> groups;
  for (uint y = 0; y < grid.height; ++y) {
    for (uint64_t tg = 0; tg < grid.width; tg += grid.group_width) {
      const uint64_t tg_width = std::min<uint64_t>(grid.group_width, grid.width - tg);
      for (uint64_t sg = 0; sg < tg_width; sg += RMSPROP_SHIM_SIMD_WIDTH) {
        const uint64_t lanes = std::min<uint64_t>(RMSPROP_SHIM_SIMD_WIDTH, tg_width - sg);
        groups.push_back(SimdGroupSpec{
            static_cast<uint>(tg + sg), y, static_cast<uint>(lanes)});
      }
    }
  }
  return groups;
}

// Runs every thread of the grid, each SIMD-group's lanes concurrently on
// RMSPROP_SHIM_SIMD_WIDTH OS threads (pool thread l runs lane l of every
// SIMD-group, in the case's order).
void run_simd_groups(
    const Kernel& kernel,
    const Dispatch& d,
    const mlx_fused_rmsprop::RMSpropGrid& grid,
    bool reverse) {
  const auto specs = simd_groups(grid);
  std::deque<rmsprop_shim::SimdGroup> groups(specs.size());
  for (size_t g = 0; g < specs.size(); ++g) {
    groups[g].lanes = specs[g].lanes;
    groups[g].running = specs[g].lanes;
  }
  const uint2 dims(grid.width, grid.height);
  std::vector<std::thread> pool;
  for (uint lane = 0; lane < RMSPROP_SHIM_SIMD_WIDTH; ++lane) {
    pool.emplace_back([&, lane] {
      for (size_t n = 0; n < specs.size(); ++n) {
        const size_t g = reverse ? specs.size() - 1 - n : n;
        if (lane >= specs[g].lanes) {
          continue;
        }
        rmsprop_shim::current_lane() = {&groups[g], lane};
        kernel.launch(d, uint2(specs[g].x0 + lane, specs[g].y), dims, lane);
        rmsprop_shim::lane_returned();
      }
    });
  }
  for (auto& t : pool) {
    t.join();
  }
}

void run_case(const Case& c) {
  using namespace mlx_fused_rmsprop;
  const bool flat = c.kernel == RMSpropKernel::contiguous;
  const bool q8 = c.family == "q8";
  const std::string name = c.family == "plain"
      ? rmsprop_kernel_name(c.kernel, c.dtype)
      : q8 ? rmsprop_q8_kernel_name(c.kernel, c.dtype)
           : rmsprop_variant_kernel_name(c.kernel, c.dtype, c.state_dtype);
  auto it = registry().find(name);
  if (it == registry().end()) {
    fail("no kernel named " + name);
  }
  const Kernel& kernel = it->second;
  const int itemsize = itemsize_of(c.dtype);
  const int state_itemsize = q8 ? 1 : itemsize_of(c.state_dtype);
  if (kernel.itemsize != itemsize || kernel.state_itemsize != state_itemsize ||
      kernel.contiguous != flat || kernel.family != c.family) {
    fail("kernel " + name + " does not match its dtypes / layout / family");
  }
  const size_t walked = static_cast<size_t>(c.walked);
  const size_t scales = static_cast<size_t>(c.scales);
  const size_t arrays = walked + scales;
  const size_t kernel_slots = c.family == "plain" ? 3 : 6;
  const size_t outputs = walked - 1 + scales;
  if (c.items.size() != arrays || c.elements.size() != arrays ||
      c.offsets.size() != arrays || c.donate.size() != outputs ||
      c.slots.size() != kernel_slots || (q8 != (scales > 0))) {
    fail("a case needs items, elements and offsets per array, donate per "
         "output and a slot per buffer");
  }

  // Inputs, each in a buffer of its exact size.
  std::ifstream in(c.input, std::ios::binary);
  if (!in) {
    fail("cannot open input " + c.input);
  }
  std::vector<Buffer> bases;
  std::vector<unsigned char*> inputs;
  for (size_t a = 0; a < arrays; ++a) {
    size_t bytes = c.elements[a] * c.items[a];
    bases.emplace_back(bytes);
    if (!in.read(reinterpret_cast<char*>(bases[a].data()), bytes)) {
      fail("short input " + c.input);
    }
  }
  for (size_t a = 0; a < arrays; ++a) {
    inputs.push_back(bases[a].data() + c.offsets[a] * c.items[a]);
  }

  // Outputs (param', the walked state', the scales'): the input buffers
  // themselves when donated, else fresh ones (of size elements; the scales'
  // of one per block).
  const uint64_t blocks = (c.size + RMSPROP_BLOCK - 1) / RMSPROP_BLOCK;
  std::vector<GuardedBuffer> fresh;
  for (size_t o = 0; o < outputs; ++o) {
    const size_t a = 1 + o;
    fresh.emplace_back((a < walked ? c.size : blocks) * c.items[a]);
  }
  // Output of input array a (>= 1).
  auto output = [&](size_t a) -> void* {
    return c.donate[a - 1] ? static_cast<void*>(inputs[a]) : fresh[a - 1].data();
  };

  // What eval_gpu binds.
  float step[RMSPROP_STEP_SCALARS];
  std::memcpy(step, c.step_bits, sizeof(step));
  RMSpropOptions options;
  options.alpha = c.alpha;
  options.eps = c.eps;
  options.momentum = c.momentum;
  options.weight_decay = c.weight_decay;
  auto k = make_coefficients<float>(0.0f, c.alpha, c.eps);
  const RMSpropDeviceScalars scalars{k.alpha, k.one_minus_alpha, k.eps};
  auto constants = make_variant_constants<float>(options);
  constants.flags = c.flags;
  const auto offset = static_cast<uint64_t>(c.offset);
  const RMSpropLeafConstants leaf{
      c.rounding, c.leaf, static_cast<uint32_t>(offset),
      static_cast<uint32_t>(offset >> 32)};
  RMSpropQuantizedLayout quantized_layout{};
  Dispatch d{};
  for (size_t i = 0; i < kernel_slots; ++i) {
    size_t a = static_cast<size_t>(c.slots[i]);
    if (a >= walked || (i < 2 && a != i)) {
      fail("bad slots");
    }
    d.in[i] = inputs[a];
    if (i >= 1) {
      d.out[i - 1] = output(a);
    }
  }
  if (q8) {
    for (size_t e = 0; e < 3; ++e) {
      const size_t s = static_cast<size_t>(c.slots[2 + e]) - 2; // its scale array
      if (s >= scales) {
        fail("bad scale slot");
      }
      d.scale_in[e] = reinterpret_cast<const float*>(inputs[walked + s]);
      d.scale_out[e] = static_cast<float*>(output(walked + s));
      if (!flat) {
        if (c.scale_strides.size() != scales) {
          fail("the general 8-bit kernels need each scale's stride");
        }
        quantized_layout.scale_stride[e] = c.scale_strides[s];
      }
    }
    quantized_layout.outputs_like_param = c.like_param ? 1u : 0u;
  }
  d.step = step;
  d.key = c.rounding == RMSPROP_ROUND_STOCHASTIC ? c.key
                                                 : reinterpret_cast<const uint*>(step);
  d.scalars = &scalars;
  d.constants = &constants;
  d.leaf = &leaf;
  d.unsigned_map = &state_map(true);
  d.signed_map = &state_map(false);
  d.quantized_layout = &quantized_layout;
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
  // grid of a size-0 update is 0 x 0 threads anyway. max_group stands for
  // the pipeline's maxTotalThreadsPerThreadgroup (1024 on Apple GPUs for
  // these kernels unless a case says otherwise): the 8-bit kernels' SIMD-
  // groups depend on it, the others' indices do not.
  RMSpropGrid grid;
  if (q8) {
    grid = rmsprop_q8_grid(rmsprop_q8_threads(c.size), c.max_group);
  } else {
    const uint64_t inner = flat ? 0 : static_cast<uint64_t>(c.shape.back());
    grid = rmsprop_grid(rmsprop_threads(c.kernel, c.size, itemsize, inner), c.max_group);
  }
  const uint2 dims(grid.width, grid.height);
  if (c.size > 0) {
    if (q8) {
      run_simd_groups(kernel, d, grid, c.reverse);
    } else {
      const uint64_t threads = uint64_t(grid.width) * grid.height;
      for (uint64_t t = 0; t < threads; ++t) {
        uint64_t linear = c.reverse ? threads - 1 - t : t;
        uint2 gid(
            static_cast<uint>(linear % grid.width),
            static_cast<uint>(linear / grid.width));
        kernel.launch(d, gid, dims, static_cast<uint>(gid.x % grid.group_width % 32));
      }
    }
  }

  for (size_t o = 0; o < outputs; ++o) {
    fresh[o].check("output " + std::to_string(o));
  }

  std::ofstream out(c.output, std::ios::binary);
  for (size_t o = 0; o < outputs; ++o) {
    const size_t a = 1 + o;
    const void* p = c.donate[o] ? static_cast<const void*>(bases[a].data())
                                : fresh[o].data();
    const size_t bytes = c.donate[o] ? c.elements[a] * c.items[a] : fresh[o].n;
    out.write(static_cast<const char*>(p), bytes);
  }
  if (!out) {
    fail("cannot write " + c.output);
  }
}

void print_grid(uint64_t threads, const mlx_fused_rmsprop::RMSpropGrid& g) {
  std::printf(
      "%llu %u %u %u %llu\n",
      static_cast<unsigned long long>(threads),
      g.width,
      g.height,
      g.group_width,
      static_cast<unsigned long long>(RMSPROP_GRID_MAX_WIDTH));
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
      harness::print_grid(
          threads,
          mlx_fused_rmsprop::rmsprop_grid(
              threads, static_cast<uint32_t>(std::strtoul(argv[6], nullptr, 10))));
      return 0;
    }
    if (command == "q8grid" && argc == 4) {
      const uint64_t threads =
          mlx_fused_rmsprop::rmsprop_q8_threads(std::strtoull(argv[2], nullptr, 10));
      harness::print_grid(
          threads,
          mlx_fused_rmsprop::rmsprop_q8_grid(
              threads, static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10))));
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
        "usage: driver list | grid KIND N ITEMSIZE INNER MAX_GROUP | "
        "q8grid N MAX_GROUP | run MANIFEST\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "driver: %s\n", e.what());
    return 1;
  }
}
