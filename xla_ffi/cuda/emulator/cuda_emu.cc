// The CUDA runtime calls the jaxmps CUDA sources make, defined for the host emulator
// (cuda_emu.h): no device, a table of H100/A100-like limits, synchronous memsets, no errors.
#include "emulator/cuda_emu.h"

#include <iterator>

namespace {
bool refuse_cooperative = false;  // jaxmps_cuda_emu_refuse_cooperative
}  // namespace

bool jaxmps::cuda::emu::CooperativeRefused() { return refuse_cooperative; }

extern "C" {

cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
const char* cudaGetErrorString(cudaError_t) { return "no error"; }
// Emulated devices: 0 is an H100 (132 SMs, 227 KiB of opt-in shared memory per block,
// compute capability 9.0: thread-block clusters); 1 is the same H100 with 16 KiB per block, so
// that tiny test images already overflow one CTA (cluster and chunked statistics paths);
// 2 is an A100-like compute capability 8.0 (no clusters).
// 3 (batch-norm L2 slicing, tests/test_cuda_emu_batch_slices.py): device 1 with a 1 MiB L2
// and no SM count (0: the planner's rule that a slice must fill the SMs always passes), so
// that tiny chunked statistics sweeps are cut into L2 slices.
// 4 (grid-resident statistics, tests/test_cuda_emu_stats.py): an H100 cut down to 4 SMs of
// 64 KiB that launches cooperative kernels, so the resident path's whole grid (4 CTAs of 512
// threads, one per SM) runs on host threads. The others report no cooperative launches: their
// statistics sweeps keep the fused, cluster and chunked paths their tests are about.
// 5 (resident waves, tests/test_cuda_emu_stats.py): device 4 with a 64 KiB L2, so that tiny
// instance-norm sweeps already overflow it and the resident path's L2 rule plans waves.
namespace {
struct EmulatedDevice {
  int sms, smem_per_block, major, minor, l2_bytes, cooperative;
};
constexpr EmulatedDevice kDevices[] = {{132, 227 << 10, 9, 0, 50 << 20, 0},
                                       {132, 16 << 10, 9, 0, 50 << 20, 0},
                                       {108, 163 << 10, 8, 0, 40 << 20, 0},
                                       {0, 16 << 10, 9, 0, 1 << 20, 0},
                                       {4, 64 << 10, 9, 0, 50 << 20, 1},
                                       {4, 64 << 10, 9, 0, 64 << 10, 1}};
int current_device = 0;
}  // namespace

// Test hook: refuse (1) or run (0) cooperative launches, as a driver that cannot co-schedule
// the grid does; returns the previous setting.
__attribute__((visibility("default"))) int jaxmps_cuda_emu_refuse_cooperative(int refuse) {
  const bool previous = refuse_cooperative;
  refuse_cooperative = refuse != 0;
  return previous ? 1 : 0;
}

// Test hook: makes `device` current (as cudaSetDevice); returns the previous one, or -1.
__attribute__((visibility("default"))) int jaxmps_cuda_emu_select_device(int device) {
  if (device < 0 || device >= int(std::size(kDevices))) return -1;
  const int previous = current_device;
  current_device = device;
  return previous;
}

cudaError_t cudaGetDevice(int* device) {
  *device = current_device;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const EmulatedDevice& d = kDevices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; break;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; break;
    case cudaDevAttrCooperativeLaunch: *value = d.cooperative; break;
    default: *value = d.smem_per_block; break;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  }
  return cudaSuccess;
}
// One cluster fits whenever its blocks' shared memory does (the emulator runs clusters one at
// a time); compute capability below 9.0 has no clusters.
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void*,
                                           const cudaLaunchConfig_t* config) {
  const EmulatedDevice& d = kDevices[current_device];
  *clusters = d.major >= 9 && config->dynamicSmemBytes <= size_t(d.smem_per_block) ? 1 : 0;
  return cudaSuccess;
}
// One block per SM whenever its shared memory fits (what the resident path asks for).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int,
                                                          size_t smem) {
  *blocks = smem <= size_t(kDevices[current_device].smem_per_block) ? 1 : 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* data, int byte, size_t bytes, cudaStream_t) {
  std::memset(data, byte, bytes);
  return cudaSuccess;
}

}  // extern "C"
