// Choosing between the installed metallib and the embedded Metal source.
#include "rmsprop_metal_library.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace mlx_fused_rmsprop {

MetalLibraryPlan plan_metal_library(const std::string& extension_dir) {
  const char* force = std::getenv(kMetalSourceEnv);
  if (force != nullptr && *force != '\0' && std::string(force) != "0") {
    return {false, ""};
  }
  auto path = std::filesystem::path(extension_dir) /
      (std::string(kMetalLibraryName) + ".metallib");
  std::error_code error;
  if (std::filesystem::is_regular_file(path, error)) {
    return {true, path.string()};
  }
  return {false, ""};
}

const std::string& extension_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<const void*>(&plan_metal_library), &info) == 0 ||
        info.dli_fname == nullptr) {
      throw std::runtime_error(
          "[FusedRMSprop] cannot locate the extension's own file.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

} // namespace mlx_fused_rmsprop
