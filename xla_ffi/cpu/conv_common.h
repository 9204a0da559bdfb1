// Shared by the three CPU convolution kernels (conv2d_forward, conv2d_data_gradient,
// conv2d_weights_gradient): FFI attribute structs, the problem geometry and its validation.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "conv_gemm.h"
#include "cpu_types.h"
#include "parallel.h"

namespace jaxmps::cpu {

// Attributes of each kernel (KERNELS.md "Convolution family"): the geometry plus the size of
// the kernel's image or weights output, named size_h/size_w here (output_h/w, input_h/w or
// kernel_h/w at the FFI boundary). Kind only makes the three attribute sets distinct types.
template <int Kind>
struct ConvAttrs {
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, groups, channels_last;
  int64_t size_h, size_w;
};
using ConvForwardAttrs = ConvAttrs<0>;
using ConvDataGradientAttrs = ConvAttrs<1>;
using ConvWeightsGradientAttrs = ConvAttrs<2>;

// One convolution as every kernel sees it: x (N, H, W, C) -> y (N, OH, OW, O) with weights
// (O, KH, KW, C/G). Strides of the two images come from ImageShape (either layout).
struct ConvProblem {
  ImageShape x, y;
  int64_t kh = 0, kw = 0, groups = 1, ig = 0, og = 0;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1, pad_top = 0, pad_left = 0;
  int64_t taps() const { return kh * kw; }
  int64_t depth() const { return kh * kw * ig; }  // reduction length of the forward
};

// A dense (N, H, W, C) image in the given layout.
inline ImageShape DenseImage(int64_t n, int64_t h, int64_t w, int64_t c, bool channels_last) {
  ImageShape s;
  s.n = n, s.h = h, s.w = w, s.c = c, s.channels_last = channels_last;
  if (channels_last) {
    s.sc = 1, s.sw = c, s.sh = w * c;
  } else {
    s.sw = 1, s.sh = w, s.sc = h * w;
  }
  s.sn = h * w * c;
  return s;
}

// Stores an accumulator value as T (rounding once for half types).
template <typename T, typename Acc>
inline void StoreAs(T* dst, Acc v) {
  if constexpr (std::is_same_v<T, Acc>) {
    *dst = v;
  } else {
    Store(dst, v);
  }
}

template <int Kind>
ffi::Error CheckGeometry(std::string_view op, const ConvAttrs<Kind>& a) {
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

// Fills `p` from the attributes, the image x (N, H, W, C) and the weights shape
// (O, KH, KW, C/G); checks groups and channel counts agree.
template <int Kind>
ffi::Error MakeProblem(std::string_view op, const ConvAttrs<Kind>& a, const ImageShape& x,
                       int64_t out_channels, int64_t kh, int64_t kw, int64_t ig, int64_t out_h,
                       int64_t out_w, ConvProblem* p) {
  JAXMPS_RETURN_IF_ERROR(CheckGeometry(op, a));
  if (x.c % a.groups || out_channels % a.groups || ig * a.groups != x.c) {
    return InvalidArgument(op, "groups (", a.groups, ") must divide the input channels (", x.c,
                           ") and output channels (", out_channels,
                           ") with weights of I/groups = ", ig, " channels");
  }
  p->x = x;
  p->y = DenseImage(x.n, out_h, out_w, out_channels, x.channels_last);
  p->kh = kh, p->kw = kw, p->groups = a.groups, p->ig = ig, p->og = out_channels / a.groups;
  p->stride_h = a.stride_h, p->stride_w = a.stride_w;
  p->dilation_h = a.dilation_h, p->dilation_w = a.dilation_w;
  p->pad_top = a.pad_top, p->pad_left = a.pad_left;
  return ffi::Error::Success();
}

// Checks an image buffer has exactly shape (n, h, w, c) in the problem's layout.
inline ffi::Error CheckImage(std::string_view op, std::string_view arg,
                             const ffi::AnyBuffer& buffer, const ImageShape& s) {
  return CheckShape(op, arg, buffer,
                    s.channels_last ? std::vector<int64_t>{s.n, s.h, s.w, s.c}
                                    : std::vector<int64_t>{s.n, s.c, s.h, s.w});
}

inline ffi::Error CheckParam(std::string_view op, std::string_view arg,
                             const ffi::AnyBuffer& buffer, ffi::DataType data,
                             std::vector<int64_t> shape) {
  JAXMPS_RETURN_IF_ERROR(CheckShape(op, arg, buffer, std::move(shape)));
  return CheckDtype(op, arg, buffer, ParamDtype(data));
}

// Reads the weights' (O, KH, KW, I/G) after checking rank and dtype.
inline ffi::Error ReadWeights(std::string_view op, const ffi::AnyBuffer& weights,
                              ffi::DataType data, int64_t dims[4]) {
  JAXMPS_RETURN_IF_ERROR(CheckRank(op, "weights", weights, 4));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(op, "weights", weights, ParamDtype(data)));
  for (int i = 0; i < 4; ++i) dims[i] = weights.dimensions()[i];
  return ffi::Error::Success();
}

// Packs rows [0, RoundUp(m, mr)) x depth [k0, k0 + kl) of an operand into MR-row panels
// (kl x MR each, k-major), for a depth made of segments of seg_len elements (k = s * seg_len +
// q: s a tap, q a channel): source(i, s) points at element q = 0 of row i's segment s (its
// elements `stride` apart) or is nullptr where the segment reads padding. Rows past m are 0.
// Contiguous segments (NHWC) are copied row by row; strided ones (NCHW: one plane per
// channel) depth step by depth step, so reads walk along image rows instead of jumping
// between planes (which also alias in the L1 cache when planes are 4 KiB multiples apart).
template <typename T, typename Acc, typename Source>
void PackSegments(int64_t mr, int64_t m, int64_t seg_len, int64_t stride, int64_t k0,
                  int64_t kl, Source&& source, Acc* dst) {
  if (stride != 1) {
    std::vector<const T*> rows(mr);
    for (int64_t i0 = 0; i0 < RoundUp(m, mr); i0 += mr) {
      Acc* panel = dst + i0 * kl;
      int64_t seg = k0 / seg_len, q = k0 % seg_len;
      for (int64_t kk = 0; kk < kl; ++kk) {
        if (kk == 0 || q == 0) {
          for (int64_t r = 0; r < mr; ++r) rows[r] = i0 + r < m ? source(i0 + r, seg) : nullptr;
        }
        Acc* out = panel + kk * mr;
        for (int64_t r = 0; r < mr; ++r) {
          out[r] = rows[r] != nullptr ? Acc(Load(rows[r][q * stride])) : Acc(0);
        }
        if (++q == seg_len) q = 0, ++seg;
      }
    }
    return;
  }
  for (int64_t i = 0; i < RoundUp(m, mr); ++i) {
    Acc* out_row = dst + (i / mr) * mr * kl + (i % mr);
    int64_t seg = k0 / seg_len, q0 = k0 % seg_len;
    for (int64_t kk = 0; kk < kl; ++seg, q0 = 0) {
      const int64_t count = std::min(seg_len - q0, kl - kk);
      const T* src = i < m ? source(i, seg) : nullptr;
      Acc* out = out_row + kk * mr;
      if (src != nullptr) {
        for (int64_t q = 0; q < count; ++q) out[q * mr] = Load(src[q0 + q]);
      } else {
        for (int64_t q = 0; q < count; ++q) out[q * mr] = Acc(0);
      }
      kk += count;
    }
  }
}

// Floor division and the matching remainder (for negative pads).
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

}  // namespace jaxmps::cpu

// Attribute decoding: the FFI passes attributes by name; each kernel binds its own set.
#define JAXMPS_CONV_GEOMETRY_MEMBERS                                                       \
  ::xla::ffi::StructMember<int64_t>("stride_h"), ::xla::ffi::StructMember<int64_t>("stride_w"), \
      ::xla::ffi::StructMember<int64_t>("dilation_h"),                                     \
      ::xla::ffi::StructMember<int64_t>("dilation_w"),                                     \
      ::xla::ffi::StructMember<int64_t>("pad_top"),                                        \
      ::xla::ffi::StructMember<int64_t>("pad_left"),                                       \
      ::xla::ffi::StructMember<int64_t>("groups"),                                         \
      ::xla::ffi::StructMember<int64_t>("channels_last")

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::cpu::ConvForwardAttrs, JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("output_h"),
                                      ::xla::ffi::StructMember<int64_t>("output_w"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::cpu::ConvDataGradientAttrs,
                                      JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("input_h"),
                                      ::xla::ffi::StructMember<int64_t>("input_w"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jaxmps::cpu::ConvWeightsGradientAttrs,
                                      JAXMPS_CONV_GEOMETRY_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("kernel_h"),
                                      ::xla::ffi::StructMember<int64_t>("kernel_w"));
