// Typed XLA FFI handlers (API 0.1) for the MPSCNNBatchNormalization family on CPU: targets
// jaxmps_batch_norm_forward (training), jaxmps_batch_norm_gradient, jaxmps_batch_norm_inference.
#include <cmath>

#include "channel_sweep.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "batch_norm";

template <typename P>
const P* Data(const ffi::AnyBuffer& b) {
  return reinterpret_cast<const P*>(b.untyped_data());
}

// Repeats a per-channel coefficient vector for every image (AffineMap takes per-(n, c) ones).
template <typename Acc>
std::vector<Acc> PerImage(const std::vector<Acc>& per_channel, int64_t n) {
  std::vector<Acc> out;
  out.reserve(n * per_channel.size());
  for (int64_t i = 0; i < n; ++i) out.insert(out.end(), per_channel.begin(), per_channel.end());
  return out;
}

// y = x * scale[c] + shift[c] for every element (the normalisation applied with statistics).
template <typename T, typename Acc>
void ApplyAffine(ffi::ThreadPool& pool, const ImageShape& s, const T* x, T* y,
                 const std::vector<Acc>& scale, const std::vector<Acc>& shift) {
  const std::vector<Acc> a = PerImage(scale, s.n), b = PerImage(shift, s.n);
  AffineMap(pool, s, x, static_cast<const T*>(nullptr), y, b.data(), a.data(), b.data());
}

// scale = gamma / sqrt(var + eps), shift = beta - mean * scale, in double then rounded once.
template <typename P, typename Acc>
void AffineFromStatistics(int64_t c, const P* gamma, const P* beta, const double* mean,
                          const double* var, double epsilon, std::vector<Acc>& scale,
                          std::vector<Acc>& shift) {
  scale.resize(c);
  shift.resize(c);
  for (int64_t j = 0; j < c; ++j) {
    const double sc = double(gamma[j]) / std::sqrt(var[j] + epsilon);
    scale[j] = Acc(sc);
    shift[j] = Acc(double(beta[j]) - mean[j] * sc);
  }
}

// Forward (training): per channel mean and biased variance over N*H*W (two passes; per-image
// partial sums in double, summed over images in a fixed order so results are deterministic).
ffi::Error Forward(ffi::ThreadPool pool, double epsilon, int64_t channels_last,
                   ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> variance) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(
      CheckParams(kOp, x.element_type(), {{"gamma", &gamma}, {"beta", &beta}}, {s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using P = typename Ty::Param;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const double m_img = double(s.pixels()), inv_m = 1.0 / (double(s.n) * m_img);

    // Shifted per-image moments, combined exactly (in double) into per-channel statistics.
    std::vector<typename Ty::Acc> pivot;
    std::vector<double> sum_u, sum_uu;
    ShiftedMoments(pool, s, xs, pivot, sum_u, sum_uu);
    std::vector<double> mu(s.c, 0.0), var(s.c, 0.0);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t c = 0; c < s.c; ++c)
        mu[c] += double(pivot[n * s.c + c]) * m_img + sum_u[n * s.c + c];
    for (double& v : mu) v *= inv_m;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t k = n * s.c + c;
        const double d = double(pivot[k]) - mu[c];  // sum (u + d)^2 over the image
        var[c] += sum_uu[k] + 2.0 * d * sum_u[k] + m_img * d * d;
      }
    for (double& v : var) v = std::max(v * inv_m, 0.0);

    std::vector<typename Ty::Acc> scale, shift;
    AffineFromStatistics(s.c, Data<P>(gamma), Data<P>(beta), mu.data(), var.data(), epsilon,
                         scale, shift);
    ApplyAffine(pool, s, xs, reinterpret_cast<T*>(y->untyped_data()), scale, shift);
    P* mean_out = reinterpret_cast<P*>(mean->untyped_data());
    P* var_out = reinterpret_cast<P*>(variance->untyped_data());
    for (int64_t c = 0; c < s.c; ++c) {
      mean_out[c] = P(mu[c]);
      var_out[c] = P(var[c]);
    }
    return ffi::Error::Success();
  });
}

// Inference: the same affine map with given statistics (MPSCNNBatchNormalization with a data
// source's mean and variance).
ffi::Error Inference(ffi::ThreadPool pool, double epsilon, int64_t channels_last,
                     ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                     ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                     ffi::Result<ffi::AnyBuffer> y) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(
      kOp, x.element_type(),
      {{"gamma", &gamma}, {"beta", &beta}, {"mean", &mean}, {"variance", &variance}}, {s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using P = typename Ty::Param;
    std::vector<double> mu(s.c), var(s.c);
    for (int64_t c = 0; c < s.c; ++c) {
      mu[c] = double(Data<P>(mean)[c]);
      var[c] = double(Data<P>(variance)[c]);
    }
    std::vector<typename Ty::Acc> scale, shift;
    AffineFromStatistics(s.c, Data<P>(gamma), Data<P>(beta), mu.data(), var.data(), epsilon,
                         scale, shift);
    ApplyAffine(pool, s, reinterpret_cast<const T*>(x.untyped_data()),
                reinterpret_cast<T*>(y->untyped_data()), scale, shift);
    return ffi::Error::Success();
  });
}

