// Row geometry of the implicit GEMMs: GEMM rows spanning the whole batch mapped to image pixels,
// per row and tap a pointer into the image (row-pointer tables), and A-panel packing from them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_common.h"

namespace jaxmps::cpu {

// The GEMM rows as a grid over the batch: row q = (n, ty, tx) in row-major order (n < images,
// ty < rows, tx < cols) reads image n around the origin (ty * step_y + base_y, tx * step_x +
// base_x). Rows span images so that small images (8x8 layers, a fully connected layer's one
// pixel) still fill whole micro-kernel tiles.
struct RowGrid {
  int64_t images = 0, rows = 0, cols = 0;
  int64_t step_y = 1, step_x = 1, base_y = 0, base_x = 0;
  int64_t size() const { return images * rows * cols; }
};

// The taps as offsets from a row's origin; tap t reads pixel origin + (y[t], x[t]).
struct TapOffsets {
  std::vector<int64_t> y, x;
  int64_t min_y = 0, max_y = 0, min_x = 0, max_x = 0;

  void Add(int64_t dy, int64_t dx) {
    min_y = y.empty() ? dy : std::min(min_y, dy), max_y = y.empty() ? dy : std::max(max_y, dy);
    min_x = x.empty() ? dx : std::min(min_x, dx), max_x = x.empty() ? dx : std::max(max_x, dx);
    y.push_back(dy), x.push_back(dx);
  }
  int64_t size() const { return static_cast<int64_t>(y.size()); }
};

// The forward's GEMM rows (output pixels of the whole batch, also the reduction of the weights
// gradient) and its taps, offsets from the top-left input pixel of an output pixel's window.
inline RowGrid ForwardGrid(const ConvProblem& p) {
  return {p.x.n, p.y.h, p.y.w, p.stride_h, p.stride_w, -p.pad_top, -p.pad_left};
}

inline TapOffsets ForwardTaps(const ConvProblem& p) {
  TapOffsets taps;
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    for (int64_t kx = 0; kx < p.kw; ++kx) taps.Add(ky * p.dilation_h, kx * p.dilation_w);
  }
  return taps;
}

// Calls f(r, n, ty, tx) for rows q0 + r, r < count, of the grid without a division per row.
template <typename F>
inline void ForEachRow(const RowGrid& g, int64_t q0, int64_t count, F&& f) {
  const int64_t per_image = g.rows * g.cols;
  int64_t n = q0 / per_image, ty = (q0 % per_image) / g.cols, tx = q0 % g.cols;
  for (int64_t r = 0; r < count; ++r) {
    f(r, n, ty, tx);
    if (++tx == g.cols) {
      tx = 0;
      if (++ty == g.rows) ty = 0, ++n;
    }
  }
}

// Calls f(i, t, src) for rows q0 + i, i < m, and every tap t, with src pointing at element 0
// of the segment that the row reads for the tap (image + n*s.sn + iy*s.sh + ix*s.sw), or
// nullptr where that pixel lies outside the image. Rows whose taps all fall inside take one
// bounds test; the others test each tap.
template <typename T, typename F>
inline void ForEachRowTap(const RowGrid& g, const TapOffsets& taps, const ImageShape& s,
                          const T* image, int64_t q0, int64_t m, F&& f) {
  const int64_t nt = taps.size();
  std::vector<int64_t> element(nt);
  for (int64_t t = 0; t < nt; ++t) element[t] = taps.y[t] * s.sh + taps.x[t] * s.sw;
  ForEachRow(g, q0, m, [&](int64_t i, int64_t n, int64_t ty, int64_t tx) {
    const int64_t iy = ty * g.step_y + g.base_y, ix = tx * g.step_x + g.base_x;
    // An offset, not a pointer: the origin itself may lie outside the image.
    const int64_t origin = n * s.sn + iy * s.sh + ix * s.sw;
    if (iy + taps.min_y >= 0 && iy + taps.max_y < s.h && ix + taps.min_x >= 0 &&
        ix + taps.max_x < s.w) {
      for (int64_t t = 0; t < nt; ++t) f(i, t, image + (origin + element[t]));
      return;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t y = iy + taps.y[t], x = ix + taps.x[t];
      const bool inside = y >= 0 && y < s.h && x >= 0 && x < s.w;
      f(i, t, inside ? image + (origin + element[t]) : nullptr);
    }
  });
}

