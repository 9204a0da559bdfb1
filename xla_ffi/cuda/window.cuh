// Tiled stencil engine for the window norms (spatial, local contrast, cross-channel) on CUDA:
// tiles with halos in shared memory, separable zero-padded box sums, op policies for the math.
//
// An image is seen as two window axes A0, A1 and one independent *lane* axis L that is kept
// innermost in shared memory, so that every shared-memory access and every pointwise step
// works on vectors of VW lanes (16 bytes):
//   spatial NHWC (H, W | C)   spatial NCHW (H, W | C)
//   cross-channel NHWC (C, 1 | HW)   cross-channel NCHW (C, 1 | HW)    [A0, A1 | L]
// Global memory is read and written along whichever axis is contiguous (vector accesses when
// that is L, coalesced scalar accesses otherwise). A CTA owns an output tile T0 x T1 x TL and
// computes in its work area (shared memory; a per-CTA slice of global scratch when even the
// smallest tile's halo does not fit, e.g. very large windows):
//   forward:  X box (tile + k-1) -> P = sum of F(X) along A0 -> y from the sums of P along A1;
//   gradient: X box (tile + 2(k-1)) and dy on BQ (tile + k-1: the points whose adjoint window
//             reaches the tile) -> window stats on BQ -> gradient quantities Q on BQ (zero
//             outside the image) -> R = adjoint sums of Q along A0 -> dx from sums along A1.
// One read of x (and dy) plus halos, which neighbouring tiles share through L2, one write.
// Window placement follows KERNELS.md: S covers [c - k//2, c + (k-1)//2], S^T the mirror.
#pragma once

#include <algorithm>

#include "cuda_common.cuh"
#include "stream_window.cuh"

