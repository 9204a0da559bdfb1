// Window-sum machinery shared by the spatial, local-contrast and cross-channel norm kernels:
// running sums in double (1-D over lanes, streamed separable 2-D), T^-beta, strided row I/O.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "cpu_types.h"
#include "parallel.h"

namespace jaxmps::cpu {

// ---------------------------------------------------------------------------------------------
// Windows. A window centred on c covers [c - lo, c + hi]; out-of-range taps read zero.
// ---------------------------------------------------------------------------------------------

struct Window {
  int64_t lo = 0, hi = 0;

  // MPS placement of a forward window of size k (extra tap on the low side for even k) ...
  static Window Forward(int64_t k) { return {k / 2, (k - 1) / 2}; }
  // ... and of its adjoint S^T, the mirrored window.
  static Window Adjoint(int64_t k) { return {(k - 1) / 2, k / 2}; }

  // On an axis of `len` positions a reach beyond len - 1 never adds a tap, so clipping it keeps
  // every sum identical while bounding buffers by the image rather than the kernel.
  Window ClippedTo(int64_t len) const {
    return {std::min(lo, len - 1), std::min(hi, len - 1)};
  }
  int64_t size() const { return lo + hi + 1; }
};

inline ffi::Error CheckWindowSize(std::string_view op, std::string_view name, int64_t k) {
  if (k < 1) return InvalidArgument(op, name, " must be a positive window size, got ", k);
  return ffi::Error::Success();
}

// True when no element is NaN or +-Inf. Integer bit tests, so the loop vectorises (a floating
// point reduction would not, without -ffast-math): adding 2^52 to the exponent field carries
// into the sign bit exactly when the exponent is all ones.
inline bool AllFinite(const double* v, int64_t n) {
  constexpr uint64_t kExponent = 0x7ff0000000000000ull, kExponentOne = 1ull << 52;
  uint64_t carry = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t bits;
    std::memcpy(&bits, v + i, sizeof bits);
    carry |= (bits & kExponent) + kExponentOne;
  }
  return (carry >> 63) == 0;
}

// ---------------------------------------------------------------------------------------------
// 1-D window sums over a line of `len` positions, each holding `lanes` contiguous values:
//   out[p*lanes + l] = sum of in[q*lanes + l] over q in [p - lo, p + hi] ∩ [0, len),
// accumulated in double. Windows of up to kDirectWindow taps are summed directly (as cheap as
// a running sum, and exact for one tap); wider ones use a running sum, one add and one
// subtract per element whatever the size, with drift far below float32 resolution.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kDirectWindow = 3;

// Direct sums of lanes [l0, l1).
template <typename V>
void DirectWindowSum(const V* in, double* out, int64_t len, int64_t lanes, Window win,
                     int64_t l0, int64_t l1) {
  for (int64_t p = 0; p < len; ++p) {
    double* o = out + p * lanes;
    for (int64_t l = l0; l < l1; ++l) o[l] = 0.0;
    const int64_t q1 = std::min(len - 1, p + win.hi);
    for (int64_t q = std::max<int64_t>(0, p - win.lo); q <= q1; ++q) {
      const V* add = in + q * lanes;
      for (int64_t l = l0; l < l1; ++l) o[l] += double(add[l]);
    }
  }
}

