// Direct loops for convolutions with one input channel per group (depthwise, any channel
// multiplier O/G): forward, data gradient and weights gradient, where a GEMM would be narrow.
#pragma once

#include <algorithm>
#include <vector>

#include "conv_common.h"

namespace jaxmps::cpu {

// The direct loops serve groups that read a single input channel, where a GEMM would be one
// column wide: always in the data gradient (its GEMM columns are the I/G = 1 inputs); in the
// forward and the weights gradient (columns: the O/G outputs of a group) only while O/G is
// below kMinGemmColumns. From there on (a first layer of 1 -> 16 channels) the GEMM's vector
// tiles are mostly full and beat these loops, which are compiled for the baseline ISA.
constexpr int64_t kMinGemmColumns = 8;
inline bool UseDepthwise(const ConvProblem& p) { return p.ig == 1 && p.og < kMinGemmColumns; }
inline bool UseDepthwiseDataGradient(const ConvProblem& p) { return p.ig == 1; }

// Range [lo, hi) of output columns ox whose input column ox*sw + offset lies in [0, width).
inline void ValidRange(int64_t count, int64_t stride, int64_t offset, int64_t width,
                       int64_t* lo, int64_t* hi) {
  *lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *hi = width - offset <= 0 ? 0 : std::min(count, (width - offset - 1) / stride + 1);
  *hi = std::max(*hi, *lo);
}

// Calls f(tap, iy, offset, lo, hi) for the taps of output row oy that read an image row:
// input row iy, input column ox * stride_w + offset for output columns ox in [lo, hi).
template <typename F>
inline void ForEachTapOfRow(const ConvProblem& p, int64_t oy, F&& f) {
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    const int64_t iy = oy * p.stride_h - p.pad_top + ky * p.dilation_h;
    if (iy < 0 || iy >= p.x.h) continue;
    for (int64_t kx = 0; kx < p.kw; ++kx) {
      const int64_t offset = kx * p.dilation_w - p.pad_left;
      int64_t lo, hi;
      ValidRange(p.y.w, p.stride_w, offset, p.x.w, &lo, &hi);
      f(ky * p.kw + kx, iy, offset, lo, hi);
    }
  }
}

// Weights (O, KH, KW, 1) as [tap][o] in Acc, so NHWC loops read them contiguously.
template <typename Acc>
std::vector<Acc> WeightsByTap(const ConvProblem& p, const Acc* w) {
  std::vector<Acc> wt(p.taps() * p.y.c);
  for (int64_t o = 0; o < p.y.c; ++o)
    for (int64_t t = 0; t < p.taps(); ++t) wt[t * p.y.c + o] = w[o * p.taps() + t];
  return wt;
}

// y[n,oy,ox,o] = b[o] + sum_taps w[o,tap] x[n,iy,ix,o/og]. NHWC: a unit is an output row,
// vectorised over channels; NCHW: a unit is an output plane, vectorised over columns.
template <typename T, typename Acc>
void DepthwiseForward(ffi::ThreadPool& pool, const ConvProblem& p, const T* x, const Acc* w,
                      const Acc* bias, T* y) {
  const ImageShape &xs = p.x, &ys = p.y;
  const int64_t og = p.og, oc = ys.c;
  if (ys.channels_last) {
    const std::vector<Acc> wt = WeightsByTap(p, w);
    ParallelFor(pool, ys.n * ys.h, [&](int64_t unit) {
      const int64_t n = unit / ys.h, oy = unit % ys.h;
      Acc* acc = ThreadScratch<Acc, kCBlock>(ys.w * oc);
      for (int64_t ox = 0; ox < ys.w; ++ox) std::copy(bias, bias + oc, acc + ox * oc);
      ForEachTapOfRow(p, oy, [&](int64_t tap, int64_t iy, int64_t off, int64_t lo, int64_t hi) {
        const Acc* wk = wt.data() + tap * oc;
        for (int64_t ox = lo; ox < hi; ++ox) {
          const T* src = x + n * xs.sn + iy * xs.sh + (ox * p.stride_w + off) * xs.sw;
          Acc* a = acc + ox * oc;
          if (og == 1) {
            for (int64_t o = 0; o < oc; ++o) a[o] += wk[o] * Acc(Load(src[o]));
          } else {  // input channel c feeds the og consecutive outputs c*og ...
            for (int64_t c = 0; c < xs.c; ++c) {
              const Acc v = Acc(Load(src[c]));
              for (int64_t j = 0; j < og; ++j) a[c * og + j] += wk[c * og + j] * v;
            }
          }
        }
      });
      T* dst = y + n * ys.sn + oy * ys.sh;
      for (int64_t i = 0; i < ys.w * oc; ++i) StoreAs(dst + i, acc[i]);
    });
    return;
  }
  ParallelFor(pool, ys.n * oc, [&](int64_t unit) {
    const int64_t n = unit / oc, o = unit % oc;
    const T* plane = x + n * xs.sn + (o / og) * xs.sc;
    std::vector<Acc> row(ys.w);
    for (int64_t oy = 0; oy < ys.h; ++oy) {
      std::fill(row.begin(), row.end(), bias[o]);
      ForEachTapOfRow(p, oy, [&](int64_t tap, int64_t iy, int64_t off, int64_t lo, int64_t hi) {
        const Acc wv = w[o * p.taps() + tap];
        const T* src = plane + iy * xs.sh + off;
        for (int64_t ox = lo; ox < hi; ++ox) row[ox] += wv * Acc(Load(src[ox * p.stride_w]));
      });
      T* dst = y + n * ys.sn + o * ys.sc + oy * ys.sh;
      for (int64_t ox = 0; ox < ys.w; ++ox) StoreAs(dst + ox, row[ox]);
    }
  });
}

