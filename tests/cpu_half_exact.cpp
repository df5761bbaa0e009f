// Compares the CPU kernel's half conversions with mlx's own float16_t /
// bfloat16_t, bit for bit: the branch-free scalar ones (csrc/cpu/half.h),
// a loop of them as the compiler vectorizes it, and on x86-64 the in-register
// SIMD ones of the AVX2 and AVX-512 builds (csrc/cpu/simd.h) the CPU runs. Built and run by
// tests/test_cpu_kernel.py; prints one line per check and exits non-zero on
// the first mismatch.
//
// Usage: cpu_half_exact <random float32 patterns> <seed>
//        cpu_half_exact all      (every one of the 2^32 float32 patterns)
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "mlx/types/half_types.h"
#include "cpu/half.h"
#include "cpu/simd.h"

namespace hb = mlx_fused_rmsprop::half_bits;
using mlx::core::bfloat16_t;
using mlx::core::float16_t;

// Bit views of floats and of mlx's own half types (the reference).
static uint32_t f2u(float f) { return std::bit_cast<uint32_t>(f); }
static float u2f(uint32_t u) { return std::bit_cast<float>(u); }
static uint16_t ref_f16(float x) { return std::bit_cast<uint16_t>(float16_t(x)); }
static uint16_t ref_bf16(float x) { return std::bit_cast<uint16_t>(bfloat16_t(x)); }
static float ref_from_f16(uint16_t b) { return static_cast<float>(std::bit_cast<float16_t>(b)); }
static float ref_from_bf16(uint16_t b) { return static_cast<float>(std::bit_cast<bfloat16_t>(b)); }

// Batched (vectorizable) versions, as the kernel uses them in loops.
__attribute__((noinline)) static void batch_to_f32(
    const uint16_t* in, float* out, int n, bool bf16) {
  if (bf16) {
    for (int i = 0; i < n; ++i) out[i] = hb::bf16_to_f32(in[i]);
  } else {
    for (int i = 0; i < n; ++i) out[i] = hb::f16_to_f32(in[i]);
  }
}
__attribute__((noinline)) static void batch_from_f32(
    const float* in, uint16_t* out, int n, bool bf16) {
  if (bf16) {
    for (int i = 0; i < n; ++i) out[i] = hb::f32_to_bf16(in[i]);
  } else {
    for (int i = 0; i < n; ++i) out[i] = hb::f32_to_f16(in[i]);
  }
}

// ---- The SIMD conversions, n % L elements left to the scalar ones. Each
// width is stamped out in a function compiled for its target (its
// intrinsics inline only there), like the kernel's loops.
#if RMSPROP_HAVE_AVX2_F16C
namespace simd = mlx_fused_rmsprop::simd;
using mlx_fused_rmsprop::BFloat16Format;
using mlx_fused_rmsprop::Float16Format;
using mlx_fused_rmsprop::Float32Format;
#define DEFINE_LANES_CONVERSIONS(SUFFIX, TARGET, L)                              \
  template <class F>                                                           \
  TARGET __attribute__((noinline)) static void to_f32_##SUFFIX(                \
      const uint16_t* in, float* out, int n) {                                 \
    int i = 0;                                                                 \
    for (; i + L <= n; i += L)                                                 \
      simd::Lanes<Float32Format, L>::store(out + i, simd::Lanes<F, L>::load(in + i)); \
    for (; i < n; ++i) out[i] = F::load(in[i]);                                \
  }                                                                            \
  template <class F>                                                           \
  TARGET __attribute__((noinline)) static void from_f32_##SUFFIX(              \
      const float* in, uint16_t* out, int n) {                                 \
    int i = 0;                                                                 \
    for (; i + L <= n; i += L)                                                 \
      simd::Lanes<F, L>::store(out + i, simd::Lanes<Float32Format, L>::load(in + i)); \
    for (; i < n; ++i) out[i] = F::store(in[i]);                               \
  }
DEFINE_LANES_CONVERSIONS(avx2, RMSPROP_TARGET_AVX2_F16C, 8)
DEFINE_LANES_CONVERSIONS(avx512, RMSPROP_TARGET_AVX512, 16)
#undef DEFINE_LANES_CONVERSIONS
#endif