// A running sum would carry a non-finite value past its window (inf - inf = NaN), but it also
// never becomes finite again; so a lane whose last position is non-finite is redone directly,
// which gives the reference's per-window NaN/Inf exactly.
template <typename V>
void WindowSum1D(const V* in, double* out, int64_t len, int64_t lanes, Window win) {
  if (len <= 0 || lanes <= 0) return;
  win = win.ClippedTo(len);
  if (win.size() <= kDirectWindow) return DirectWindowSum(in, out, len, lanes, win, 0, lanes);
  for (int64_t l = 0; l < lanes; ++l) out[l] = 0.0;
  for (int64_t q = 0; q <= win.hi; ++q) {
    const V* add = in + q * lanes;
    for (int64_t l = 0; l < lanes; ++l) out[l] += double(add[l]);
  }
  for (int64_t p = 1; p < len; ++p) {
    const double* prev = out + (p - 1) * lanes;
    double* cur = out + p * lanes;
    const bool adds = p + win.hi < len, subs = p - win.lo - 1 >= 0;
    const V* add = in + (p + win.hi) * lanes;
    const V* sub = in + (p - win.lo - 1) * lanes;
    if (adds && subs) {
      for (int64_t l = 0; l < lanes; ++l) cur[l] = (prev[l] + double(add[l])) - double(sub[l]);
    } else if (adds) {
      for (int64_t l = 0; l < lanes; ++l) cur[l] = prev[l] + double(add[l]);
    } else if (subs) {
      for (int64_t l = 0; l < lanes; ++l) cur[l] = prev[l] - double(sub[l]);
    } else {
      for (int64_t l = 0; l < lanes; ++l) cur[l] = prev[l];
    }
  }
  const double* last = out + (len - 1) * lanes;
  for (int64_t l = 0; l < lanes; ++l) {
    if (!std::isfinite(last[l])) DirectWindowSum(in, out, len, lanes, win, l, l + 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Streamed separable 2-D window sums over an image region of `height` rows; each row holds
// `width` pixels x `lanes` channels (lanes fastest), values of type V (the data's accumulation
// type). Rows enter top to bottom through a source callback into a ring holding just the rows
// the vertical window needs; double column sums follow the window (add rows entering,
// subtract rows leaving) and a horizontal 1-D window sum over them gives each output row.
// Several "summed" planes share the window (e.g. X and X^2); "payload" planes ride in the
// same ring unsummed, for values an output row needs again (e.g. g T^-beta). Memory is
// O(window rows x row), so large images stream through cache.
// ---------------------------------------------------------------------------------------------

template <typename V>
class WindowStream {
 public:
  WindowStream(int64_t height, int64_t width, int64_t lanes, Window vertical, Window horizontal,
               int summed, int payload = 0)
      : height_(height),
        width_(width),
        lanes_(lanes),
        row_(width * lanes),
        vertical_(vertical.ClippedTo(height)),
        horizontal_(horizontal),
        summed_(summed),
        planes_(summed + payload),
        // Rows live at once: the previous output row's window plus the rows entering.
        ring_rows_(std::min(height, vertical_.size() + 1)),
        ring_(size_t(planes_) * ring_rows_ * row_),
        columns_(size_t(summed) * row_),
        dirty_(summed, false),
        slots_(planes_) {}

  // Row r of plane k, while it is in the ring.
  V* Row(int64_t r, int k) {
    return ring_.data() + (size_t(k) * ring_rows_ + size_t(r % ring_rows_)) * row_;
  }

  // Writes the window sums of output row h into sums[k] (row_ doubles) for each summed plane,
  // first pulling the rows it needs: source(r, slots) must fill row r of every plane (slots[k]).
  // Successive calls must ask for consecutive rows h, h + 1, ... (from any first row).
  template <typename Source>
  void Produce(int64_t h, Source&& source, double* const* sums) {
    const int64_t want_lo = std::max<int64_t>(0, h - vertical_.lo);
    const int64_t want_hi = std::min(height_ - 1, h + vertical_.hi);
    if (next_ < 0) {  // first call: the stream starts at the top of this row's window
      next_ = lo_row_ = want_lo;
      hi_row_ = want_lo - 1;
    }
    for (; next_ <= want_hi; ++next_) {
      for (int k = 0; k < planes_; ++k) slots_[k] = Row(next_, k);
      source(next_, slots_.data());
    }
    const bool direct = vertical_.size() <= kDirectWindow;
    for (int k = 0; k < summed_; ++k) {
      double* col = columns_.data() + size_t(k) * row_;
      const bool anchor = direct || dirty_[k];
      if (anchor) {
        Anchor(col, k, want_lo, want_hi);
      } else {
        int64_t in = hi_row_ + 1, out = lo_row_;
        // Steady state: one row enters as one leaves, updated in a single pass.
        for (; in <= want_hi && out < want_lo; ++in, ++out) Slide(col, Row(in, k), Row(out, k));
        for (; in <= want_hi; ++in) Add(col, Row(in, k));
        for (; out < want_lo; ++out) Subtract(col, Row(out, k));
      }
      // Non-finite column sums may be leftovers of a non-finite row that has left the window
      // (inf - inf): recompute them from the ring. While the window still holds non-finite
      // values, every row is recomputed so (dirty), and the running sums resume after.
      bool finite = AllFinite(col, row_);
      if (!finite && !anchor) {
        Anchor(col, k, want_lo, want_hi);
        finite = AllFinite(col, row_);
      }
      dirty_[k] = !finite;
      WindowSum1D(col, sums[k], width_, lanes_, horizontal_);
    }
    lo_row_ = want_lo;
    hi_row_ = want_hi;
  }

 private:
  void Add(double* col, const V* row) const {
    for (int64_t j = 0; j < row_; ++j) col[j] += double(row[j]);
  }
  void Subtract(double* col, const V* row) const {
    for (int64_t j = 0; j < row_; ++j) col[j] -= double(row[j]);
  }
  void Slide(double* col, const V* enter, const V* leave) const {
    for (int64_t j = 0; j < row_; ++j) col[j] = (col[j] + double(enter[j])) - double(leave[j]);
  }
  void Anchor(double* col, int k, int64_t r0, int64_t r1) {
    std::fill(col, col + row_, 0.0);
    for (int64_t r = r0; r <= r1; ++r) Add(col, Row(r, k));
  }

  int64_t height_, width_, lanes_, row_;
  Window vertical_, horizontal_;
  int summed_, planes_;
  int64_t ring_rows_;
  std::vector<V> ring_;
  std::vector<double> columns_;
  std::vector<bool> dirty_;
  std::vector<V*> slots_;
  int64_t next_ = -1, lo_row_ = 0, hi_row_ = -1;  // next row to pull; rows in the column sums
};

// ---------------------------------------------------------------------------------------------
// Work units of the spatial-window kernels: (image, block of 16 to 64 channels, band of rows).
// The partition depends only on the shape and kernel (never on the thread count), so results
// are bitwise reproducible. Bands, each streaming its own halo rows, exist only to give a
// small batch enough units to share out.
// ---------------------------------------------------------------------------------------------

// Spatial windows never cross planes, so an NCHW batch is one image of N*C channels, and an
// NHWC batch of one-channel images is the same memory: the spatial-window kernels run it that
// way, so that work units fill their lanes across images (64 one-channel 16x16 images, the
// demo's first layer: local contrast norm forward+backward 0.52 ms as 64 one-lane units, 0.10
// ms as 4 units of 16 lanes).
inline ImageShape PlanesAsChannels(const ImageShape& s) {
  if ((s.channels_last && s.c != 1) || s.size() == 0) return s;
  ImageShape f = s;
  f.channels_last = false;
  f.n = 1, f.c = s.n * s.c;
  f.sw = 1, f.sh = s.w, f.sc = s.h * s.w, f.sn = f.c * f.sc;
  return f;
}

struct SpatialUnit {
  int64_t n, c0, lanes, h0, h1;
};

class SpatialUnits {
 public:
  static constexpr int64_t kMinUnits = 16;

  // Channels per unit. NHWC: as many as keep a row of the unit within kRowValues values, from
  // 16 (one cache line of floats per pixel) to 64: wider blocks read longer contiguous runs of
  // a row, which the hardware prefetchers follow. Measured on the 2-core CI machine (N=8,
  // 64x64, C=64, window 5, float32): spatial norm forward 2.2 -> 1.75 ms and gradient 4.5 ->
  // 3.7 ms with 64 channels instead of 16; at 128x128, 64 channels still beat 32 and 16. The
  // budget keeps a unit's rings and column sums (about 30 rows for a gradient) within a core's
  // L2. NCHW: 16, since each channel of a unit is a separate stream of plane rows (64 channels
  // measured slower there: spatial norm forward+backward 7.0 -> 8.9-9.6 ms).
  static constexpr int64_t kMinLanes = 16, kMaxLanes = 64, kRowValues = 16384;
  static int64_t LanesFor(const ImageShape& s) {
    if (!s.channels_last) return kMinLanes;
    const int64_t fit = kRowValues / std::max<int64_t>(1, s.w) / kMinLanes * kMinLanes;
    return std::clamp(fit, kMinLanes, kMaxLanes);
  }

  // `halo_rows`: rows beyond the band a unit must stream (kernel_h - 1 per window pass).
  SpatialUnits(const ImageShape& s, int64_t halo_rows) : s_(s), lanes_(LanesFor(s)) {
    blocks_ = (s.c + lanes_ - 1) / lanes_;
    const int64_t images = s.n * blocks_;
    int64_t bands = images > 0 ? (kMinUnits + images - 1) / images : 1;
    // Keep every band several halos tall so streamed halo rows stay a small overhead.
    const int64_t min_band = std::max<int64_t>(16, 4 * halo_rows);
    bands = std::max<int64_t>(1, std::min(bands, s.h / min_band));
    band_rows_ = (s.h + bands - 1) / bands;
    bands_ = band_rows_ > 0 ? (s.h + band_rows_ - 1) / band_rows_ : 0;
  }

  int64_t count() const { return s_.n * blocks_ * bands_; }

  SpatialUnit operator[](int64_t i) const {
    const int64_t band = i % bands_, rest = i / bands_;
    const int64_t c0 = (rest % blocks_) * lanes_, n = rest / blocks_;
    const int64_t h0 = band * band_rows_;
    return {n, c0, std::min(lanes_, s_.c - c0), h0, std::min(s_.h, h0 + band_rows_)};
  }

 private:
  ImageShape s_;
  int64_t lanes_;
  int64_t blocks_ = 0, bands_ = 0, band_rows_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Strided gathers into / scatters from dense [positions][lanes] buffers. One pair serves both
// layouts: position and lane strides come from ImageShape (e.g. an NHWC row: positions w at
// stride C, lanes c at stride 1; an NCHW row: positions at stride 1, lanes at stride H*W).
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void Gather(const T* src, int64_t positions, int64_t pos_stride, int64_t lanes,
            int64_t lane_stride, A* out) {
  if (lane_stride == 1 || pos_stride != 1) {
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t l = 0; l < lanes; ++l)
        out[p * lanes + l] = A(Load(src[p * pos_stride + l * lane_stride]));
  } else {  // positions contiguous: walk memory in order
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t p = 0; p < positions; ++p) out[p * lanes + l] = A(Load(src[p + l * lane_stride]));
  }
}

template <typename A, typename T>
void Scatter(const A* in, int64_t positions, int64_t pos_stride, int64_t lanes,
             int64_t lane_stride, T* dst) {
  if (lane_stride == 1 || pos_stride != 1) {
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t l = 0; l < lanes; ++l)
        Store(dst + p * pos_stride + l * lane_stride, in[p * lanes + l]);
  } else {
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t p = 0; p < positions; ++p) Store(dst + p + l * lane_stride, in[p * lanes + l]);
  }
}

