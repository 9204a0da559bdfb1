// Typed XLA FFI handler (API 0.1) for MPSCNNConvolution on CPU: target jaxmps_conv2d_forward,
// NHWC and NCHW, as an implicit GEMM (im2col fused into panel packing) on the conv_gemm core.
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_forward";

// Packs im2col rows [p0, p0 + m) (output pixels of one image and group) x depth [k0, k0 + kl)
// (k = (ky*KW + kx)*I/G + c) into MR-row panels. `xg` points at channel g*I/G of image n.
template <typename T, typename Acc>
void PackIm2col(const ConvProblem& p, int64_t mr, const T* xg, int64_t p0, int64_t m,
                int64_t k0, int64_t kl, Acc* dst) {
  const ImageShape& xs = p.x;
  PackSegments<T, Acc>(
      mr, m, p.ig, xs.sc, k0, kl,
      [&](int64_t i, int64_t tap) -> const T* {
        const int64_t oy = (p0 + i) / p.y.w, ox = (p0 + i) % p.y.w;
        const int64_t iy = oy * p.stride_h - p.pad_top + (tap / p.kw) * p.dilation_h;
        const int64_t ix = ox * p.stride_w - p.pad_left + (tap % p.kw) * p.dilation_w;
        if (iy < 0 || iy >= xs.h || ix < 0 || ix >= xs.w) return nullptr;
        return xg + iy * xs.sh + ix * xs.sw;
      },
      dst);
}

// y[n, pixels p0.., channels of group g] = C (m x O/G, row stride ldc) + bias.
template <typename T, typename Acc>
void StoreOutputs(const ConvProblem& p, const Acc* cbuf, int64_t ldc, const Acc* bias,
                  int64_t n, int64_t g, int64_t p0, int64_t m, T* y) {
  const int64_t og = p.og;
  T* yg = y + n * p.y.sn + g * og * p.y.sc;
  const Acc* bg = bias + g * og;
  if (p.y.channels_last) {
    for (int64_t i = 0; i < m; ++i) {
      T* row = yg + (p0 + i) * p.y.sw;
      const Acc* c = cbuf + i * ldc;
      for (int64_t o = 0; o < og; ++o) StoreAs(row + o, c[o] + bg[o]);
    }
  } else {
    for (int64_t o = 0; o < og; ++o) {
      T* plane = yg + o * p.y.sc + p0;
      for (int64_t i = 0; i < m; ++i) StoreAs(plane + i, cbuf[i * ldc + o] + bg[o]);
    }
  }
}

// Work units of (image, group, block of output pixels), so each y element has one owner.
inline int64_t PixelBlock(const ConvProblem& p, int64_t mr) {
  return std::min(RoundUp(p.y.h * p.y.w, mr), 8 * mr);
}

// y = bias + conv(x, w): work units of (image, group, block of output pixels); per unit one
// GEMM C (pixels x O/G) = im2col (pixels x KH*KW*I/G) * W^T with W^T packed once per call.
template <typename T, typename Acc>
void ForwardGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* x, const Acc* w,
                 const Acc* bias, T* y) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>();
  const int64_t depth = p.depth(), og = p.og, n_pad = RoundUp(og, mk.nr);
  AlignedBuffer<Acc> wpack(p.groups * depth * n_pad);
  for (int64_t g = 0; g < p.groups; ++g) {
    const Acc* wg = w + g * og * depth;
    PackB<Acc>(depth, og, mk.nr, [&](int64_t k, int64_t o) { return wg[o * depth + k]; },
               wpack.data() + g * depth * n_pad);
  }
  const int64_t pixels = p.y.h * p.y.w, block = PixelBlock(p, mk.mr);
  const int64_t blocks = (pixels + block - 1) / block;
  ParallelFor(pool, p.x.n * p.groups * blocks, [&](int64_t unit) {
    const int64_t n = unit / (p.groups * blocks), g = (unit / blocks) % p.groups;
    const int64_t p0 = (unit % blocks) * block, m = std::min(block, pixels - p0);
    AlignedBuffer<Acc> apack(RoundUp(m, mk.mr) * std::min(depth, kDepthBlock));
    AlignedBuffer<Acc> cbuf(RoundUp(m, mk.mr) * n_pad);
    const T* xg = x + n * p.x.sn + g * p.ig * p.x.sc;
    GemmPacked<Acc>(
        mk, m, og, depth, wpack.data() + g * depth * n_pad,
        [&](int64_t k0, int64_t kl, Acc* dst) {
          PackIm2col<T, Acc>(p, mk.mr, xg, p0, m, k0, kl, dst);
        },
        apack.data(), cbuf.data(), n_pad, false);
    StoreOutputs(p, cbuf.data(), n_pad, bias, n, g, p0, m, y);
  });
}

