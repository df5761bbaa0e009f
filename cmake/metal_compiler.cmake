# rmsprop_find_metal_compiler(<out-var>): sets <out-var> to ON when
# `xcrun -sdk macosx -f metal` finds Apple's Metal compiler, else to OFF with
# one message saying what happens instead. The option RMSPROP_BUILD_METALLIB
# (default ON) can be turned OFF to skip the metallib on purpose.
option(RMSPROP_BUILD_METALLIB
       "Build mlx_fused_rmsprop.metallib when a Metal compiler is found" ON)

function(rmsprop_find_metal_compiler out_var)
  if(NOT RMSPROP_BUILD_METALLIB)
    message(STATUS "mlx_fused_rmsprop: metallib skipped (RMSPROP_BUILD_METALLIB=OFF); "
                   "the Metal kernels are compiled at run time")
    set(${out_var} OFF PARENT_SCOPE)
    return()
  endif()
  execute_process(
    COMMAND xcrun -sdk macosx -f metal
    RESULT_VARIABLE _result
    OUTPUT_VARIABLE _path
    ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_result EQUAL 0 AND NOT _path STREQUAL "")
    message(STATUS "mlx_fused_rmsprop: Metal compiler ${_path}: building the metallib")
    set(${out_var} ON PARENT_SCOPE)
  else()
    message(WARNING
      "mlx_fused_rmsprop: no Metal compiler (`xcrun -sdk macosx -f metal` failed). "
      "Building without mlx_fused_rmsprop.metallib: the GPU kernels will be "
      "compiled from the source embedded in the extension on the first GPU "
      "step of each process. To build them ahead of time, install Xcode with "
      "its Metal Toolchain (xcodebuild -downloadComponent MetalToolchain).")
    set(${out_var} OFF PARENT_SCOPE)
  endif()
endfunction()