namespace jaxmps::cuda {

constexpr int kWindowThreads = 256;

struct WindowPlan {
  int64_t n = 0;
  int64_t dim[3] = {1, 1, 1};     // extents of A0, A1, L
  int64_t stride[3] = {0, 0, 1};  // element strides of A0, A1, L
  int64_t image_stride = 0;       // elements per image
  int k0 = 1, k1 = 1;             // window sizes along A0 and A1
  int tile[3] = {1, 1, 1};        // output tile T0, T1, TL (TL: a power-of-two multiple of VW)
  int64_t tiles[3] = {1, 1, 1};
  int64_t total_tiles = 0;
  bool vector_io = false;         // L contiguous, vector-aligned: 16-byte global accesses
  int fast_axis = 2;              // otherwise, the axis scalar accesses run along (stride 1)
  bool in_shared = true;          // work area in shared memory (else global scratch)
  int64_t work_vectors = 0;       // work-area vectors per CTA
  int64_t grid = 0;               // CTAs launched (a grid-stride loop covers all tiles)
};

// Extents (A0, A1; lanes are always the tile's) of the work-area boxes and where the X and BQ
// boxes start relative to the tile origin.
struct WindowBoxes {
  int x0, x1, p0, p1, q0, q1, r0, r1, xo0, xo1, qo0, qo1;
  __host__ __device__ WindowBoxes(const WindowPlan& p, bool gradient) {
    const int t0 = p.tile[0], t1 = p.tile[1], k0 = p.k0, k1 = p.k1;
    x0 = gradient ? t0 + 2 * (k0 - 1) : t0 + k0 - 1;
    x1 = gradient ? t1 + 2 * (k1 - 1) : t1 + k1 - 1;
    xo0 = gradient ? k0 - 1 : k0 / 2;
    xo1 = gradient ? k1 - 1 : k1 / 2;
    q0 = t0 + k0 - 1, q1 = t1 + k1 - 1;
    qo0 = (k0 - 1) / 2, qo1 = (k1 - 1) / 2;
    p0 = gradient ? q0 : t0, p1 = x1;
    r0 = t0, r1 = q1;
  }
  // Work-area vectors per lane vector of the tile: X, [dy], P (reused for R), Q, [out].
  __host__ __device__ int64_t Planes(int nf, int ng, int ngs, bool gradient,
                                     bool separate_out, int t0, int t1) const {
    const int64_t x = int64_t(x0) * x1, q = int64_t(q0) * q1;
    if (!gradient) return x + int64_t(nf) * p0 * p1 + (separate_out ? int64_t(t0) * t1 : 0);
    const int64_t pr = std::max<int64_t>(int64_t(nf) * p0 * p1, int64_t(ngs) * r0 * r1);
    return x + q + pr + int64_t(ng) * q;  // the output staging reuses dy's box
  }
};

// Division by a small positive divisor through a float reciprocal, corrected to be exact for
// dividends below 2^24 (box indices are far smaller).
struct SmallDiv {
  int d;
  float inv;
  __device__ explicit SmallDiv(int divisor) : d(divisor), inv(1.f / float(divisor)) {}
  __device__ __forceinline__ int Div(int i, int* rem) const {
    int q = int(float(i) * inv);
    int r = i - q * d;
    if (r < 0) r += d, --q;
    if (r >= d) r -= d, ++q;
    *rem = r;
    return q;
  }
};

// Tile geometry of one CTA iteration: image, origin of the tile along A0, A1, L.
struct TileAt {
  int64_t img, o0, o1, oL;
};
__device__ __forceinline__ TileAt LocateTile(const WindowPlan& p, int64_t t) {
  TileAt at;
  const int64_t tl = t % p.tiles[2];
  t /= p.tiles[2];
  const int64_t t1 = t % p.tiles[1];
  t /= p.tiles[1];
  const int64_t t0 = t % p.tiles[0];
  at.img = t / p.tiles[0];
  at.o0 = t0 * p.tile[0], at.o1 = t1 * p.tile[1], at.oL = tl * p.tile[2];
  return at;
}

template <typename A, int VW>
struct LaneVec {
  A v[VW];
};

// Visits every vector point of a box e0 x e1 x nv (nv lane vectors, a power of two):
// f(index, i0, i1, lane_vector), lane vectors fastest.
template <typename F>
__device__ __forceinline__ void ForEachVector(int e0, int e1, int nv, F&& f) {
  const SmallDiv d1(e1);
  const int shift = __ffs(nv) - 1, size = e0 * e1 * nv;
  for (int i = threadIdx.x; i < size; i += kWindowThreads) {
    int i1;
    const int i0 = d1.Div(i >> shift, &i1);
    f(i, i0, i1, i & (nv - 1));
  }
}

// Moves a box between global memory and shared vectors. Load: dst[(i0*e1+i1)*nv+v] = the
// image's elements at (g0 + i0, g1 + i1, gL + v*VW + e), zero outside the image. Store (tile
// only): the reverse, skipping points outside the image. Accesses run along the contiguous
// axis: 16-byte vectors along L when possible, else coalesced scalars along A0 or A1. Each
// thread issues kInFlight loads before storing any, so several misses overlap.
constexpr int kInFlight = 4;

template <bool kStore, typename T, typename A, int VW>
__device__ void MoveBox(const WindowPlan& p, T* __restrict__ image, int64_t g0, int64_t g1,
                        int64_t gL, int e0, int e1, LaneVec<A, VW>* __restrict__ box) {
  using U = std::remove_const_t<T>;
  const int nv = p.tile[2] / VW;
  if (p.vector_io) {
    const SmallDiv d1(e1);
    const int shift = __ffs(nv) - 1, size = e0 * e1 * nv;
    for (int first = threadIdx.x; first < size; first += kInFlight * kWindowThreads) {
      int64_t at[kInFlight];
      bool inside[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int i = first + u * kWindowThreads;
        int i1;
        const int i0 = d1.Div(i >> shift, &i1);
        const int64_t a0 = g0 + i0, a1 = g1 + i1, l = gL + int64_t(i & (nv - 1)) * VW;
        inside[u] = i < size && a0 >= 0 && a0 < p.dim[0] && a1 >= 0 && a1 < p.dim[1] &&
                    l < p.dim[2];
        at[u] = a0 * p.stride[0] + a1 * p.stride[1] + l;
      }
      if constexpr (kStore) {
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          if (!inside[u]) continue;
          const LaneVec<A, VW> v = box[first + u * kWindowThreads];
          Vec<U, VW> out;
#pragma unroll
          for (int e = 0; e < VW; ++e) out.v[e] = FromAcc<U>(v.v[e]);
          StoreVec<U, VW>(image + at[u], out);
        }
      } else {
        Vec<U, VW> in[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u)
          if (inside[u]) in[u] = LoadVec<U, VW>(image + at[u]);
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          const int i = first + u * kWindowThreads;
          if (i >= size) break;
          LaneVec<A, VW> v;
#pragma unroll
          for (int e = 0; e < VW; ++e) v.v[e] = inside[u] ? ToAcc(in[u].v[e]) : A(0);
          box[i] = v;
        }
      }
    }
    return;
  }
  // Scalars, the stride-1 axis fastest: (slow, mid, fast) extents in that order.
  const int tl = p.tile[2];
  const int fast = p.fast_axis;
  const int ef = fast == 0 ? e0 : fast == 1 ? e1 : tl;
  const int em = fast == 2 ? e1 : tl;  // the middle axis: L unless L is the fast one
  const SmallDiv df(ef), dm(em);
  A* flat = &box[0].v[0];
  const int size = e0 * e1 * tl;
  for (int first = threadIdx.x; first < size; first += kInFlight * kWindowThreads) {
    int64_t at[kInFlight];
    int slot[kInFlight];
    bool inside[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int j = first + u * kWindowThreads;
      int f, m;
      const int s = dm.Div(df.Div(j, &f), &m);
      int i0, i1, l;
      if (fast == 0) i0 = f, l = m, i1 = s;
      else if (fast == 1) i1 = f, l = m, i0 = s;
      else l = f, i1 = m, i0 = s;
      const int64_t a0 = g0 + i0, a1 = g1 + i1, al = gL + l;
      inside[u] = j < size && a0 >= 0 && a0 < p.dim[0] && a1 >= 0 && a1 < p.dim[1] &&
                  al < p.dim[2];
      slot[u] = j < size ? (i0 * e1 + i1) * tl + l : -1;
      at[u] = a0 * p.stride[0] + a1 * p.stride[1] + al * p.stride[2];
    }
    if constexpr (kStore) {
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (inside[u]) image[at[u]] = FromAcc<U>(flat[slot[u]]);
    } else {
      A v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = inside[u] ? ToAcc(image[at[u]]) : A(0);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (slot[u] >= 0) flat[slot[u]] = v[u];
    }
  }
}

