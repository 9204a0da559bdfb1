// Typed XLA FFI handler (API 0.1) for the weight/bias gradient of MPSCNNConvolutionGradient on
// CPU: target jaxmps_conv2d_weights_gradient, NHWC and NCHW, summed over the batch.
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_weights_gradient";

// Output pixels reduced per packed block (one GEMM depth block).
constexpr int64_t kChunk = kDepthBlock;
// Partial sums kept apart and added in a fixed order at the end: the split of the reduction
// depends on the shapes only, never on the thread count, so results are reproducible.
constexpr int64_t kMaxSlots = 16;

// Packs rows [0, RoundUp(K, MR)) (k = (ky*KW + kx)*I/G + c) x depth [k0, k0 + kl) (output
// pixels first + k0 ...) of im2col^T into MR-row panels. `xg` points at channel g*I/G of image
// n. The rows of a panel fall into runs that share a tap (consecutive channels, contiguous in
// NHWC): per pixel each run is one bounds check and one strided copy.
template <typename T, typename Acc>
void PackIm2colT(const ConvProblem& p, int64_t mr, const T* xg, int64_t first, int64_t k0,
                 int64_t kl, Acc* dst) {
  struct Run {
    int64_t r0, r1, off_y, off_x, c0;
  };
  const ImageShape& xs = p.x;
  const int64_t depth = p.depth(), ow = p.y.w;
  std::vector<Run> runs;
  for (int64_t i0 = 0; i0 < RoundUp(depth, mr); i0 += mr) {
    Acc* panel = dst + i0 * kl;
    runs.clear();
    for (int64_t r = 0; r < mr && i0 + r < depth;) {
      const int64_t k = i0 + r, tap = k / p.ig, c = k % p.ig;
      const int64_t len = std::min(p.ig - c, std::min(mr - r, depth - k));
      runs.push_back({r, r + len, (tap / p.kw) * p.dilation_h - p.pad_top,
                      (tap % p.kw) * p.dilation_w - p.pad_left, c});
      r += len;
    }
    const int64_t filled = runs.back().r1;  // rows past K (last panel) stay zero
    int64_t oy = (first + k0) / ow, ox = (first + k0) % ow;
    for (int64_t kk = 0; kk < kl; ++kk) {
      Acc* out = panel + kk * mr;
      for (const Run& run : runs) {
        const int64_t iy = oy * p.stride_h + run.off_y, ix = ox * p.stride_w + run.off_x;
        if (iy >= 0 && iy < xs.h && ix >= 0 && ix < xs.w) {
          const T* src = xg + iy * xs.sh + ix * xs.sw + run.c0 * xs.sc;
          for (int64_t r = run.r0; r < run.r1; ++r) out[r] = Load(src[(r - run.r0) * xs.sc]);
        } else {
          for (int64_t r = run.r0; r < run.r1; ++r) out[r] = Acc(0);
        }
      }
      for (int64_t r = filled; r < mr; ++r) out[r] = Acc(0);
      if (++ox == ow) ox = 0, ++oy;
    }
  }
}

// dW (O, KH, KW, I/G) and db (O,): the reduction over (image, output pixel) is cut into chunks
// of kChunk pixels of one image, dealt in fixed contiguous ranges to at most kMaxSlots slots,
// each slot a work unit with its own partial sums; per chunk and group one GEMM
// C (K x O/G) += im2col^T (K x chunk) * dy (chunk x O/G).
template <typename T, typename Acc>
void WeightsGradientGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy, const T* x,
                         Acc* dw, Acc* db) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>();
  const int64_t depth = p.depth(), og = p.og, n_pad = RoundUp(og, mk.nr);
  const int64_t rows = RoundUp(depth, mk.mr), out_c = p.y.c;
  const int64_t pixels = p.y.h * p.y.w, per_image = (pixels + kChunk - 1) / kChunk;
  const int64_t chunks = p.x.n * per_image, slots = std::min(kMaxSlots, chunks);
  const int64_t slot_size = p.groups * rows * n_pad + out_c;
  AlignedBuffer<Acc> partial(slots * slot_size);
  ParallelFor(pool, slots, [&](int64_t s) {
    Acc* cs = partial.data() + s * slot_size;
    Acc* dbs = cs + p.groups * rows * n_pad;
    std::fill(cs, cs + slot_size, Acc(0));
    AlignedBuffer<Acc> apack(rows * kChunk), bpack(kChunk * n_pad);
    for (int64_t chunk = s * chunks / slots; chunk < (s + 1) * chunks / slots; ++chunk) {
      const int64_t n = chunk / per_image, first = (chunk % per_image) * kChunk;
      const int64_t len = std::min(kChunk, pixels - first);
      for (int64_t g = 0; g < p.groups; ++g) {
        const T* dyg = dy + n * p.y.sn + g * og * p.y.sc;
        const T* xg = x + n * p.x.sn + g * p.ig * p.x.sc;
        PackB<Acc>(
            len, og, mk.nr,
            [&](int64_t k, int64_t o) {
              return Acc(Load(dyg[(first + k) * p.y.sw + o * p.y.sc]));
            },
            bpack.data());
        GemmPacked<Acc>(
            mk, depth, og, len, bpack.data(),
            [&](int64_t k0, int64_t kl, Acc* dst) {
              PackIm2colT<T, Acc>(p, mk.mr, xg, first, k0, kl, dst);
            },
            apack.data(), cs + g * rows * n_pad, n_pad, true);
        // db from the packed dy panels (already converted to Acc).
        for (int64_t j0 = 0; j0 < og; j0 += mk.nr) {
          const Acc* panel = bpack.data() + j0 * len;
          for (int64_t k = 0; k < len; ++k) {
            for (int64_t jj = 0; jj < std::min(mk.nr, og - j0); ++jj) {
              dbs[g * og + j0 + jj] += panel[k * mk.nr + jj];
            }
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
                      .Attrs<jaxmps::cpu::ConvWeightsGradientAttrs>()  // geometry, kernel_h/w
                      .Arg<xla::ffi::AnyBuffer>()   // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<xla::ffi::AnyBuffer>()   // x: (N, H, W, I) or (N, I, H, W)
                      .Ret<xla::ffi::AnyBuffer>()   // dweights: (O, KH, KW, I/G), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // dbias: (O,), param dtype
