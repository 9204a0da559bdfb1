// Helpers shared by every jaxmps Metal kernel: the thread-builtin parameter list, the kernel
// instantiation macros, image indexing and a threadgroup sum.
#pragma once

#include <metal_stdlib>

#include "params.h"

using namespace metal;

// Every kernel ends its parameter list with these builtins, in this order (the emulator binds
// them by position; see emulator/metal_compat.h).
#define JAXMPS_THREAD_ARGS                              \
  uint3 thread_in_grid [[thread_position_in_grid]],     \
  uint3 group_in_grid [[threadgroup_position_in_grid]], \
  uint3 thread_in_group [[thread_position_in_threadgroup]], \
  uint3 group_size [[threads_per_threadgroup]],         \
  uint3 groups_in_grid [[threadgroups_per_grid]],       \
  uint thread_index [[thread_index_in_threadgroup]],    \
  uint lane [[thread_index_in_simdgroup]],              \
  uint simd_group [[simdgroup_index_in_threadgroup]],   \
  uint simd_width [[threads_per_simdgroup]],            \
  uint simd_groups [[simdgroups_per_threadgroup]]

// Kernel `name` for storage type T is the Metal function "<name>_<T>" (float, half, bfloat).
// The emulator defines its own versions of these two macros, which register the functions.
#ifndef JAXMPS_INSTANTIATE_KERNEL
#define JAXMPS_INSTANTIATE_KERNEL(name, T) \
  template [[host_name(#name "_" #T)]] [[kernel]] decltype(name<T>) name<T>;
#endif
#ifndef JAXMPS_REGISTER_KERNEL
#define JAXMPS_REGISTER_KERNEL(name)  // Metal finds a plain kernel by its name
#endif

#if defined(__HAVE_BFLOAT__)
#define JAXMPS_INSTANTIATE_BFLOAT(name) JAXMPS_INSTANTIATE_KERNEL(name, bfloat)
#else
#define JAXMPS_INSTANTIATE_BFLOAT(name)  // bfloat needs MSL 3.1 (macOS 14)
#endif

// Data is stored as float, half or bfloat and computed in float.
#define JAXMPS_INSTANTIATE_STORAGE_TYPES(name) \
  JAXMPS_INSTANTIATE_KERNEL(name, float)       \
  JAXMPS_INSTANTIATE_KERNEL(name, half)        \
  JAXMPS_INSTANTIATE_BFLOAT(name)

struct ImageCoords {
  uint n, c, h, w;
};

// Logical coordinates of the element at flat index i (memory order of the layout).
inline ImageCoords image_coords(ImageGeometry g, uint i) {
  ImageCoords at;
  if (g.channels_last) {
    at.c = i % g.c;
    i /= g.c;
    at.w = i % g.w;
    i /= g.w;
    at.h = i % g.h;
    at.n = i / g.h;
  } else {
    at.w = i % g.w;
    i /= g.w;
    at.h = i % g.h;
    i /= g.h;
    at.c = i % g.c;
    at.n = i / g.c;
  }
  return at;
}

inline uint image_offset(ImageGeometry g, uint n, uint c, uint h, uint w) {
  return n * g.sn + c * g.sc + h * g.sh + w * g.sw;
}

// Sum of v over the threadgroup, returned to every thread. `partials` holds at least one float
// per SIMD-group. The sum does not depend on the SIMD width's partition into groups beyond
// float rounding, and every thread adds the partials in the same order, so all get the same.
inline float threadgroup_sum(float v, threadgroup float* partials, uint lane, uint simd_group,
                             uint simd_groups) {
  v = simd_sum(v);
  if (lane == 0) partials[simd_group] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint i = 0; i < simd_groups; ++i) total += partials[i];
  // The next call reuses `partials`: nobody may write them before everyone has read them.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}