// The SIMD builds this CPU runs, each with its conversions.
struct SimdBuild {
  const char* name;
  void (*to_f32)(const uint16_t*, float*, int, bool bf16);
  void (*from_f32)(const float*, uint16_t*, int, bool bf16);
};
static std::vector<SimdBuild> simd_builds() {
  std::vector<SimdBuild> builds;
#if RMSPROP_HAVE_AVX2_F16C
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    builds.push_back({"AVX2",
        [](const uint16_t* in, float* out, int n, bool bf16) {
          bf16 ? to_f32_avx2<BFloat16Format>(in, out, n) : to_f32_avx2<Float16Format>(in, out, n);
        },
        [](const float* in, uint16_t* out, int n, bool bf16) {
          bf16 ? from_f32_avx2<BFloat16Format>(in, out, n)
               : from_f32_avx2<Float16Format>(in, out, n);
        }});
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    builds.push_back({"AVX-512",
        [](const uint16_t* in, float* out, int n, bool bf16) {
          bf16 ? to_f32_avx512<BFloat16Format>(in, out, n)
               : to_f32_avx512<Float16Format>(in, out, n);
        },
        [](const float* in, uint16_t* out, int n, bool bf16) {
          bf16 ? from_f32_avx512<BFloat16Format>(in, out, n)
               : from_f32_avx512<Float16Format>(in, out, n);
        }});
  }
#endif
  return builds;
}

static int fail(const char* what, uint32_t in, uint32_t got, uint32_t want) {
  std::printf("MISMATCH %s input=0x%08x got=0x%08x want=0x%08x\n", what, in, got, want);
  return 1;
}

