// Shared by the three CPU convolution kernels (conv2d_forward, conv2d_data_gradient,
// conv2d_weights_gradient): the problem geometry built from the attributes, buffer checks.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "conv_gemm.h"
#include "cpu_types.h"
#include "jaxmps/conv_attrs.h"
#include "parallel.h"

namespace jaxmps::cpu {

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

// Fills `p` from the attributes, the image x (N, H, W, C) and the weights shape
// (O, KH, KW, C/G); checks groups and channel counts agree.
template <int Kind>
ffi::Error MakeProblem(std::string_view op, const ConvAttrs<Kind>& a, const ImageShape& x,
                       int64_t out_channels, int64_t kh, int64_t kw, int64_t ig, int64_t out_h,
                       int64_t out_w, ConvProblem* p) {
  JAXMPS_RETURN_IF_ERROR(CheckConvGeometry(op, a));
  JAXMPS_RETURN_IF_ERROR(CheckConvChannels(op, a.groups, x.c, out_channels, ig));
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

// Floor division and the matching remainder (for negative pads).
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

}  // namespace jaxmps::cpu
