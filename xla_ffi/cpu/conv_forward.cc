// Typed XLA FFI handler (API 0.1) for MPSCNNConvolution on CPU: target jaxmps_conv2d_forward,
// NHWC and NCHW, as an implicit GEMM (rows: output pixels of the batch) on the conv_gemm core.
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"
#include "conv_rows.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_forward";

// Runs f(g, q0, m) over the pool for the work units of (group g, GEMM rows [q0, q0 + m)), so
// each y element has one owner. Blocks of 8 tiles keep a unit's C block in L1/L2 and give
// small problems several units.
template <typename F>
void ForEachForwardUnit(ffi::ThreadPool& pool, const ConvProblem& p, int64_t mr, F&& f) {
  const int64_t rows = ForwardGrid(p).size(), block = 8 * mr;
  const int64_t blocks = (rows + block - 1) / block;
  ParallelFor(pool, p.groups * blocks, [&](int64_t unit) {
    const int64_t q0 = (unit % blocks) * block;
    f(unit / blocks, q0, std::min(block, rows - q0));
  });
}

// y rows [q0, q0 + m) (channels of group g) = C (m x O/G, row stride ldc) + bias.
template <typename T, typename Acc>
void StoreOutputs(const ConvProblem& p, const Acc* cbuf, int64_t ldc, const Acc* bias,
                  int64_t g, int64_t q0, int64_t m, T* y) {
  const int64_t og = p.og, sc = p.y.sc;
  const Acc* bg = bias + g * og;
  T** dst = ThreadScratch<T*, kRowList>(m);
  ForEachRow(ForwardGrid(p), q0, m, [&](int64_t i, int64_t n, int64_t oy, int64_t ox) {
    dst[i] = y + n * p.y.sn + oy * p.y.sh + ox * p.y.sw + g * og * sc;
  });
  if (p.y.channels_last) {
    for (int64_t i = 0; i < m; ++i) {
      const Acc* c = cbuf + i * ldc;
      for (int64_t o = 0; o < og; ++o) StoreAs(dst[i] + o, c[o] + bg[o]);
    }
  } else {  // channel planes: consecutive rows of one image are consecutive in a plane
    for (int64_t o = 0; o < og; ++o) {
      for (int64_t i = 0; i < m; ++i) StoreAs(dst[i] + o * sc, cbuf[i * ldc + o] + bg[o]);
    }
  }
}

// W^T (depth x O/G per group, k = tap*I/G + c) packed into B panels with depth blocks of
// `block`: the GEMMs' right-hand side, packed once per call.
template <typename Acc>
AlignedBuffer<Acc> PackWeights(const ConvProblem& p, const Acc* w, int64_t nr, int64_t block) {
  const int64_t depth = p.depth(), og = p.og, n_pad = RoundUp(og, nr);
  AlignedBuffer<Acc> wpack(p.groups * depth * n_pad);
  for (int64_t g = 0; g < p.groups; ++g) {
    const Acc* wg = w + g * og * depth;
    PackB<Acc>(depth, og, nr, [&](int64_t k, int64_t o) { return wg[o * depth + k]; },
               wpack.data() + g * depth * n_pad, block);
  }
  return wpack;
}

// y = bias + conv(x, w) with A packed: per unit one GEMM C (rows x O/G) = im2col (rows x
// KH*KW*I/G) * W^T, im2col packed from the unit's row-pointer table (either layout, any dtype).
template <typename T, typename Acc>
void ForwardGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* x, const Acc* w,
                 const Acc* bias, T* y) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>(p.og);
  const int64_t depth = p.depth(), taps = p.taps(), n_pad = RoundUp(p.og, mk.nr);
  const AlignedBuffer<Acc> wpack = PackWeights(p, w, mk.nr, kDepthBlock);
  const RowGrid grid = ForwardGrid(p);
  const TapOffsets offsets = ForwardTaps(p);
  ForEachForwardUnit(pool, p, mk.mr, [&](int64_t g, int64_t q0, int64_t m) {
    const int64_t m_pad = RoundUp(m, mk.mr);
    const T** table = ThreadScratch<const T*, kPointerTable>(m_pad * taps);
    Acc* apack = ThreadScratch<Acc, kAPanels>(m_pad * std::min(depth, kDepthBlock));
    Acc* cbuf = ThreadScratch<Acc, kCBlock>(m_pad * n_pad);
    FillRowPointers<T>(grid, offsets, p.x, x + g * p.ig * p.x.sc, nullptr, q0, m, mk.mr, table);
    GemmPacked<Acc>(
        mk, m, p.og, depth, wpack.data() + g * depth * n_pad,
        [&](int64_t k0, int64_t kl, Acc* dst) {
          for (int64_t i0 = 0; i0 < m_pad; i0 += mk.mr) {
            PackTile<T, Acc>(mk.mr, p.ig, p.x.sc, k0, kl, table + i0 * taps, dst + i0 * kl);
          }
        },
        apack, cbuf, n_pad, false);
    StoreOutputs(p, cbuf, n_pad, bias, g, q0, m, y);
  });
}

