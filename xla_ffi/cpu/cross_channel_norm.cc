// Typed XLA FFI handlers (API 0.1) for MPSCNNCrossChannelNormalization on CPU: targets
// jaxmps_cross_channel_norm_forward and jaxmps_cross_channel_norm_gradient, NHWC and NCHW.
#include <memory>

#include "window_sum.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "cross_channel_norm";

struct Params {
  int64_t kernel_size;
  double alpha, beta, delta;
};

// Window sums across channels stay O(1) per element whatever the window: work units are
// (image, block of pixels) tiles, and
// - channel-major tiles [C][pixels] (NCHW, or NHWC with windows over kShiftedMaxTaps) run a
//   1-D running sum across channels that advances all pixels of the tile at once;
// - pixel-major tiles [pixels][C] (NHWC, windows of up to kShiftedMaxTaps) sum shifted copies
//   of each pixel's contiguous channel vector: no transposes, vectorised along channels.
// Tile sizes depend only on the shape and window, never on the thread count.
constexpr int64_t kShiftedMaxTaps = 16;

template <typename Acc>
class ChannelTiles {
 public:
  ChannelTiles(const ImageShape& s, int64_t kernel_size)
      : s_(s), pixel_major_(s.channels_last && kernel_size <= kShiftedMaxTaps) {
    constexpr int64_t kTile = 4096;  // values per tile: a unit's tiles stay in L1/L2
    const int64_t pixels = s.pixels();
    block_ = std::min(pixels, std::clamp<int64_t>(kTile / std::max<int64_t>(1, s.c), 16, 256));
    blocks_ = block_ > 0 ? (pixels + block_ - 1) / block_ : 0;
  }

  int64_t count() const { return s_.n * blocks_; }
  int64_t max_values() const { return block_ * s_.c; }

  struct Tile {
    int64_t offset, pixels;
  };
  Tile operator[](int64_t i) const {
    const int64_t n = i / blocks_, first = (i % blocks_) * block_;
    return {n * s_.sn + first * s_.sw, std::min(block_, s_.pixels() - first)};
  }

  template <typename T>
  void Load(const T* image, const Tile& t, Acc* out) const {
    if (pixel_major_) {
      Gather(image + t.offset, t.pixels, s_.sw, s_.c, s_.sc, out);
    } else {
      Gather(image + t.offset, s_.c, s_.sc, t.pixels, s_.sw, out);
    }
  }
  template <typename T>
  void Store(T* image, const Tile& t, const Acc* in) const {
    if (pixel_major_) {
      Scatter(in, t.pixels, s_.sw, s_.c, s_.sc, image + t.offset);
    } else {
      Scatter(in, s_.c, s_.sc, t.pixels, s_.sw, image + t.offset);
    }
  }

  // out = window sums across channels of the tile values v; padded: C + kShiftedMaxTaps doubles.
  void Sum(const Acc* v, double* out, const Tile& t, Window w, double* padded) const {
    if (!pixel_major_) return WindowSum1D(v, out, s_.c, t.pixels, w);
    w = w.ClippedTo(s_.c);
    const int64_t c = s_.c, taps = w.size();
    std::fill(padded, padded + c + taps, 0.0);
    WithConstant<kShiftedMaxTaps>(taps, [&](auto taps_constant) {
      constexpr int kTaps = decltype(taps_constant)::value;
      for (int64_t p = 0; p < t.pixels; ++p) {
        const Acc* vp = v + p * c;
        double* op = out + p * c;
        for (int64_t j = 0; j < c; ++j) padded[w.lo + j] = double(vp[j]);
        // One pass, the taps unrolled in registers (tap order kept: the same sums as adding
        // shifted copies pass by pass, which spent its time loading and storing op).
        for (int64_t j = 0; j < c; ++j) {
          double sum = 0.0;
#pragma GCC unroll 16
          for (int tap = 0; tap < kTaps; ++tap) sum += padded[j + tap];
          op[j] = sum;
        }
      }
    });
  }

 private:
  ImageShape s_;
  bool pixel_major_;
  int64_t block_ = 0, blocks_ = 0;
};

// A unit's scratch: m-value arrays left uninitialised (every kernel writes before reading).
template <typename V>
std::unique_ptr<V[]> Scratch(int64_t m) {
  return std::make_unique_for_overwrite<V[]>(size_t(m));
}

// L = delta + alpha/N * s from window sums s of X^2, then L^-beta into tb; t keeps L, or with
// `next` (the gradient) becomes L^(-beta-1).
template <typename Acc>
void Denominator(const Params& p, const NegPow& neg_pow, const double* s, Acc* t, Acc* tb,
                 int64_t m, bool next = false) {
  const double scale = p.alpha / double(p.kernel_size);
#pragma GCC ivdep
  for (int64_t j = 0; j < m; ++j) t[j] = Acc(p.delta + scale * s[j]);
  neg_pow(t, tb, m, next ? t : nullptr);
}

