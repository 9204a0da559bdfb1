// C entry points of libjaxmps_metal_emu for ctypes (tests/metal_emu.py): list the emulated
// kernels, choose the schedule and SIMD width, and launch a named kernel over host buffers.
#include <cstdint>
#include <string>

#include "runtime.h"

#define JAXMPS_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
thread_local std::string last_error;

int Fail(std::string message) {
  last_error = std::move(message);
  return -1;
}
}  // namespace

using jaxmps::metal_emu::Kernels;

JAXMPS_EMU_EXPORT int jaxmps_emu_kernel_count() { return int(Kernels().size()); }

JAXMPS_EMU_EXPORT const char* jaxmps_emu_kernel_name(int i) { return Kernels()[i].name.c_str(); }

JAXMPS_EMU_EXPORT const char* jaxmps_emu_last_error() { return last_error.c_str(); }

// schedule: 0 forward, 1 reverse, 2 shuffle (seeded). simd_width: a power of two in [4, 64].
JAXMPS_EMU_EXPORT int jaxmps_emu_set_options(int schedule, uint64_t seed, uint32_t simd_width) {
  if (schedule < 0 || schedule > 2) return Fail("schedule must be 0, 1 or 2");
  if (simd_width < 4 || simd_width > jaxmps::metal_emu::kMaxSimdWidth ||
      (simd_width & (simd_width - 1)) != 0) {
    return Fail("simd_width must be a power of two in [4, 64]");
  }
  jaxmps::metal_emu::SetOptions({jaxmps::metal_emu::Schedule(schedule), seed, simd_width});
  return 0;
}

JAXMPS_EMU_EXPORT void jaxmps_emu_get_options(int* schedule, uint64_t* seed,
                                              uint32_t* simd_width) {
  const auto o = jaxmps::metal_emu::GetOptions();
  *schedule = int(o.schedule);
  *seed = o.seed;
  *simd_width = o.simd_width;
}

// Runs kernel `name` over groups[0..2] threadgroups of threads[0..2] threads, binding
// buffers[i] (of buffer_bytes[i] bytes) to [[buffer(i)]] and threadgroup_bytes[j] of
// threadgroup memory to [[threadgroup(j)]]. Returns 0, or -1 with jaxmps_emu_last_error().
JAXMPS_EMU_EXPORT int jaxmps_emu_launch(const char* name, const uint32_t* groups,
                                        const uint32_t* threads, int num_buffers,
                                        void* const* buffers, const uint64_t* buffer_bytes,
                                        int num_threadgroup, const uint32_t* threadgroup_bytes) {
  const auto* kernel = jaxmps::metal_emu::FindKernel(name);
  if (!kernel) return Fail(std::string("no emulated kernel named ") + name);
  jaxmps::metal_emu::LaunchConfig config;
  config.groups = jaxmps::metal_emu::uint3(groups[0], groups[1], groups[2]);
  config.threads = jaxmps::metal_emu::uint3(threads[0], threads[1], threads[2]);
  config.buffers.assign(buffers, buffers + num_buffers);
  config.buffer_bytes.assign(buffer_bytes, buffer_bytes + num_buffers);
  config.threadgroup_bytes.assign(threadgroup_bytes, threadgroup_bytes + num_threadgroup);
  std::string error = jaxmps::metal_emu::Launch(*kernel, config);
  return error.empty() ? 0 : Fail(std::move(error));
}