// sums[q][e] = the window sum along A1 (k points from `at`) of plane q, lane e.
template <int NQ, typename A, int VW>
__device__ __forceinline__ void SumAlongA1(const LaneVec<A, VW>* planes, int plane, int at, int k,
                                           int nv, A (&sums)[NQ][VW]) {
#pragma unroll
  for (int q = 0; q < NQ; ++q)
#pragma unroll
    for (int e = 0; e < VW; ++e) sums[q][e] = A(0);
  for (int d = 0; d < k; ++d)
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const LaneVec<A, VW> pv = planes[q * plane + at + d * nv];
#pragma unroll
      for (int e = 0; e < VW; ++e) sums[q][e] += pv.v[e];
    }
}

template <typename T, typename A, typename Policy, bool kGrad>
__global__ void __launch_bounds__(kWindowThreads)
    WindowKernel(WindowPlan p, Policy pol, const T* __restrict__ x, const T* __restrict__ dy,
                 T* __restrict__ out, LaneVec<A, 16 / sizeof(A)>* __restrict__ global_work) {
  constexpr int VW = 16 / sizeof(A);
  constexpr int NF = Policy::kF, NG = Policy::kG, NGS = Policy::kGS;
  using LV = LaneVec<A, VW>;
  JAXMPS_DYNAMIC_SHARED(smem);
  LV* const work = p.in_shared ? reinterpret_cast<LV*>(smem)
                               : global_work + int64_t(blockIdx.x) * p.work_vectors;
  const WindowBoxes b(p, kGrad);
  const int nv = p.tile[2] / VW, t0 = p.tile[0], t1 = p.tile[1];
  const int sx = b.x0 * b.x1 * nv, sq = b.q0 * b.q1 * nv, sp = b.p0 * b.p1 * nv,
            sr = b.r0 * b.r1 * nv;
  LV* const xb = work;
  LV* const gb = xb + sx;                    // gradient: dy on BQ, later the output staging
  LV* const pb = kGrad ? gb + sq : xb + sx;  // P, reused for R
  LV* const rb = pb;
  LV* const qb = pb + (kGrad ? max(NF * sp, NGS * sr) : NF * sp);
  LV* const ob = kGrad ? gb : qb;            // forward: after P; gradient: dy's space

  for (int64_t t = blockIdx.x; t < p.total_tiles; t += gridDim.x) {
    const TileAt at = LocateTile(p, t);
    const int64_t base = at.img * p.image_stride;
    __syncthreads();  // the previous tile's readers are done with the work area
    MoveBox<false, const T, A, VW>(p, x + base, at.o0 - b.xo0, at.o1 - b.xo1, at.oL, b.x0,
                                   b.x1, xb);
    if constexpr (kGrad)
      MoveBox<false, const T, A, VW>(p, dy + base, at.o0 - b.qo0, at.o1 - b.qo1, at.oL, b.q0,
                                     b.q1, gb);
    __syncthreads();
    // P: window sums of F(X) along A0.
    ForEachVector(b.p0, b.p1, nv, [&](int i, int i0, int i1, int v) {
      A acc[NF][VW] = {};
      for (int d = 0; d < p.k0; ++d) {
        const LV xv = xb[((i0 + d) * b.x1 + i1) * nv + v];
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          A f[NF];
          pol.Transform(xv.v[e], f);
#pragma unroll
          for (int q = 0; q < NF; ++q) acc[q][e] += f[q];
        }
      }
#pragma unroll
      for (int q = 0; q < NF; ++q)
#pragma unroll
        for (int e = 0; e < VW; ++e) pb[q * sp + i].v[e] = acc[q][e];
    });
    __syncthreads();
    if constexpr (!kGrad) {
      ForEachVector(t0, t1, nv, [&](int i, int i0, int i1, int v) {
        A s[NF][VW];
        SumAlongA1<NF>(pb, sp, (i0 * b.p1 + i1) * nv + v, p.k1, nv, s);
        const LV xv = xb[((i0 + b.xo0) * b.x1 + i1 + b.xo1) * nv + v];
        LV y;
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          A se[NF];
#pragma unroll
          for (int q = 0; q < NF; ++q) se[q] = s[q][e];
          y.v[e] = pol.Forward(xv.v[e], se);
        }
        ob[i] = y;
      });
    } else {
      // Window statistics and gradient quantities on BQ; zero outside the image, as the
      // reference's zero padding of the adjoint sum.
      ForEachVector(b.q0, b.q1, nv, [&](int i, int i0, int i1, int v) {
        const int64_t a0 = at.o0 - b.qo0 + i0, a1 = at.o1 - b.qo1 + i1;
        LV qv[NG] = {};
        if (a0 >= 0 && a0 < p.dim[0] && a1 >= 0 && a1 < p.dim[1]) {
          A s[NF][VW];
          SumAlongA1<NF>(pb, sp, (i0 * b.p1 + i1) * nv + v, p.k1, nv, s);
          const LV xv = xb[((i0 + b.xo0 - b.qo0) * b.x1 + i1 + b.xo1 - b.qo1) * nv + v];
          const LV gv = gb[i];
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            A se[NF], qe[NG];
#pragma unroll
            for (int q = 0; q < NF; ++q) se[q] = s[q][e];
            pol.Inner(xv.v[e], gv.v[e], se, qe);
#pragma unroll
            for (int q = 0; q < NG; ++q) qv[q].v[e] = qe[q];
          }
        }
#pragma unroll
        for (int q = 0; q < NG; ++q) qb[q * sq + i] = qv[q];
      });
      __syncthreads();
      // R: adjoint window sums of the first NGS quantities along A0.
      ForEachVector(b.r0, b.r1, nv, [&](int i, int i0, int i1, int v) {
        A acc[NGS][VW] = {};
        for (int d = 0; d < p.k0; ++d)
#pragma unroll
          for (int q = 0; q < NGS; ++q) {
            const LV qv = qb[q * sq + ((i0 + d) * b.q1 + i1) * nv + v];
#pragma unroll
            for (int e = 0; e < VW; ++e) acc[q][e] += qv.v[e];
          }
#pragma unroll
        for (int q = 0; q < NGS; ++q)
#pragma unroll
          for (int e = 0; e < VW; ++e) rb[q * sr + i].v[e] = acc[q][e];
      });
      __syncthreads();
      ForEachVector(t0, t1, nv, [&](int i, int i0, int i1, int v) {
        A st[NGS][VW];
        SumAlongA1<NGS>(rb, sr, (i0 * b.r1 + i1) * nv + v, p.k1, nv, st);
        const int at_q = ((i0 + b.qo0) * b.q1 + i1 + b.qo1) * nv + v;
        LV qo[NG];
#pragma unroll
        for (int q = 0; q < NG; ++q) qo[q] = qb[q * sq + at_q];
        const LV xv = xb[((i0 + b.xo0) * b.x1 + i1 + b.xo1) * nv + v];
        LV dx;
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          A qe[NG], se[NGS];
#pragma unroll
          for (int q = 0; q < NG; ++q) qe[q] = qo[q].v[e];
#pragma unroll
          for (int q = 0; q < NGS; ++q) se[q] = st[q][e];
          dx.v[e] = pol.Combine(xv.v[e], qe, se);
        }
        ob[i] = dx;  // dy's space: every reader of gb finished before the R pass
      });
    }
    __syncthreads();
    MoveBox<true, T, A, VW>(p, out + base, at.o0, at.o1, at.oL, t0, t1, ob);
  }
}