inline void PrefetchLine(const void* address) {
#if defined(__x86_64__)
  // Not __builtin_prefetch: GCC deletes loops whose only statements are prefetch builtins.
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(address)));
#else
  __builtin_prefetch(address);
#endif
}

// Asks for the cache lines a later Gather of the same region reads. Units read strided slices
// of the image (64 bytes of every NHWC pixel, or rows of 16 NCHW planes), which hardware
// prefetchers follow poorly.
template <typename T>
void Prefetch(const T* src, int64_t positions, int64_t pos_stride, int64_t lanes,
              int64_t lane_stride) {
  constexpr int64_t kLine = 64 / sizeof(T);
  if (lane_stride == 1) {
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t l = 0; l < lanes; l += kLine) PrefetchLine(src + p * pos_stride + l);
  } else if (pos_stride == 1) {
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t p = 0; p < positions; p += kLine) PrefetchLine(src + p + l * lane_stride);
  }
}

// Row h of a spatial unit as a [W][lanes] buffer, in either layout.
class UnitRows {
 public:
  UnitRows(const ImageShape& s, const SpatialUnit& u)
      : s_(s), offset_(u.n * s.sn + u.c0 * s.sc), lanes_(u.lanes) {}
  // Also prefetches row h + 1, which the streams read next.
  template <typename T, typename A>
  void Load(const T* image, int64_t h, A* out) const {
    if (h + 1 < s_.h) Prefetch(image + offset_ + (h + 1) * s_.sh, s_.w, s_.sw, lanes_, s_.sc);
    Gather(image + offset_ + h * s_.sh, s_.w, s_.sw, lanes_, s_.sc, out);
  }
  template <typename A, typename T>
  void Store(T* image, int64_t h, const A* in) const {
    Scatter(in, s_.w, s_.sw, lanes_, s_.sc, image + offset_ + h * s_.sh);
  }

