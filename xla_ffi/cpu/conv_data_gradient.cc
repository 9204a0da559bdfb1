// Typed XLA FFI handler (API 0.1) for the data gradient of MPSCNNConvolutionGradient on CPU:
// target jaxmps_conv2d_data_gradient, NHWC and NCHW, as stride phases of an implicit GEMM.
#include <vector>

#include "conv_common.h"
#include "conv_depthwise.h"
#include "conv_rows.h"

namespace jaxmps::cpu {
namespace {

constexpr std::string_view kOp = "conv2d_data_gradient";

// dx pixel (iy, ix) receives tap (ky, kx) from dy pixel ((iy + pad_top - ky*dh) / sh, ...) when
// that division is exact. Exactness depends only on iy mod sh, so the dx pixels split into
// sh*sw phases, each a dense grid whose pixels share the same valid taps: per phase the
// gradient is an ordinary GEMM with no multiplications by inserted zeros.
struct Phase {
  int64_t ry = 0, rx = 0;      // first dx row / column of the phase
  int64_t rows = 0, cols = 0;  // phase grid size: iy = ry + sh*ty, ix = rx + sw*tx
  std::vector<int64_t> ky, kx;  // valid taps
  TapOffsets dy_offsets;  // tap t reads dy pixel (ty + dy_offsets.y[t], tx + dy_offsets.x[t])
  int64_t taps() const { return static_cast<int64_t>(ky.size()); }
  // The phase's GEMM rows: its dx pixels over the whole batch.
  RowGrid grid(int64_t images) const { return {images, rows, cols, 1, 1, 0, 0}; }
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
          ph.dy_offsets.Add(FloorDiv(num_y, p.stride_h), FloorDiv(num_x, p.stride_w));
        }
      }
      phases.push_back(std::move(ph));
    }
  }
  return phases;
}

// One work unit: group g, phase, GEMM rows [q0, q0 + m) of the phase (over the batch).
struct Unit {
  int64_t g, phase, q0, m;
};

// The phases, their weights packed per (group, phase) as B (taps*O/G x I/G; depth blocks of
// `block`, or one block when 0), and the work units of a data-gradient call.
template <typename Acc>
struct Plan {
  std::vector<Phase> phases;
  std::vector<int64_t> offsets;  // of the packed weights, per (group, phase)
  AlignedBuffer<Acc> packed;
  std::vector<std::pair<int64_t, int64_t>> work;  // (phase, q0) per group
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
      const int64_t rows = phases[f].grid(images).size();
      for (int64_t q0 = 0; q0 < rows; q0 += block) work.push_back({int64_t(f), q0});
    }
  }
  int64_t units() const { return groups * static_cast<int64_t>(work.size()); }
  Unit unit(int64_t i) const {
    const int64_t per = static_cast<int64_t>(work.size());
    const auto [f, q0] = work[i % per];
    return {i / per, f, q0, std::min(block, phases[f].grid(images).size() - q0)};
  }
  const Acc* weights(const Unit& u) const {
    return packed.data() + offsets[u.g * phases.size() + u.phase];
  }
};

// dx pixels of a unit's rows = C rows (I/G channels of group g).
template <typename T, typename Acc>
void StoreInputGradient(const ConvProblem& p, const Phase& ph, const Acc* cbuf, int64_t ldc,
                        const Unit& u, T* dx) {
  T* dxg = dx + u.g * p.ig * p.x.sc;
  ForEachRow(ph.grid(p.x.n), u.q0, u.m, [&](int64_t i, int64_t n, int64_t ty, int64_t tx) {
    T* pixel = dxg + n * p.x.sn + (ph.ry + ty * p.stride_h) * p.x.sh +
               (ph.rx + tx * p.stride_w) * p.x.sw;
    const Acc* c = cbuf + i * ldc;
    for (int64_t ch = 0; ch < p.ig; ++ch) StoreAs(pixel + ch * p.x.sc, c[ch]);
  });
}