// ---- policies: the pointwise math of each op ------------------------------------------------

// Spatial and cross-channel norm: T = delta + alpha/N * S[X^2], Y = X T^-beta;
// dX = g T^-beta - (2 alpha beta / N) X S^T[g X T^(-beta-1)].
// Q planes: [g X T^(-beta-1) (summed), g T^-beta].
// kQ: NegPower's form (kRuntimeBeta, or 4 beta compiled in: Compiled, for MPS's default 5).
template <typename A, int kQ = kRuntimeBeta>
struct PowerNormPolicy {
  static constexpr int kF = 1, kG = 2, kGS = 1;
  static constexpr int kDefaultQ = 20;  // beta 5, spatial and cross-channel norm's default
  using Compiled = PowerNormPolicy<A, kDefaultQ>;
  A alpha_over_n;
  NegPower<A, kQ> power;  // t -> t^-beta
  A delta, two_alpha_beta_over_n;
  bool Compilable() const { return power.Is(kDefaultQ); }
  Compiled Compile() const {
    return {alpha_over_n, power.template Compiled<kDefaultQ>(), delta, two_alpha_beta_over_n};
  }
  __device__ void Transform(A x, A (&f)[kF]) const { f[0] = x * x; }
  __device__ A Forward(A x, const A (&s)[kF]) const {
    return x * power.Of(delta + alpha_over_n * s[0]);
  }
  __device__ void Inner(A x, A g, const A (&s)[kF], A (&q)[kG]) const {
    A next;  // T^(-beta-1)
    const A tb = power.Of(delta + alpha_over_n * s[0], &next);
    q[0] = g * x * next;
    q[1] = g * tb;
  }
  __device__ A Combine(A x, const A (&q)[kG], const A (&st)[kGS]) const {
    return q[1] - two_alpha_beta_over_n * x * st[0];
  }
};

