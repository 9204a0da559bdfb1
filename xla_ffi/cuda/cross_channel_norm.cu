// Typed XLA FFI handlers (API 0.1) for MPSCNNCrossChannelNormalization on CUDA: targets
// jaxmps_cross_channel_norm_forward and jaxmps_cross_channel_norm_gradient, NHWC and NCHW.
#include "lane_window.cuh"
#include "window.cuh"

namespace jaxmps::cuda {
namespace {

constexpr std::string_view kOp = "cross_channel_norm";

// L = delta + alpha/N * sum of X^2 over the channel window (N = kernel_size), Y = X L^-beta:
// the spatial norm's math with the window across channels. NHWC rows of channels go to the
// lane kernel when a row fits a warp's lanes and the window one neighbouring vector each side,
// else to the row kernel; everything else (NCHW, very long windows) to the tile engine.
template <bool kGrad>
ffi::Error Run(cudaStream_t stream, ffi::ScratchAllocator& scratch, int64_t kernel_size,
               double alpha, double beta, double delta, int64_t channels_last,
               const ffi::AnyBuffer* dy, const ffi::AnyBuffer& x, ffi::AnyBuffer& out) {
  JAXMPS_RETURN_IF_ERROR(CheckWindow(kOp, "kernel_size", kernel_size));
  const double n = double(kernel_size);
  auto make_policy = [&](auto zero) {
    using A = decltype(zero);
    return PowerNormPolicy<A>{A(alpha / n), NegPower<A>::Make(beta), A(delta),
                                  A(2.0 * alpha * beta / n)};
  };
  if (channels_last) {  // channels are contiguous rows: the row kernel when a row fits
    ImageShape s;
    JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
    if (dy != nullptr) JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", *dy, "x", x));
    bool ran = false;
    JAXMPS_RETURN_IF_ERROR(DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
      using T = typename Types<decltype(tag)>::T;
      using A = typename Types<decltype(tag)>::Acc;
      if (s.size() == 0) return ran = true, ffi::Error::Success();
      const T* xp = static_cast<const T*>(x.untyped_data());
      const T* dyp = dy != nullptr ? static_cast<const T*>(dy->untyped_data()) : nullptr;
      T* outp = static_cast<T*>(out.untyped_data());
      const auto policy = make_policy(A(0));
      JAXMPS_RETURN_IF_ERROR((TryLaneWindow<T, A, PowerNormPolicy<A>, kGrad>(
          kOp, stream, s.n * s.pixels(), s.c, int(kernel_size), policy, xp, dyp, outp, &ran)));
      if (ran) return ffi::Error::Success();
      return LaunchRowWindow<T, A, PowerNormPolicy<A>, kGrad>(
          kOp, stream, s, int(kernel_size), policy, xp, dyp, outp, &ran);
    }));
    if (ran) return ffi::Error::Success();
  }
  return RunWindowOp<kGrad>(
      kOp, stream, scratch, channels_last, dy, x, out,
      [&](auto zero, const ImageShape& s) {
        return ChannelWindowPlan<decltype(zero)>(s, int(kernel_size));
      },
      make_policy);
}

ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator scratch, int64_t kernel_size,
                   double alpha, double beta, double delta, int64_t channels_last,
                   ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  return Run<false>(stream, scratch, kernel_size, alpha, beta, delta, channels_last, nullptr, x,
                    *y);
}

ffi::Error Gradient(cudaStream_t stream, ffi::ScratchAllocator scratch, int64_t kernel_size,
                    double alpha, double beta, double delta, int64_t channels_last,
                    ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> dx) {
  return Run<true>(stream, scratch, kernel_size, alpha, beta, delta, channels_last, &dy, x, *dx);
}

}  // namespace
}  // namespace jaxmps::cuda

#ifdef JAXMPS_CUDA_EMU
// Emulator library only (tests): how many times the lane kernel, and a window kernel with a
// compiled beta form (any window op), were launched, so the tests can tell which path a call
// took.
extern "C" __attribute__((visibility("default"))) int64_t jaxmps_cuda_emu_lane_window_launches() {
  return jaxmps::cuda::lane_window_launches.load();
}
extern "C" __attribute__((visibility("default"))) int64_t
jaxmps_cuda_emu_compiled_beta_launches() {
  return jaxmps::cuda::compiled_beta_launches.load();
}
#endif

JAXMPS_FFI_TARGET("jaxmps_cross_channel_norm_forward", JaxmpsCrossChannelNormForwardCuda,
                  jaxmps::cuda::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_cross_channel_norm_gradient", JaxmpsCrossChannelNormGradientCuda,
                  jaxmps::cuda::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // dx: like x
