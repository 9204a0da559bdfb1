// Typed XLA FFI handlers (API 0.1) of the convolution family for the Metal backend: targets
// jaxmps_conv2d_*_metal (_metal_emu in the emulator); validation, plan, RunPlan.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "handler_common.h"
#include "jaxmps/conv_attrs.h"

namespace jaxmps::metal {
namespace {

// The shared geometry checks, plus a geometry small enough for the kernels' int32.
template <int Kind>
ffi::Error CheckGeometry(std::string_view op, const ConvAttrs<Kind>& a) {
  JAXMPS_RETURN_IF_ERROR(CheckConvGeometry(op, a));
  constexpr int64_t kLimit = int64_t(1) << 30;
  for (int64_t v : {a.stride_h, a.stride_w, a.dilation_h, a.dilation_w, a.pad_top, a.pad_left,
                    a.size_h, a.size_w}) {
    if (std::llabs(v) >= kLimit) {
      return InvalidArgument(op, "strides, dilation, pads and sizes must be below 2^30 in ",
                             "magnitude on the Metal backend, got ", v);
    }
  }
  return ffi::Error::Success();
}

// Weights (O, KH, KW, I/G), float32.
ffi::Error ReadWeights(std::string_view op, std::string_view arg, const ffi::AnyBuffer& weights,
                       int64_t dims[4]) {
  JAXMPS_RETURN_IF_ERROR(CheckRank(op, arg, weights, 4));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(op, arg, weights, ffi::DataType::F32));
  for (int i = 0; i < 4; ++i) dims[i] = weights.dimensions()[i];
  return ffi::Error::Success();
}

// The image result `arg` (N, H, W, C) of the data dtype `like`; fills its geometry.
ffi::Error ResultImage(std::string_view op, std::string_view arg, const ffi::AnyBuffer& buffer,
                       const ffi::AnyBuffer& like, int64_t n, int64_t c, int64_t h, int64_t w,
                       bool channels_last, ImageGeometry* g) {
  if (n * c * h * w > int64_t(kMaxElements)) {
    return InvalidArgument(op, arg, " must have fewer than 2^31 elements on the Metal backend");
  }
  JAXMPS_RETURN_IF_ERROR(CheckShape(op, arg, buffer,
                                    channels_last ? std::vector<int64_t>{n, h, w, c}
                                                  : std::vector<int64_t>{n, c, h, w}));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(op, arg, buffer, like.element_type()));
  *g = MakeGeometry(uint32_t(n), uint32_t(c), uint32_t(h), uint32_t(w), channels_last);
  return ffi::Error::Success();
}

// The convolution x (N, I, H, W) -> y (N, O, OH, OW) with (O, kh, kw, ig) weights.
template <int Kind>
ffi::Error MakeConv(std::string_view op, const ConvAttrs<Kind>& a, const ImageGeometry& x,
                    const ImageGeometry& y, int64_t kh, int64_t kw, int64_t ig,
                    ConvParams* p) {
  JAXMPS_RETURN_IF_ERROR(CheckConvChannels(op, a.groups, x.c, y.c, ig));
  if (uint64_t(y.c) * kh * kw * ig + y.c > kMaxElements) {
    return InvalidArgument(op, "weights must have fewer than 2^31 elements on the Metal backend");
  }
  *p = ConvParams{x,
                  y,
                  uint32_t(kh),
                  uint32_t(kw),
                  uint32_t(a.groups),
                  uint32_t(ig),
                  uint32_t(y.c / a.groups),
                  int32_t(a.stride_h),
                  int32_t(a.stride_w),
                  int32_t(a.dilation_h),
                  int32_t(a.dilation_w),
                  int32_t(a.pad_top),
                  int32_t(a.pad_left),
                  1};
  return ffi::Error::Success();
}

constexpr std::string_view kOp = "conv2d";

ffi::Error Forward(ConvForwardAttrs a, ffi::AnyBuffer x, ffi::AnyBuffer weights,
                   ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y) {
  ImageGeometry xg, yg;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kOp, "x", x, a.channels_last, &xg, &s));
  JAXMPS_RETURN_IF_ERROR(CheckGeometry(kOp, a));
  int64_t wd[4];
  JAXMPS_RETURN_IF_ERROR(ReadWeights(kOp, "weights", weights, wd));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, kMetalParamData, {{"bias", &bias}}, {wd[0]}));
  JAXMPS_RETURN_IF_ERROR(
      ResultImage(kOp, "y", *y, x, xg.n, wd[0], a.size_h, a.size_w, a.channels_last, &yg));
  ConvParams p;
  JAXMPS_RETURN_IF_ERROR(MakeConv(kOp, a, xg, yg, wd[1], wd[2], wd[3], &p));
  return RunPlan(kOp, PlanConv2dForward(s, p), {In(x), In(weights), In(bias), Out(y)});
}

