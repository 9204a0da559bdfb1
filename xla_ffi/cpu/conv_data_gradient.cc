// Typed XLA FFI handler (API 0.1) for the data gradient of MPSCNNConvolutionGradient on CPU:
// target jaxmps_conv2d_data_gradient, NHWC and NCHW, as stride phases of an implicit GEMM.
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_data_gradient";

// dx pixel (iy, ix) receives tap (ky, kx) from dy pixel ((iy + pad_top - ky*dh) / sh, ...) when
// that division is exact. Exactness depends only on iy mod sh, so the dx pixels split into
// sh*sw phases, each a dense grid whose pixels share the same valid taps: per phase the
// gradient is an ordinary GEMM with no multiplications by inserted zeros.
struct Phase {
  int64_t ry = 0, rx = 0;    // first dx row / column of the phase
  int64_t rows = 0, cols = 0;  // phase grid size: iy = ry + sh*ty, ix = rx + sw*tx
  std::vector<int64_t> ky, kx;  // valid taps
  std::vector<int64_t> dy_row, dy_col;  // tap t reads dy row ty + dy_row[t], col tx + dy_col[t]
  int64_t pixels() const { return rows * cols; }
  int64_t taps() const { return static_cast<int64_t>(ky.size()); }
};

std::vector<Phase> MakePhases(const ConvProblem& p) {
  std::vector<Phase> phases;
  for (int64_t ry = 0; ry < std::min(p.stride_h, p.x.h); ++ry) {
    for (int64_t rx = 0; rx < std::min(p.stride_w, p.x.w); ++rx) {
      Phase ph;
      ph.ry = ry, ph.rx = rx;
      ph.rows = (p.x.h - ry + p.stride_h - 1) / p.stride_h;
      ph.cols = (p.x.w - rx + p.stride_w - 1) / p.stride_w;
      for (int64_t ky = 0; ky < p.kh; ++ky) {
        const int64_t num_y = ry + p.pad_top - ky * p.dilation_h;
        if (num_y - FloorDiv(num_y, p.stride_h) * p.stride_h) continue;
        for (int64_t kx = 0; kx < p.kw; ++kx) {
          const int64_t num_x = rx + p.pad_left - kx * p.dilation_w;
          if (num_x - FloorDiv(num_x, p.stride_w) * p.stride_w) continue;
          ph.ky.push_back(ky), ph.kx.push_back(kx);
          ph.dy_row.push_back(FloorDiv(num_y, p.stride_h));
          ph.dy_col.push_back(FloorDiv(num_x, p.stride_w));
        }
      }
      phases.push_back(std::move(ph));
    }
  }
  return phases;
}

// Packs rows [q0, q0 + m) (phase pixels) x depth [k0, k0 + kl) (k = t*O/G + o over the
// phase's valid taps t) of the gathered dy into MR-row panels. `dyg` points at channel g*O/G.
template <typename T, typename Acc>
void PackGather(const ConvProblem& p, const Phase& ph, int64_t mr, const T* dyg, int64_t q0,
                int64_t m, int64_t k0, int64_t kl, Acc* dst) {
  const ImageShape& ys = p.y;
  PackSegments<T, Acc>(
      mr, m, p.og, ys.sc, k0, kl,
      [&](int64_t i, int64_t t) -> const T* {
        const int64_t oy = (q0 + i) / ph.cols + ph.dy_row[t];
        const int64_t ox = (q0 + i) % ph.cols + ph.dy_col[t];
        if (oy < 0 || oy >= ys.h || ox < 0 || ox >= ys.w) return nullptr;
        return dyg + oy * ys.sh + ox * ys.sw;
      },
      dst);
}

// One work unit: image n, group g, phase, phase pixels [q0, q0 + m).
struct Unit {
  int64_t n, g, phase, q0, m;
};

// The phases, their weights packed per (group, phase) as B (taps*O/G x I/G; depth blocks of
// `block`, or one block when 0), and the work units of a data-gradient call.
template <typename Acc>
struct Plan {
  std::vector<Phase> phases;
  std::vector<int64_t> offsets;  // of the packed weights, per (group, phase)
  AlignedBuffer<Acc> packed;
  std::vector<std::pair<int64_t, int64_t>> work;  // (phase, q0) per (image, group)
  int64_t n_pad = 0, block = 0, groups = 0, images = 0;

