// Register/warp-shuffle kernel for windows along the contiguous axis of short rows (NHWC
// cross-channel norm): TryLaneWindow runs it when a row fits one warp's lanes, else declines.
//
// The row kernel (window.cuh) stages padded rows in shared memory and pays index arithmetic
// per element: compute-bound (measured on H100: ~2x the memory roofline). Here each thread
// holds one 16-byte vector (VW elements) of one row, a row of C elements being Lp = C / VW
// consecutive lanes of a warp (Lp a power of two <= 32: a warp holds 32 / Lp whole rows). When
// the window's halos (k//2 left, (k-1)//2 right, mirrored for the adjoint) are at most VW, a
// thread's neighbours live in the adjacent lane only: one __shfl_up_sync / __shfl_down_sync
// per halo element, zero at the row's first / last lane (the zero padding of KERNELS.md).
// - forward: window sums S of F(x) over own + halo elements, y = Forward(x, S);
// - gradient: S at own elements (F(x) halo), Q = Inner(x, g, S), then the adjoint window sums
//   of the summed Q planes (their halo shuffled the same way), dx = Combine(x, Q, S^T).
// Sums are direct (no running sums: a NaN stays in its windows), summed in a fixed order (no
// atomics: bitwise repeatable). Each thread loads all its kUnroll vectors (x and dy) before
// using any, so enough bytes are in flight to keep the kernel memory-bound.
#pragma once

#include <algorithm>
#ifdef JAXMPS_CUDA_EMU
#include <atomic>
#endif

#include "cuda_common.cuh"

namespace jaxmps::cuda {

constexpr int kLaneThreads = 256;
constexpr unsigned kFullWarp = 0xffffffffu;

struct LanePlan {
  int64_t vectors = 0;  // VW-element vectors in the tensor: rows * lanes
  int lanes = 1;        // vectors per row (Lp): a power of two <= 32
  int k = 1;            // window size
};

// Vectors per thread: loaded together before use (x and dy for the gradient, so both
// directions keep 64 bytes per thread in flight).
template <bool kGrad>
constexpr int LaneUnroll() {
  return kGrad ? 2 : 4;
}

// sums[q][e] = the sum over d in [-lo, hi] of v[q][e + d], for planes q < NP, where elements
// outside this thread's vector come from the neighbouring lanes of the same row (zero past the
// row's ends). H >= max(lo, hi) is the compiled halo: the terms |d| <= H are unrolled and the
// ones outside [-lo, hi] selected away (a select, not a multiply: NaN stays out).
// Every lane of the warp must call this (shuffles).
template <int NP, int H, typename A, int VW, int NV>
__device__ __forceinline__ void LaneWindowSums(const A (&v)[NV][VW], bool first_lane,
                                               bool last_lane, int lo, int hi,
                                               A (&sums)[NP][VW]) {
  static_assert(NP <= NV && H <= VW, "the halo must come from the adjacent lane only");
  bool use[2 * H + 1];
#pragma unroll
  for (int d = -H; d <= H; ++d) use[d + H] = -d <= lo && d <= hi;
#pragma unroll
  for (int q = 0; q < NP; ++q) {
    A left[H > 0 ? H : 1], right[H > 0 ? H : 1];  // the left lane's last H, right lane's first H
#pragma unroll
    for (int j = 0; j < H; ++j) {
      const A l = __shfl_up_sync(kFullWarp, v[q][VW - H + j], 1);
      const A r = __shfl_down_sync(kFullWarp, v[q][j], 1);
      left[j] = first_lane ? A(0) : l;
      right[j] = last_lane ? A(0) : r;
    }
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      A s = A(0);
#pragma unroll
      for (int d = -H; d <= H; ++d) {
        const int i = e + d;  // compile-time after unrolling
        const A term = i < 0 ? left[(H + i) < 0 ? 0 : H + i]
                             : i >= VW ? right[(i - VW) < H ? i - VW : 0] : v[q][i < VW ? i : 0];
        if (use[d + H]) s += term;
      }
      sums[q][e] = s;
    }
  }
}

