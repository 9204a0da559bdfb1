// RunPlan on the Apple GPU (macOS only, Objective-C++, ARC): the one file that talks to Metal,
// and the only part of the backend that the Linux tests cannot run (see ../README.md).
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "runner.h"

namespace jaxmps::metal {
namespace {

constexpr const char* kLibraryFile = "jaxmps_kernels.metallib";

std::string Describe(NSError* error) {
  return error ? std::string([[error localizedDescription] UTF8String]) : "unknown error";
}

// Directory of this shared library: the metallib is installed next to it.
std::string LibraryDirectory() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&LibraryDirectory), &info) == 0 || !info.dli_fname) {
    return "";
  }
  const std::string path = info.dli_fname;
  return path.substr(0, path.find_last_of('/') + 1);
}

// The device, its command queue, the kernel library and one pipeline per kernel, created on
// first use and kept for the life of the process (never destroyed: no teardown order issues
// at exit). Handlers may run on several XLA threads at once: MTLDevice, MTLCommandQueue and
// pipeline states are thread-safe; the pipeline cache is guarded by a mutex.
class Context {
 public:
  static Context& Get() {
    static Context* context = new Context();
    return *context;
  }

  const std::string& error() const { return error_; }
  id<MTLDevice> device() const { return device_; }
  id<MTLCommandQueue> queue() const { return queue_; }

  id<MTLComputePipelineState> Pipeline(const std::string& name, std::string* error) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = pipelines_.find(name);
    if (found != pipelines_.end()) return found->second;
    id<MTLFunction> function = [library_ newFunctionWithName:@(name.c_str())];
    if (!function) {
      *error = "the Metal library has no kernel " + name +
               (name.size() > 7 && name.compare(name.size() - 7, 7, "_bfloat") == 0
                    ? " (bfloat16 kernels need macOS 14 / MSL 3.1)"
                    : "");
      return nil;
    }
    NSError* ns_error = nil;
    id<MTLComputePipelineState> pipeline =
        [device_ newComputePipelineStateWithFunction:function error:&ns_error];
    if (!pipeline) {
      *error = "cannot build the pipeline of " + name + ": " + Describe(ns_error);
      return nil;
    }
    pipelines_[name] = pipeline;
    return pipeline;
  }

 private:
  Context() {
    @autoreleasepool {
      device_ = MTLCreateSystemDefaultDevice();
      if (!device_) {
        error_ = "no Metal device (set JAXMPS_METAL=0 to use the CPU kernels)";
        return;
      }
      queue_ = [device_ newCommandQueue];
      const std::string path = LibraryDirectory() + kLibraryFile;
      NSError* ns_error = nil;
      library_ = [device_ newLibraryWithURL:[NSURL fileURLWithPath:@(path.c_str())]
                                      error:&ns_error];
      if (!library_) error_ = "cannot load " + path + ": " + Describe(ns_error);
    }
  }

  id<MTLDevice> device_ = nil;
  id<MTLCommandQueue> queue_ = nil;
  id<MTLLibrary> library_ = nil;
  std::string error_;
  std::mutex mutex_;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
};

// An XLA host buffer as a shared MTLBuffer. Unified memory lets the GPU use a page-aligned
// buffer in place (the length is rounded up to whole pages, which are mapped because they hold
// the buffer's end; kernels never touch bytes past `bytes`). Otherwise operands are copied in
// and results copied back once the GPU has finished (`copy_back`).
struct WrappedBuffer {
  id<MTLBuffer> buffer = nil;
  bool copy_back = false;
};

WrappedBuffer Wrap(id<MTLDevice> device, const IoBuffer& io) {
  const uint64_t page = uint64_t(getpagesize());
  const MTLResourceOptions shared = MTLResourceStorageModeShared;
  if (io.bytes == 0) return {[device newBufferWithLength:16 options:shared], false};
  if (reinterpret_cast<uintptr_t>(io.data) % page == 0) {
    id<MTLBuffer> wrapped = [device newBufferWithBytesNoCopy:io.data
                                                      length:(io.bytes + page - 1) / page * page
                                                     options:shared
                                                 deallocator:nil];
    if (wrapped) return {wrapped, false};
  }
  if (io.is_result) return {[device newBufferWithLength:io.bytes options:shared], true};
  return {[device newBufferWithBytes:io.data length:io.bytes options:shared], false};
}

}  // namespace