  Plan(const ConvProblem& p, const Acc* w, const MicroKernel<Acc>& mk, int64_t depth_block)
      : phases(MakePhases(p)), n_pad(RoundUp(p.ig, mk.nr)), block(8 * mk.mr),
        groups(p.groups), images(p.x.n) {
    int64_t size = 0;
    for (int64_t g = 0; g < p.groups; ++g) {
      for (const Phase& ph : phases) {
        offsets.push_back(size);
        size += ph.taps() * p.og * n_pad;
      }
    }
    packed.Resize(std::max<int64_t>(size, 1));
    for (int64_t g = 0; g < p.groups; ++g) {
      for (size_t f = 0; f < phases.size(); ++f) {
        const Phase& ph = phases[f];
        const int64_t depth = ph.taps() * p.og;
        PackB<Acc>(
            depth, p.ig, mk.nr,
            [&](int64_t k, int64_t c) {
              const int64_t t = k / p.og, o = g * p.og + k % p.og;
              return w[((o * p.kh + ph.ky[t]) * p.kw + ph.kx[t]) * p.ig + c];
            },
            packed.data() + offsets[g * phases.size() + f],
            depth_block > 0 ? depth_block : std::max<int64_t>(depth, 1));
      }
    }
    for (size_t f = 0; f < phases.size(); ++f) {
      for (int64_t q0 = 0; q0 < phases[f].pixels(); q0 += block) work.push_back({int64_t(f), q0});
    }
  }
  int64_t units() const { return images * groups * static_cast<int64_t>(work.size()); }
  Unit unit(int64_t i) const {
    const int64_t per = static_cast<int64_t>(work.size());
    const auto [f, q0] = work[i % per];
    return {i / (groups * per), (i / per) % groups, f,
            q0, std::min(block, phases[f].pixels() - q0)};
  }
  const Acc* weights(const Unit& u) const {
    return packed.data() + offsets[u.g * phases.size() + u.phase];
  }
};

// dx pixels of a unit's phase = C rows (I/G channels of group g).
template <typename T, typename Acc>
void StoreInputGradient(const ConvProblem& p, const Phase& ph, const Acc* cbuf, int64_t ldc,
                        const Unit& u, T* dx) {
  T* dxg = dx + u.n * p.x.sn + u.g * p.ig * p.x.sc;
  for (int64_t i = 0; i < u.m; ++i) {
    const int64_t ty = (u.q0 + i) / ph.cols, tx = (u.q0 + i) % ph.cols;
    T* pixel = dxg + (ph.ry + ty * p.stride_h) * p.x.sh + (ph.rx + tx * p.stride_w) * p.x.sw;
    const Acc* c = cbuf + i * ldc;
    for (int64_t ch = 0; ch < p.ig; ++ch) StoreAs(pixel + ch * p.x.sc, c[ch]);
  }
}

// dx: work units of (image, group, phase, block of phase pixels); per unit one GEMM
// C (pixels x I/G) = gathered dy (pixels x taps*O/G) * W (taps*O/G x I/G), W packed per
// (group, phase) once per call. Every dx element belongs to exactly one unit.
template <typename T, typename Acc>
void DataGradientGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy, const Acc* w,
                      T* dx) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>();
  const Plan<Acc> plan(p, w, mk, kDepthBlock);
  ParallelFor(pool, plan.units(), [&](int64_t unit) {
    const Unit u = plan.unit(unit);
    const Phase& ph = plan.phases[u.phase];
    const int64_t depth = ph.taps() * p.og;
    AlignedBuffer<Acc> apack(RoundUp(u.m, mk.mr) * std::max<int64_t>(1, std::min(depth,
                                                                                 kDepthBlock)));
    AlignedBuffer<Acc> cbuf(RoundUp(u.m, mk.mr) * plan.n_pad);
    const T* dyg = dy + u.n * p.y.sn + u.g * p.og * p.y.sc;
    GemmPacked<Acc>(
        mk, u.m, p.ig, depth, plan.weights(u),
        [&](int64_t k0, int64_t kl, Acc* dst) {
          PackGather<T, Acc>(p, ph, mk.mr, dyg, u.q0, u.m, k0, kl, dst);
        },
        apack.data(), cbuf.data(), plan.n_pad, false);
    StoreInputGradient(p, ph, cbuf.data(), plan.n_pad, u, dx);
  });
}