// Local contrast norm: M = S[X]/N, VAR = S[X^2]/N - M^2, T = delta + alpha VAR,
// Y = pm + ps (X - p0 M) T^-beta; A = g T^-beta, C = A (X - p0 M) / T,
// dX = ps (A - p0/N S^T[A] - 2 alpha beta / N (X S^T[C] - S^T[C M])).
// The adjoint sum is linear, so the two sums without an X factor are one:
// dX = ps (A - S^T[D] - X S^T[C']), D = p0/N A - 2 alpha beta / N C M, C' = 2 alpha beta / N C.
// Q planes: [D, C' (summed), A]: two adjoint sums per element instead of three (fewer
// registers, exchange planes and adds in the streaming gradient).
// kQ as for PowerNormPolicy (compiled: MPS's default 0.5).
template <typename A, int kQ = kRuntimeBeta>
struct ContrastNormPolicy {
  static constexpr int kF = 2, kG = 3, kGS = 2;
  static constexpr int kDefaultQ = 2;  // beta 0.5
  using Compiled = ContrastNormPolicy<A, kDefaultQ>;
  A inv_n, alpha;
  NegPower<A, kQ> power;  // t -> t^-beta
  A delta, p0, pm, ps, p0_over_n, two_alpha_beta_over_n;
  bool Compilable() const { return power.Is(kDefaultQ); }
  Compiled Compile() const {
    return {inv_n, alpha, power.template Compiled<kDefaultQ>(), delta, p0, pm, ps, p0_over_n,
            two_alpha_beta_over_n};
  }
  __device__ void Transform(A x, A (&f)[kF]) const {
    f[0] = x;
    f[1] = x * x;
  }
  __device__ void Stats(const A (&s)[kF], A* mean, A* t) const {
    *mean = s[0] * inv_n;
    *t = delta + alpha * (s[1] * inv_n - *mean * *mean);
  }
  __device__ A Forward(A x, const A (&s)[kF]) const {
    A mean, t;
    Stats(s, &mean, &t);
    return pm + ps * (x - p0 * mean) * power.Of(t);
  }
  __device__ void Inner(A x, A g, const A (&s)[kF], A (&q)[kG]) const {
    A mean, t;
    Stats(s, &mean, &t);
    A next;  // T^(-beta-1)
    const A a = g * power.Of(t, &next);
    const A c = two_alpha_beta_over_n * (g * next * (x - p0 * mean));
    q[0] = p0_over_n * a - c * mean;
    q[1] = c;
    q[2] = a;
  }
  __device__ A Combine(A x, const A (&q)[kG], const A (&st)[kGS]) const {
    return ps * (q[2] - st[0] - x * st[1]);
  }
};

// ---- windows along the contiguous axis: NHWC cross-channel ----------------------------------

// NHWC images are rows of C contiguous channels, one per pixel, and the cross-channel window
// runs along them: a CTA takes `rows` whole rows (one contiguous stretch of memory), keeps
// each padded with k-1 zeros on both sides in shared memory, and sums windows straight from
// there, one output per thread and consecutive threads on consecutive channels (conflict-free,
// coalesced). Gradient: Q on every padded position (zero outside the row), then dx.
struct RowPlan {
  int64_t rows = 0;   // pixels over all images
  int c = 0, k = 1;   // row length (channels), window size
  int pad = 0;        // zeros each side: k - 1
  int per_block = 1;  // rows per CTA
  int width() const { return c + 2 * pad; }
};