template <typename T, typename A, typename Policy, bool kGrad, int VW, int H>
__global__ void __launch_bounds__(kLaneThreads)
    LaneWindowKernel(LanePlan p, Policy pol, const T* __restrict__ x, const T* __restrict__ dy,
                     T* __restrict__ out) {
  constexpr int U = LaneUnroll<kGrad>(), NF = Policy::kF, NG = Policy::kG,
                NGS = Policy::kGS;
  // Every block covers whole warps and a warp whole rows, so a vector's place in its row is
  // its lane's place in the warp.
  const int in_row = int(threadIdx.x) & 31 & (p.lanes - 1);
  const bool first_lane = in_row == 0, last_lane = in_row == p.lanes - 1;
  const int64_t first = int64_t(blockIdx.x) * (U * kLaneThreads) + threadIdx.x;
  // Lanes past the end load the last vector again (their own whole rows: they only feed the
  // warp's shuffles) and store nothing.
  Vec<T, VW> xr[U], gr[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t at = min(first + u * kLaneThreads, p.vectors - 1) * VW;
    xr[u] = LoadVec<T, VW>(x + at);
    if constexpr (kGrad) gr[u] = LoadVec<T, VW>(dy + at);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    A xv[VW], f[NF][VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      xv[e] = ToAcc(xr[u].v[e]);
      A fe[NF];
      pol.Transform(xv[e], fe);
#pragma unroll
      for (int q = 0; q < NF; ++q) f[q][e] = fe[q];
    }
    A s[NF][VW];
    LaneWindowSums<NF, H>(f, first_lane, last_lane, p.k / 2, (p.k - 1) / 2, s);
    Vec<T, VW> result;
    if constexpr (!kGrad) {
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        A se[NF];
#pragma unroll
        for (int q = 0; q < NF; ++q) se[q] = s[q][e];
        result.v[e] = FromAcc<T>(pol.Forward(xv[e], se));
      }
    } else {
      A qv[NG][VW];
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        A se[NF], qe[NG];
#pragma unroll
        for (int q = 0; q < NF; ++q) se[q] = s[q][e];
        pol.Inner(xv[e], ToAcc(gr[u].v[e]), se, qe);
#pragma unroll
        for (int q = 0; q < NG; ++q) qv[q][e] = qe[q];
      }
      A st[NGS][VW];  // adjoint window [c - (k-1)//2, c + k//2]
      LaneWindowSums<NGS, H>(qv, first_lane, last_lane, (p.k - 1) / 2, p.k / 2, st);
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        A qe[NG], se[NGS];
#pragma unroll
        for (int q = 0; q < NG; ++q) qe[q] = qv[q][e];
#pragma unroll
        for (int q = 0; q < NGS; ++q) se[q] = st[q][e];
        result.v[e] = FromAcc<T>(pol.Combine(xv[e], qe, se));
      }
    }
    const int64_t v = first + u * kLaneThreads;
    if (v < p.vectors) StoreVec<T, VW>(out + v * VW, result);
  }
}

// The compiled halo for window size k: the smallest power of two >= k // 2 (1 at least), or 0
// when the halo does not fit in one neighbouring vector of VW elements.
inline int LaneHalo(int64_t k, int vw) {
  int h = 1;
  while (h < k / 2) h *= 2;
  return h <= vw ? h : 0;
}

// Vectors per row (Lp) when rows of c elements in vectors of vw fit a warp as whole
// power-of-two lane groups, else 0.
inline int LanesPerRow(int64_t c, int vw) {
  const int64_t lanes = c / vw;
  return c % vw == 0 && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0 ? int(lanes)
                                                                                  : 0;
}

#ifdef JAXMPS_CUDA_EMU
// Launches of the lane kernel: lets the emulator tests tell which path a call took.
inline std::atomic<int64_t> lane_window_launches{0};
#endif

// Runs the lane kernel over `rows` rows of c contiguous elements with window k when it
// applies (*ran = true), else leaves *ran = false for the caller's general path.
template <typename T, typename A, typename Policy, bool kGrad>
ffi::Error TryLaneWindow(std::string_view op, cudaStream_t stream, int64_t rows, int64_t c,
                         int k, const Policy& pol, const T* x, const T* dy, T* out, bool* ran) {
  *ran = false;
  const int vw = VectorWidth<T>(c, {x, dy, out});
  const int lanes = LanesPerRow(c, vw), halo = LaneHalo(k, vw);
  if (lanes == 0 || halo == 0) return ffi::Error::Success();
  *ran = true;
  LanePlan p;
  p.vectors = rows * lanes, p.lanes = lanes, p.k = k;
#ifdef JAXMPS_CUDA_EMU
  ++lane_window_launches;
#endif
  const int64_t blocks = CeilDiv(p.vectors, int64_t(LaneUnroll<kGrad>()) * kLaneThreads);
  const char* what = kGrad ? "the lane window gradient kernel" : "the lane window forward kernel";
  // The op's default beta (MPS's 5) compiled in when it is the one asked for.
  const bool compiled = !std::is_same_v<A, double> && UseCompiledBeta(pol);
#ifdef JAXMPS_CUDA_EMU
  if (compiled) ++compiled_beta_launches;
#endif
  return DispatchVector<T>(vw, [&](auto vw_c) {
    constexpr int VW = decltype(vw_c)::value;
    auto with_halo = [&](auto policy) {
      using P = decltype(policy);
      auto launch = [&](auto kernel) {
        return Launch(op, what, kernel, blocks, kLaneThreads, 0, stream, p, policy, x, dy, out);
      };
      switch (halo) {  // halos are powers of two <= VW
        case 1: return launch(LaneWindowKernel<T, A, P, kGrad, VW, 1>);
        case 2:
          if constexpr (VW >= 2) return launch(LaneWindowKernel<T, A, P, kGrad, VW, 2>);
          break;
        case 4:
          if constexpr (VW >= 4) return launch(LaneWindowKernel<T, A, P, kGrad, VW, 4>);
          break;
        case 8:
          if constexpr (VW >= 8) return launch(LaneWindowKernel<T, A, P, kGrad, VW, 8>);
          break;
      }
      return Internal(op, "lane window halo ", halo, " exceeds the vector width ", VW);
    };
    if constexpr (!std::is_same_v<A, double>) {  // float64 takes pow either way
      if (compiled) return with_halo(pol.Compile());
    }
    return with_halo(pol);
  });
}

}  // namespace jaxmps::cuda
