// Where eval_gpu gets the Metal kernels of kernels/rmsprop.metal: the
// metallib built beside the extension, or the shader source embedded in the
// extension, compiled at run time. Compiled into every build (no Metal
// needed), so the choice and the embedded source are testable anywhere.
#pragma once

#include <string>

namespace mlx_fused_rmsprop {

// The name MLX caches the library under for the whole process (one name per
// package, so no other extension's "rmsprop" library is ever taken for ours),
// and the stem of the metallib file: <extension dir>/mlx_fused_rmsprop.metallib.
inline constexpr const char* kMetalLibraryName = "mlx_fused_rmsprop";

// Set (to anything but "" or "0"), eval_gpu compiles the embedded source even
// where a metallib is installed: the run-time path, testable on any Mac.
inline constexpr const char* kMetalSourceEnv = "MLX_FUSED_RMSPROP_METAL_JIT";

// kernels/rmsprop.metal with rmsprop_math.h inlined: a self-contained Metal
// source, generated at build time by cmake/embed_metal_source.cmake.
extern const char kEmbeddedMetalSource[];

struct MetalLibraryPlan {
  bool from_metallib; // else: compile kEmbeddedMetalSource
  std::string metallib_path; // when from_metallib
};

// The metallib in `extension_dir` when it exists and kMetalSourceEnv is not
// set; otherwise the embedded source. Reads the environment on every call;
// eval_gpu calls it once per process.
MetalLibraryPlan plan_metal_library(const std::string& extension_dir);

// The folder holding this extension's shared library (computed once).
const std::string& extension_dir();

} // namespace mlx_fused_rmsprop