template <typename T, typename A, typename Policy, bool kGrad>
__global__ void __launch_bounds__(kWindowThreads)
    RowWindowKernel(RowPlan p, Policy pol, const T* __restrict__ x, const T* __restrict__ dy,
                    T* __restrict__ out) {
  constexpr int NF = Policy::kF, NG = Policy::kG, NGS = Policy::kGS;
  JAXMPS_DYNAMIC_SHARED(smem);
  const int width = p.c + 2 * p.pad, r_count = p.per_block;
  A* const xs = reinterpret_cast<A*>(smem);  // rows x width
  A* const qs = xs + r_count * width;        // NG planes of rows x width
  const int64_t first_row = int64_t(blockIdx.x) * r_count;
  const int rows = int(min(int64_t(r_count), p.rows - first_row));
  const int64_t base = first_row * p.c;  // the CTA's rows are contiguous in memory
  const SmallDiv dw(width), dc(p.c);
  for (int j = threadIdx.x; j < r_count * width; j += kWindowThreads) {
    int col;
    const int r = dw.Div(j, &col);
    col -= p.pad;
    xs[j] = r < rows && col >= 0 && col < p.c ? ToAcc(x[base + int64_t(r) * p.c + col]) : A(0);
  }
  __syncthreads();
  // Sums of F(x) over the forward window [c - k//2, c + (k-1)//2] of column `col`.
  auto window_stats = [&](const A* row, int col, A (&s)[NF]) {
#pragma unroll
    for (int q = 0; q < NF; ++q) s[q] = A(0);
    for (int d = 0; d < p.k; ++d) {
      A f[NF];
      pol.Transform(row[col - p.k / 2 + d], f);
#pragma unroll
      for (int q = 0; q < NF; ++q) s[q] += f[q];
    }
  };
  if constexpr (!kGrad) {
    for (int j = threadIdx.x; j < rows * p.c; j += kWindowThreads) {
      int col;
      const int r = dc.Div(j, &col);
      const A* row = xs + r * width + p.pad;
      A s[NF];
      window_stats(row, col, s);
      out[base + j] = FromAcc<T>(pol.Forward(row[col], s));
    }
  } else {
    const int plane = r_count * width;
    for (int j = threadIdx.x; j < plane; j += kWindowThreads) {
      int col;
      const int r = dw.Div(j, &col);
      col -= p.pad;
      A qv[NG] = {};
      // Positions whose forward window stays inside the padded row; others are never read.
      if (r < rows && col >= 0 && col < p.c) {
        const A* row = xs + r * width + p.pad;
        A s[NF];
        window_stats(row, col, s);
        pol.Inner(row[col], ToAcc(dy[base + int64_t(r) * p.c + col]), s, qv);
      }
#pragma unroll
      for (int q = 0; q < NG; ++q) qs[q * plane + j] = qv[q];
    }
    __syncthreads();
    const int lo_t = (p.k - 1) / 2;  // adjoint window [c - (k-1)//2, c + k//2]
    for (int j = threadIdx.x; j < rows * p.c; j += kWindowThreads) {
      int col;
      const int r = dc.Div(j, &col);
      const int at = r * width + p.pad + col;
      A st[NGS] = {};
      for (int d = 0; d < p.k; ++d)
#pragma unroll
        for (int q = 0; q < NGS; ++q) st[q] += qs[q * plane + at - lo_t + d];
      A qo[NG];
#pragma unroll
      for (int q = 0; q < NG; ++q) qo[q] = qs[q * plane + at];
      out[base + j] = FromAcc<T>(pol.Combine(xs[at], qo, st));
    }
  }
}