// dx[n,iy,ix,c] = sum over o in group c and taps reaching (iy, ix) of w[o,tap] dy[n,oy,ox,o],
// in scatter form (any stride, no divisibility tests). A unit owns whole dx images (NHWC) or
// planes (NCHW) and accumulates them in Acc before one store.
template <typename T, typename Acc>
void DepthwiseDataGradient(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy,
                           const Acc* w, T* dx) {
  const ImageShape &xs = p.x, &ys = p.y;
  const int64_t og = p.og, oc = ys.c, ic = xs.c;
  if (ys.channels_last) {
    const std::vector<Acc> wt = WeightsByTap(p, w);
    // Per dx pixel one partial sum per output channel o (vector loops over all O channels),
    // summed over each input channel's og outputs at the end.
    ParallelFor(pool, ys.n, [&](int64_t n) {
      std::vector<Acc> acc_image(xs.h * xs.w * oc, Acc(0));  // a whole image: not kept
      Acc* acc = acc_image.data();
      for (int64_t oy = 0; oy < ys.h; ++oy) {
        ForEachTapOfRow(p, oy, [&](int64_t tap, int64_t iy, int64_t off, int64_t lo,
                                   int64_t hi) {
          const Acc* wk = wt.data() + tap * oc;
          for (int64_t ox = lo; ox < hi; ++ox) {
            const T* g = dy + n * ys.sn + oy * ys.sh + ox * ys.sw;
            Acc* a = acc + (iy * xs.w + ox * p.stride_w + off) * oc;
            for (int64_t o = 0; o < oc; ++o) a[o] += wk[o] * Acc(Load(g[o]));
          }
        });
      }
      T* dst = dx + n * xs.sn;
      if (og == 1) {
        for (int64_t i = 0; i < xs.h * xs.w * ic; ++i) StoreAs(dst + i, acc[i]);
      } else {
        for (int64_t i = 0; i < xs.h * xs.w * ic; ++i) {
          Acc sum = 0;
          for (int64_t j = 0; j < og; ++j) sum += acc[i * og + j];
          StoreAs(dst + i, sum);
        }
      }
    });
    return;
  }
  ParallelFor(pool, ys.n * ic, [&](int64_t unit) {
    const int64_t n = unit / ic, c = unit % ic;
    std::vector<Acc> acc(xs.h * xs.w, Acc(0));
    for (int64_t o = c * og; o < (c + 1) * og; ++o) {
      const T* gplane = dy + n * ys.sn + o * ys.sc;
      for (int64_t oy = 0; oy < ys.h; ++oy) {
        ForEachTapOfRow(p, oy, [&](int64_t tap, int64_t iy, int64_t off, int64_t lo,
                                   int64_t hi) {
          const Acc wv = w[o * p.taps() + tap];
          Acc* a = acc.data() + iy * xs.w + off;
          const T* g = gplane + oy * ys.sh;
          for (int64_t ox = lo; ox < hi; ++ox) a[ox * p.stride_w] += wv * Acc(Load(g[ox]));
        });
      }
    }
    T* dst = dx + n * xs.sn + c * xs.sc;
    for (size_t i = 0; i < acc.size(); ++i) StoreAs(dst + i, acc[i]);
  });
}

