// Shared by the Metal FFI handlers (norm_targets.cc, conv_targets.cc): target naming, the
// handler buffers as plan io, and the argument checks specific to the Metal backend.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>
#include <vector>

#include "runner.h"

// The Metal library registers jaxmps_<kernel>_metal; the emulator library _metal_emu.
#ifndef JAXMPS_METAL_TARGET_SUFFIX
#define JAXMPS_METAL_TARGET_SUFFIX "_metal"
#endif
#define JAXMPS_METAL_TARGET(kernel) "jaxmps_" kernel JAXMPS_METAL_TARGET_SUFFIX

namespace jaxmps::metal {

// The handler's XLA buffers as plan io buffers (host memory, unified with the GPU's).
inline IoBuffer In(const ffi::AnyBuffer& b) { return {b.untyped_data(), b.size_bytes(), false}; }
inline IoBuffer Out(ffi::Result<ffi::AnyBuffer>& b) {
  return {b->untyped_data(), b->size_bytes(), true};
}

// An image argument: 4-d, fewer than 2^31 elements, stored as float32, float16 or bfloat16
// (Apple GPUs have no float64).
inline ffi::Error ReadImage(std::string_view op, std::string_view arg, const ffi::AnyBuffer& x,
                            int64_t channels_last, ImageGeometry* g, Storage* storage) {
  JAXMPS_RETURN_IF_ERROR(DispatchFloat(op, arg, x.element_type(), {.f64 = false}, [&](auto tag) {
    constexpr ffi::DataType dt = decltype(tag)::value;
    *storage = dt == ffi::DataType::F16    ? Storage::kFloat16
               : dt == ffi::DataType::BF16 ? Storage::kBFloat16
                                           : Storage::kFloat32;
    return ffi::Error::Success();
  }));
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(op, arg, x, channels_last != 0, &s));
  if (uint64_t(s.size()) > kMaxElements) {
    return InvalidArgument(op, arg, " must have fewer than 2^31 elements on the Metal backend, ",
                           "got ", s.size());
  }
  *g = MakeGeometry(uint32_t(s.n), uint32_t(s.c), uint32_t(s.h), uint32_t(s.w),
                    channels_last != 0);
  return ffi::Error::Success();
}

// Parameters, statistics and weights are float32 for every Metal data dtype: handlers pass
// kMetalParamData as the data dtype to jaxmps::CheckParams.
constexpr ffi::DataType kMetalParamData = ffi::DataType::F32;

}  // namespace jaxmps::metal
