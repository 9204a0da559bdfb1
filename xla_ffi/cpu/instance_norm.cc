// Typed XLA FFI handlers (API 0.1) for MPSCNNInstanceNormalization on CPU:
// targets jaxmps_instance_norm_forward and jaxmps_instance_norm_gradient, NHWC and NCHW.
#include <cmath>

#include "channel_sweep.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "instance_norm";

// Forward: per (image, channel) mean and biased variance over H*W (two passes, double sums),
// then y = (x - mean) * rstd * gamma + beta. Saves mean and rstd for the gradient (MPS's
// gradient state holds the same), so the gradient needs no second statistics pass.
ffi::Error Forward(ffi::ThreadPool pool, double epsilon, int64_t channels_last,
                   ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> rstd) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(
      CheckParams(kOp, x.element_type(), {{"gamma", &gamma}, {"beta", &beta}}, {s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using P = typename Ty::Param;
    using Acc = typename Ty::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const P* g = reinterpret_cast<const P*>(gamma.untyped_data());
    const P* b = reinterpret_cast<const P*>(beta.untyped_data());
    const double inv_m = 1.0 / double(s.pixels());

    std::vector<Acc> pivot;
    std::vector<double> sum_u, sum_uu;
    ShiftedMoments(pool, s, xs, pivot, sum_u, sum_uu);

    P* mean_out = reinterpret_cast<P*>(mean->untyped_data());
    P* rstd_out = reinterpret_cast<P*>(rstd->untyped_data());
    std::vector<Acc> zero(s.n * s.c, Acc(0)), scale(s.n * s.c), shift(s.n * s.c);
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t k = n * s.c + c;
        const double du = sum_u[k] * inv_m;
        const double var = std::max(sum_uu[k] * inv_m - du * du, 0.0);
        const double mu = double(pivot[k]) + du;
        const double r = 1.0 / std::sqrt(var + epsilon);
        mean_out[k] = P(mu);
        rstd_out[k] = P(r);
        scale[k] = Acc(r * double(g[c]));
        shift[k] = Acc(double(b[c]) - mu * r * double(g[c]));
      }
    }
    AffineMap(pool, s, xs, static_cast<const T*>(nullptr),
              reinterpret_cast<T*>(y->untyped_data()), zero.data(), scale.data(),
              shift.data());
    return ffi::Error::Success();
  });
}

// Gradient (exact VJP, MPS_SEMANTICS section 6): with xhat = (x - mean) * rstd,
//   dbeta_n = sum g, dgamma_n = sum g * xhat (per image; summed over the batch on output),
//   dx = gamma * rstd * (g - dbeta_n / M - xhat * dgamma_n / M),  M = H * W.
ffi::Error Gradient(ffi::ThreadPool pool, int64_t channels_last, ffi::AnyBuffer dy,
                    ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer mean,
                    ffi::AnyBuffer rstd, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dgamma, ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, x.element_type(), {{"gamma", &gamma}}, {s.c}));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, x.element_type(),
                                     {{"mean", &mean}, {"rstd", &rstd}}, {s.n, s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using P = typename Ty::Param;
    using Acc = typename Ty::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const T* gs = reinterpret_cast<const T*>(dy.untyped_data());
    const P* g = reinterpret_cast<const P*>(gamma.untyped_data());
    const P* mu = reinterpret_cast<const P*>(mean.untyped_data());
    const P* r = reinterpret_cast<const P*>(rstd.untyped_data());

    // Sums of g and g * (x - mean) per (n, c); the latter times rstd is sum g * xhat.
    std::vector<Acc> center(mu, mu + s.n * s.c);
    std::vector<double> sum_g, sum_gx;
    SumPairs(pool, s, xs, gs, center.data(),
             [](Acc xv, Acc gv, Acc m) { return std::pair<Acc, Acc>(gv, gv * (xv - m)); },
             sum_g, sum_gx);
    for (int64_t k = 0; k < s.n * s.c; ++k) sum_gx[k] *= double(r[k]);
    const double inv_m = 1.0 / double(s.pixels());
    std::vector<Acc> a(s.n * s.c), bcoef(s.n * s.c), ccoef(s.n * s.c);
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t k = n * s.c + c;
        // dx = A * g + B * x + C with xhat expanded: A = gamma*rstd,
        // B = -A*rstd*dgamma_n/M, C = -A*dbeta_n/M - B*mean.
        const double A = double(g[c]) * double(r[k]);
        const double B = -A * double(r[k]) * sum_gx[k] * inv_m;
        a[k] = Acc(A);
        bcoef[k] = Acc(B);
        ccoef[k] = Acc(-A * sum_g[k] * inv_m - B * double(mu[k]));
      }
    }
    AffineMap(pool, s, xs, gs, reinterpret_cast<T*>(dx->untyped_data()), a.data(),
              bcoef.data(), ccoef.data());
    P* dg = reinterpret_cast<P*>(dgamma->untyped_data());
    P* db = reinterpret_cast<P*>(dbeta->untyped_data());
    auto tot_gx = SumOverImages(sum_gx, s.n, s.c), tot_g = SumOverImages(sum_g, s.n, s.c);
    for (int64_t c = 0; c < s.c; ++c) {
      dg[c] = P(tot_gx[c]);
      db[c] = P(tot_g[c]);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_instance_norm_forward", JaxmpsInstanceNormForwardCpu,
                  jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // beta: (C,)
                      .Ret<xla::ffi::AnyBuffer>()      // y: like x
                      .Ret<xla::ffi::AnyBuffer>()      // mean: (N, C)
                      .Ret<xla::ffi::AnyBuffer>());    // rstd: (N, C)

JAXMPS_FFI_TARGET("jaxmps_instance_norm_gradient", JaxmpsInstanceNormGradientCpu,
                  jaxmps::cpu::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (N, C)
                      .Arg<xla::ffi::AnyBuffer>()      // rstd: (N, C)
                      .Ret<xla::ffi::AnyBuffer>()      // dx: like x
                      .Ret<xla::ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // dbeta: (C,)
