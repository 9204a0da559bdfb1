// Typed XLA FFI handlers (API 0.1) for MPSCNNSpatialNormalization on CUDA:
// targets jaxmps_spatial_norm_forward and jaxmps_spatial_norm_gradient, NHWC and NCHW.
#include "window.cuh"

namespace jaxmps::cuda {
namespace {

constexpr std::string_view kOp = "spatial_norm";

// T = delta + alpha/N * S[X^2] over a kernel_h x kernel_w window (N = kh * kw), Y = X T^-beta.
template <bool kGrad>
ffi::Error Run(cudaStream_t stream, ffi::ScratchAllocator& scratch, int64_t kernel_h,
               int64_t kernel_w, double alpha, double beta, double delta, int64_t channels_last,
               const ffi::AnyBuffer* dy, const ffi::AnyBuffer& x, ffi::AnyBuffer& out) {
  JAXMPS_RETURN_IF_ERROR(CheckWindow(kOp, "kernel_h", kernel_h));
  JAXMPS_RETURN_IF_ERROR(CheckWindow(kOp, "kernel_w", kernel_w));
  const double n = double(kernel_h) * double(kernel_w);
  return RunWindowOp<kGrad>(
      kOp, stream, scratch, channels_last, dy, x, out,
      [&](auto zero, const ImageShape& s) {
        return SpatialWindowPlan<decltype(zero)>(s, int(kernel_h), int(kernel_w));
      },
      [&](auto zero) {
        using A = decltype(zero);
        return PowerNormPolicy<A>{A(alpha / n), NegPower<A>::Make(beta), A(delta),
                                  A(2.0 * alpha * beta / n)};
      });
}

ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator scratch, int64_t kernel_h,
                   int64_t kernel_w, double alpha, double beta, double delta,
                   int64_t channels_last, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  return Run<false>(stream, scratch, kernel_h, kernel_w, alpha, beta, delta, channels_last,
                    nullptr, x, *y);
}

ffi::Error Gradient(cudaStream_t stream, ffi::ScratchAllocator scratch, int64_t kernel_h,
                    int64_t kernel_w, double alpha, double beta, double delta,
                    int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                    ffi::Result<ffi::AnyBuffer> dx) {
  return Run<true>(stream, scratch, kernel_h, kernel_w, alpha, beta, delta, channels_last, &dy,
                   x, *dx);
}

}  // namespace
}  // namespace jaxmps::cuda

JAXMPS_FFI_TARGET("jaxmps_spatial_norm_forward", JaxmpsSpatialNormForwardCuda,
                  jaxmps::cuda::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_spatial_norm_gradient", JaxmpsSpatialNormGradientCuda,
                  jaxmps::cuda::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // dx: like x
