// Per-(image, channel) reductions and affine maps over an NHWC or NCHW image, shared by the
// instance and batch norm kernels: vectorisable row loops, deterministic partial sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_types.h"
#include "parallel.h"

namespace jaxmps::cpu {

// Work units: NHWC (image, chunk of 128 pixels, all channels); NCHW (image, channel, chunk of
// 2048 pixels read as rows of kPlaneLanes). Either way each float32 partial sum covers 128
// values before it is added in double across chunks (short enough to keep float32 sums
// accurate), and the chunking depends only on the shape, so results are bitwise identical for
// any thread count. NCHW chunks are longer because each is one contiguous run: 128-pixel units
// cost more in hand-out than in arithmetic there.
constexpr int64_t kPixelChunk = 128;
constexpr int64_t kPlaneLanes = 16;
constexpr int64_t kPlaneChunk = kPixelChunk * kPlaneLanes;

template <typename T>
using AccOf = decltype(Load(std::declval<T>()));

// Calls f(j0, width) for the NHWC channel blocks [j0, j0 + width) of a C-channel pixel: full
// blocks with width = integral_constant<kPlaneLanes> (a compile-time trip count the loop
// vectoriser turns into whole registers), then the ragged last block with a runtime width.
template <typename F>
void ForChannelBlocks(int64_t c, F&& f) {
  int64_t j0 = 0;
  for (; j0 + kPlaneLanes <= c; j0 += kPlaneLanes) {
    f(j0, std::integral_constant<int64_t, kPlaneLanes>{});
  }
  if (j0 < c) f(j0, c - j0);
}

struct Units {
  int64_t chunk, chunks_per_plane, count;
  explicit Units(const ImageShape& s)
      : chunk(s.channels_last ? kPixelChunk : kPlaneChunk),
        chunks_per_plane((s.pixels() + chunk - 1) / chunk),
        count(s.n * chunks_per_plane * (s.channels_last ? 1 : s.c)) {}
};

// For every (n, c): first[n*C+c] = sum_p u, second[n*C+c] = sum_p v where
// (u, v) = pair(a[i], b[i], center[n*C+c]) over the pixels p of image n, channel c.
// `b` may be null (pair then gets 0 for it). Used for moments (u = x - pivot, v = u^2) and for
// gradient sums (u = g, v = g * (x - mean)).
template <bool kHasB, typename T, typename Pair>
void SumPairsImpl(ffi::ThreadPool& pool, const ImageShape& s, const T* __restrict__ a,
                  const T* __restrict__ b, const AccOf<T>* __restrict__ center, Pair pair,
                  std::vector<double>& first, std::vector<double>& second) {
  using Acc = AccOf<T>;
  const Units units(s);
  const int64_t pixels = s.pixels(), c = s.c;
  // One slot per unit: NHWC units hold C partial pairs, NCHW units one pair.
  const int64_t slot = s.channels_last ? c : 1;
  std::vector<double> part1(units.count * slot), part2(units.count * slot);
  // kHasB is a template parameter so the inner loops carry no branch and vectorise.
  auto second_of = [&](int64_t i) { return kHasB ? Load(b[i]) : Acc(0); };
  ParallelForVectorized(pool, units.count, [&](int64_t unit) {
    const int64_t chunk = unit % units.chunks_per_plane;
    const int64_t p0 = chunk * units.chunk, p1 = std::min(pixels, p0 + units.chunk);
    double* out1 = part1.data() + unit * slot;
    double* out2 = part2.data() + unit * slot;
    if (s.channels_last) {
      const int64_t n = unit / units.chunks_per_plane;
      const Acc* ctr = center + n * c;
      // One block of kPlaneLanes channels at a time down the unit's pixels, its sums in
      // registers (a C-long accumulator array went through memory at every pixel: the pass ran
      // 2x NCHW's). The unit's rows stay in L1 across blocks. Each channel still adds its
      // pixels in order: the same sums, bit for bit.
      ForChannelBlocks(c, [&](int64_t j0, auto width) {
        const int64_t w = width;
        Acc l1[kPlaneLanes] = {}, l2[kPlaneLanes] = {};
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t row = n * s.sn + p * c + j0;
#pragma GCC unroll 1
          for (int64_t k = 0; k < w; ++k) {
            auto [u, v] = pair(Load(a[row + k]), second_of(row + k), ctr[j0 + k]);
            l1[k] += u;
            l2[k] += v;
          }
        }
        for (int64_t k = 0; k < w; ++k) out1[j0 + k] = l1[k], out2[j0 + k] = l2[k];
      });
    } else {
      const int64_t plane = unit / units.chunks_per_plane;  // = n * C + c
      const int64_t base = plane * pixels;
      const Acc ctr = center[plane];
      // The plane read as rows of kPlaneLanes pixels, one partial sum per lane: the same
      // independent-accumulator loop as NHWC's. `unroll 1` keeps GCC from unrolling the lane
      // loop into scalars before the loop vectoriser sees it (the SLP pass then rebuilt them
      // with shuffles: the statistics pass ran 3x slower). The ragged tail goes to lane 0.
      Acc l1[kPlaneLanes] = {}, l2[kPlaneLanes] = {};
      int64_t p = p0;
      for (; p + kPlaneLanes <= p1; p += kPlaneLanes) {
#pragma GCC unroll 1
        for (int64_t k = 0; k < kPlaneLanes; ++k) {
          auto [u, v] = pair(Load(a[base + p + k]), second_of(base + p + k), ctr);
          l1[k] += u;
          l2[k] += v;
        }
      }
      for (; p < p1; ++p) {
        auto [u, v] = pair(Load(a[base + p]), second_of(base + p), ctr);
        l1[0] += u;
        l2[0] += v;
      }
      double t1 = 0, t2 = 0;
      for (int64_t k = 0; k < kPlaneLanes; ++k) t1 += l1[k], t2 += l2[k];
      out1[0] = t1, out2[0] = t2;
    }
  });
  // Combine the chunks of each (n, c) in a fixed order.
  first.assign(s.n * c, 0.0);
  second.assign(s.n * c, 0.0);
  for (int64_t unit = 0; unit < units.count; ++unit) {
    if (s.channels_last) {
      const int64_t n = unit / units.chunks_per_plane;
      for (int64_t j = 0; j < c; ++j) {
        first[n * c + j] += part1[unit * c + j];
        second[n * c + j] += part2[unit * c + j];
      }
    } else {
      const int64_t plane = unit / units.chunks_per_plane;
      first[plane] += part1[unit];
      second[plane] += part2[unit];
    }
  }
}

