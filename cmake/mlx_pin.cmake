# The mlx release this package is built for, read from pyproject.toml (its one
# source of truth), and the build-time check against the mlx being compiled
# against.
#
# As a module (include from CMakeLists.txt):
#   rmsprop_read_mlx_pin(<pyproject.toml> <out-var>)
#   rmsprop_check_mlx_version(<pinned> <found> <where>)
# As a script (what the tests run, with any version):
#   cmake -DPYPROJECT=pyproject.toml -DMLX_FOUND_VERSION=0.32.3 \
#         [-DMLX_PIN_PLATFORM=Darwin|Linux] -P cmake/mlx_pin.cmake
# prints the pin and exits non-zero with the build's message on a mismatch.

# Every `mlx==X` / `mlx[cpu]==X` requirement in pyproject.toml ([build-system]
# requires and [project] dependencies) must name the same X.
function(rmsprop_read_mlx_pin pyproject out_var)
  file(STRINGS "${pyproject}" _lines REGEX "\"mlx(\\[[a-z0-9,]+\\])?==")
  set(_pins)
  foreach(_line IN LISTS _lines)
    string(REGEX MATCH "\"mlx(\\[[a-z0-9,]+\\])?==([^;\" ]+)" _match "${_line}")
    list(APPEND _pins "${CMAKE_MATCH_2}")
  endforeach()
  list(REMOVE_DUPLICATES _pins)
  list(LENGTH _pins _count)
  if(NOT _count EQUAL 1)
    message(
      FATAL_ERROR
        "pyproject.toml must pin mlx to exactly one version in [build-system] "
        "requires and [project] dependencies; found: '${_pins}'.")
  endif()
  set(${out_var} "${_pins}" PARENT_SCOPE)
endfunction()

function(rmsprop_check_mlx_version pinned found where)
  if(NOT found STREQUAL pinned)
    # MLX_PIN_PLATFORM (script mode only: Darwin or Linux) stands in for the
    # platform being built for.
    if((DEFINED MLX_PIN_PLATFORM AND MLX_PIN_PLATFORM STREQUAL "Darwin")
       OR (NOT DEFINED MLX_PIN_PLATFORM AND APPLE))
      set(_req "mlx==${pinned}")
    else()
      set(_req "mlx[cpu]==${pinned}")
    endif()
    message(
      FATAL_ERROR
        "mlx-fused-rmsprop must be built against mlx ${pinned} (its pin in "
        "pyproject.toml), but this build environment has mlx ${found} "
        "(${where}). The extension links libmlx, whose C++ ABI changes "
        "between releases, so a build against ${found} could not run beside "
        "the mlx ${pinned} that pip installs with it.\n"
        "Fix: pip install '${_req}' in this environment and run the install "
        "again, or install without --no-build-isolation (pip then builds "
        "against the pinned mlx in an isolated environment).")
  endif()
endfunction()

if(CMAKE_SCRIPT_MODE_FILE AND CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT PYPROJECT)
    set(PYPROJECT "${CMAKE_CURRENT_LIST_DIR}/../pyproject.toml")
  endif()
  rmsprop_read_mlx_pin("${PYPROJECT}" _pinned)
  message(STATUS "mlx pin: ${_pinned}")
  if(DEFINED MLX_FOUND_VERSION)
    rmsprop_check_mlx_version("${_pinned}" "${MLX_FOUND_VERSION}" "given on the command line")
  endif()
endif()
