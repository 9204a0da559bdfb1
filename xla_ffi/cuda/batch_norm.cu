// Typed XLA FFI handlers (API 0.1) for MPSCNNBatchNormalization on CUDA: targets
// jaxmps_batch_norm_forward, jaxmps_batch_norm_gradient, jaxmps_batch_norm_inference.
#include "stats.cuh"

namespace jaxmps::cuda {
namespace {

constexpr std::string_view kOp = "batch_norm";

// Training forward: per-channel mean and biased variance over (N, H, W), y normalised with them.
ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator scratch, double epsilon,
                   int64_t channels_last, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                   ffi::AnyBuffer beta, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> variance) {
  return RunStatsForward(kOp, /*per_image=*/false, stream, scratch, epsilon, channels_last, x,
                         gamma, beta, *y, *mean, *variance);
}

// Gradient (exact VJP, including the cotangents dmean and dvariance of the returned batch
// statistics): dx = gamma rstd (g - sum_g/M - xhat sum_gx/M) + dmean/M + 2 dvariance (x-mean)/M.
ffi::Error Gradient(cudaStream_t stream, ffi::ScratchAllocator scratch, double epsilon,
                    int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                    ffi::AnyBuffer gamma, ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                    ffi::AnyBuffer dmean, ffi::AnyBuffer dvariance,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgamma,
                    ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, x.element_type(),
                                     {{"gamma", &gamma}, {"mean", &mean}, {"variance", &variance},
                                      {"dmean", &dmean}, {"dvariance", &dvariance}},
                                     {s.c}));
  return RunStatsGradient(kOp, /*per_image=*/false, stream, scratch, s, dy, x, *dx, *dgamma,
                          *dbeta, [&](auto& gp, auto tag) {
                            using A = typename Types<decltype(tag)>::Acc;
                            gp.gamma = static_cast<const A*>(gamma.untyped_data());
                            gp.mean = static_cast<const A*>(mean.untyped_data());
                            gp.second = static_cast<const A*>(variance.untyped_data());
                            gp.dmean = static_cast<const A*>(dmean.untyped_data());
                            gp.dvariance = static_cast<const A*>(dvariance.untyped_data());
                            gp.epsilon = A(epsilon);
                            gp.second_is_rstd = false;
                          });
}

// Inference: y = (x - mean) * gamma / sqrt(variance + epsilon) + beta with given statistics;
// one vectorised elementwise sweep.
ffi::Error Inference(cudaStream_t stream, ffi::ScratchAllocator scratch, double epsilon,
                     int64_t channels_last, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                     ffi::AnyBuffer beta, ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                     ffi::Result<ffi::AnyBuffer> y) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(
      kOp, x.element_type(),
      {{"gamma", &gamma}, {"beta", &beta}, {"mean", &mean}, {"variance", &variance}}, {s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using A = typename Types<decltype(tag)>::Acc;
    if (s.size() == 0) return ffi::Error::Success();
    DeviceLimits limits;
    JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(kOp, &limits));
    const int max_vec = VectorWidth<T>(s.channels_last ? s.c : s.pixels(),
                                       {x.untyped_data(), y->untyped_data()});
    const StatsPlan plan = PlanStats<T, A>(s, /*per_image=*/false, /*arrays=*/1, max_vec, limits,
                                           /*allow_on_chip=*/false);
    Coef<A>* coef = nullptr;
    JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, kOp, s.c, &coef));
    JAXMPS_RETURN_IF_ERROR(Launch(
        kOp, "the inference coefficient kernel", InferenceCoefKernel<A>, CeilDiv(s.c, 128), 128,
        0, stream, s.c, static_cast<const A*>(gamma.untyped_data()),
        static_cast<const A*>(beta.untyped_data()), static_cast<const A*>(mean.untyped_data()),
        static_cast<const A*>(variance.untyped_data()), A(epsilon), coef));
    return DispatchVector<T>(plan.vec, [&](auto v) {
      return Launch(kOp, "the apply kernel", ApplyKernel<T, A, decltype(v)::value, false>,
                    plan.blocks(), kStatsThreads, 0, stream, plan,
                    static_cast<const T*>(x.untyped_data()), nullptr, coef,
                    static_cast<T*>(y->untyped_data()));
    });
  });
}

}  // namespace
}  // namespace jaxmps::cuda

JAXMPS_FFI_TARGET("jaxmps_batch_norm_forward", JaxmpsBatchNormForwardCuda,
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
                      .Ret<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // variance: (C,), biased

JAXMPS_FFI_TARGET("jaxmps_batch_norm_gradient", JaxmpsBatchNormGradientCuda,
                  jaxmps::cuda::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // variance: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // dmean: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // dvariance: (C,)
                      .Ret<xla::ffi::AnyBuffer>()      // dx: like x
                      .Ret<xla::ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // dbeta: (C,)

JAXMPS_FFI_TARGET("jaxmps_batch_norm_inference", JaxmpsBatchNormInferenceCuda,
                  jaxmps::cuda::Inference,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                      .Ctx<xla::ffi::ScratchAllocator>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // beta: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // variance: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x
