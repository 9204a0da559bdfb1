// Typed XLA FFI handlers (API 0.1) of the normalization family for the Metal backend: targets
// jaxmps_<kernel>_metal (_metal_emu in the emulator); validation, plan, RunPlan.
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>

#include "handler_common.h"

namespace jaxmps::metal {
namespace {

ffi::Error CheckWindow(std::string_view op, std::string_view name, int64_t k) {
  if (k < 1 || k > int64_t(kMaxElements)) {
    return InvalidArgument(op, name, " must be a positive integer, got ", k);
  }
  return ffi::Error::Success();
}

// ---- instance norm ---------------------------------------------------------------------------

constexpr std::string_view kInstance = "instance_norm";

ffi::Error InstanceNormForward(double epsilon, int64_t channels_last, ffi::AnyBuffer x,
                               ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                               ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                               ffi::Result<ffi::AnyBuffer> rstd) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kInstance, "x", x, channels_last, &g, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kInstance, kMetalParamData, {{"gamma", &gamma}, {"beta", &beta}}, {g.c}));
  return RunPlan(kInstance, PlanNormForward(s, g, true, float(epsilon)),
                 {In(x), In(gamma), In(beta), Out(y), Out(mean), Out(rstd)});
}

ffi::Error InstanceNormGradient(int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                                ffi::AnyBuffer gamma, ffi::AnyBuffer mean, ffi::AnyBuffer rstd,
                                ffi::Result<ffi::AnyBuffer> dx,
                                ffi::Result<ffi::AnyBuffer> dgamma,
                                ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kInstance, "x", x, channels_last, &g, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kInstance, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kInstance, kMetalParamData, {{"gamma", &gamma}}, {g.c}));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kInstance, kMetalParamData, {{"mean", &mean}, {"rstd", &rstd}}, {g.n, g.c}));
  return RunPlan(kInstance, PlanInstanceNormGradient(s, g),
                 {In(dy), In(x), In(gamma), In(mean), In(rstd), Out(dx), Out(dgamma),
                  Out(dbeta)});
}

// ---- batch norm ------------------------------------------------------------------------------

constexpr std::string_view kBatch = "batch_norm";

ffi::Error BatchNormForward(double epsilon, int64_t channels_last, ffi::AnyBuffer x,
                            ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                            ffi::Result<ffi::AnyBuffer> variance) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kBatch, "x", x, channels_last, &g, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kBatch, kMetalParamData, {{"gamma", &gamma}, {"beta", &beta}}, {g.c}));
  return RunPlan(kBatch, PlanNormForward(s, g, false, float(epsilon)),
                 {In(x), In(gamma), In(beta), Out(y), Out(mean), Out(variance)});
}

ffi::Error BatchNormGradient(double epsilon, int64_t channels_last, ffi::AnyBuffer dy,
                             ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer mean,
                             ffi::AnyBuffer variance, ffi::AnyBuffer dmean,
                             ffi::AnyBuffer dvariance, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Result<ffi::AnyBuffer> dgamma,
                             ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kBatch, "x", x, channels_last, &g, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kBatch, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kBatch, kMetalParamData,
                                     {{"gamma", &gamma}, {"mean", &mean}, {"variance", &variance},
                                      {"dmean", &dmean}, {"dvariance", &dvariance}},
                                     {g.c}));
  return RunPlan(kBatch, PlanBatchNormGradient(s, g, float(epsilon)),
                 {In(dy), In(x), In(gamma), In(mean), In(variance), In(dmean), In(dvariance),
                  Out(dx), Out(dgamma), Out(dbeta)});
}

ffi::Error BatchNormInference(double epsilon, int64_t channels_last, ffi::AnyBuffer x,
                              ffi::AnyBuffer gamma, ffi::AnyBuffer beta, ffi::AnyBuffer mean,
                              ffi::AnyBuffer variance, ffi::Result<ffi::AnyBuffer> y) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadImage(kBatch, "x", x, channels_last, &g, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(
      kBatch, kMetalParamData,
      {{"gamma", &gamma}, {"beta", &beta}, {"mean", &mean}, {"variance", &variance}}, {g.c}));
  return RunPlan(kBatch, PlanBatchNormInference(s, g, float(epsilon)),
                 {In(x), In(gamma), In(beta), In(mean), In(variance), Out(y)});
}

// ---- window norms ----------------------------------------------------------------------------

