// Typed XLA FFI handlers (API 0.1) for MPSCNNLocalContrastNormalization on CPU: targets
// jaxmps_local_contrast_norm_forward and jaxmps_local_contrast_norm_gradient, NHWC and NCHW.
#include "window_sum.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "local_contrast_norm";

struct Params {
  int64_t kernel_h, kernel_w;
  double alpha, beta, delta, p0, pm, ps;
  double taps() const { return double(kernel_h * kernel_w); }
};

ffi::Error CheckParams(const Params& p) {
  JAXMPS_RETURN_IF_ERROR(CheckWindowSize(kOp, "kernel_h", p.kernel_h));
  return CheckWindowSize(kOp, "kernel_w", p.kernel_w);
}

// Streams the window statistics of a unit's rows, M = S[X] / N and
// T = delta + alpha (S[X^2] / N - M^2) (population variance over the zero-padded window),
// from double window sums (no float cancellation in the variance) to the accumulation type.
template <typename Acc>
class Moments {
 public:
  Moments(const ImageShape& s, const SpatialUnit& u, const Params& p)
      : rows_(s, u),
        stream_(s.h, s.w, u.lanes, Window::Forward(p.kernel_h), Window::Forward(p.kernel_w),
                /*summed=*/2),
        sum_(s.w * u.lanes),
        sum_sq_(s.w * u.lanes),
        inv_n_(1.0 / p.taps()),
        alpha_(p.alpha),
        delta_(p.delta) {}

  // mean and t of row h (W * lanes values each); returns the X row (valid until the next call).
  template <typename T>
  const Acc* Compute(const T* x, int64_t h, Acc* mean, Acc* t) {
    const int64_t m = int64_t(sum_.size());
    auto source = [&](int64_t r, Acc* const* slot) {
      const Acc* xr = slot[0];
      Acc* squares = slot[1];
      rows_.Load(x, r, slot[0]);
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) squares[j] = xr[j] * xr[j];
    };
    double* sums[2] = {sum_.data(), sum_sq_.data()};
    stream_.Produce(h, source, sums);
#pragma GCC ivdep
    for (int64_t j = 0; j < m; ++j) {
      const double mu = sum_[j] * inv_n_;
      mean[j] = Acc(mu);
      t[j] = Acc(delta_ + alpha_ * (sum_sq_[j] * inv_n_ - mu * mu));
    }
    return stream_.Row(h, 0);
  }

  const UnitRows& rows() const { return rows_; }

 private:
  UnitRows rows_;
  WindowStream<Acc> stream_;
  std::vector<double> sum_, sum_sq_;
  double inv_n_, alpha_, delta_;
};

// Y = pm + ps (X - p0 M) T^-beta.
ffi::Error Forward(ffi::ThreadPool pool, int64_t kernel_h, int64_t kernel_w, double alpha,
                   double beta, double delta, double p0, double pm, double ps,
                   int64_t channels_last, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const Params p{kernel_h, kernel_w, alpha, beta, delta, p0, pm, ps};
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last != 0, &s));
  JAXMPS_RETURN_IF_ERROR(CheckParams(p));
  s = PlanesAsChannels(s);
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using Acc = typename Types<decltype(tag)>::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    T* ys = reinterpret_cast<T*>(y->untyped_data());
    const NegPow neg_pow(beta);
    const Acc p0a = Acc(p0), pma = Acc(pm), psa = Acc(ps);
    const SpatialUnits units(s, kernel_h - 1);
    ParallelForVectorized(pool, units.count(), [&](int64_t i) {
      const SpatialUnit u = units[i];
      const int64_t m = s.w * u.lanes;
      Moments<Acc> moments(s, u, p);
      std::vector<Acc> mean(m), t(m);
      for (int64_t h = u.h0; h < u.h1; ++h) {
        const Acc* xr = moments.Compute(xs, h, mean.data(), t.data());
        neg_pow(t.data(), t.data(), m);
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) t[j] = pma + psa * (xr[j] - p0a * mean[j]) * t[j];
        moments.rows().Store(ys, h, t.data());
      }
    });
    return ffi::Error::Success();
  });
}

// With A = g T^-beta, U = X - p0 M, C = A U / T:
//   dX = ps (A - (p0/N) S^T[A] - (2 alpha beta / N) (X S^T[C] - S^T[C M])).
// The statistics stream through a forward window; A, C and C M feed one adjoint stream.
ffi::Error Gradient(ffi::ThreadPool pool, int64_t kernel_h, int64_t kernel_w, double alpha,
                    double beta, double delta, double p0, double pm, double ps,
                    int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                    ffi::Result<ffi::AnyBuffer> dx) {
  const Params p{kernel_h, kernel_w, alpha, beta, delta, p0, pm, ps};
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last != 0, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckParams(p));
  s = PlanesAsChannels(s);
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using Acc = typename Types<decltype(tag)>::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const T* gs = reinterpret_cast<const T*>(dy.untyped_data());
    T* dxs = reinterpret_cast<T*>(dx->untyped_data());
    const NegPow neg_pow(beta);
    const Acc p0a = Acc(p0);
    const double mean_coef = p0 / p.taps();
    const double var_coef = 2.0 * alpha * beta / p.taps();
    const SpatialUnits units(s, 2 * (kernel_h - 1));
    ParallelForVectorized(pool, units.count(), [&](int64_t i) {
      const SpatialUnit u = units[i];
      const int64_t m = s.w * u.lanes;
      Moments<Acc> moments(s, u, p);
      // Planes: 0 = A, 1 = C, 2 = C M (summed), 3 = X.
      WindowStream<Acc> adjoint(s.h, s.w, u.lanes, Window::Adjoint(kernel_h),
                                Window::Adjoint(kernel_w), /*summed=*/3, /*payload=*/1);
      std::vector<Acc> mean(m), t(m), tb(m), g(m);
      std::vector<double> sa(m), sc(m), scm(m);
      auto source = [&](int64_t r, Acc* const* slot) {
        const Acc* xr = moments.Compute(xs, r, mean.data(), t.data());
        neg_pow(t.data(), tb.data(), m, /*next=*/t.data());  // t now T^(-beta-1)
        moments.rows().Load(gs, r, g.data());
        Acc *a = slot[0], *c = slot[1], *cm = slot[2], *xkeep = slot[3];
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) {
          a[j] = g[j] * tb[j];
          c[j] = g[j] * (xr[j] - p0a * mean[j]) * t[j];
          cm[j] = c[j] * mean[j];
          xkeep[j] = xr[j];
        }
      };
      double* sums[3] = {sa.data(), sc.data(), scm.data()};
      for (int64_t h = u.h0; h < u.h1; ++h) {
        adjoint.Produce(h, source, sums);
        const Acc* a = adjoint.Row(h, 0);
        const Acc* xr = adjoint.Row(h, 3);
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j)
          sa[j] = ps * (a[j] - mean_coef * sa[j] - var_coef * (xr[j] * sc[j] - scm[j]));
        moments.rows().Store(dxs, h, sa.data());
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_local_contrast_norm_forward", JaxmpsLocalContrastNormForwardCpu,
                  jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<double>("p0")
                      .Attr<double>("pm")
                      .Attr<double>("ps")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_local_contrast_norm_gradient", JaxmpsLocalContrastNormGradientCpu,
                  jaxmps::cpu::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<double>("p0")
                      .Attr<double>("pm")
                      .Attr<double>("ps")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // dx: like x