 private:
  ImageShape s_;
  int64_t offset_, lanes_;
};

// Calls f(std::integral_constant<int, value>{}) when 0 <= value <= kMax (else nothing), so a
// loop over a small runtime count (a power, a window's taps) is compiled unrolled.
template <int kMax, typename F>
void WithConstant(int64_t value, F&& f) {
  [&]<int... K>(std::integer_sequence<int, K...>) {
    ((value == K ? (f(std::integral_constant<int, K>{}), 0) : 0), ...);
  }(std::make_integer_sequence<int, kMax + 1>{});
}

// ---------------------------------------------------------------------------------------------
// out = t^-beta over an array of V (float or double). The generic form is exp(-beta log t),
// in double. Integer, half- and quarter-integer beta up to 8 (the MPS defaults are 5 and 0.5;
// LRN's classic 0.75) use products of r = 1/t, sqrt r and sqrt sqrt r instead: vectorised, a
// few ulp from pow(), underflowing rather than overflowing for large t, and real for t < 0
// with integer beta, like pow(). (beta = 0.75 through exp/log was 7% of the training demo's
// step in libm.)
// ---------------------------------------------------------------------------------------------

class NegPow {
 public:
  explicit NegPow(double beta) : beta_(beta) {
    const double quarters = 4.0 * beta;
    if (beta == std::nearbyint(beta) && std::fabs(beta) <= kMaxPower) {
      mode_ = beta >= 0 ? kInverseInteger : kInteger;
      power_ = int(std::fabs(beta));
    } else if (beta > 0 && quarters == std::nearbyint(quarters) && beta < kMaxPower) {
      mode_ = kInverseQuarterInteger;
      power_ = int(std::floor(beta));
      quarters_ = int(quarters) - 4 * power_;  // 1, 2 or 3
    } else {
      mode_ = kGeneric;
    }
  }