// NHWC float32 without packing A: each tile passes one row pointer per (row, tap) into x (the
// group's channels are contiguous) or into a zero row for padding taps, and the row-pointer
// micro-kernel walks taps x I/G against W^T packed once per call.
void ForwardRows(ffi::ThreadPool& pool, const ConvProblem& p, const float* x, const float* w,
                 const float* bias, float* y) {
  const MicroKernel<float>& mk = SelectMicroKernel<float>(p.og);
  const int64_t taps = p.taps(), depth = p.depth(), n_pad = RoundUp(p.og, mk.nr);
  const AlignedBuffer<float> wpack = PackWeights(p, w, mk.nr, std::max<int64_t>(depth, 1));
  const std::vector<float> zeros(p.ig, 0.f);
  const RowGrid grid = ForwardGrid(p);
  const TapOffsets offsets = ForwardTaps(p);
  ForEachForwardUnit(pool, p, mk.mr, [&](int64_t g, int64_t q0, int64_t m) {
    const int64_t m_pad = RoundUp(m, mk.mr);
    const float** table = ThreadScratch<const float*, kPointerTable>(m_pad * taps);
    float* cbuf = ThreadScratch<float, kCBlock>(m_pad * n_pad);
    FillRowPointers<float>(grid, offsets, p.x, x + g * p.ig, zeros.data(), q0, m, mk.mr, table);
    const float* wg = wpack.data() + g * depth * n_pad;
    for (int64_t i0 = 0; i0 < m_pad; i0 += mk.mr) {
      for (int64_t j0 = 0; j0 < n_pad; j0 += mk.nr) {
        mk.rows_fn(taps, p.ig, table + i0 * taps, wg + j0 * depth, cbuf + i0 * n_pad + j0,
                   n_pad, false);
      }
    }
    StoreOutputs(p, cbuf, n_pad, bias, g, q0, m, y);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ConvForwardAttrs attrs, ffi::AnyBuffer x,
                   ffi::AnyBuffer weights, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y) {
  ImageShape xs;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "x", x, attrs.channels_last, &xs));
  int64_t wd[4];
  JAXMPS_RETURN_IF_ERROR(ReadWeights(kOp, weights, x.element_type(), wd));
  ConvProblem p;
  JAXMPS_RETURN_IF_ERROR(
      MakeProblem(kOp, attrs, xs, wd[0], wd[1], wd[2], wd[3], attrs.size_h, attrs.size_w, &p));
  JAXMPS_RETURN_IF_ERROR(CheckParam(kOp, "bias", bias, x.element_type(), {wd[0]}));
  JAXMPS_RETURN_IF_ERROR(CheckImage(kOp, "y", *y, p.y));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(kOp, "y", *y, x.element_type()));
  return DispatchFloat(kOp, "x", x.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using Acc = typename Ty::Acc;
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    const Acc* wp = reinterpret_cast<const Acc*>(weights.untyped_data());
    const Acc* bp = reinterpret_cast<const Acc*>(bias.untyped_data());
    T* yp = reinterpret_cast<T*>(y->untyped_data());
    if (UseDepthwise(p)) {
      DepthwiseForward<T, Acc>(pool, p, xp, wp, bp, yp);
    } else if constexpr (std::is_same_v<T, float>) {
      if (p.x.channels_last) {
        ForwardRows(pool, p, xp, wp, bp, yp);
      } else {
        ForwardGemm<T, Acc>(pool, p, xp, wp, bp, yp);
      }
    } else {
      ForwardGemm<T, Acc>(pool, p, xp, wp, bp, yp);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_conv2d_forward", JaxmpsConv2dForwardCpu, jaxmps::cpu::Forward,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attrs<jaxmps::ConvForwardAttrs>()  // geometry, output_h, output_w
                      .Arg<xla::ffi::AnyBuffer>()   // x: (N, H, W, I) or (N, I, H, W)
                      .Arg<xla::ffi::AnyBuffer>()   // weights: (O, KH, KW, I/G), param dtype
                      .Arg<xla::ffi::AnyBuffer>()   // bias: (O,), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // y: (N, OH, OW, O) or (N, O, OH, OW)