// dx: work units of (group, phase, block of phase rows); per unit one GEMM C (rows x I/G) =
// gathered dy (rows x taps*O/G) * W (taps*O/G x I/G), W packed per (group, phase) once per
// call, the gathered dy packed from the unit's row-pointer table. Every dx element belongs to
// exactly one unit.
template <typename T, typename Acc>
void DataGradientGemm(ffi::ThreadPool& pool, const ConvProblem& p, const T* dy, const Acc* w,
                      T* dx) {
  const MicroKernel<Acc>& mk = SelectMicroKernel<Acc>(p.ig);
  const Plan<Acc> plan(p, w, mk, kDepthBlock);
  ParallelFor(pool, plan.units(), [&](int64_t unit) {
    const Unit u = plan.unit(unit);
    const Phase& ph = plan.phases[u.phase];
    const int64_t taps = ph.taps(), depth = taps * p.og, m_pad = RoundUp(u.m, mk.mr);
    const T** table = ThreadScratch<const T*, kPointerTable>(m_pad * taps);
    Acc* apack = ThreadScratch<Acc, kAPanels>(m_pad * std::min(depth, kDepthBlock));
    Acc* cbuf = ThreadScratch<Acc, kCBlock>(m_pad * plan.n_pad);
    FillRowPointers<T>(ph.grid(p.x.n), ph.dy_offsets, p.y, dy + u.g * p.og * p.y.sc, nullptr,
                       u.q0, u.m, mk.mr, table);
    GemmPacked<Acc>(
        mk, u.m, p.ig, depth, plan.weights(u),
        [&](int64_t k0, int64_t kl, Acc* dst) {
          for (int64_t i0 = 0; i0 < m_pad; i0 += mk.mr) {
            PackTile<T, Acc>(mk.mr, p.og, p.y.sc, k0, kl, table + i0 * taps, dst + i0 * kl);
          }
        },
        apack, cbuf, plan.n_pad, false);
    StoreInputGradient(p, ph, cbuf, plan.n_pad, u, dx);
  });
}

// NHWC float32 without packing A: per tile of a phase, one row pointer per (row, valid tap)
// into dy (the group's O/G channels are contiguous) or into a zero row.
void DataGradientRows(ffi::ThreadPool& pool, const ConvProblem& p, const float* dy,
                      const float* w, float* dx) {
  const MicroKernel<float>& mk = SelectMicroKernel<float>(p.ig);
  const Plan<float> plan(p, w, mk, 0);
  const std::vector<float> zeros(p.og, 0.f);
  ParallelFor(pool, plan.units(), [&](int64_t unit) {
    const Unit u = plan.unit(unit);
    const Phase& ph = plan.phases[u.phase];
    const int64_t taps = ph.taps(), m_pad = RoundUp(u.m, mk.mr);
    const float** table = ThreadScratch<const float*, kPointerTable>(m_pad * taps);
    float* cbuf = ThreadScratch<float, kCBlock>(m_pad * plan.n_pad);
    FillRowPointers<float>(ph.grid(p.x.n), ph.dy_offsets, p.y, dy + u.g * p.og, zeros.data(),
                           u.q0, u.m, mk.mr, table);
    for (int64_t i0 = 0; i0 < m_pad; i0 += mk.mr) {
      for (int64_t j0 = 0; j0 < plan.n_pad; j0 += mk.nr) {
        mk.rows_fn(taps, p.og, table + i0 * taps, plan.weights(u) + j0 * taps * p.og,
                   cbuf + i0 * plan.n_pad + j0, plan.n_pad, false);
      }
    }
    StoreInputGradient(p, ph, cbuf, plan.n_pad, u, dx);
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
    if (UseDepthwiseDataGradient(p)) {
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
                      .Attrs<jaxmps::ConvDataGradientAttrs>()  // geometry, input_h/w
                      .Arg<xla::ffi::AnyBuffer>()   // dy: (N, OH, OW, O) or (N, O, OH, OW)
                      .Arg<xla::ffi::AnyBuffer>()   // weights: (O, KH, KW, I/G), param dtype
                      .Ret<xla::ffi::AnyBuffer>());  // dx: (N, H, W, I) or (N, I, H, W)