ffi::Error DataGradient(ConvDataGradientAttrs a, ffi::AnyBuffer dy, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> dx) {
  ImageGeometry xg, yg;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kOp, "dy", dy, a.channels_last, &yg, &s));
  JAXMPS_RETURN_IF_ERROR(CheckGeometry(kOp, a));
  int64_t wd[4];
  JAXMPS_RETURN_IF_ERROR(ReadWeights(kOp, "weights", weights, wd));
  if (yg.c != wd[0]) {
    return InvalidArgument(kOp, "dy must have O = ", wd[0], " channels (weights ",
                           ShapeString(weights.dimensions()), "), got ", yg.c);
  }
  JAXMPS_RETURN_IF_ERROR(ResultImage(kOp, "dx", *dx, dy, yg.n, wd[3] * a.groups, a.size_h,
                                     a.size_w, a.channels_last, &xg));
  ConvParams p;
  JAXMPS_RETURN_IF_ERROR(MakeConv(kOp, a, xg, yg, wd[1], wd[2], wd[3], &p));
  return RunPlan(kOp, PlanConv2dDataGradient(s, p), {In(dy), In(weights), Out(dx)});
}

ffi::Error WeightsGradient(ConvWeightsGradientAttrs a, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                           ffi::Result<ffi::AnyBuffer> dweights,
                           ffi::Result<ffi::AnyBuffer> dbias) {
  ImageGeometry xg, yg;
  Storage s, dy_storage;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kOp, "x", x, a.channels_last, &xg, &s));
  JAXMPS_RETURN_IF_ERROR(ReadImage(kOp, "dy", dy, a.channels_last, &yg, &dy_storage));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(kOp, "dy", dy, x.element_type()));
  if (yg.n != xg.n) {
    return InvalidArgument(kOp, "dy must have the batch size of x (", xg.n, "), got ", yg.n);
  }
  JAXMPS_RETURN_IF_ERROR(CheckGeometry(kOp, a));
  const int64_t ig = xg.c / a.groups;
  ConvParams p;
  JAXMPS_RETURN_IF_ERROR(MakeConv(kOp, a, xg, yg, a.size_h, a.size_w, ig, &p));
  JAXMPS_RETURN_IF_ERROR(
      CheckParams(kOp, kMetalParamData, {{"dweights", &*dweights}}, {yg.c, a.size_h, a.size_w, ig}));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, kMetalParamData, {{"dbias", &*dbias}}, {yg.c}));
  return RunPlan(kOp, PlanConv2dWeightsGradient(s, p),
                 {In(dy), In(x), Out(dweights), Out(dbias)});
}

}  // namespace
}  // namespace jaxmps::metal

// ---- registration (attribute decoding: jaxmps/conv_attrs.h) ------------------------------------

namespace ffi = xla::ffi;

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("conv2d_forward"), JaxmpsConv2dForwardMetal,
                  jaxmps::metal::Forward,
                  ffi::Ffi::Bind()
                      .Attrs<jaxmps::ConvForwardAttrs>()  // geometry, output_h, output_w
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, I) or (N, I, H, W)
                      .Arg<ffi::AnyBuffer>()      // weights: (O, KH, KW, I/G), float32
                      .Arg<ffi::AnyBuffer>()      // bias: (O,), float32
                      .Ret<ffi::AnyBuffer>());    // y: (N, OH, OW, O) or (N, O, OH, OW)

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("conv2d_data_gradient"), JaxmpsConv2dDataGradientMetal,
                  jaxmps::metal::DataGradient,
                  ffi::Ffi::Bind()
                      .Attrs<jaxmps::ConvDataGradientAttrs>()  // geometry, input_h/w
                      .Arg<ffi::AnyBuffer>()      // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<ffi::AnyBuffer>()      // weights: (O, KH, KW, I/G), float32
                      .Ret<ffi::AnyBuffer>());    // dx: (N, H, W, I) or (N, I, H, W)

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("conv2d_weights_gradient"),
                  JaxmpsConv2dWeightsGradientMetal, jaxmps::metal::WeightsGradient,
                  ffi::Ffi::Bind()
                      .Attrs<jaxmps::ConvWeightsGradientAttrs>()  // geometry, kernel_h/w
                      .Arg<ffi::AnyBuffer>()      // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, I) or (N, I, H, W)
                      .Ret<ffi::AnyBuffer>()      // dweights: (O, KH, KW, I/G), float32
                      .Ret<ffi::AnyBuffer>());    // dbias: (O,), float32
