// Channel-blocked sweeps over an NHWC or NCHW image for the per-channel statistics kernels
// (instance and batch norm): work units of (image, block of channels), contiguous inner loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_types.h"
#include "parallel.h"

namespace jaxmps::cpu {

// NHWC blocks 16 channels (one 64-byte line of float32 per pixel); NCHW blocks single planes.
inline int64_t ChannelBlock(const ImageShape& s) { return s.channels_last ? 16 : 1; }

// Calls unit(n, c0, c1) for every (image, channel block), in parallel on XLA's pool.
template <typename F>
void ForEachChannelBlock(ffi::ThreadPool& pool, const ImageShape& s, F&& unit) {
  const int64_t block = ChannelBlock(s);
  const int64_t blocks = (s.c + block - 1) / block;
  ParallelFor(pool, s.n * blocks, [&](int64_t i) {
    const int64_t n = i / blocks, c0 = (i % blocks) * block;
    unit(n, c0, std::min(s.c, c0 + block));
  });
}

// Visits every element of image n, channels [c0, c1), in memory order: f(flat_index, c).
template <typename F>
inline void SweepBlock(const ImageShape& s, int64_t n, int64_t c0, int64_t c1, F&& f) {
  const int64_t base = n * s.sn, pixels = s.pixels();
  if (s.channels_last) {
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t row = base + p * s.c;
      for (int64_t c = c0; c < c1; ++c) f(row + c, c);
    }
  } else {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = base + c * s.sc;
      for (int64_t p = 0; p < pixels; ++p) f(plane + p, c);
    }
  }
}

// sums[k] (k = n*C + c) = sum over the pixels of image n of value(flat_index, k, c),
// accumulated in double so that statistics of large images keep float32 accuracy.
template <typename V>
void SumPerImageChannel(ffi::ThreadPool& pool, const ImageShape& s, V&& value,
                        std::vector<double>& sums) {
  sums.assign(s.n * s.c, 0.0);
  ForEachChannelBlock(pool, s, [&](int64_t n, int64_t c0, int64_t c1) {
    double* out = sums.data() + n * s.c;
    SweepBlock(s, n, c0, c1,
               [&](int64_t i, int64_t c) { out[c] += value(i, n * s.c + c, c); });
  });
}

// Two sums per (image, channel) in one sweep: value returns a pair (e.g. sum g and sum g*xhat for the gradients).
template <typename V>
void SumPairPerImageChannel(ffi::ThreadPool& pool, const ImageShape& s, V&& value,
                            std::vector<double>& first, std::vector<double>& second) {
  first.assign(s.n * s.c, 0.0);
  second.assign(s.n * s.c, 0.0);
  ForEachChannelBlock(pool, s, [&](int64_t n, int64_t c0, int64_t c1) {
    double* a = first.data() + n * s.c;
    double* b = second.data() + n * s.c;
    SweepBlock(s, n, c0, c1, [&](int64_t i, int64_t c) {
      auto [u, v] = value(i, n * s.c + c, c);
      a[c] += u;
      b[c] += v;
    });
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

// out = f(flat_index, n*C + c) for every element, in parallel.
template <typename F>
void MapPerImageChannel(ffi::ThreadPool& pool, const ImageShape& s, F&& f) {
  ForEachChannelBlock(pool, s, [&](int64_t n, int64_t c0, int64_t c1) {
    SweepBlock(s, n, c0, c1, [&](int64_t i, int64_t c) { f(i, n * s.c + c); });
  });
}

}  // namespace jaxmps::cpu
