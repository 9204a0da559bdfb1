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
// - pixel-major tiles (NHWC, windows of up to kShiftedMaxTaps) are one contiguous run of
//   pixels x C values: x and dy are read and y/dx written in place, and each window sum adds
//   the taps of a pixel's channel vector (TapSums), vectorised along channels;
// - channel-major tiles (NCHW, or NHWC with longer windows) are copied into [C][pixels] and run
//   a 1-D running sum across channels that advances all pixels of the tile at once.
// Tile sizes depend only on the shape and window, never on the thread count.
constexpr int64_t kShiftedMaxTaps = 16;

class ChannelTiles {
 public:
  ChannelTiles(const ImageShape& s, int64_t kernel_size)
      : s_(s), pixel_major_(s.channels_last && kernel_size <= kShiftedMaxTaps) {
    constexpr int64_t kTile = 4096;  // values per tile: a unit's tiles stay in L1/L2
    const int64_t pixels = s.pixels();
    block_ = std::min(pixels, std::clamp<int64_t>(kTile / std::max<int64_t>(1, s.c), 16, 256));
    blocks_ = block_ > 0 ? (pixels + block_ - 1) / block_ : 0;
  }

  bool pixel_major() const { return pixel_major_; }
  int64_t count() const { return s_.n * blocks_; }
  int64_t max_values() const { return block_ * s_.c; }

  struct Tile {
    int64_t offset, pixels;
  };
  Tile operator[](int64_t i) const {
    const int64_t n = i / blocks_, first = (i % blocks_) * block_;
    return {n * s_.sn + first * s_.sw, std::min(block_, s_.pixels() - first)};
  }