// dW[o,tap] = sum_{n,oy,ox} dy[n,oy,ox,o] x[n,iy,ix,o/og], db[o] = sum dy. A unit owns a block
// of output channels (NHWC: 16 channels, NCHW: one) over a fixed range of images (a batch
// slot); the slots' partial sums are added in slot order at the end. The split depends on the
// shapes only, so results do not depend on the thread count.
template <typename T, typename Acc>
void DepthwiseWeightsGradient(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy,
                              const T* x, Acc* dw, Acc* db) {
  const ImageShape &xs = p.x, &ys = p.y;
  const int64_t og = p.og, oc = ys.c, taps = p.taps(), block = ys.channels_last ? 16 : 1;
  const int64_t blocks = (oc + block - 1) / block;
  // Enough units for the pool even when the channels make a single block (a first layer).
  const int64_t slots = std::min<int64_t>(ys.n, std::max<int64_t>(1, 16 / blocks));
  const int64_t slot_size = oc * (taps + 1);  // dW then db
  std::vector<Acc> partial(slots * slot_size, Acc(0));
  ParallelFor(pool, blocks * slots, [&](int64_t unit) {
    const int64_t o0 = (unit / slots) * block, o1 = std::min(oc, o0 + block), nb = o1 - o0;
    const int64_t slot = unit % slots;
    // Sums local to the unit ([tap][j], then db), copied to the slot's partial sums at the end
    // (accumulating in the shared buffer would bounce cache lines between threads).
    std::vector<Acc> sums(nb * (taps + 1), Acc(0));
    Acc* acc = sums.data();
    Acc* bsum = sums.data() + nb * taps;
    // Element offsets of the block's channels in dy and in x (channel o reads o / og).
    std::vector<int64_t> g_off(nb), x_off(nb);
    for (int64_t j = 0; j < nb; ++j) {
      g_off[j] = (o0 + j) * ys.sc, x_off[j] = (o0 + j) / og * xs.sc;
    }
    const int64_t c0 = o0 / og, c1 = (o1 - 1) / og + 1;  // input channels the block reads
    for (int64_t n = slot * ys.n / slots; n < (slot + 1) * ys.n / slots; ++n) {
      for (int64_t oy = 0; oy < ys.h; ++oy) {
        const T* grow = dy + n * ys.sn + oy * ys.sh;
        for (int64_t ox = 0; ox < ys.w; ++ox)
          for (int64_t j = 0; j < nb; ++j) bsum[j] += Acc(Load(grow[ox * ys.sw + g_off[j]]));
        ForEachTapOfRow(p, oy, [&](int64_t tap, int64_t iy, int64_t off, int64_t lo,
                                   int64_t hi) {
          Acc* a = acc + tap * nb;
          const T* xrow = x + n * xs.sn + iy * xs.sh;
          if (!ys.channels_last) {  // one channel per unit: a dot product along the row
            const T* g = grow + g_off[0];
            const T* src = xrow + x_off[0] + off;
            Acc sum = 0;
            for (int64_t ox = lo; ox < hi; ++ox) {
              sum += Acc(Load(g[ox])) * Acc(Load(src[ox * p.stride_w]));
            }
            a[0] += sum;
            return;
          }
          for (int64_t ox = lo; ox < hi; ++ox) {
            const T* src = xrow + (ox * p.stride_w + off) * xs.sw;
            const T* g = grow + ox * ys.sw;
            if (og == 1) {
              for (int64_t j = 0; j < nb; ++j) {
                a[j] += Acc(Load(g[o0 + j])) * Acc(Load(src[o0 + j]));
              }
            } else {  // input channel c feeds outputs [c*og, (c+1)*og) of the block
              for (int64_t c = c0; c < c1; ++c) {
                const Acc v = Acc(Load(src[c]));
                const int64_t lo_o = std::max(o0, c * og), hi_o = std::min(o1, (c + 1) * og);
                for (int64_t o = lo_o; o < hi_o; ++o) a[o - o0] += Acc(Load(g[o])) * v;
              }
            }
          }
        });
      }
    }
    std::copy(acc, acc + nb * taps, partial.data() + slot * slot_size + o0 * taps);
    std::copy(bsum, bsum + nb, partial.data() + slot * slot_size + oc * taps + o0);
  });
  // dW[o][t] from the blocks' [tap][j] layout, each sum over the slots in slot order.
  for (int64_t o = 0; o < oc; ++o) {
    const int64_t o0 = o / block * block, nb = std::min(oc, o0 + block) - o0;
    for (int64_t t = 0; t < taps; ++t) {
      Acc sum = 0;
      for (int64_t s = 0; s < slots; ++s) {
        sum += partial[s * slot_size + o0 * taps + t * nb + (o - o0)];
      }
      dw[o * taps + t] = sum;
    }
    Acc sum = 0;
    for (int64_t s = 0; s < slots; ++s) sum += partial[s * slot_size + oc * taps + o];
    db[o] = sum;
  }
}

}  // namespace jaxmps::cpu
