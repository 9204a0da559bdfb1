// The CUDA runtime calls the jaxmps CUDA sources make, defined for the host emulator
// (cuda_emu.h): no device, an H100-like limits table, synchronous memsets, no errors.
#include "emulator/cuda_emu.h"

extern "C" {

cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
const char* cudaGetErrorString(cudaError_t) { return "no error"; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  // 132 SMs and 227 KiB of opt-in shared memory per block, as an H100.
  *value = attr == cudaDevAttrMultiProcessorCount ? 132 : 227 << 10;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* data, int byte, size_t bytes, cudaStream_t) {
  std::memset(data, byte, bytes);
  return cudaSuccess;
}

}  // extern "C"
