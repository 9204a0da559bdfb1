// What the Metal FFI handlers need from a device: run a dispatch plan over the handler's
// buffers. Implemented by host/metal_runner.mm (the Apple GPU) and emulator/emu_runner.cc.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../dispatch.h"
#include "jaxmps/ffi_common.h"

namespace jaxmps::metal {

// One of the handler's XLA buffers (host memory): plan buffer i for i < plan.io_buffers.
struct IoBuffer {
  void* data = nullptr;
  uint64_t bytes = 0;
  bool is_result = false;
};

// Runs the plan's launches in order and returns when they have finished; errors name `op`.
ffi::Error RunPlan(std::string_view op, const Plan& plan, const std::vector<IoBuffer>& io);

// Metal only: "" when the device and kernel library are usable, else why not.
const std::string& BackendError();

}  // namespace jaxmps::metal