// Runs the row kernel when a row (padded, with its gradient planes) fits in shared memory;
// *ran = false leaves the op to the general tile engine.
template <typename T, typename A, typename Policy, bool kGrad>
ffi::Error LaunchRowWindow(std::string_view op, cudaStream_t stream, const ImageShape& s, int k,
                           const Policy& pol, const T* x, const T* dy, T* out, bool* ran) {
  *ran = false;
  DeviceLimits limits;
  JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
  RowPlan p;
  p.rows = s.n * s.pixels();
  p.c = int(s.c), p.k = k, p.pad = k - 1;
  const int64_t planes = kGrad ? 1 + Policy::kG : 1;
  const int64_t row_bytes = int64_t(p.width()) * planes * int64_t(sizeof(A));
  const int64_t budget = std::min<int64_t>(limits.max_smem_per_block, 48 << 10);
  if (s.c > (1 << 16) || row_bytes > budget) return ffi::Error::Success();
  // About 2048 outputs per CTA, within the budget.
  p.per_block = int(std::max<int64_t>(1, std::min<int64_t>(budget / row_bytes,
                                                            std::max<int64_t>(1, 2048 / s.c))));
  *ran = true;
  return Launch(op, kGrad ? "the row window gradient kernel" : "the row window forward kernel",
                RowWindowKernel<T, A, Policy, kGrad>, CeilDiv(p.rows, p.per_block),
                kWindowThreads, p.per_block * row_bytes, stream, p, pol, x, dy, out);
}

// ---- host side ------------------------------------------------------------------------------

// Spatial windows (kh, kw): A0 = H, A1 = W, lanes = channels (contiguous for NHWC, a plane
// apart for NCHW). Preferred tile: 16 x 16 pixels by 8 channels (NHWC), 16 x 32 pixels by one
// lane vector of channels (NCHW).
template <typename A>
WindowPlan SpatialWindowPlan(const ImageShape& s, int kh, int kw) {
  constexpr int VW = 16 / sizeof(A);
  WindowPlan p;
  p.n = s.n;
  p.image_stride = s.sn;
  p.dim[0] = s.h, p.dim[1] = s.w, p.dim[2] = s.c;
  p.stride[0] = s.sh, p.stride[1] = s.sw, p.stride[2] = s.sc;
  p.k0 = kh, p.k1 = kw;
  if (s.channels_last) {
    p.tile[0] = 16, p.tile[1] = 16, p.tile[2] = 2 * VW;
  } else {
    p.tile[0] = 16, p.tile[1] = 32, p.tile[2] = VW;
  }
  return p;
}

// A window across channels: A0 = C, A1 unused, lanes = pixels (contiguous for NCHW, C apart
// for NHWC). Preferred tile: all channels up to 128 by 4 lane vectors of pixels.
template <typename A>
WindowPlan ChannelWindowPlan(const ImageShape& s, int kernel_size) {
  constexpr int VW = 16 / sizeof(A);
  WindowPlan p;
  p.n = s.n;
  p.image_stride = s.sn;
  p.dim[0] = s.c, p.dim[1] = 1, p.dim[2] = s.pixels();
  p.stride[0] = s.sc, p.stride[1] = 0, p.stride[2] = s.channels_last ? s.c : 1;
  p.k0 = kernel_size, p.k1 = 1;
  p.tile[0] = int(std::min<int64_t>(s.c, 128)), p.tile[1] = 1, p.tile[2] = 4 * VW;
  return p;
}

// Chooses the I/O mode, fits the tile to shared memory (halving the longer window-axis extent,
// lanes last) and sizes the grid. When even a one-point tile's halo does not fit, the
// preferred tile's work area goes to global scratch (grid-stride over tiles, 2 CTAs per SM).
template <typename T, typename A, typename Policy>
ffi::Error FinishWindowPlan(std::string_view op, WindowPlan& p, bool gradient,
                            const DeviceLimits& limits, const void* x, const void* out) {
  constexpr int VW = 16 / sizeof(A);
  // VW lanes of T move as one 2..16-byte access when L is contiguous and vector-aligned.
  const uintptr_t vector_bytes = VW * sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(x) % vector_bytes == 0 &&
                       reinterpret_cast<uintptr_t>(out) % vector_bytes == 0;
  p.vector_io = p.stride[2] == 1 && p.dim[2] % VW == 0 && p.image_stride % VW == 0 && aligned;
  p.fast_axis = p.stride[2] == 1 ? 2 : p.stride[1] == 1 ? 1 : p.stride[0] == 1 ? 0 : 2;
  for (int a = 0; a < 2; ++a)
    p.tile[a] = int(std::max<int64_t>(1, std::min<int64_t>(p.tile[a], p.dim[a])));
  while (p.tile[2] > VW && p.tile[2] / 2 >= p.dim[2]) p.tile[2] /= 2;
  auto bytes = [&](const WindowPlan& q) {
    const WindowBoxes b(q, gradient);
    return b.Planes(Policy::kF, Policy::kG, Policy::kGS, gradient, true, q.tile[0], q.tile[1]) *
           (q.tile[2] / VW) * int64_t(sizeof(A) * VW);
  };
  auto shrink = [&](WindowPlan& q) {
    if (q.tile[0] > 1 && q.tile[0] >= q.tile[1]) return q.tile[0] = (q.tile[0] + 1) / 2, true;
    if (q.tile[1] > 1) return q.tile[1] = (q.tile[1] + 1) / 2, true;
    if (q.tile[2] > VW) return q.tile[2] /= 2, true;
    return false;
  };
  const WindowPlan preferred = p;
  const int64_t budget = std::min<int64_t>(limits.max_smem_per_block, 100 << 10);
  while (bytes(p) > budget && shrink(p)) {
  }
  p.in_shared = bytes(p) <= limits.max_smem_per_block;
  if (!p.in_shared) {
    p = preferred;
    p.in_shared = false;
    const WindowBoxes b(p, gradient);
    if (int64_t(b.x0) * b.x1 * p.tile[2] >= (1 << 24)) {
      return InvalidArgument(op, "window ", p.k0, "x", p.k1, " is too large for the CUDA kernels");
    }
  }
  p.work_vectors = bytes(p) / int64_t(sizeof(A) * VW);
  p.total_tiles = p.n;
  for (int a = 0; a < 3; ++a) {
    p.tiles[a] = CeilDiv(p.dim[a], p.tile[a]);
    p.total_tiles *= p.tiles[a];
  }
  p.grid = p.in_shared ? std::min<int64_t>(p.total_tiles, 0x7fffffff)
                       : std::min<int64_t>(p.total_tiles, 2 * int64_t(limits.sm_count));
  return ffi::Error::Success();
}

