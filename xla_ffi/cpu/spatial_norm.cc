// Typed XLA FFI handlers (API 0.1) for MPSCNNSpatialNormalization on CPU:
// targets jaxmps_spatial_norm_forward and jaxmps_spatial_norm_gradient, NHWC and NCHW.
#include "window_sum.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "spatial_norm";

struct Params {
  int64_t kernel_h, kernel_w;
  double alpha, beta, delta;
  // T = delta + scale * S[X^2], scale = alpha / N with N = kernel_h * kernel_w.
  double scale() const { return alpha / double(kernel_h * kernel_w); }
};

ffi::Error CheckParams(const Params& p) {
  JAXMPS_RETURN_IF_ERROR(CheckWindowSize(kOp, "kernel_h", p.kernel_h));
  return CheckWindowSize(kOp, "kernel_w", p.kernel_w);
}

// Streams T = delta + scale * S[X^2] over a unit's rows, in the data's accumulation type Acc
// (window sums in double). Plane 1 keeps the X row (payload) for the consumers of row h.
template <typename Acc>
class Denominator {
 public:
  Denominator(const ImageShape& s, const SpatialUnit& u, const Params& p)
      : rows_(s, u),
        stream_(s.h, s.w, u.lanes, Window::Forward(p.kernel_h), Window::Forward(p.kernel_w),
                /*summed=*/1, /*payload=*/1),
        sum_(s.w * u.lanes),
        delta_(p.delta),
        scale_(p.scale()) {}

  // t = T of row h (W * lanes values); returns the X row (valid until the next call).
  template <typename T>
  const Acc* Compute(const T* x, int64_t h, Acc* t) {
    const int64_t m = int64_t(sum_.size());
    auto source = [&](int64_t r, Acc* const* slot) {
      Acc* squares = slot[0];
      const Acc* xr = slot[1];
      rows_.Load(x, r, slot[1]);
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) squares[j] = xr[j] * xr[j];
    };
    double* sums = sum_.data();
    stream_.Produce(h, source, &sums);
    for (int64_t j = 0; j < m; ++j) t[j] = Acc(delta_ + scale_ * sum_[j]);
    return stream_.Row(h, 1);
  }

  const UnitRows& rows() const { return rows_; }

 private:
  UnitRows rows_;
  WindowStream<Acc> stream_;
  std::vector<double> sum_;
  double delta_, scale_;
};

// Y = X * T^-beta.
ffi::Error Forward(ffi::ThreadPool pool, int64_t kernel_h, int64_t kernel_w, double alpha,
                   double beta, double delta, int64_t channels_last, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> y) {
  const Params p{kernel_h, kernel_w, alpha, beta, delta};
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
    const SpatialUnits units(s, kernel_h - 1);
    ParallelForVectorized(pool, units.count(), [&](int64_t i) {
      const SpatialUnit u = units[i];
      const int64_t m = s.w * u.lanes;
      Denominator<Acc> den(s, u, p);
      std::vector<Acc> t(m);
      for (int64_t h = u.h0; h < u.h1; ++h) {
        const Acc* xr = den.Compute(xs, h, t.data());
        neg_pow(t.data(), t.data(), m);
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) t[j] *= xr[j];
        den.rows().Store(ys, h, t.data());
      }
    });
    return ffi::Error::Success();
  });
}

// dX = g T^-beta - (2 alpha beta / N) X S^T[g X T^(-beta-1)]: T streams through a forward
// window; per row, g T^-beta (payload) and g X T^(-beta-1) (summed) feed the adjoint stream.
ffi::Error Gradient(ffi::ThreadPool pool, int64_t kernel_h, int64_t kernel_w, double alpha,
                    double beta, double delta, int64_t channels_last, ffi::AnyBuffer dy,
                    ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> dx) {
  const Params p{kernel_h, kernel_w, alpha, beta, delta};
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
    const double coef = 2.0 * alpha * beta / double(kernel_h * kernel_w);
    const SpatialUnits units(s, 2 * (kernel_h - 1));
    ParallelForVectorized(pool, units.count(), [&](int64_t i) {
      const SpatialUnit u = units[i];
      const int64_t m = s.w * u.lanes;
      Denominator<Acc> den(s, u, p);
      // Planes: 0 = g X T^(-beta-1) (summed), 1 = g T^-beta, 2 = X.
      WindowStream<Acc> adjoint(s.h, s.w, u.lanes, Window::Adjoint(kernel_h),
                                Window::Adjoint(kernel_w), /*summed=*/1, /*payload=*/2);
      std::vector<Acc> t(m), tb(m), g(m);
      std::vector<double> sum(m);
      auto source = [&](int64_t r, Acc* const* slot) {
        const Acc* xr = den.Compute(xs, r, t.data());
        neg_pow(t.data(), tb.data(), m, /*next=*/t.data());  // t now T^(-beta-1)
        den.rows().Load(gs, r, g.data());
        Acc *inner = slot[0], *a = slot[1], *xkeep = slot[2];
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) {
          a[j] = g[j] * tb[j];
          inner[j] = g[j] * xr[j] * t[j];
          xkeep[j] = xr[j];
        }
      };
      double* sums = sum.data();
      for (int64_t h = u.h0; h < u.h1; ++h) {
        adjoint.Produce(h, source, &sums);
        const Acc* a = adjoint.Row(h, 1);
        const Acc* xr = adjoint.Row(h, 2);
#pragma GCC ivdep
        for (int64_t j = 0; j < m; ++j) t[j] = a[j] - Acc(coef * sum[j]) * xr[j];
        den.rows().Store(dxs, h, t.data());
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_spatial_norm_forward", JaxmpsSpatialNormForwardCpu,
                  jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_spatial_norm_gradient", JaxmpsSpatialNormGradientCpu,
                  jaxmps::cpu::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_h")
                      .Attr<int64_t>("kernel_w")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // dx: like x
