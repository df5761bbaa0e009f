// Drops the macros of metal_shim.h after the shader, so code that follows can
// use `device`, `kernel`, `buffer`, ... as ordinary identifiers again.
#undef device
#undef constant
#undef thread
#undef kernel
#undef buffer
#undef thread_position_in_grid
#undef threads_per_grid
#undef thread_index_in_simdgroup
#undef host_name