  // out may alias t. With `next` (distinct from out; it may alias t) also next = t^(-beta-1),
  // which every gradient kernel needs: from r = 1/t where beta's form computes r anyway
  // (next = out * r), saving the gradients' second division; else next = out / t.
  template <typename V>
  void operator()(const V* t, V* out, int64_t n, V* next = nullptr) const {
    if (mode_ == kGeneric) {
      for (int64_t i = 0; i < n; ++i) out[i] = V(std::exp(-beta_ * std::log(double(t[i]))));
      DivideBy(out, t, next, n);
      return;
    }
    WithPower([&](auto power) {
      constexpr int p = decltype(power)::value;
      switch (mode_) {
        case kInteger:
          for (int64_t i = 0; i < n; ++i) out[i] = Power<p>(t[i]);
          DivideBy(out, t, next, n);
          break;
        case kInverseInteger:
        case kInverseQuarterInteger:
          for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
            const int64_t m = std::min(kChunk, n - i0);
            // The chunk of t is read into r before out or next (either may alias t) is written.
            V r[kChunk];
            V* o = out + i0;
            if (mode_ == kInverseInteger) {
              for (int64_t i = 0; i < m; ++i) r[i] = V(1) / t[i0 + i];
              for (int64_t i = 0; i < m; ++i) o[i] = Power<p>(r[i]);
            } else {
              // + 0 maps t = -0 to +0, so r = +inf as pow(-0, -beta) = +inf requires.
              for (int64_t i = 0; i < m; ++i) r[i] = V(1) / (t[i0 + i] + V(0));
              SquareRoots(r, o, m);  // r^(1/2)
              if (quarters_ == 1) {
                SquareRoots(o, o, m);  // r^(1/4)
              } else if (quarters_ == 3) {  // r^(1/2) r^(1/4)
                V q[kChunk];
                SquareRoots(o, q, m);
                for (int64_t i = 0; i < m; ++i) o[i] *= q[i];
              }
              for (int64_t i = 0; i < m; ++i) o[i] *= Power<p>(r[i]);
            }
            if (next != nullptr) {
#pragma GCC ivdep
              for (int64_t i = 0; i < m; ++i) next[i0 + i] = o[i] * r[i];
            }
          }
          break;
        case kGeneric:
          break;
      }
    });
  }

 private:
  // Products stay within a few ulp of pow() up to this power (the MPS default beta is 5).
  static constexpr int kMaxPower = 8;

  static constexpr int64_t kChunk = 256;

  // next = out / t (nothing without next); next may alias t.
  template <typename V>
  static void DivideBy(const V* out, const V* t, V* next, int64_t n) {
    if (next == nullptr) return;
    for (int64_t i = 0; i < n; ++i) next[i] = out[i] / t[i];
  }

  // out = sqrt(in) (NaN for in < 0); out may alias in. Spelled with SSE intrinsics on x86:
  // std::sqrt must set errno for negative input (no -fno-math-errno here), which keeps its
  // loops scalar.
  template <typename V>
  static void SquareRoots(const V* in, V* out, int64_t n) {
    int64_t i = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<V, float>) {
      for (; i + 4 <= n; i += 4) _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
    } else {
      for (; i + 2 <= n; i += 2) _mm_storeu_pd(out + i, _mm_sqrt_pd(_mm_loadu_pd(in + i)));
    }
#endif
    for (; i < n; ++i) out[i] = std::sqrt(in[i]);
  }

  // Calls f(std::integral_constant<int, power_>) so each loop has its power unrolled.
  template <typename F>
  void WithPower(F&& f) const {
    WithConstant<kMaxPower>(power_, std::forward<F>(f));
  }

  // x^P by repeated squaring, unrolled at compile time.
  template <int P, typename V>
  static V Power(V x) {
    if constexpr (P == 0) {
      return V(1);
    } else if constexpr (P == 1) {
      return x;
    } else {
      const V half = Power<P / 2>(x);
      return P % 2 ? half * half * x : half * half;
    }
  }

  enum Mode { kGeneric, kInteger, kInverseInteger, kInverseQuarterInteger };
  double beta_;
  Mode mode_ = kGeneric;
  int power_ = 0;
  int quarters_ = 0;  // kInverseQuarterInteger: beta = power_ + quarters_ / 4
};

}  // namespace jaxmps::cpu
