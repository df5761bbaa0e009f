# Writes OUTPUT, a C++ file defining mlx_fused_rmsprop::kEmbeddedMetalSource:
# the text of SHADER with every line `#include "NAME"` replaced by the text of
# INCLUDE_DIR/NAME (one level: an inlined file may not include another with
# quotes). That is a self-contained Metal source that eval_gpu compiles at run
# time when no metallib was built. tests/test_metal_emulation.py applies the
# same rule to the files and compares, so the string cannot drift from them.
#
#   cmake -DSHADER=kernels/rmsprop.metal -DINCLUDE_DIR=kernels \
#         -DOUTPUT=build/rmsprop_metal_source.cpp -P cmake/embed_metal_source.cmake
cmake_minimum_required(VERSION 3.20)
foreach(var SHADER INCLUDE_DIR OUTPUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "embed_metal_source.cmake: -D${var}=... is required")
  endif()
endforeach()

set(_quoted_include "\n#include \"([^\"\n]+)\"")
file(READ "${SHADER}" _source)
# A leading newline lets the first line match like every other.
set(_source "\n${_source}")
string(REGEX MATCHALL "${_quoted_include}" _directives "${_source}")
foreach(_directive IN LISTS _directives)
  string(REGEX REPLACE "${_quoted_include}" "\\1" _name "${_directive}")
  file(READ "${INCLUDE_DIR}/${_name}" _included)
  if(_included MATCHES "${_quoted_include}")
    message(FATAL_ERROR "${_name} includes a file with quotes; inline one level only")
  endif()
  string(REPLACE "${_directive}" "\n${_included}" _source "${_source}")
endforeach()
string(SUBSTRING "${_source}" 1 -1 _source)

# A raw string literal: the text is kept byte for byte, backslashes included.
# (A raw-string delimiter has at most 16 characters.)
set(_delimiter "rmsprop_metal")
string(FIND "${_source}" ")${_delimiter}\"" _clash)
if(NOT _clash EQUAL -1)
  message(FATAL_ERROR "the shader contains the raw-string delimiter )${_delimiter}\"")
endif()
file(WRITE "${OUTPUT}.tmp"
  "// Generated from ${SHADER} by cmake/embed_metal_source.cmake. Do not edit.\n"
  "#include \"rmsprop_metal_library.h\"\n\n"
  "namespace mlx_fused_rmsprop {\n\n"
  "const char kEmbeddedMetalSource[] = R\"${_delimiter}(${_source})${_delimiter}\";\n\n"
  "} // namespace mlx_fused_rmsprop\n")
# Only touch OUTPUT when it changes, so an unchanged shader rebuilds nothing.
file(COPY_FILE "${OUTPUT}.tmp" "${OUTPUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUTPUT}.tmp")