template <typename T, typename Pair>
void SumPairs(ffi::ThreadPool& pool, const ImageShape& s, const T* a, const T* b,
              const AccOf<T>* center, Pair pair, std::vector<double>& first,
              std::vector<double>& second) {
  if (b) {
    SumPairsImpl<true>(pool, s, a, b, center, pair, first, second);
  } else {
    SumPairsImpl<false>(pool, s, a, b, center, pair, first, second);
  }
}

// out[i] = ca[k] * g[i] + cb[k] * x[i] + cc[k] for every element, k = n*C + c; `g` may be null
// (then out = cb * x + cc). One pass, vectorised along the contiguous axis.
template <typename T>
void AffineMap(ffi::ThreadPool& pool, const ImageShape& s, const T* __restrict__ x,
               const T* __restrict__ g, T* __restrict__ out, const AccOf<T>* ca,
               const AccOf<T>* cb, const AccOf<T>* cc) {
  const Units units(s);
  const int64_t pixels = s.pixels(), c = s.c;
  ParallelForVectorized(pool, units.count, [&](int64_t unit) {
    const int64_t chunk = unit % units.chunks_per_plane;
    const int64_t p0 = chunk * units.chunk, p1 = std::min(pixels, p0 + units.chunk);
    if (s.channels_last) {
      const int64_t n = unit / units.chunks_per_plane;
      const auto *a = ca + n * c, *b = cb + n * c, *k = cc + n * c;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t row = n * s.sn + p * c;
        if (g) {
          for (int64_t j = 0; j < c; ++j)
            Store(out + row + j, a[j] * Load(g[row + j]) + b[j] * Load(x[row + j]) + k[j]);
        } else {
          for (int64_t j = 0; j < c; ++j) Store(out + row + j, b[j] * Load(x[row + j]) + k[j]);
        }
      }
    } else {
      const int64_t plane = unit / units.chunks_per_plane;
      const int64_t base = plane * pixels;
      const auto a = ca[plane], b = cb[plane], k = cc[plane];
      if (g) {
        for (int64_t p = p0; p < p1; ++p)
          Store(out + base + p, a * Load(g[base + p]) + b * Load(x[base + p]) + k);
      } else {
        for (int64_t p = p0; p < p1; ++p) Store(out + base + p, b * Load(x[base + p]) + k);
      }
    }
  });
}

// Sums per-image values over the batch in a fixed order (deterministic).
inline std::vector<double> SumOverImages(const std::vector<double>& per_nc, int64_t n,
                                         int64_t c) {
  std::vector<double> out(c, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) out[j] += per_nc[i * c + j];
  return out;
}

// Per-(n, c) mean and biased variance over `groups` images at a time from shifted moments:
// with u = x - pivot, mean = pivot + E[u], var = E[u^2] - E[u]^2 (the pivot, one sample of the
// same (n, c), keeps the float32 sums free of cancellation when |mean| >> std).
template <typename T>
void ShiftedMoments(ffi::ThreadPool& pool, const ImageShape& s, const T* x,
                    std::vector<AccOf<T>>& pivot, std::vector<double>& sum_u,
                    std::vector<double>& sum_uu) {
  using Acc = AccOf<T>;
  pivot.resize(s.n * s.c);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c) {
      const Acc v = Load(x[n * s.sn + c * s.sc]);
      // A non-finite pivot would poison every sum: fall back to 0 (NaN/Inf still propagate
      // through the sums themselves).
      pivot[n * s.c + c] = (v - v == Acc(0)) ? v : Acc(0);
    }
  SumPairs(pool, s, x, static_cast<const T*>(nullptr), pivot.data(),
           [](Acc xv, Acc, Acc p) {
             const Acc u = xv - p;
             return std::pair<Acc, Acc>(u, u * u);
           },
           sum_u, sum_uu);
}

}  // namespace jaxmps::cpu