// NHWC float32 without packing A: per 14-pixel tile of a phase, one row pointer per (pixel,
// valid tap) into dy (the group's O/G channels are contiguous) or into a zero row.
void DataGradientRows(ffi::ThreadPool& pool, const ConvProblem& p, const float* dy,
                      const float* w, float* dx) {
  const MicroKernel<float>& mk = SelectMicroKernel<float>();
  const Plan<float> plan(p, w, mk, 0);
  const std::vector<float> zeros(p.og, 0.f);
  ParallelFor(pool, plan.units(), [&](int64_t unit) {
    const Unit u = plan.unit(unit);
    const Phase& ph = plan.phases[u.phase];
    const int64_t taps = ph.taps();
    AlignedBuffer<float> cbuf(RoundUp(u.m, mk.mr) * plan.n_pad);
    std::vector<const float*> rows(std::max<int64_t>(taps, 1) * mk.mr);
    const float* dyg = dy + u.n * p.y.sn + u.g * p.og;
    for (int64_t i0 = 0; i0 < u.m; i0 += mk.mr) {
      for (int64_t r = 0; r < mk.mr; ++r) {
        const int64_t ty = (u.q0 + i0 + r) / ph.cols, tx = (u.q0 + i0 + r) % ph.cols;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t oy = ty + ph.dy_row[t], ox = tx + ph.dy_col[t];
          const bool inside = i0 + r < u.m && oy >= 0 && oy < p.y.h && ox >= 0 && ox < p.y.w;
          rows[t * mk.mr + r] = inside ? dyg + oy * p.y.sh + ox * p.y.sw : zeros.data();
        }
      }
      for (int64_t j0 = 0; j0 < plan.n_pad; j0 += mk.nr) {
        mk.rows_fn(taps, p.og, rows.data(), plan.weights(u) + j0 * taps * p.og,
                   cbuf.data() + i0 * plan.n_pad + j0, plan.n_pad, false);
      }
    }
    StoreInputGradient(p, ph, cbuf.data(), plan.n_pad, u, dx);
  });
}

ffi::Error DataGradient(ffi::ThreadPool pool, ConvDataGradientAttrs attrs, ffi::AnyBuffer dy,
                        ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> dx) {
  ImageShape ys;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(kOp, "dy", dy, attrs.channels_last, &ys));
  int64_t wd[4];
  JAXMPS_RETURN_IF_ERROR(ReadWeights(kOp, weights, dy.element_type(), wd));
  if (ys.c != wd[0]) {
    return InvalidArgument(kOp, "dy must have O = ", wd[0], " channels (weights ",
                           ShapeString(weights.dimensions()), "), got ", ys.c);
  }
  // The forward problem whose input dx is: x (N, input_h, input_w, G*I/G).
  const ImageShape xs = DenseImage(ys.n, attrs.size_h, attrs.size_w,
                                   wd[3] * std::max<int64_t>(attrs.groups, 1), ys.channels_last);
  ConvProblem p;
  JAXMPS_RETURN_IF_ERROR(MakeProblem(kOp, attrs, xs, wd[0], wd[1], wd[2], wd[3], ys.h, ys.w, &p));
  JAXMPS_RETURN_IF_ERROR(CheckImage(kOp, "dx", *dx, p.x));
  JAXMPS_RETURN_IF_ERROR(CheckDtype(kOp, "dx", *dx, dy.element_type()));
  return DispatchFloat(kOp, "dy", dy.element_type(), {}, [&](auto tag) {
    using Ty = Types<decltype(tag)>;
    using T = typename Ty::T;
    using Acc = typename Ty::Acc;
    const T* dyp = reinterpret_cast<const T*>(dy.untyped_data());
    const Acc* wp = reinterpret_cast<const Acc*>(weights.untyped_data());
    T* dxp = reinterpret_cast<T*>(dx->untyped_data());
    if (UseDepthwise(p)) {
      DepthwiseDataGradient<T, Acc>(pool, p, dyp, wp, dxp);
    } else if constexpr (std::is_same_v<T, float>) {
      if (p.x.channels_last) {
        DataGradientRows(pool, p, dyp, wp, dxp);
      } else {
        DataGradientGemm<T, Acc>(pool, p, dyp, wp, dxp);
      }
    } else {
      DataGradientGemm<T, Acc>(pool, p, dyp, wp, dxp);
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxmps::cpu

JAXMPS_FFI_TARGET("jaxmps_conv2d_data_gradient", JaxmpsConv2dDataGradientCpu,
                  jaxmps::cpu::DataGradient,
                  xla::ffi::Ffi::Bind()
                      .Ctx<xla::ffi::ThreadPool>()
                      .Attrs<jaxmps::cpu::ConvDataGradientAttrs>()  // geometry, input_h/w
                      .Arg<xla::ffi::AnyBuffer>()   // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<xla::ffi::AnyBuffer>()   // weights: (O, KH, KW, I/G), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // dx: (N, H, W, I) or (N, I, H, W)
