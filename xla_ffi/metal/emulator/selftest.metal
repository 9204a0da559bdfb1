// Kernels that test the emulator itself (tests/test_metal_emulator.py): builtins, barriers,
// threadgroup memory, SIMD-group functions, and rule-breaking kernels it must expose.
#include "../kernels/common.h"

// Each thread writes its 20 builtin values at its slot (threadgroup-major order).
kernel void emu_thread_ids(device uint* out [[buffer(0)]], JAXMPS_THREAD_ARGS) {
  const uint group = group_in_grid.x +
                     groups_in_grid.x * (group_in_grid.y + groups_in_grid.y * group_in_grid.z);
  const uint threads = group_size.x * group_size.y * group_size.z;
  device uint* o = out + (group * threads + thread_index) * 20;
  const uint3 v[5] = {thread_in_grid, group_in_grid, thread_in_group, group_size, groups_in_grid};
  for (uint k = 0; k < 5; ++k) {
    o[3 * k] = v[k].x;
    o[3 * k + 1] = v[k].y;
    o[3 * k + 2] = v[k].z;
  }
  o[15] = thread_index;
  o[16] = lane;
  o[17] = simd_group;
  o[18] = simd_width;
  o[19] = simd_groups;
}
JAXMPS_REGISTER_KERNEL(emu_thread_ids)

// out[t] = in[(t + 1) % n] within each threadgroup, through threadgroup memory.
kernel void emu_rotate(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                       threadgroup float* tile [[threadgroup(0)]], JAXMPS_THREAD_ARGS) {
  tile[thread_index] = in[thread_in_grid.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[thread_in_grid.x] = tile[(thread_index + 1) % group_size.x];
}
JAXMPS_REGISTER_KERNEL(emu_rotate)

// The same without the barrier: a thread may read its neighbour's slot before it is written.
kernel void emu_rotate_without_barrier(device const float* in [[buffer(0)]],
                                       device float* out [[buffer(1)]],
                                       threadgroup float* tile [[threadgroup(0)]],
                                       JAXMPS_THREAD_ARGS) {
  tile[thread_index] = in[thread_in_grid.x];
  out[thread_in_grid.x] = tile[(thread_index + 1) % group_size.x];
}
JAXMPS_REGISTER_KERNEL(emu_rotate_without_barrier)

// Tree reduction through threadgroup memory (power-of-two threadgroups): out[group] = sum.
// `flags` bit 0 drops the barrier inside the loop (a classic bug the tests must catch).
kernel void emu_tree_sum(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                         constant uint& flags [[buffer(2)]],
                         threadgroup float* tile [[threadgroup(0)]], JAXMPS_THREAD_ARGS) {
  tile[thread_index] = in[thread_in_grid.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = group_size.x / 2; s > 0; s /= 2) {
    if (thread_index < s) tile[thread_index] += tile[thread_index + s];
    if (!(flags & 1)) threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (thread_index == 0) out[group_in_grid.x] = tile[0];
}
JAXMPS_REGISTER_KERNEL(emu_tree_sum)

struct SimdTestParams {
  uint delta, mask, source;
  float threshold;
};

// Every SIMD-group function on v = in[thread], 13 results per thread.
kernel void emu_simd_functions(device const float* in [[buffer(0)]],
                               device float* out [[buffer(1)]],
                               constant SimdTestParams& p [[buffer(2)]], JAXMPS_THREAD_ARGS) {
  const float v = in[thread_in_grid.x];
  device float* o = out + thread_in_grid.x * 13;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_exclusive_sum(v);
  o[4] = simd_prefix_inclusive_sum(v);
  o[5] = simd_shuffle(v, ushort((lane + p.delta) % simd_width));
  o[6] = simd_shuffle_down(v, ushort(p.delta));
  o[7] = simd_shuffle_up(v, ushort(p.delta));
  o[8] = simd_shuffle_xor(v, ushort(p.mask));
  o[9] = simd_broadcast(v, ushort(p.source));
  o[10] = simd_is_first() ? 1.0f : 0.0f;
  o[11] = simd_all(v > p.threshold) ? 1.0f : 0.0f;
  o[12] = simd_any(v > p.threshold) ? 1.0f : 0.0f;
}
JAXMPS_REGISTER_KERNEL(emu_simd_functions)

// The jaxmps reduction helper, as the normalization kernels use it: out[group] = sum.
kernel void emu_threadgroup_sum(device const float* in [[buffer(0)]],
                                device float* out [[buffer(1)]],
                                threadgroup float* partials [[threadgroup(0)]],
                                JAXMPS_THREAD_ARGS) {
  const float total = threadgroup_sum(in[thread_in_grid.x], partials, lane, simd_group,
                                      simd_groups);
  // Every thread must see the same total.
  out[thread_in_grid.x] = total;
}
JAXMPS_REGISTER_KERNEL(emu_threadgroup_sum)

// Two threadgroup allocations: out[2t] = a[n - 1 - t] (written by another thread), out[2t + 1]
// = b[t] never written (Metal leaves it undefined: the emulator poisons it).
kernel void emu_threadgroup_memory(device float* out [[buffer(0)]],
                                   threadgroup float* a [[threadgroup(0)]],
                                   threadgroup float* b [[threadgroup(1)]],
                                   JAXMPS_THREAD_ARGS) {
  a[thread_index] = float(group_in_grid.x * 1000 + thread_index);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[2 * thread_in_grid.x] = a[group_size.x - 1 - thread_index];
  out[2 * thread_in_grid.x + 1] = b[thread_index];
}
JAXMPS_REGISTER_KERNEL(emu_threadgroup_memory)

// Broken kernels: a barrier some threads skip (returned early, or in a divergent branch), and
// a SIMD-group function called by only part of a SIMD-group.
kernel void emu_barrier_after_return(device float* out [[buffer(0)]], JAXMPS_THREAD_ARGS) {
  if (thread_index == 0) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[thread_in_grid.x] = 1.0f;
}
JAXMPS_REGISTER_KERNEL(emu_barrier_after_return)

kernel void emu_divergent_barriers(device float* out [[buffer(0)]], JAXMPS_THREAD_ARGS) {
  if (thread_index % 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[thread_in_grid.x] = 1.0f;
}
JAXMPS_REGISTER_KERNEL(emu_divergent_barriers)

kernel void emu_divergent_simd(device float* out [[buffer(0)]], JAXMPS_THREAD_ARGS) {
  float v = 1.0f;
  if (lane < 5) v = simd_sum(v);
  out[thread_in_grid.x] = simd_sum(v);
}
JAXMPS_REGISTER_KERNEL(emu_divergent_simd)

// Storage conversions: out[2i] = float(half(in[i])), out[2i + 1] = float(bfloat(in[i])).
kernel void emu_round_trip(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                           constant uint& count [[buffer(2)]], JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= count) return;
  out[2 * i] = float(half(in[i]));
  out[2 * i + 1] = float(bfloat(in[i]));
}
JAXMPS_REGISTER_KERNEL(emu_round_trip)