  // Channel-major tiles only: copy in as [C][pixels], copy out, running window sums.
  template <typename T, typename Acc>
  void Load(const T* image, const Tile& t, Acc* out) const {
    Gather(image + t.offset, s_.c, s_.sc, t.pixels, s_.sw, out);
  }
  template <typename T, typename Acc>
  void Store(T* image, const Tile& t, const Acc* in) const {
    Scatter(in, s_.c, s_.sc, t.pixels, s_.sw, image + t.offset);
  }
  template <typename Acc>
  void Sum(const Acc* v, double* out, const Tile& t, Window w) const {
    WindowSum1D(v, out, s_.c, t.pixels, w);
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

// Window sums across the C contiguous channels of each pixel, for pixel-major tiles: a pixel's
// values go into a zero-padded row and each output adds the window's taps in one pass, unrolled
// at compile time (channel order kept). The sums are in the accumulation type: at most 16
// terms, none subtracted (the running sums, which subtract, are the ones kept in double).
template <typename Acc>
class TapSums {
 public:
  TapSums(int64_t c, Window w)
      : c_(c), w_(w.ClippedTo(c)), padded_(Scratch<Acc>(c + kShiftedMaxTaps)) {
    std::fill(padded_.get(), padded_.get() + c + kShiftedMaxTaps, Acc(0));
  }

  // out[p*C + j] = the window sum over channels of value(p*C + j') for pixels p < pixels.
  template <typename Value>
  void operator()(int64_t pixels, Value value, Acc* __restrict__ out) {
    Acc* __restrict__ padded = padded_.get();
    WithConstant<kShiftedMaxTaps>(w_.size(), [&](auto taps_constant) {
      constexpr int kTaps = decltype(taps_constant)::value;
      for (int64_t p = 0; p < pixels; ++p) {
        for (int64_t j = 0; j < c_; ++j) padded[w_.lo + j] = value(p * c_ + j);
        Acc* op = out + p * c_;
        for (int64_t j = 0; j < c_; ++j) {
          Acc sum = Acc(0);
#pragma GCC unroll 16
          for (int tap = 0; tap < kTaps; ++tap) sum += padded[j + tap];
          op[j] = sum;
        }
      }
    });
  }

 private:
  int64_t c_;
  Window w_;
  std::unique_ptr<Acc[]> padded_;
};

// L = delta + alpha/N * s from window sums s of X^2 (s may alias t), then L^-beta into tb; t
// keeps L, or with `next` (the gradient) becomes L^(-beta-1).
template <typename Acc, typename S>
void Denominator(const Params& p, const NegPow& neg_pow, const S* s, Acc* t, Acc* tb, int64_t m,
                 bool next = false) {
  const S scale = S(p.alpha / double(p.kernel_size)), delta = S(p.delta);
#pragma GCC ivdep
  for (int64_t j = 0; j < m; ++j) t[j] = Acc(delta + scale * s[j]);
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
    const ChannelTiles tiles(s, kernel_size);
    const Window window = Window::Forward(kernel_size);
    if (tiles.pixel_major()) {
      ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
        const auto tile = tiles[i];
        const int64_t m = s.c * tile.pixels;
        const T* __restrict__ xp = xs + tile.offset;
        T* __restrict__ yp = ys + tile.offset;
        auto t = Scratch<Acc>(m);
        TapSums<Acc> sums(s.c, window);
        sums(tile.pixels, [&](int64_t k) { const Acc v = Load(xp[k]); return v * v; }, t.get());
        Denominator(p, neg_pow, t.get(), t.get(), t.get(), m);
        for (int64_t k = 0; k < m; ++k) Store(yp + k, Load(xp[k]) * t[k]);
      });
      return ffi::Error::Success();
    }
    ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
      const auto tile = tiles[i];
      const int64_t capacity = tiles.max_values(), m = s.c * tile.pixels;
      auto xt = Scratch<Acc>(capacity), t = Scratch<Acc>(capacity);
      auto sums = Scratch<double>(capacity);
      tiles.Load(xs, tile, xt.get());
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) t[j] = xt[j] * xt[j];
      tiles.Sum(t.get(), sums.get(), tile, window);
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
    const ChannelTiles tiles(s, kernel_size);
    const Window forward = Window::Forward(kernel_size), adjoint = Window::Adjoint(kernel_size);
    if (tiles.pixel_major()) {
      ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
        const auto tile = tiles[i];
        const int64_t m = s.c * tile.pixels;
        const T* __restrict__ xp = xs + tile.offset;
        const T* __restrict__ gp = gs + tile.offset;
        T* __restrict__ dxp = dxs + tile.offset;
        auto t = Scratch<Acc>(m), tb = Scratch<Acc>(m), inner = Scratch<Acc>(m);
        TapSums<Acc> forward_sums(s.c, forward), adjoint_sums(s.c, adjoint);
        forward_sums(tile.pixels, [&](int64_t k) { const Acc v = Load(xp[k]); return v * v; },
                     t.get());
        Denominator(p, neg_pow, t.get(), t.get(), tb.get(), m, /*next=*/true);
        // t: L^(-beta-1), tb: L^-beta.
#pragma GCC ivdep
        for (int64_t k = 0; k < m; ++k) inner[k] = Load(gp[k]) * Load(xp[k]) * t[k];
        adjoint_sums(tile.pixels, [&](int64_t k) { return inner[k]; }, t.get());
        const Acc c = Acc(coef);
        for (int64_t k = 0; k < m; ++k)
          Store(dxp + k, Load(gp[k]) * tb[k] - c * t[k] * Load(xp[k]));
      });
      return ffi::Error::Success();
    }
    ParallelForVectorized(pool, tiles.count(), [&](int64_t i) {
      const auto tile = tiles[i];
      const int64_t capacity = tiles.max_values(), m = s.c * tile.pixels;
      auto xt = Scratch<Acc>(capacity), g = Scratch<Acc>(capacity);
      auto inner = Scratch<Acc>(capacity), t = Scratch<Acc>(capacity);
      auto tb = Scratch<Acc>(capacity), sums = Scratch<double>(capacity);
      tiles.Load(xs, tile, xt.get());
      tiles.Load(gs, tile, g.get());
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) inner[j] = xt[j] * xt[j];
      tiles.Sum(inner.get(), sums.get(), tile, forward);
      Denominator(p, neg_pow, sums.get(), t.get(), tb.get(), m, /*next=*/true);
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        inner[j] = g[j] * xt[j] * t[j];  // t: L^(-beta-1)
        g[j] *= tb[j];                   // now g L^-beta
      }
      tiles.Sum(inner.get(), sums.get(), tile, adjoint);
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