// Both directions over a list of float32 bit patterns.
static int check_floats(const std::vector<uint32_t>& bits, const char* label) {
  size_t n = bits.size();
  std::vector<float> in(n);
  for (size_t i = 0; i < n; ++i) in[i] = u2f(bits[i]);
  std::vector<uint16_t> h(n), b(n);
  batch_from_f32(in.data(), h.data(), static_cast<int>(n), false);
  batch_from_f32(in.data(), b.data(), static_cast<int>(n), true);
  for (const SimdBuild& build : simd_builds()) {
    std::vector<uint16_t> hs(n), bs(n);
    build.from_f32(in.data(), hs.data(), static_cast<int>(n), false);
    build.from_f32(in.data(), bs.data(), static_cast<int>(n), true);
    for (size_t i = 0; i < n; ++i) {
      if (hs[i] != ref_f16(in[i])) return fail(build.name, bits[i], hs[i], ref_f16(in[i]));
      if (bs[i] != ref_bf16(in[i])) return fail(build.name, bits[i], bs[i], ref_bf16(in[i]));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t want_h = ref_f16(in[i]), want_b = ref_bf16(in[i]);
    if (h[i] != want_h) return fail("f32->f16 (batch)", bits[i], h[i], want_h);
    if (b[i] != want_b) return fail("f32->bf16 (batch)", bits[i], b[i], want_b);
    if (hb::f32_to_f16(in[i]) != want_h)
      return fail("f32->f16 (scalar)", bits[i], hb::f32_to_f16(in[i]), want_h);
    if (hb::f32_to_bf16(in[i]) != want_b)
      return fail("f32->bf16 (scalar)", bits[i], hb::f32_to_bf16(in[i]), want_b);
  }
  std::printf("ok %s: %zu float32 patterns -> f16, bf16\n", label, n);
  return 0;
}

int main(int argc, char** argv) {
  long random_count = argc > 1 ? std::atol(argv[1]) : 1000000;
  unsigned seed = argc > 2 ? static_cast<unsigned>(std::atol(argv[2])) : 0;

  // 1. Every half bit pattern -> float32, both formats, batch and scalar.
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> f(65536), bf(65536);
  batch_to_f32(all.data(), f.data(), 65536, false);
  batch_to_f32(all.data(), bf.data(), 65536, true);
  for (int i = 0; i < 65536; ++i) {
    uint16_t x = static_cast<uint16_t>(i);
    uint32_t want = f2u(ref_from_f16(x)), want_b = f2u(ref_from_bf16(x));
    if (f2u(f[i]) != want) return fail("f16->f32 (batch)", x, f2u(f[i]), want);
    if (f2u(hb::f16_to_f32(x)) != want)
      return fail("f16->f32 (scalar)", x, f2u(hb::f16_to_f32(x)), want);
    if (f2u(bf[i]) != want_b) return fail("bf16->f32 (batch)", x, f2u(bf[i]), want_b);
  }
  std::string builds = "portable";
  for (const SimdBuild& build : simd_builds()) {
    std::vector<float> fs(65536), bfs(65536);
    build.to_f32(all.data(), fs.data(), 65536, false);
    build.to_f32(all.data(), bfs.data(), 65536, true);
    for (int i = 0; i < 65536; ++i) {
      uint16_t x = static_cast<uint16_t>(i);
      if (f2u(fs[i]) != f2u(ref_from_f16(x))) return fail(build.name, x, f2u(fs[i]), f2u(ref_from_f16(x)));
      if (f2u(bfs[i]) != f2u(ref_from_bf16(x)))
        return fail(build.name, x, f2u(bfs[i]), f2u(ref_from_bf16(x)));
    }
    builds += std::string(", ") + build.name;
  }
  std::printf("ok all 65536 f16 and bf16 patterns -> f32 (%s)\n", builds.c_str());

  // 2. Every float32 a half can hold (round trips), and its neighbours: the
  //    rounding boundaries (ties, just below/above) of every half interval.
  std::vector<uint32_t> near;
  near.reserve(65536 * 2 * 9);
  for (int i = 0; i < 65536; ++i) {
    uint32_t centers[2] = {f2u(ref_from_f16(static_cast<uint16_t>(i))),
                           f2u(ref_from_bf16(static_cast<uint16_t>(i)))};
    for (uint32_t c : centers) {
      for (int d = -4; d <= 4; ++d) near.push_back(c + static_cast<uint32_t>(d));
    }
    // Exact midpoints between consecutive halves (ties to even).
    uint32_t lo = f2u(ref_from_f16(static_cast<uint16_t>(i)));
    uint32_t hi = f2u(ref_from_f16(static_cast<uint16_t>(i + 1)));
    float mid = (u2f(lo) + u2f(hi)) * 0.5f;
    for (int d = -1; d <= 1; ++d) near.push_back(f2u(mid) + static_cast<uint32_t>(d));
  }
  if (check_floats(near, "half values, midpoints and neighbours")) return 1;

  // 3. Special float32 values and every float32 exponent's extremes.
  std::vector<uint32_t> special;
  for (uint32_t e = 0; e < 256; ++e) {
    for (uint32_t s = 0; s < 2; ++s) {
      uint32_t base = (s << 31) | (e << 23);
      for (uint32_t m : {0u, 1u, 2u, 0x1000u, 0x0FFFu, 0x2000u, 0x1FFFu, 0x400000u,
                         0x3FFFFFu, 0x7FFFFEu, 0x7FFFFFu, 0x7FE000u, 0x7FF000u}) {
        special.push_back(base | m);
      }
    }
  }
  if (check_floats(special, "every exponent's edge mantissas (incl. NaN/Inf/subnormal)"))
    return 1;

  // 4. Every float32 bit pattern (slow: minutes), or random ones.
  if (argc > 1 && std::strcmp(argv[1], "all") == 0) {
    const uint64_t chunk = 1ull << 24;
    std::vector<uint32_t> r(chunk);
    for (uint64_t start = 0; start < (1ull << 32); start += chunk) {
      for (uint64_t i = 0; i < chunk; ++i) r[i] = static_cast<uint32_t>(start + i);
      if (check_floats(r, "all float32 bit patterns (chunk)")) return 1;
    }
    std::printf("ALL OK\n");
    return 0;
  }
  std::mt19937_64 rng(seed);
  const long chunk = 1 << 20;
  for (long done = 0; done < random_count; done += chunk) {
    long m = std::min(chunk, random_count - done);
    std::vector<uint32_t> r(static_cast<size_t>(m));
    for (auto& x : r) x = static_cast<uint32_t>(rng());
    if (check_floats(r, "random float32 bit patterns")) return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
