// RunPlan on the emulator: the same plans the macOS host encodes, launched kernel by kernel on
// the C++-compiled Metal sources. Scratch and results start poisoned (NaN), as undefined memory.
#include <cstring>
#include <memory>

#include "../host/runner.h"
#include "runtime.h"

namespace jaxmps::metal {

ffi::Error RunPlan(std::string_view op, const Plan& plan, const std::vector<IoBuffer>& io) {
  if (int(io.size()) != plan.io_buffers) {
    return Internal(op, "the plan expects ", plan.io_buffers, " buffers, got ", io.size());
  }
  std::vector<void*> buffers;
  std::vector<uint64_t> bytes;
  for (const IoBuffer& b : io) {
    if (b.is_result) std::memset(b.data, metal_emu::kPoisonByte, b.bytes);
    buffers.push_back(b.data);
    bytes.push_back(b.bytes);
  }
  std::vector<std::unique_ptr<uint8_t[]>> scratch;
  for (uint64_t n : plan.scratch_bytes) {
    scratch.emplace_back(new uint8_t[n]);
    std::memset(scratch.back().get(), metal_emu::kPoisonByte, n);
    buffers.push_back(scratch.back().get());
    bytes.push_back(n);
  }
  for (const Launch& launch : plan.launches) {
    const metal_emu::KernelEntry* kernel = metal_emu::FindKernel(launch.kernel);
    if (!kernel) return Internal(op, "no Metal kernel named ", launch.kernel);
    metal_emu::LaunchConfig config;
    config.groups = {launch.groups.x, launch.groups.y, launch.groups.z};
    config.threads = {launch.threads.x, launch.threads.y, launch.threads.z};
    for (const Binding& binding : launch.bindings) {
      if (binding.buffer >= 0) {
        config.buffers.push_back(buffers.at(binding.buffer));
        config.buffer_bytes.push_back(bytes.at(binding.buffer));
      } else {
        config.buffers.push_back(const_cast<uint8_t*>(binding.bytes.data()));
        config.buffer_bytes.push_back(binding.bytes.size());
      }
    }
    config.threadgroup_bytes = launch.threadgroup_bytes;
    if (std::string error = metal_emu::Launch(*kernel, config); !error.empty()) {
      return Internal(op, "emulated Metal kernel failed: ", error);
    }
  }
  return ffi::Error::Success();
}

}  // namespace jaxmps::metal