WindowParams MakeWindow(const ImageGeometry& g, int64_t kh, int64_t kw, int64_t kc,
                        double alpha, double beta, double delta, double p0 = 0, double pm = 0,
                        double ps = 0) {
  return WindowParams{g,           uint32_t(kh), uint32_t(kw), uint32_t(kc),
                      float(alpha), float(beta), float(delta), float(p0),
                      float(pm),    float(ps)};
}

// Reads x, checks dy (when given) against it and the window sizes.
ffi::Error ReadWindowed(std::string_view op, const ffi::AnyBuffer& x, const ffi::AnyBuffer* dy,
                        int64_t channels_last,
                        std::initializer_list<std::pair<const char*, int64_t>> sizes,
                        ImageGeometry* g, Storage* s) {
  JAXMPS_RETURN_IF_ERROR(ReadImage(op, "x", x, channels_last, g, s));
  if (dy) JAXMPS_RETURN_IF_ERROR(CheckSameAs(op, "dy", *dy, "x", x));
  for (auto [name, k] : sizes) JAXMPS_RETURN_IF_ERROR(CheckWindow(op, name, k));
  return ffi::Error::Success();
}

constexpr std::string_view kSpatial = "spatial_norm";

ffi::Error SpatialNormForward(int64_t kernel_h, int64_t kernel_w, double alpha, double beta,
                              double delta, int64_t channels_last, ffi::AnyBuffer x,
                              ffi::Result<ffi::AnyBuffer> y) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kSpatial, x, nullptr, channels_last,
                                      {{"kernel_h", kernel_h}, {"kernel_w", kernel_w}}, &g, &s));
  const WindowParams p = MakeWindow(g, kernel_h, kernel_w, 1, alpha, beta, delta);
  return RunPlan(kSpatial, PlanWindowNormForward(s, p), {In(x), Out(y)});
}

ffi::Error SpatialNormGradient(int64_t kernel_h, int64_t kernel_w, double alpha, double beta,
                               double delta, int64_t channels_last, ffi::AnyBuffer dy,
                               ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> dx) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kSpatial, x, &dy, channels_last,
                                      {{"kernel_h", kernel_h}, {"kernel_w", kernel_w}}, &g, &s));
  const WindowParams p = MakeWindow(g, kernel_h, kernel_w, 1, alpha, beta, delta);
  return RunPlan(kSpatial, PlanWindowNormGradient(s, p), {In(dy), In(x), Out(dx)});
}

constexpr std::string_view kCrossChannel = "cross_channel_norm";

ffi::Error CrossChannelNormForward(int64_t kernel_size, double alpha, double beta, double delta,
                                   int64_t channels_last, ffi::AnyBuffer x,
                                   ffi::Result<ffi::AnyBuffer> y) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kCrossChannel, x, nullptr, channels_last,
                                      {{"kernel_size", kernel_size}}, &g, &s));
  const WindowParams p = MakeWindow(g, 1, 1, kernel_size, alpha, beta, delta);
  return RunPlan(kCrossChannel, PlanWindowNormForward(s, p), {In(x), Out(y)});
}

ffi::Error CrossChannelNormGradient(int64_t kernel_size, double alpha, double beta, double delta,
                                    int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                                    ffi::Result<ffi::AnyBuffer> dx) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kCrossChannel, x, &dy, channels_last,
                                      {{"kernel_size", kernel_size}}, &g, &s));
  const WindowParams p = MakeWindow(g, 1, 1, kernel_size, alpha, beta, delta);
  return RunPlan(kCrossChannel, PlanWindowNormGradient(s, p), {In(dy), In(x), Out(dx)});
}

constexpr std::string_view kLocalContrast = "local_contrast_norm";

ffi::Error LocalContrastNormForward(int64_t kernel_h, int64_t kernel_w, double alpha,
                                    double beta, double delta, double p0, double pm, double ps,
                                    int64_t channels_last, ffi::AnyBuffer x,
                                    ffi::Result<ffi::AnyBuffer> y) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kLocalContrast, x, nullptr, channels_last,
                                      {{"kernel_h", kernel_h}, {"kernel_w", kernel_w}}, &g, &s));
  const WindowParams p = MakeWindow(g, kernel_h, kernel_w, 1, alpha, beta, delta, p0, pm, ps);
  return RunPlan(kLocalContrast, PlanLocalContrastNormForward(s, p), {In(x), Out(y)});
}