// Fills the row pointers of rows [q0, q0 + m) tile by tile: tile i (rows q0 + i*mr ...) gets
// taps*mr pointers at table + i*taps*mr, entry t*mr + r the segment of row r for tap t as
// ForEachRowTap gives it, `pad` for padding and for the rows past m.
template <typename T>
void FillRowPointers(const RowGrid& g, const TapOffsets& taps, const ImageShape& s,
                     const T* image, const T* pad, int64_t q0, int64_t m, int64_t mr,
                     const T** table) {
  const int64_t nt = taps.size(), tiles = (m + mr - 1) / mr;
  ForEachRowTap(g, taps, s, image, q0, m, [&](int64_t i, int64_t t, const T* src) {
    table[(i / mr) * nt * mr + t * mr + i % mr] = src != nullptr ? src : pad;
  });
  for (int64_t i = m; i < tiles * mr; ++i) {
    for (int64_t t = 0; t < nt; ++t) table[(i / mr) * nt * mr + t * mr + i % mr] = pad;
  }
}

// Packs depth [k0, k0 + kl) of one tile (k = t * seg_len + q: tap t, channel q; the tile's
// pointers `rows` as FillRowPointers wrote them with pad = nullptr) into an MR-row panel (kl x
// MR, k-major). Channel q of a segment lies `stride` elements after its pointer. Contiguous
// segments (NHWC, stride 1) are copied row by row; strided ones (NCHW: one plane per channel)
// depth step by depth step, as one contiguous run of MR values where the tile's rows are
// consecutive pixels of an image row (stride 1 interior), so reads walk along image rows
// instead of jumping between planes.
template <typename T, typename Acc>
void PackTile(int64_t mr, int64_t seg_len, int64_t stride, int64_t k0, int64_t kl,
              const T* const* rows, Acc* panel) {
  int64_t seg = k0 / seg_len, q = k0 % seg_len;
  if (stride == 1) {
    for (int64_t kk = 0; kk < kl; ++seg, q = 0) {
      const int64_t count = std::min(seg_len - q, kl - kk);
      for (int64_t r = 0; r < mr; ++r) {
        const T* src = rows[seg * mr + r];
        Acc* out = panel + kk * mr + r;
        if (src != nullptr) {
          for (int64_t j = 0; j < count; ++j) out[j * mr] = Acc(Load(src[q + j]));
        } else {
          for (int64_t j = 0; j < count; ++j) out[j * mr] = Acc(0);
        }
      }
      kk += count;
    }
    return;
  }
  for (int64_t kk = 0; kk < kl; ++seg, q = 0) {
    const int64_t count = std::min(seg_len - q, kl - kk);
    const T* const* seg_rows = rows + seg * mr;
    bool consecutive = seg_rows[0] != nullptr;
    for (int64_t r = 1; r < mr && consecutive; ++r) consecutive = seg_rows[r] == seg_rows[0] + r;
    for (int64_t j = 0; j < count; ++j) {
      Acc* out = panel + (kk + j) * mr;
      const int64_t offset = (q + j) * stride;
      if (consecutive) {
        const T* src = seg_rows[0] + offset;
        for (int64_t r = 0; r < mr; ++r) out[r] = Acc(Load(src[r]));
      } else {
        for (int64_t r = 0; r < mr; ++r) {
          out[r] = seg_rows[r] != nullptr ? Acc(Load(seg_rows[r][offset])) : Acc(0);
        }
      }
    }
    kk += count;
  }
}

}  // namespace jaxmps::cpu