const std::string& BackendError() { return Context::Get().error(); }

ffi::Error RunPlan(std::string_view op, const Plan& plan, const std::vector<IoBuffer>& io) {
  Context& context = Context::Get();
  if (!context.error().empty()) return Internal(op, "Metal backend unavailable: ", context.error());
  if (int(io.size()) != plan.io_buffers) {
    return Internal(op, "the plan expects ", plan.io_buffers, " buffers, got ", io.size());
  }
  @autoreleasepool {  // XLA's threads have no autorelease pool of their own
    id<MTLDevice> device = context.device();
    std::vector<WrappedBuffer> buffers;
    for (const IoBuffer& b : io) buffers.push_back(Wrap(device, b));
    for (uint64_t bytes : plan.scratch_bytes) {
      buffers.push_back({[device newBufferWithLength:bytes options:MTLResourceStorageModePrivate],
                         false});
    }
    for (const WrappedBuffer& b : buffers) {
      if (!b.buffer) return Internal(op, "cannot allocate a Metal buffer");
    }

    id<MTLCommandBuffer> commands = [context.queue() commandBuffer];
    // A serial encoder: each dispatch sees the writes of the previous ones (the plans rely on
    // it, and the emulator runs launches one after the other the same way).
    id<MTLComputeCommandEncoder> encoder = [commands computeCommandEncoder];
    for (const Launch& launch : plan.launches) {
      std::string error;
      id<MTLComputePipelineState> pipeline = context.Pipeline(launch.kernel, &error);
      const uint64_t threads = uint64_t(launch.threads.x) * launch.threads.y * launch.threads.z;
      if (pipeline && threads > pipeline.maxTotalThreadsPerThreadgroup) {
        error = launch.kernel + " allows " +
                std::to_string(pipeline.maxTotalThreadsPerThreadgroup) +
                " threads per threadgroup, the plan uses " + std::to_string(threads);
      }
      if (!error.empty()) {
        [encoder endEncoding];
        return Internal(op, error);
      }
      [encoder setComputePipelineState:pipeline];
      for (size_t i = 0; i < launch.bindings.size(); ++i) {
        const Binding& binding = launch.bindings[i];
        if (binding.buffer >= 0) {
          [encoder setBuffer:buffers[binding.buffer].buffer offset:0 atIndex:i];
        } else {
          [encoder setBytes:binding.bytes.data() length:binding.bytes.size() atIndex:i];
        }
      }
      for (size_t i = 0; i < launch.threadgroup_bytes.size(); ++i) {
        [encoder setThreadgroupMemoryLength:launch.threadgroup_bytes[i] atIndex:i];
      }
      [encoder dispatchThreadgroups:MTLSizeMake(launch.groups.x, launch.groups.y, launch.groups.z)
              threadsPerThreadgroup:MTLSizeMake(launch.threads.x, launch.threads.y,
                                                launch.threads.z)];
    }
    [encoder endEncoding];
    [commands commit];
    [commands waitUntilCompleted];
    if (commands.status != MTLCommandBufferStatusCompleted) {
      return Internal(op, "Metal command buffer failed: ", Describe(commands.error));
    }
    for (size_t i = 0; i < io.size(); ++i) {
      if (buffers[i].copy_back) std::memcpy(io[i].data, [buffers[i].buffer contents], io[i].bytes);
    }
  }
  return ffi::Error::Success();
}

}  // namespace jaxmps::metal

// For jaxmps/_src/ffi.py: "" when the Metal device and kernel library are usable, else why not
// (no Metal device, metallib missing), so that the backend can be marked unavailable at load.
extern "C" __attribute__((visibility("default"))) const char* jaxmps_metal_error() {
  return jaxmps::metal::BackendError().c_str();
}