ffi::Error LocalContrastNormGradient(int64_t kernel_h, int64_t kernel_w, double alpha,
                                     double beta, double delta, double p0, double pm, double ps,
                                     int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                                     ffi::Result<ffi::AnyBuffer> dx) {
  ImageGeometry g;
  Storage s;
  JAXMPS_RETURN_IF_ERROR(ReadWindowed(kLocalContrast, x, &dy, channels_last,
                                      {{"kernel_h", kernel_h}, {"kernel_w", kernel_w}}, &g, &s));
  const WindowParams p = MakeWindow(g, kernel_h, kernel_w, 1, alpha, beta, delta, p0, pm, ps);
  return RunPlan(kLocalContrast, PlanLocalContrastNormGradient(s, p),
                 {In(dy), In(x), Out(dx)});
}

}  // namespace
}  // namespace jaxmps::metal

// ---- registration ----------------------------------------------------------------------------

namespace ffi = xla::ffi;

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("instance_norm_forward"), JaxmpsInstanceNormForwardMetal,
                  jaxmps::metal::InstanceNormForward,
                  ffi::Ffi::Bind()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<ffi::AnyBuffer>()      // beta: (C,)
                      .Ret<ffi::AnyBuffer>()      // y: like x
                      .Ret<ffi::AnyBuffer>()      // mean: (N, C)
                      .Ret<ffi::AnyBuffer>());    // rstd: (N, C)

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("instance_norm_gradient"),
                  JaxmpsInstanceNormGradientMetal, jaxmps::metal::InstanceNormGradient,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // dy: like x
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<ffi::AnyBuffer>()      // mean: (N, C)
                      .Arg<ffi::AnyBuffer>()      // rstd: (N, C)
                      .Ret<ffi::AnyBuffer>()      // dx: like x
                      .Ret<ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<ffi::AnyBuffer>());    // dbeta: (C,)

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("batch_norm_forward"), JaxmpsBatchNormForwardMetal,
                  jaxmps::metal::BatchNormForward,
                  ffi::Ffi::Bind()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<ffi::AnyBuffer>()      // beta: (C,)
                      .Ret<ffi::AnyBuffer>()      // y: like x
                      .Ret<ffi::AnyBuffer>()      // mean: (C,)
                      .Ret<ffi::AnyBuffer>());    // variance: (C,), biased

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("batch_norm_gradient"), JaxmpsBatchNormGradientMetal,
                  jaxmps::metal::BatchNormGradient,
                  ffi::Ffi::Bind()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // dy: like x
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<ffi::AnyBuffer>()      // variance: (C,)
                      .Arg<ffi::AnyBuffer>()      // dmean: (C,)
                      .Arg<ffi::AnyBuffer>()      // dvariance: (C,)
                      .Ret<ffi::AnyBuffer>()      // dx: like x
                      .Ret<ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<ffi::AnyBuffer>());    // dbeta: (C,)

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("batch_norm_inference"), JaxmpsBatchNormInferenceMetal,
                  jaxmps::metal::BatchNormInference,
                  ffi::Ffi::Bind()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<ffi::AnyBuffer>()      // beta: (C,)
                      .Arg<ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<ffi::AnyBuffer>()      // variance: (C,)
                      .Ret<ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("spatial_norm_forward"), JaxmpsSpatialNormForwardMetal,
                  jaxmps::metal::SpatialNormForward,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("spatial_norm_gradient"), JaxmpsSpatialNormGradientMetal,
                  jaxmps::metal::SpatialNormGradient,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // dy: like x
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // dx: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("local_contrast_norm_forward"),
                  JaxmpsLocalContrastNormForwardMetal, jaxmps::metal::LocalContrastNormForward,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<double>("p0")
                      .Attr<double>("pm")
                      .Attr<double>("ps")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("local_contrast_norm_gradient"),
                  JaxmpsLocalContrastNormGradientMetal, jaxmps::metal::LocalContrastNormGradient,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<double>("p0")
                      .Attr<double>("pm")
                      .Attr<double>("ps")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // dy: like x
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // dx: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("cross_channel_norm_forward"),
                  JaxmpsCrossChannelNormForwardMetal, jaxmps::metal::CrossChannelNormForward,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET(JAXMPS_METAL_TARGET("cross_channel_norm_gradient"),
                  JaxmpsCrossChannelNormGradientMetal, jaxmps::metal::CrossChannelNormGradient,
                  ffi::Ffi::Bind()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<ffi::AnyBuffer>()      // dy: like x
                      .Arg<ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<ffi::AnyBuffer>());    // dx: like x
