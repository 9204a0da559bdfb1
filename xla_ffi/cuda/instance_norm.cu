// Typed XLA FFI handlers (API 0.1) for MPSCNNInstanceNormalization on CUDA:
// targets jaxmps_instance_norm_forward and jaxmps_instance_norm_gradient, NHWC and NCHW.
#include "stats.cuh"

namespace jaxmps::cuda {
namespace {

constexpr std::string_view kOp = "instance_norm";

// Forward: per (image, channel) mean and biased variance over H*W, y = (x - mean) * rstd *
// gamma + beta; mean and rstd (N, C) are saved for the gradient, as MPS's gradient state does.
ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator scratch, double epsilon,
                   int64_t channels_last, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                   ffi::AnyBuffer beta, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> rstd) {
  return RunStatsForward(kOp, /*per_image=*/true, stream, scratch, epsilon, channels_last, x,
                         gamma, beta, *y, *mean, *rstd);
}

// Gradient (exact VJP): per (image, channel) sums of g and g * xhat, dx = gamma * rstd *
// (g - sum_g / M - xhat * sum_gx / M); dgamma, dbeta are those sums added over the batch.
ffi::Error Gradient(cudaStream_t stream, ffi::ScratchAllocator scratch, int64_t channels_last,
                    ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                    ffi::AnyBuffer mean, ffi::AnyBuffer rstd, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dgamma, ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, x.element_type(), {{"gamma", &gamma}}, {s.c}));
  JAXMPS_RETURN_IF_ERROR(
      CheckParams(kOp, x.element_type(), {{"mean", &mean}, {"rstd", &rstd}}, {s.n, s.c}));
  return RunStatsGradient(kOp, /*per_image=*/true, stream, scratch, s, dy, x, *dx, *dgamma,
                          *dbeta, [&](auto& gp, auto tag) {
                            using A = typename Types<decltype(tag)>::Acc;
                            gp.gamma = static_cast<const A*>(gamma.untyped_data());
                            gp.mean = static_cast<const A*>(mean.untyped_data());
                            gp.second = static_cast<const A*>(rstd.untyped_data());
                            gp.second_is_rstd = true;
                          });
}

}  // namespace
}  // namespace jaxmps::cuda

JAXMPS_FFI_TARGET("jaxmps_instance_norm_forward", JaxmpsInstanceNormForwardCuda,
                  jaxmps::cuda::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // beta: (C,)
                      .Ret<xla::ffi::AnyBuffer>()      // y: like x
                      .Ret<xla::ffi::AnyBuffer>()      // mean: (N, C)
                      .Ret<xla::ffi::AnyBuffer>());    // rstd: (N, C)

JAXMPS_FFI_TARGET("jaxmps_instance_norm_gradient", JaxmpsInstanceNormGradientCuda,
                  jaxmps::cuda::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (N, C)
                      .Arg<xla::ffi::AnyBuffer>()      // rstd: (N, C)
                      .Ret<xla::ffi::AnyBuffer>()      // dx: like x
                      .Ret<xla::ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // dbeta: (C,)
