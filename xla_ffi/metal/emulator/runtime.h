// Metal compute emulator runtime: the registry of kernels compiled as C++, and Launch(), which
// runs one over a grid with a fiber per simulated thread, real barriers and SIMD-group exchanges.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vector_types.h"

namespace jaxmps::metal_emu {

// The position builtins of one simulated thread: exactly the parameters that the kernels'
// JAXMPS_THREAD_ARGS list declares (kernels/common.h), in that order.
struct ThreadIds {
  uint3 thread_in_grid, group_in_grid, thread_in_group, group_size, groups_in_grid;
  uint32_t thread_index = 0, lane = 0, simd_group = 0, simd_width = 0, simd_groups = 0;
};
constexpr size_t kThreadArgCount = 10;

// A binding parameter of a kernel ([[buffer(i)]] or [[threadgroup(i)]]), read from its C++ type:
// a pointer takes a buffer's address, a reference (`constant Params& p`) the bytes of a struct
// of exactly `value_bytes` bytes.
struct ParamInfo {
  bool is_pointer = true;
  size_t value_bytes = 0;
};

struct KernelEntry {
  std::string name;
  std::vector<ParamInfo> params;  // buffers, then threadgroup memory; builtins excluded
  void (*invoke)(void* const* args, const ThreadIds& ids) = nullptr;
};

void AddKernel(KernelEntry entry);
const KernelEntry* FindKernel(std::string_view name);
const std::vector<KernelEntry>& Kernels();

// ---- binding a kernel function's parameters --------------------------------------------------

template <typename F>
struct KernelSignature;
template <typename... P>
struct KernelSignature<void (*)(P...)> {
  using Params = std::tuple<P...>;
  static constexpr size_t kBindings = sizeof...(P) - kThreadArgCount;
};

template <typename P>
P BindParam(void* raw) {
  if constexpr (std::is_pointer_v<P>) {
    return reinterpret_cast<P>(raw);
  } else {
    static_assert(std::is_reference_v<P>, "kernel binding parameters are pointers or references");
    return *reinterpret_cast<std::remove_reference_t<P>*>(raw);
  }
}

template <typename P>
ParamInfo DescribeParam() {
  if constexpr (std::is_pointer_v<P>) {
    return {true, 0};
  } else {
    return {false, sizeof(std::remove_reference_t<P>)};
  }
}

template <auto Fn, size_t... I>
void InvokeKernel(void* const* args, const ThreadIds& t, std::index_sequence<I...>) {
  using Params = typename KernelSignature<decltype(Fn)>::Params;
  Fn(BindParam<std::tuple_element_t<I, Params>>(args[I])..., t.thread_in_grid, t.group_in_grid,
     t.thread_in_group, t.group_size, t.groups_in_grid, t.thread_index, t.lane, t.simd_group,
     t.simd_width, t.simd_groups);
}

// Registers kernel function `Fn` under its Metal name (used by the kernels' instantiation
// macros; see metal_compat.h).
template <auto Fn>
bool RegisterKernel(const char* name) {
  using Sig = KernelSignature<decltype(Fn)>;
  using Params = typename Sig::Params;
  constexpr size_t n = Sig::kBindings;
  static_assert(std::is_same_v<std::tuple_element_t<n, Params>, uint3> &&
                    std::is_same_v<std::tuple_element_t<n + 4, Params>, uint3> &&
                    std::is_same_v<std::tuple_element_t<n + 5, Params>, uint32_t> &&
                    std::is_same_v<std::tuple_element_t<n + 9, Params>, uint32_t>,
                "a kernel must end with JAXMPS_THREAD_ARGS");
  KernelEntry entry;
  entry.name = name;
  [&]<size_t... I>(std::index_sequence<I...>) {
    entry.params = {DescribeParam<std::tuple_element_t<I, Params>>()...};
  }(std::make_index_sequence<n>{});
  entry.invoke = [](void* const* args, const ThreadIds& ids) {
    InvokeKernel<Fn>(args, ids, std::make_index_sequence<n>{});
  };
  AddKernel(std::move(entry));
  return true;
}

// ---- launching -------------------------------------------------------------------------------

struct LaunchConfig {
  uint3 groups{1, 1, 1};   // threadgroups per grid (dispatchThreadgroups)
  uint3 threads{1, 1, 1};  // threads per threadgroup
  std::vector<void*> buffers;             // [[buffer(i)]]
  std::vector<size_t> buffer_bytes;       // sizes, checked against `constant T&` parameters
  std::vector<uint32_t> threadgroup_bytes;  // [[threadgroup(i)]] (setThreadgroupMemoryLength)
};

// Runs `kernel` over the grid. Returns "" on success, else what went wrong (a binding that does
// not match the kernel's parameters, a barrier not reached by every thread, ...).
std::string Launch(const KernelEntry& kernel, const LaunchConfig& config);

// In which order the scheduler resumes runnable simulated threads (and runs threadgroups):
// the kernels must give the same results under every order, as on a GPU.
enum class Schedule { kForward, kReverse, kShuffle };
struct Options {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  uint32_t simd_width = 32;  // Apple GPUs: 32
};
void SetOptions(const Options& options);
Options GetOptions();

// ---- called from kernel code (through metal_compat.h) ----------------------------------------

// Blocks the calling simulated thread until every thread of its threadgroup that has not
// returned arrives at a barrier at the same source location.
void ThreadgroupBarrier(const char* file, uint32_t line);
// Deposits `bytes` of `value` for the caller's lane, waits for every live lane of the
// SIMD-group, and returns the lanes' deposits (16 bytes per lane) and the mask of live lanes.
const unsigned char* SimdExchange(const void* value, size_t bytes, uint64_t* active,
                                  const char* file, uint32_t line);
// The builtins of the calling simulated thread.
const ThreadIds& CurrentThread();
constexpr size_t kSimdSlotBytes = 16;
constexpr uint32_t kMaxSimdWidth = 64;
// Byte pattern of memory nobody wrote: threadgroup memory, scratch, unread lanes (a NaN).
constexpr unsigned char kPoisonByte = 0xFF;

}  // namespace jaxmps::metal_emu