// Y = X L^-beta.
ffi::Error Forward(ffi::ThreadPool pool, int64_t kernel_size, double alpha, double beta,
                   double delta, int64_t channels_last, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> y) {
  const Params p{kernel_size, alpha, beta, delta};
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last != 0, &s));
  JAXMPS_RETURN_IF_ERROR(CheckWindowSize(kOp, "kernel_size", kernel_size));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using Acc = typename Types<decltype(tag)>::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    T* ys = reinterpret_cast<T*>(y->untyped_data());
    const NegPow neg_pow(beta);
    const ChannelTiles<Acc> tiles(s, kernel_size);
    ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
      const auto tile = tiles[i];
      const int64_t capacity = tiles.max_values(), m = s.c * tile.pixels;
      auto xt = Scratch<Acc>(capacity), t = Scratch<Acc>(capacity);
      auto sums = Scratch<double>(capacity), padded = Scratch<double>(s.c + kShiftedMaxTaps);
      tiles.Load(xs, tile, xt.get());
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) t[j] = xt[j] * xt[j];
      tiles.Sum(t.get(), sums.get(), tile, Window::Forward(kernel_size), padded.get());
      Denominator(p, neg_pow, sums.get(), t.get(), t.get(), m);
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) t[j] *= xt[j];
      tiles.Store(ys, tile, t.get());
    });
    return ffi::Error::Success();
  });
}

// dX = g L^-beta - (2 alpha beta / N) X R[g X L^(-beta-1)], R the adjoint channel window.
ffi::Error Gradient(ffi::ThreadPool pool, int64_t kernel_size, double alpha, double beta,
                    double delta, int64_t channels_last, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                    ffi::Result<ffi::AnyBuffer> dx) {
  const Params p{kernel_size, alpha, beta, delta};
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, channels_last != 0, &s));
  JAXMPS_RETURN_IF_ERROR(CheckSameAs(kOp, "dy", dy, "x", x));
  JAXMPS_RETURN_IF_ERROR(CheckWindowSize(kOp, "kernel_size", kernel_size));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using Acc = typename Types<decltype(tag)>::Acc;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const T* gs = reinterpret_cast<const T*>(dy.untyped_data());
    T* dxs = reinterpret_cast<T*>(dx->untyped_data());
    const NegPow neg_pow(beta);
    const double coef = 2.0 * alpha * beta / double(kernel_size);
    const ChannelTiles<Acc> tiles(s, kernel_size);
    ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
      const auto tile = tiles[i];
      const int64_t capacity = tiles.max_values(), m = s.c * tile.pixels;
      auto xt = Scratch<Acc>(capacity), g = Scratch<Acc>(capacity);
      auto inner = Scratch<Acc>(capacity), t = Scratch<Acc>(capacity);
      auto tb = Scratch<Acc>(capacity), sums = Scratch<double>(capacity);
      auto padded = Scratch<double>(s.c + kShiftedMaxTaps);
      tiles.Load(xs, tile, xt.get());
      tiles.Load(gs, tile, g.get());
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) inner[j] = xt[j] * xt[j];
      tiles.Sum(inner.get(), sums.get(), tile, Window::Forward(kernel_size), padded.get());
      Denominator(p, neg_pow, sums.get(), t.get(), tb.get(), m, /*next=*/true);
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        inner[j] = g[j] * xt[j] * t[j];  // t: L^(-beta-1)
        g[j] *= tb[j];                   // now g L^-beta
      }
      tiles.Sum(inner.get(), sums.get(), tile, Window::Adjoint(kernel_size), padded.get());
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) t[j] = g[j] - Acc(coef * sums[j]) * xt[j];
      tiles.Store(dxs, tile, t.get());
    });
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_cross_channel_norm_forward", JaxmpsCrossChannelNormForwardCpu,
                  jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // y: like x

JAXMPS_FFI_TARGET("jaxmps_cross_channel_norm_gradient", JaxmpsCrossChannelNormGradientCpu,
                  jaxmps::cpu::Gradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attr<int64_t>("kernel_size")
                      .Attr<double>("alpha")
                      .Attr<double>("beta")
                      .Attr<double>("delta")
                      .Attr<int64_t>("channels_last")
                      .Arg<xla::ffi::AnyBuffer>()      // dy: like x
                      .Arg<xla::ffi::AnyBuffer>()      // x: (N, H, W, C) or (N, C, H, W)
                      .Ret<xla::ffi::AnyBuffer>());    // dx: like x
