// Typed XLA FFI handler (API 0.1) for the weight/bias gradient of MPSCNNConvolutionGradient on
// CPU: target jaxmps_conv2d_weights_gradient, NHWC and NCHW, summed over the batch.
#include <algorithm>
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"
#include "conv_rows.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_weights_gradient";

// Output pixels (GEMM rows of the forward, spanning images) reduced per GEMM call: up to 256,
// fewer for deep im2col rows so that a chunk's rows stay near 1 MiB (L2) and the per-thread
// scratch stays small.
inline int64_t ChunkPixels(int64_t rows) {
  return std::clamp<int64_t>((int64_t(1) << 18) / std::max<int64_t>(rows, 1), 16, 256);
}
// Partial sums kept apart and added in a fixed order at the end: the split of the reduction
// depends on the shapes only, never on the thread count, so results are reproducible.
constexpr int64_t kMaxSlots = 16;

// The im2col rows of pixels [first, first + len) (GEMM rows of the forward) for group g: row
// i (lda elements, k = tap*I/G + c) holds pixel i's K inputs, one contiguous copy per tap in
// NHWC (entries past K are left alone: the caller zeroes them once). Read with stride lda,
// these rows are the A panels of the GEMM (A = im2col^T, MR consecutive k per depth step): no
// second packing pass.
template <typename T, typename Acc>
void GatherIm2colRows(const ConvProblem& p, const RowGrid& grid, const TapOffsets& taps,
                      const T* xg, int64_t first, int64_t len, int64_t lda, Acc* cols) {
  const int64_t ig = p.ig, sc = p.x.sc;
  const bool single = ig == 1;  // a first layer's one input channel: one value per tap
  ForEachRowTap(grid, taps, p.x, xg, first, len, [&](int64_t i, int64_t t, const T* src) {
    Acc* out = cols + i * lda + t * ig;
    if (single) {
      *out = src != nullptr ? Acc(Load(*src)) : Acc(0);
    } else if (src == nullptr) {
      std::fill(out, out + ig, Acc(0));
    } else if (sc == 1) {
      for (int64_t c = 0; c < ig; ++c) out[c] = Acc(Load(src[c]));
    } else {
      for (int64_t c = 0; c < ig; ++c) out[c] = Acc(Load(src[c * sc]));
    }
  });
}

// Packs the dy rows of a chunk (pixel k at dy_rows[k] + channel, its O/G values `sc` apart)
// into the GEMM's B panels (len x NR each, zero past O/G) and adds them to the bias gradient.
template <typename T, typename Acc>
void PackDyRows(const T* const* dy_rows, int64_t channel, int64_t sc, int64_t len, int64_t og,
                int64_t nr, Acc* dst, Acc* db) {
  for (int64_t j0 = 0; j0 < og; j0 += nr) {
    const int64_t cols = std::min(nr, og - j0);
    Acc* panel = dst + j0 * len;
    Acc* dbj = db + j0;
    for (int64_t k = 0; k < len; ++k) {
      const T* src = dy_rows[k] + channel + j0 * sc;
      Acc* out = panel + k * nr;
      if (sc == 1) {
        for (int64_t j = 0; j < cols; ++j) out[j] = Acc(Load(src[j]));
      } else {
        for (int64_t j = 0; j < cols; ++j) out[j] = Acc(Load(src[j * sc]));
      }
      std::fill(out + cols, out + nr, Acc(0));
      for (int64_t j = 0; j < cols; ++j) dbj[j] += out[j];
    }
  }
}