// Gradient (exact VJP incl. the path through the returned statistics, MPS_SEMANTICS section 7):
//   dbeta = sum g, dgamma = sum g * xhat over (N, H, W), M = N*H*W,
//   dx = gamma*rstd*(g - dbeta/M - xhat*dgamma/M) + dmean/M + 2*dvariance*(x - mean)/M,
// which is affine in (g, x) per channel: dx = A*g + B*x + C, applied in one pass.
ffi::Error Gradient(ffi::ThreadPool pool, double epsilon, int64_t channels_last,
                    ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                    ffi::AnyBuffer mean, ffi::AnyBuffer variance, ffi::AnyBuffer dmean,
                    ffi::AnyBuffer dvariance, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dgamma, ffi::Result<ffi::AnyBuffer> dbeta) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(kOp, x.element_type(),
                                            {{"gamma", &gamma},
                                             {"mean", &mean},
                                             {"variance", &variance},
                                             {"dmean", &dmean},
                                             {"dvariance", &dvariance}}, {s.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using P = typename Ty::Param;
    using Acc = typename Ty::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const T* gs = reinterpret_cast<const T*>(dy.untyped_data());
    const P* mu = Data<P>(mean);
    std::vector<Acc> rstd(s.c), mean_acc(s.c);
    for (int64_t c = 0; c < s.c; ++c) {
      rstd[c] = Acc(1.0 / std::sqrt(double(Data<P>(variance)[c]) + epsilon));
      mean_acc[c] = Acc(mu[c]);
    }
    std::vector<double> part_g, part_gx;
    const std::vector<Acc> center = PerImage(mean_acc, s.n);
    SumPairs(pool, s, xs, gs, center.data(),
             [](Acc xv, Acc gv, Acc m) { return std::pair<Acc, Acc>(gv, gv * (xv - m)); },
             part_g, part_gx);
    const std::vector<double> sum_g = SumOverImages(part_g, s.n, s.c);
    std::vector<double> sum_gx = SumOverImages(part_gx, s.n, s.c);
    for (int64_t c = 0; c < s.c; ++c) sum_gx[c] *= double(rstd[c]);  // sum g * xhat
    const double inv_m = 1.0 / double(s.n * s.pixels());
    std::vector<Acc> a(s.c), b(s.c), cc(s.c);
    for (int64_t c = 0; c < s.c; ++c) {
      const double r = double(rstd[c]), m = double(mu[c]);
      const double A = double(Data<P>(gamma)[c]) * r;
      const double B = -A * r * sum_gx[c] * inv_m + 2.0 * double(Data<P>(dvariance)[c]) * inv_m;
      a[c] = Acc(A);
      b[c] = Acc(B);
      cc[c] = Acc(-A * sum_g[c] * inv_m + double(Data<P>(dmean)[c]) * inv_m - B * m);
    }
    const std::vector<Acc> an = PerImage(a, s.n), bn = PerImage(b, s.n), cn = PerImage(cc, s.n);
    AffineMap(pool, s, xs, gs, reinterpret_cast<T*>(dx->untyped_data()), an.data(), bn.data(),
              cn.data());
    P* dg = reinterpret_cast<P*>(dgamma->untyped_data());
    P* db = reinterpret_cast<P*>(dbeta->untyped_data());
    for (int64_t c = 0; c < s.c; ++c) {
      dg[c] = P(sum_gx[c]);
      db[c] = P(sum_g[c]);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_batch_norm_forward", JaxmpsBatchNormForwardCpu, jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // beta: (C,)
                      .Ret<xla::ffi::AnyBuffer>()      // y: like x
                      .Ret<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // variance: (C,), biased

JAXMPS_FFI_TARGET("jaxmps_batch_norm_inference", JaxmpsBatchNormInferenceCpu,
                  jaxmps::cpu::Inference,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // beta: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // variance: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_batch_norm_gradient", JaxmpsBatchNormGradientCpu,
                  jaxmps::cpu::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<double>("epsilon")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Arg<xla::ffi::AnyBuffer>()      // gamma: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // mean: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // variance: (C,)
                      .Arg<xla::ffi::AnyBuffer>()      // dmean: (C,) cotangent of mean
                      .Arg<xla::ffi::AnyBuffer>()      // dvariance: (C,) cotangent of variance
                      .Ret<xla::ffi::AnyBuffer>()      // dx: like x
                      .Ret<xla::ffi::AnyBuffer>()      // dgamma: (C,)
                      .Ret<xla::ffi::AnyBuffer>());    // dbeta: (C,)