// NHWC float32 without packing A: each 14-pixel tile passes one row pointer per (pixel, tap)
// into x (channels of the group are contiguous) or into a zero row for padding taps, and the
// row-pointer micro-kernel walks taps x I/G against W^T packed once per call.
void ForwardRows(ffi::ThreadPool& pool, const ConvProblem& p, const float* x, const float* w,
                 const float* bias, float* y) {
  const MicroKernel<float>& mk = SelectMicroKernel<float>();
  const int64_t taps = p.taps(), ig = p.ig, og = p.og, depth = p.depth();
  const int64_t n_pad = RoundUp(og, mk.nr);
  AlignedBuffer<float> wpack(p.groups * depth * n_pad);
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* wg = w + g * og * depth;
    PackB<float>(depth, og, mk.nr, [&](int64_t k, int64_t o) { return wg[o * depth + k]; },
                 wpack.data() + g * depth * n_pad, depth);
  }
  const std::vector<float> zeros(ig, 0.f);
  const int64_t pixels = p.y.h * p.y.w, block = PixelBlock(p, mk.mr);
  const int64_t blocks = (pixels + block - 1) / block;
  ParallelFor(pool, p.x.n * p.groups * blocks, [&](int64_t unit) {
    const int64_t n = unit / (p.groups * blocks), g = (unit / blocks) % p.groups;
    const int64_t p0 = (unit % blocks) * block, m = std::min(block, pixels - p0);
    AlignedBuffer<float> cbuf(RoundUp(m, mk.mr) * n_pad);
    std::vector<const float*> rows(taps * mk.mr);
    const float* xg = x + n * p.x.sn + g * ig;
    for (int64_t i0 = 0; i0 < m; i0 += mk.mr) {
      for (int64_t r = 0; r < mk.mr; ++r) {
        const int64_t pixel = p0 + i0 + r, oy = pixel / p.y.w, ox = pixel % p.y.w;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t iy = oy * p.stride_h - p.pad_top + (t / p.kw) * p.dilation_h;
          const int64_t ix = ox * p.stride_w - p.pad_left + (t % p.kw) * p.dilation_w;
          const bool inside = i0 + r < m && iy >= 0 && iy < p.x.h && ix >= 0 && ix < p.x.w;
          rows[t * mk.mr + r] = inside ? xg + iy * p.x.sh + ix * p.x.sw : zeros.data();
        }
      }
      for (int64_t j0 = 0; j0 < n_pad; j0 += mk.nr) {
        mk.rows_fn(taps, ig, rows.data(), wpack.data() + g * depth * n_pad + j0 * depth,
                   cbuf.data() + i0 * n_pad + j0, n_pad, false);
      }
    }
    StoreOutputs(p, cbuf.data(), n_pad, bias, n, g, p0, m, y);
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
                      .Attrs<jaxmps::cpu::ConvForwardAttrs>()  // geometry, output_h, output_w
                      .Arg<xla::ffi::AnyBuffer>()   // x: (N, H, W, I) or (N, I, H, W)
                      .Arg<xla::ffi::AnyBuffer>()   // weights: (O, KH, KW, I/G), param dtype
                      .Arg<xla::ffi::AnyBuffer>()   // bias: (O,), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // y: (N, OH, OW, O) or (N, O, OH, OW)