// Runs one window kernel (forward or gradient) over every image.
template <typename T, typename A, typename Policy, bool kGrad>
ffi::Error LaunchWindow(std::string_view op, cudaStream_t stream, ffi::ScratchAllocator& scratch,
                        WindowPlan p, const Policy& pol, const T* x, const T* dy, T* out) {
  using LV = LaneVec<A, 16 / sizeof(A)>;
  DeviceLimits limits;
  JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
  JAXMPS_RETURN_IF_ERROR((FinishWindowPlan<T, A, Policy>(op, p, kGrad, limits, x, out)));
  if (p.total_tiles == 0) return ffi::Error::Success();
  auto kernel = WindowKernel<T, A, Policy, kGrad>;
  LV* work = nullptr;
  int64_t smem = 0;
  if (p.in_shared) {
    smem = p.work_vectors * int64_t(sizeof(LV));
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, kernel, smem));
  } else {
    JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, p.grid * p.work_vectors, &work));
  }
  return Launch(op, kGrad ? "the window gradient kernel" : "the window forward kernel", kernel,
                p.grid, kWindowThreads, smem, stream, p, pol, x, dy, out, work);
}

// Checks a window size attribute.
inline ffi::Error CheckWindow(std::string_view op, std::string_view name, int64_t k) {
  if (k < 1 || k > (1 << 20)) return InvalidArgument(op, name, " must be >= 1, got ", k);
  return ffi::Error::Success();
}

// A window op's handler body: validates x (and dy), then runs the forward or gradient kernel
// with make_plan(A{}, shape) -> WindowPlan and make_policy(A{}) -> Policy.
template <bool kGrad, typename MakePlan, typename MakePolicy>
ffi::Error RunWindowOp(std::string_view op, cudaStream_t stream, ffi::ScratchAllocator& scratch,
                       int64_t channels_last, const ffi::AnyBuffer* dy, const ffi::AnyBuffer& x,
                       ffi::AnyBuffer& out, MakePlan&& make_plan, MakePolicy&& make_policy) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(op, "x", x, channels_last, &s));
  if (dy != nullptr) JAXMPS_RETURN_IF_ERROR(CheckSameAs(op, "dy", *dy, "x", x));
  return DispatchFloat(op, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using A = typename Types<decltype(tag)>::Acc;
    if (s.size() == 0) return ffi::Error::Success();
    const WindowPlan plan = make_plan(A(0), s);
    const auto policy = make_policy(A(0));
    using Policy = std::decay_t<decltype(policy)>;
    const T* xp = static_cast<const T*>(x.untyped_data());
    const T* dyp = dy != nullptr ? static_cast<const T*>(dy->untyped_data()) : nullptr;
    T* outp = static_cast<T*>(out.untyped_data());
    bool ran = false;
    JAXMPS_RETURN_IF_ERROR((TryStreamWindow<T, A, Policy, kGrad>(
        op, stream, plan.dim, plan.stride, plan.image_stride, plan.n, plan.k0, plan.k1, policy,
        xp, dyp, outp, &ran)));
    if (ran) return ffi::Error::Success();
    return LaunchWindow<T, A, Policy, kGrad>(op, stream, scratch, plan, policy, xp, dyp, outp);
  });
}

}  // namespace jaxmps::cuda