// dW (O, KH, KW, I/G) and db (O,): the reduction over the GEMM rows of the forward (output
// pixels of the whole batch) is cut into chunks of ChunkPixels, dealt in fixed contiguous
// ranges to at most kMaxSlots slots, each slot a work unit with its own partial sums; per
// chunk and group one GEMM C (K x O/G) += im2col^T (K x chunk) * dy (chunk x O/G).
template <typename T, typename Acc>
void WeightsGradientGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy, const T* x,
                         Acc* dw, Acc* db) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>(p.og);
  const int64_t depth = p.depth(), og = p.og, n_pad = RoundUp(og, mk.nr);
  const int64_t rows = RoundUp(depth, mk.mr), out_c = p.y.c;
  const RowGrid grid = ForwardGrid(p);
  const TapOffsets offsets = ForwardTaps(p);
  const int64_t chunk_pixels = ChunkPixels(rows);
  const int64_t pixels = grid.size(), chunks = (pixels + chunk_pixels - 1) / chunk_pixels;
  const int64_t slots = std::min(kMaxSlots, chunks);
  const int64_t slot_size = p.groups * rows * n_pad + out_c;
  AlignedBuffer<Acc> partial(slots * slot_size);
  ParallelFor(pool, slots, [&](int64_t s) {
    Acc* cs = partial.data() + s * slot_size;
    Acc* dbs = cs + p.groups * rows * n_pad;
    std::fill(cs, cs + slot_size, Acc(0));
    Acc* cols = ThreadScratch<Acc, kAPanels>(chunk_pixels * rows);
    Acc* bpack = ThreadScratch<Acc, kBPanels>(chunk_pixels * n_pad);
    const T** dy_rows = ThreadScratch<const T*, kRowList>(chunk_pixels);
    for (int64_t i = 0; i < chunk_pixels; ++i) {  // the im2col rows' columns past K
      std::fill(cols + i * rows + depth, cols + (i + 1) * rows, Acc(0));
    }
    for (int64_t chunk = s * chunks / slots; chunk < (s + 1) * chunks / slots; ++chunk) {
      const int64_t first = chunk * chunk_pixels, len = std::min(chunk_pixels, pixels - first);
      ForEachRow(grid, first, len, [&](int64_t i, int64_t n, int64_t oy, int64_t ox) {
        dy_rows[i] = dy + n * p.y.sn + oy * p.y.sh + ox * p.y.sw;
      });
      for (int64_t g = 0; g < p.groups; ++g) {
        GatherIm2colRows<T, Acc>(p, grid, offsets, x + g * p.ig * p.x.sc, first, len, rows,
                                 cols);
        PackDyRows<T, Acc>(dy_rows, g * og * p.y.sc, p.y.sc, len, og, mk.nr, bpack,
                           dbs + g * og);
        Acc* cg = cs + g * rows * n_pad;
        for (int64_t j0 = 0; j0 < n_pad; j0 += mk.nr) {
          for (int64_t i0 = 0; i0 < rows; i0 += mk.mr) {
            mk.fn(len, cols + i0, rows, bpack + j0 * len, cg + i0 * n_pad + j0, n_pad, true);
          }
        }
      }
    }
  });
  // Sum the slots in order; dW[o][k] = C_g[k][o - g*O/G].
  ParallelFor(pool, out_c, [&](int64_t o) {
    const int64_t g = o / og, j = o % og;
    for (int64_t k = 0; k < depth; ++k) {
      Acc sum = 0;
      for (int64_t s = 0; s < slots; ++s) {
        sum += partial.data()[s * slot_size + (g * rows + k) * n_pad + j];
      }
      dw[o * depth + k] = sum;
    }
    Acc sum = 0;
    for (int64_t s = 0; s < slots; ++s) {
      sum += partial.data()[s * slot_size + p.groups * rows * n_pad + o];
    }
    db[o] = sum;
  });
}

ffi::Error WeightsGradient(ffi::ThreadPool pool, ConvWeightsGradientAttrs attrs,
                           ffi::AnyBuffer dy, ffi::AnyBuffer x,
                           ffi::Result<ffi::AnyBuffer> dweights,
                           ffi::Result<ffi::AnyBuffer> dbias) {
  ImageShape xs, ys;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, attrs.channels_last, &xs));
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "dy", dy, attrs.channels_last, &ys));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(kOp, "dy", dy, x.element_type()));
  if (ys.n != xs.n) {
    return InvalidArgument(kOp, "dy must have the batch size of x (", xs.n, "), got ", ys.n);
  }
  const int64_t groups = std::max<int64_t>(attrs.groups, 1);
  ConvProblem p;
  JAXMPS_RETURN_IF_ERROR(MakeProblem(kOp, attrs, xs, ys.c, attrs.size_h, attrs.size_w,
                                     xs.c / groups, ys.h, ys.w, &p));
  JAXMPS_RETURN_IF_ERROR(CheckParam(kOp, "dweights", *dweights, x.element_type(),
                                    {ys.c, attrs.size_h, attrs.size_w, xs.c / groups}));
  JAXMPS_RETURN_IF_ERROR(CheckParam(kOp, "dbias", *dbias, x.element_type(), {ys.c}));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using Acc = typename Ty::Acc;
    const T* dyp = reinterpret_cast<const T*>(dy.untyped_data());
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    Acc* dwp = reinterpret_cast<Acc*>(dweights->untyped_data());
    Acc* dbp = reinterpret_cast<Acc*>(dbias->untyped_data());
    if (UseDepthwise(p)) {
      DepthwiseWeightsGradient<T, Acc>(pool, p, dyp, xp, dwp, dbp);
    } else {
      WeightsGradientGemm<T, Acc>(pool, p, dyp, xp, dwp, dbp);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_conv2d_weights_gradient", JaxmpsConv2dWeightsGradientCpu,
                  jaxmps::cpu::WeightsGradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attrs<jaxmps::ConvWeightsGradientAttrs>()  // geometry, kernel_h/w
                      .Arg<xla::ffi::AnyBuffer>()   // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<xla::ffi::AnyBuffer>()   // x: (N, H, W, I) or (N, I, H, W)
                      .Ret<xla::ffi::AnyBuffer>()   // dweights: (O, KH, KW, I/G), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // dbias: (O,), param dtype
