// Shared by every backend's convolution handlers (CPU, Metal host, ...): the attribute structs of
// the three conv kernels, their XLA FFI decoding, and the geometry/channel checks they all apply.
#pragma once

#include <cstdint>
#include <string_view>

#include "jaxmps/ffi_common.h"

namespace jaxmps {

// Attributes of each kernel (KERNELS.md "Convolution family"): the geometry plus the size of
// the kernel's image or weights output, named size_h/size_w here (output_h/w, input_h/w or
// kernel_h/w at the FFI boundary). Kind only makes the three attribute sets distinct types, so
// each binds its own attribute names.
template <int Kind>
struct ConvAttrs {
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, groups, channels_last;
  int64_t size_h, size_w;
};
using ConvForwardAttrs = ConvAttrs<0>;
using ConvDataGradientAttrs = ConvAttrs<1>;
using ConvWeightsGradientAttrs = ConvAttrs<2>;

// Strides, dilation, groups and the output size must be positive (pads may be any value).
template <int Kind>
ffi::Error CheckConvGeometry(std::string_view op, const ConvAttrs<Kind>& a) {
  if (a.stride_h < 1 || a.stride_w < 1) {
    return InvalidArgument(op, "strides must be positive, got (", a.stride_h, ", ", a.stride_w,
                           ")");
  }
  if (a.dilation_h < 1 || a.dilation_w < 1) {
    return InvalidArgument(op, "dilation must be positive, got (", a.dilation_h, ", ",
                           a.dilation_w, ")");
  }
  if (a.groups < 1) return InvalidArgument(op, "groups must be positive, got ", a.groups);
  if (a.size_h < 1 || a.size_w < 1) {
    return InvalidArgument(op, "output size must be positive, got ", a.size_h, "x", a.size_w);
  }
  return ffi::Error::Success();
}

// `groups` (>= 1, checked by CheckConvGeometry) must split the input and output channels, with
// weights of ig = I/groups input channels.
inline ffi::Error CheckConvChannels(std::string_view op, int64_t groups, int64_t in_channels,
                                    int64_t out_channels, int64_t ig) {
  if (in_channels % groups || out_channels % groups || ig * groups != in_channels) {
    return InvalidArgument(op, "groups (", groups, ") must divide the input channels (",
                           in_channels, ") and output channels (", out_channels,
                           ") with weights of I/groups = ", ig, " channels");
  }
  return ffi::Error::Success();
}

}  // namespace jaxmps

// Attribute decoding: the FFI passes attributes by name; each kernel binds its own set.
#define JAXMPS_CONV_GEOMETRY_MEMBERS                                                       \
  ::xla::ffi::StructMember<int64_t>("stride_h"), ::xla::ffi::StructMember<int64_t>("stride_w"), \
      ::xla::ffi::StructMember<int64_t>("dilation_h"),                                     \
      ::xla::ffi::StructMember<int64_t>("dilation_w"),                                     \
      ::xla::ffi::StructMember<int64_t>("pad_top"),                                        \
      ::xla::ffi::StructMember<int64_t>("pad_left"),                                       \
      ::xla::ffi::StructMember<int64_t>("groups"),                                         \
      ::xla::ffi::StructMember<int64_t>("channels_last")

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::ConvForwardAttrs, JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("output_h"),
                                      ::xla::ffi::StructMember<int64_t>("output_w"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::ConvDataGradientAttrs,
                                      JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("input_h"),
                                      ::xla::ffi::StructMember<int64_t>("input_w"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::ConvWeightsGradientAttrs,
                                      JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("kernel_h"),
                                      ::xla::ffi::StructMember<int64_t>("kernel_w"));
