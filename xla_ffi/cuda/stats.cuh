// Per-channel statistics engine for instance and batch norm on CUDA: plans (tiles of image,
// channel block and row range), deterministic block reductions, fused and chunked launchers.
//
// A reduction *group* is what one statistic row is computed over: per (image, channel block)
// for instance norm, per channel block over the whole batch for batch norm. NHWC groups hold
// `lanes` vectors of `vec` channels per pixel row; NCHW groups hold one channel, read as vectors
// of `vec` consecutive pixels of each plane. A group is cut into *chunks* of rows.
//
// Fused path (the group fits in shared memory): one CTA per group loads it once, reduces,
// and applies from shared memory: x read once, y written once (gradient: dy, x read once).
// Chunked path: a partial-sum kernel per chunk, a finalize kernel per statistic (fixed-order
// warp tree over chunks), and an apply kernel that walks chunks in reverse so that the data the
// partial kernel read last is re-read from L2. No atomics: results are bitwise repeatable.
#pragma once

#include <algorithm>

#include "cuda_common.cuh"

namespace jaxmps::cuda {

constexpr int kStatsThreads = 256;
constexpr int kStatsWarps = kStatsThreads / 32;
constexpr int kChunkVectorsPerThread = 16;     // chunked path: vectors each thread reads
constexpr int64_t kFusedBudget = 100 << 10;    // fused tile bytes that leave 2 CTAs per SM

struct StatsPlan {
  int64_t n = 0, c = 0, hw = 0;
  bool channels_last = true;
  bool per_image = true;        // statistics per (n, c) (instance) or per c (batch)
  int vec = 1;                  // elements per vector
  int lanes = 1;                // NHWC: vectors across a channel block (power of two <= 32)
  int64_t cblocks = 1;          // NHWC: channel blocks of lanes * vec channels
  int64_t groups = 0;           // CTAs of the fused path / groups of the chunked path
  int64_t rows = 0;             // NHWC: pixel rows per group; NCHW: vectors per plane
  int64_t chunk_rows = 0;       // rows (NHWC) or vectors (NCHW) per chunk
  int64_t chunks_per_plane = 1; // NCHW: chunks per plane
  int64_t chunks = 1;           // chunks per group
  int64_t stats = 0;            // number of statistics: n * c or c
  int64_t count = 0;            // elements per statistic: hw or n * hw
  bool fused = false;
  int per_thread = 0;           // fused: vectors each thread keeps in shared memory
  int sums = 1;                 // sums per channel reduced together (1 or 2)
  int arrays = 1;               // image arrays kept on chip by the fused path (x; dy and x)

  __host__ __device__ int width() const { return lanes * vec; }   // channel slots reduced per CTA
  __host__ __device__ int64_t planes() const { return per_image ? 1 : n; }
  __host__ __device__ int64_t blocks() const { return fused ? groups : groups * chunks; }
  // Dynamic shared memory: the tile, then per-warp reduction rows, reduced totals and the
  // per-slot coefficient table (see SharedLayout).
  template <typename T, typename A>
  int64_t shared_bytes() const {
    const int64_t tile = fused ? int64_t(per_thread) * kStatsThreads * vec * sizeof(T) * arrays : 0;
    return tile + int64_t(kStatsWarps + 1) * sums * width() * sizeof(A) +
           int64_t(width()) * 4 * sizeof(A);
  }
};

// Where a thread's vectors of chunk q of group g live: base + s * stride for s < count, and
// the statistic index of its vector slot e: kbase + e * kstep.
struct Cursor {
  int64_t base = 0, stride = 0, kbase = 0;
  int count = 0, kstep = 0;
  int64_t channel = 0;  // channel of slot 0
};

__device__ __forceinline__ Cursor MakeCursor(const StatsPlan& p, int64_t g, int64_t q, int t) {
  Cursor cur;
  if (p.channels_last) {
    const int lane = t & (p.lanes - 1), rt = t / p.lanes, rows_step = kStatsThreads / p.lanes;
    const int64_t img = p.per_image ? g / p.cblocks : 0;
    const int64_t cb = p.per_image ? g % p.cblocks : g;
    const int64_t c0 = (cb * p.lanes + lane) * p.vec;
    const int64_t r0 = q * p.chunk_rows, r1 = min(p.rows, r0 + p.chunk_rows);
    const int64_t first = r0 + rt;
    cur.count = (c0 < p.c && first < r1) ? int((r1 - first + rows_step - 1) / rows_step) : 0;
    cur.base = (img * p.hw + first) * p.c + c0;
    cur.stride = int64_t(rows_step) * p.c;
    cur.channel = c0;
    cur.kbase = (p.per_image ? img * p.c : 0) + c0;
    cur.kstep = 1;
  } else {
    const int64_t img = p.per_image ? g / p.c : q / p.chunks_per_plane;
    const int64_t ch = p.per_image ? g % p.c : g;
    const int64_t sub = p.per_image ? q : q % p.chunks_per_plane;
    const int64_t o0 = sub * p.chunk_rows, o1 = min(p.rows, o0 + p.chunk_rows);
    const int64_t first = o0 + t;
    cur.count = first < o1 ? int((o1 - first + kStatsThreads - 1) / kStatsThreads) : 0;
    cur.base = (img * p.c + ch) * p.hw + first * p.vec;
    cur.stride = int64_t(kStatsThreads) * p.vec;
    cur.channel = ch;
    cur.kbase = p.per_image ? img * p.c + ch : ch;
    cur.kstep = 0;
  }
  return cur;
}

// The channel and statistic index of reduced slot i (< width) of group g.
struct SlotIndex {
  int64_t channel, k;
  bool valid;
};
__device__ __forceinline__ SlotIndex SlotOf(const StatsPlan& p, int64_t g, int i) {
  SlotIndex r;
  if (p.channels_last) {
    const int64_t img = p.per_image ? g / p.cblocks : 0;
    const int64_t cb = p.per_image ? g % p.cblocks : g;
    r.channel = cb * p.width() + i;
    r.k = (p.per_image ? img * p.c : 0) + r.channel;
    r.valid = r.channel < p.c;
  } else {
    r.channel = p.per_image ? g % p.c : g;
    r.k = g;  // per_image: g = n * c + ch; batch: g = ch
    r.valid = i == 0;
  }
  return r;
}


// Element index of pixel 0 of statistic k's channel (the shift of the chunked forward sums).
__device__ __forceinline__ int64_t FirstElement(const StatsPlan& p, int64_t k) {
  const int64_t img = p.per_image ? k / p.c : 0, ch = p.per_image ? k % p.c : k;
  return p.channels_last ? img * p.hw * p.c + ch : (img * p.c + ch) * p.hw;
}

// Per-statistic affine coefficients: out = a * g + b * (x - mean) + c (forward: a unused).
template <typename A>
struct Coef {
  A mean, a, b, c;
};

// Dynamic shared memory of a stats kernel: [tile][per-warp rows][totals][coefficient table].
template <typename T, typename A, int V>
struct SharedLayout {
  Vec<T, V>* tile;
  A* red;
  A* totals;
  Coef<A>* coef;
  __device__ SharedLayout(const StatsPlan& p, unsigned char* smem) {
    tile = reinterpret_cast<Vec<T, V>*>(smem);
    const int64_t tile_vectors = p.fused ? int64_t(p.per_thread) * kStatsThreads * p.arrays : 0;
    red = reinterpret_cast<A*>(smem + tile_vectors * sizeof(Vec<T, V>));
    totals = red + kStatsWarps * p.sums * p.width();
    coef = reinterpret_cast<Coef<A>*>(totals + p.sums * p.width());
  }
};

// Sums acc[s][e] over the CTA's threads that share a channel lane (all threads for NCHW) in a
// fixed tree (warp butterfly, then warps in order) into totals[s * width + slot]: NHWC slot =
// lane * vec + e; NCHW slot 0 holds the channel's total (the vector slots folded in order).
template <typename A, int NS, int V>
__device__ void BlockReduce(const StatsPlan& p, A (&acc)[NS][V], A* red, A* totals) {
  for (int off = 16; off >= p.lanes; off >>= 1) {
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[s][e] += __shfl_xor_sync(0xffffffffu, acc[s][e], off);
  }
  const int warp = threadIdx.x / 32, lane_id = threadIdx.x % 32, width = p.width();
  if (lane_id < p.lanes) {
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int e = 0; e < V; ++e) red[(warp * NS + s) * width + lane_id * V + e] = acc[s][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < NS * width; i += kStatsThreads) {
    A total = 0;
    if (p.channels_last) {
      for (int w = 0; w < kStatsWarps; ++w) total += red[w * NS * width + i];
    } else if (i % width == 0) {
      for (int w = 0; w < kStatsWarps; ++w)
        for (int e = 0; e < V; ++e) total += red[w * NS * width + i + e];
    }
    totals[i] = total;
  }
  __syncthreads();
}

// The reduced slot holding the channel of the thread's vector element e.
template <int V>
__device__ __forceinline__ int MySlot(const StatsPlan& p, int e) {
  return p.channels_last ? (threadIdx.x & (p.lanes - 1)) * V + e : 0;
}

// ---- kernel parameters ----------------------------------------------------------------------

template <typename A>
struct ForwardParams {
  const A* gamma = nullptr;
  const A* beta = nullptr;
  A* mean_out = nullptr;    // (stats,)
  A* second_out = nullptr;  // (stats,): rstd (instance) or biased variance (batch)
  A epsilon = 0;
  bool second_is_rstd = true;
};

template <typename A>
struct GradientParams {
  const A* gamma = nullptr;
  const A* mean = nullptr;       // (stats,)
  const A* second = nullptr;     // (stats,): rstd (instance) or variance (batch)
  const A* dmean = nullptr;      // batch: cotangent of the returned mean (C,); else nullptr
  const A* dvariance = nullptr;  // batch: cotangent of the returned variance (C,)
  A epsilon = 0;
  bool second_is_rstd = true;
  A* sum_g_out = nullptr;   // (stats,): sum of dy per statistic
  A* sum_gx_out = nullptr;  // (stats,): sum of dy * xhat per statistic
};

template <typename A>
__device__ __forceinline__ A RstdOf(const GradientParams<A>& gp, int64_t k) {
  return gp.second_is_rstd ? gp.second[k] : A(1) / sqrt(gp.second[k] + gp.epsilon);
}

__device__ __forceinline__ int64_t ChannelOf(const StatsPlan& p, int64_t k) {
  return p.per_image ? k % p.c : k;
}

// Forward coefficients from mean and variance: y = (x - mean) * rstd * gamma + beta.
template <typename A>
__device__ __forceinline__ Coef<A> ForwardCoef(const StatsPlan& p, const ForwardParams<A>& fp,
                                               int64_t k, A mean, A var) {
  const A rstd = A(1) / sqrt(var + fp.epsilon);
  const int64_t ch = ChannelOf(p, k);
  fp.mean_out[k] = mean;
  fp.second_out[k] = fp.second_is_rstd ? rstd : var;
  return Coef<A>{mean, A(0), rstd * fp.gamma[ch], fp.beta[ch]};
}

// Gradient coefficients from the reduced sums (KERNELS.md): dx = a g + b (x - mean) + c with
// a = gamma rstd, b = -a rstd sgx / M (+ 2 dvariance / M), c = -a sg / M (+ dmean / M).
template <typename A>
__device__ __forceinline__ Coef<A> GradientCoef(const StatsPlan& p, const GradientParams<A>& gp,
                                                int64_t k, A sum_g, A sum_gx) {
  const int64_t ch = ChannelOf(p, k);
  const A rstd = RstdOf(gp, k), inv_m = A(1) / A(p.count);
  const A a = gp.gamma[ch] * rstd;
  Coef<A> cf{gp.mean[k], a, -a * rstd * sum_gx * inv_m, -a * sum_g * inv_m};
  if (gp.dmean != nullptr) {
    cf.b += A(2) * gp.dvariance[ch] * inv_m;
    cf.c += gp.dmean[ch] * inv_m;
  }
  gp.sum_g_out[k] = sum_g;
  gp.sum_gx_out[k] = sum_gx;
  return cf;
}

template <typename T, typename A, int V, bool kGrad>
__device__ __forceinline__ Vec<T, V> ApplyCoef(const Coef<A> (&cf)[V], const Vec<T, V>& xv,
                                               const Vec<T, V>& gv) {
  Vec<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    A r = cf[e].b * (ToAcc(xv.v[e]) - cf[e].mean) + cf[e].c;
    if constexpr (kGrad) r += cf[e].a * ToAcc(gv.v[e]);
    out.v[e] = FromAcc<T>(r);
  }
  return out;
}

// ---- fused kernels: one CTA per group, the group kept in shared memory ----------------------

// Visits the vectors thread t owns in group g in a fixed order: f(m, element_index), with m
// the running index of the vector in the thread's shared-memory column.
template <typename F>
__device__ __forceinline__ void ForEachGroupVector(const StatsPlan& p, int64_t g, F&& f) {
  int m = 0;
  for (int64_t q = 0; q < p.chunks; ++q) {
    const Cursor cur = MakeCursor(p, g, q, threadIdx.x);
#pragma unroll 4
    for (int s = 0; s < cur.count; ++s) f(m + s, cur.base + s * cur.stride);
    m += cur.count;
  }
}

// Each thread's coefficients for its vector slots, from the shared table.
template <typename A, int V>
__device__ __forceinline__ void ReadCoefs(const StatsPlan& p, const Coef<A>* table,
                                          Coef<A> (&cf)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) cf[e] = table[MySlot<V>(p, e)];
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    FusedForwardKernel(StatsPlan p, const T* __restrict__ x, T* __restrict__ y,
                       ForwardParams<A> fp) {
  JAXMPS_DYNAMIC_SHARED(smem);
  SharedLayout<T, A, V> sh(p, smem);
  const int64_t g = blockIdx.x;
  const int t = threadIdx.x, width = p.width();
  const A inv_m = A(1) / A(p.count);

  A acc[1][V] = {};
  ForEachGroupVector(p, g, [&](int m, int64_t at) {
    const Vec<T, V> v = LoadVec<T, V>(x + at);
    sh.tile[m * kStatsThreads + t] = v;
#pragma unroll
    for (int e = 0; e < V; ++e) acc[0][e] += ToAcc(v.v[e]);
  });
  BlockReduce<A, 1, V>(p, acc, sh.red, sh.totals);
  if (t < width) sh.coef[t].mean = sh.totals[t] * inv_m;
  __syncthreads();
  Coef<A> cf[V];
  ReadCoefs<A, V>(p, sh.coef, cf);
  // Exact second pass over shared memory: the variance of the centred values.
#pragma unroll
  for (int e = 0; e < V; ++e) acc[0][e] = 0;
  ForEachGroupVector(p, g, [&](int m, int64_t) {
    const Vec<T, V> v = sh.tile[m * kStatsThreads + t];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A d = ToAcc(v.v[e]) - cf[e].mean;
      acc[0][e] += d * d;
    }
  });
  BlockReduce<A, 1, V>(p, acc, sh.red, sh.totals);
  if (t < width) {
    const SlotIndex si = SlotOf(p, g, t);
    if (si.valid) sh.coef[t] = ForwardCoef(p, fp, si.k, sh.coef[t].mean, sh.totals[t] * inv_m);
  }
  __syncthreads();
  ReadCoefs<A, V>(p, sh.coef, cf);
  ForEachGroupVector(p, g, [&](int m, int64_t at) {
    const Vec<T, V> v = sh.tile[m * kStatsThreads + t];
    StoreVec<T, V>(y + at, ApplyCoef<T, A, V, false>(cf, v, v));
  });
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    FusedGradientKernel(StatsPlan p, const T* __restrict__ dy, const T* __restrict__ x,
                        T* __restrict__ dx, GradientParams<A> gp) {
  JAXMPS_DYNAMIC_SHARED(smem);
  SharedLayout<T, A, V> sh(p, smem);
  Vec<T, V>* gtile = sh.tile + int64_t(p.per_thread) * kStatsThreads;
  const int64_t g = blockIdx.x;
  const int t = threadIdx.x, width = p.width();

  // The input statistics of the thread's slots (xhat = (x - mean) * rstd).
  const Cursor c0 = MakeCursor(p, g, 0, t);
  A mean[V], rstd[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t k = c0.kbase + e * c0.kstep;
    const bool live = p.channels_last ? c0.channel < p.c : true;
    mean[e] = live ? gp.mean[k] : A(0);
    rstd[e] = live ? RstdOf(gp, k) : A(0);
  }
  A acc[2][V] = {};
  ForEachGroupVector(p, g, [&](int m, int64_t at) {
    const Vec<T, V> xv = LoadVec<T, V>(x + at), gv = LoadVec<T, V>(dy + at);
    sh.tile[m * kStatsThreads + t] = xv;
    gtile[m * kStatsThreads + t] = gv;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A gg = ToAcc(gv.v[e]);
      acc[0][e] += gg;
      acc[1][e] += gg * (ToAcc(xv.v[e]) - mean[e]) * rstd[e];
    }
  });
  BlockReduce<A, 2, V>(p, acc, sh.red, sh.totals);
  if (t < width) {
    const SlotIndex si = SlotOf(p, g, t);
    if (si.valid) sh.coef[t] = GradientCoef(p, gp, si.k, sh.totals[t], sh.totals[width + t]);
  }
  __syncthreads();
  Coef<A> cf[V];
  ReadCoefs<A, V>(p, sh.coef, cf);
  ForEachGroupVector(p, g, [&](int m, int64_t at) {
    StoreVec<T, V>(dx + at, ApplyCoef<T, A, V, true>(cf, sh.tile[m * kStatsThreads + t],
                                                     gtile[m * kStatsThreads + t]));
  });
}

// ---- chunked kernels ------------------------------------------------------------------------

// Partial sums of one chunk, written to partial[(s * stats + k) * chunks + q]. Forward: sums
// of d and d^2 with d = x - x[pixel 0 of k] (the shift keeps float32 sums accurate when the
// mean is large against the spread); gradient: sums of g and g * xhat.
template <typename T, typename A, int V, bool kGrad>
__global__ void __launch_bounds__(kStatsThreads)
    PartialKernel(StatsPlan p, const T* __restrict__ x, const T* __restrict__ dy,
                  GradientParams<A> gp, A* __restrict__ partial) {
  JAXMPS_DYNAMIC_SHARED(smem);
  SharedLayout<T, A, V> sh(p, smem);
  const int64_t g = blockIdx.x / p.chunks, q = blockIdx.x % p.chunks;
  const int t = threadIdx.x, width = p.width();
  const Cursor cur = MakeCursor(p, g, q, t);
  A ref[V] = {}, rstd[V] = {};
  if (cur.count > 0) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t k = cur.kbase + e * cur.kstep;
      if constexpr (kGrad) {
        ref[e] = gp.mean[k];
        rstd[e] = RstdOf(gp, k);
      } else {
        ref[e] = ToAcc(x[FirstElement(p, k)]);
      }
    }
  }
  A acc[2][V] = {};
#pragma unroll 4
  for (int s = 0; s < cur.count; ++s) {
    const int64_t at = cur.base + s * cur.stride;
    const Vec<T, V> xv = LoadVec<T, V>(x + at);
    if constexpr (kGrad) {
      const Vec<T, V> gv = LoadVec<T, V>(dy + at);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A gg = ToAcc(gv.v[e]);
        acc[0][e] += gg;
        acc[1][e] += gg * (ToAcc(xv.v[e]) - ref[e]) * rstd[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A d = ToAcc(xv.v[e]) - ref[e];
        acc[0][e] += d;
        acc[1][e] += d * d;
      }
    }
  }
  BlockReduce<A, 2, V>(p, acc, sh.red, sh.totals);
  if (t < width) {
    const SlotIndex si = SlotOf(p, g, t);
    if (si.valid) {
      partial[si.k * p.chunks + q] = sh.totals[t];
      partial[(p.stats + si.k) * p.chunks + q] = sh.totals[width + t];
    }
  }
}

// One warp per statistic: sums its chunks' partials in a fixed order (lanes strided over
// chunks, then a butterfly) and writes the statistic outputs and the apply coefficients.
constexpr int kFinalizeWarps = 8;

template <typename T, typename A, bool kGrad>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
    FinalizeKernel(StatsPlan p, const T* __restrict__ x, const A* __restrict__ partial,
                   ForwardParams<A> fp, GradientParams<A> gp, Coef<A>* __restrict__ coef) {
  const int64_t k = int64_t(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= p.stats) return;
  A s0 = 0, s1 = 0;
  for (int64_t q = lane; q < p.chunks; q += 32) {
    s0 += partial[k * p.chunks + q];
    s1 += partial[(p.stats + k) * p.chunks + q];
  }
  for (int off = 16; off > 0; off >>= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, off);
    s1 += __shfl_xor_sync(0xffffffffu, s1, off);
  }
  if (lane != 0) return;
  if constexpr (kGrad) {
    coef[k] = GradientCoef(p, gp, k, s0, s1);
  } else {
    const A inv_m = A(1) / A(p.count);
    const A shifted_mean = s0 * inv_m;
    const A var = max(s1 * inv_m - shifted_mean * shifted_mean, A(0));
    coef[k] = ForwardCoef(p, fp, k, ToAcc(x[FirstElement(p, k)]) + shifted_mean, var);
  }
}

// Applies per-statistic coefficients chunk by chunk, last chunk first (L2 reuse, see top).
template <typename T, typename A, int V, bool kGrad>
__global__ void __launch_bounds__(kStatsThreads)
    ApplyKernel(StatsPlan p, const T* __restrict__ x, const T* __restrict__ dy,
                const Coef<A>* __restrict__ coef, T* __restrict__ out) {
  const int64_t b = int64_t(gridDim.x) - 1 - blockIdx.x;
  const int64_t g = b / p.chunks, q = b % p.chunks;
  const Cursor cur = MakeCursor(p, g, q, threadIdx.x);
  if (cur.count == 0) return;
  Coef<A> cf[V];
#pragma unroll
  for (int e = 0; e < V; ++e) cf[e] = coef[cur.kbase + e * cur.kstep];
#pragma unroll 4
  for (int s = 0; s < cur.count; ++s) {
    const int64_t at = cur.base + s * cur.stride;
    const Vec<T, V> xv = LoadVec<T, V>(x + at);
    Vec<T, V> gv = xv;
    if constexpr (kGrad) gv = LoadVec<T, V>(dy + at);
    StoreVec<T, V>(out + at, ApplyCoef<T, A, V, kGrad>(cf, xv, gv));
  }
}

// dgamma[c] = sum_n sum_gx[n, c], dbeta[c] = sum_n sum_g[n, c], images in order.
template <typename A>
__global__ void SumOverImagesKernel(int64_t n, int64_t c, const A* __restrict__ sum_g,
                                    const A* __restrict__ sum_gx, A* __restrict__ dgamma,
                                    A* __restrict__ dbeta) {
  const int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  A g = 0, gx = 0;
  for (int64_t i = 0; i < n; ++i) {
    g += sum_g[i * c + ch];
    gx += sum_gx[i * c + ch];
  }
  dgamma[ch] = gx;
  dbeta[ch] = g;
}

// Inference coefficients from given statistics: y = (x - mean) * gamma * rstd + beta.
template <typename A>
__global__ void InferenceCoefKernel(int64_t c, const A* __restrict__ gamma,
                                    const A* __restrict__ beta, const A* __restrict__ mean,
                                    const A* __restrict__ variance, A epsilon,
                                    Coef<A>* __restrict__ coef) {
  const int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  coef[ch] = Coef<A>{mean[ch], A(0), gamma[ch] / sqrt(variance[ch] + epsilon), beta[ch]};
}

// ---- host side: planning and launching ------------------------------------------------------

// Plans a statistics sweep over image `s`. `sums`: sums per channel (forward 1 fused / 2
// chunked, gradient 2); `arrays`: images kept on chip by the fused path (forward 1, gradient
// 2); `max_vec`: widest legal vector (VectorWidth over C for NHWC, H*W for NCHW);
// `allow_fused`: false for apply-only sweeps (inference).
template <typename T, typename A>
StatsPlan PlanStats(const ImageShape& s, bool per_image, int arrays, int max_vec,
                    const DeviceLimits& limits, bool allow_fused) {
  StatsPlan base;
  base.n = s.n, base.c = s.c, base.hw = s.pixels();
  base.channels_last = s.channels_last;
  base.per_image = per_image;
  base.stats = per_image ? s.n * s.c : s.c;
  base.count = per_image ? s.pixels() : s.n * s.pixels();
  base.arrays = arrays;

  // NHWC: lanes vectors of vec channels per row; NCHW: vectors of vec pixels, one channel.
  auto configure = [&](int vec, int lanes, bool fused) {
    StatsPlan p = base;
    p.vec = vec, p.lanes = lanes, p.fused = fused;
    p.sums = fused ? arrays : 2;  // fused forward reduces one sum at a time
    if (p.channels_last) {
      p.cblocks = CeilDiv(s.c, int64_t(lanes) * vec);
      p.rows = per_image ? s.pixels() : s.n * s.pixels();
      p.groups = (per_image ? s.n : 1) * p.cblocks;
      const int64_t rows_step = kStatsThreads / lanes;
      p.chunk_rows = fused ? p.rows : rows_step * kChunkVectorsPerThread;
      p.chunks = CeilDiv(p.rows, p.chunk_rows);
      p.per_thread = fused ? int(std::min<int64_t>(CeilDiv(p.rows, rows_step), 1 << 20)) : 0;
    } else {
      p.rows = s.pixels() / vec;
      p.groups = p.stats;
      p.chunk_rows = fused ? p.rows : int64_t(kStatsThreads) * kChunkVectorsPerThread;
      p.chunks_per_plane = CeilDiv(p.rows, p.chunk_rows);
      p.chunks = p.planes() * p.chunks_per_plane;
      p.per_thread = fused ? int(std::min<int64_t>(
                                 p.planes() * CeilDiv(p.rows, kStatsThreads), 1 << 20))
                           : 0;
    }
    return p;
  };
  auto max_lanes = [&](int vec) -> int {
    if (!s.channels_last) return 1;
    return int(std::min<int64_t>(32, CeilPow2(CeilDiv(s.c, vec))));
  };
  // NHWC rows narrower than this waste most of each 32-byte sector and make the fused path
  // slower than chunking (measured on H200: 2x); the chunked apply re-reads from L2 anyway.
  const int64_t min_row_bytes = std::min<int64_t>(64, s.c * int64_t(sizeof(T)));
  if (allow_fused) {
    for (int64_t budget : {std::min(kFusedBudget, limits.max_smem_per_block),
                           limits.max_smem_per_block}) {
      for (int vec = max_vec; vec >= 1; vec /= 2) {
        for (int lanes = max_lanes(vec); lanes >= 1; lanes /= 2) {
          if (s.channels_last && int64_t(lanes) * vec * int64_t(sizeof(T)) < min_row_bytes) break;
          StatsPlan p = configure(vec, lanes, true);
          if (p.per_thread < (1 << 20) && p.shared_bytes<T, A>() <= budget) return p;
        }
      }
    }
  }
  // Chunked: rows of up to 128 bytes per CTA (a full cache line when C allows).
  const int lanes = int(std::min<int64_t>(
      max_lanes(max_vec), std::max<int64_t>(1, 128 / (max_vec * int64_t(sizeof(T))))));
  return configure(max_vec, lanes, false);
}

// Forward sweep: y and the statistics outputs (fp.mean_out, fp.second_out).
template <typename T, typename A, int V>
ffi::Error LaunchStatsForward(std::string_view op, cudaStream_t stream,
                              ffi::ScratchAllocator& scratch, const StatsPlan& p, const T* x,
                              T* y, const ForwardParams<A>& fp) {
  const int64_t smem = p.shared_bytes<T, A>();
  if (p.fused) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, FusedForwardKernel<T, A, V>, smem));
    return Launch(op, "the fused forward kernel", FusedForwardKernel<T, A, V>, p.blocks(),
                  kStatsThreads, smem, stream, p, x, y, fp);
  }
  A* partial = nullptr;
  Coef<A>* coef = nullptr;
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, 2 * p.stats * p.chunks, &partial));
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, p.stats, &coef));
  JAXMPS_RETURN_IF_ERROR(Launch(op, "the partial-sum kernel", PartialKernel<T, A, V, false>,
                                p.blocks(), kStatsThreads, smem, stream, p, x, nullptr,
                                GradientParams<A>{}, partial));
  JAXMPS_RETURN_IF_ERROR(Launch(op, "the finalize kernel", FinalizeKernel<T, A, false>,
                                CeilDiv(p.stats, kFinalizeWarps), kFinalizeWarps * 32, 0, stream,
                                p, x, partial, fp, GradientParams<A>{}, coef));
  return Launch(op, "the apply kernel", ApplyKernel<T, A, V, false>, p.blocks(), kStatsThreads,
                0, stream, p, x, nullptr, coef, y);
}

// Gradient sweep: dx, and the per-statistic sums in gp.sum_g_out / gp.sum_gx_out.
template <typename T, typename A, int V>
ffi::Error LaunchStatsGradient(std::string_view op, cudaStream_t stream,
                               ffi::ScratchAllocator& scratch, const StatsPlan& p, const T* dy,
                               const T* x, T* dx, const GradientParams<A>& gp) {
  const int64_t smem = p.shared_bytes<T, A>();
  if (p.fused) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, FusedGradientKernel<T, A, V>, smem));
    return Launch(op, "the fused gradient kernel", FusedGradientKernel<T, A, V>, p.blocks(),
                  kStatsThreads, smem, stream, p, dy, x, dx, gp);
  }
  A* partial = nullptr;
  Coef<A>* coef = nullptr;
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, 2 * p.stats * p.chunks, &partial));
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, p.stats, &coef));
  JAXMPS_RETURN_IF_ERROR(Launch(op, "the partial-sum kernel", PartialKernel<T, A, V, true>,
                                p.blocks(), kStatsThreads, smem, stream, p, x, dy, gp, partial));
  JAXMPS_RETURN_IF_ERROR(Launch(op, "the finalize kernel", FinalizeKernel<T, A, true>,
                                CeilDiv(p.stats, kFinalizeWarps), kFinalizeWarps * 32, 0, stream,
                                p, x, partial, ForwardParams<A>{}, gp, coef));
  return Launch(op, "the apply kernel", ApplyKernel<T, A, V, true>, p.blocks(), kStatsThreads, 0,
                stream, p, x, dy, coef, dx);
}

// dgamma, dbeta (C,) from per-image sums (N, C), summed over images in order.
template <typename A>
ffi::Error LaunchSumOverImages(std::string_view op, cudaStream_t stream, int64_t n, int64_t c,
                               const A* sum_g, const A* sum_gx, A* dgamma, A* dbeta) {
  return Launch(op, "the sum-over-images kernel", SumOverImagesKernel<A>, CeilDiv(c, 128), 128,
                0, stream, n, c, sum_g, sum_gx, dgamma, dbeta);
}

// ---- handler helpers ------------------------------------------------------------------------

// Fills `bytes` of device memory with `byte` (0xff gives NaN floats: statistics of no data).
inline ffi::Error FillAsync(std::string_view op, cudaStream_t stream, void* data, int64_t bytes,
                            int byte) {
  if (bytes <= 0) return ffi::Error::Success();
  if (cudaMemsetAsync(data, byte, size_t(bytes), stream) != cudaSuccess) {
    return LaunchError(op, "cudaMemsetAsync");
  }
  return ffi::Error::Success();
}

// ---- handler bodies shared by instance and batch norm ----------------------------------------

// Forward handler body: validates x, gamma, beta (C,), then y and the statistics `mean` and
// `second` ((N, C) mean and rstd when per_image, else (C,) mean and biased variance).
inline ffi::Error RunStatsForward(std::string_view op, bool per_image, cudaStream_t stream,
                                  ffi::ScratchAllocator& scratch, double epsilon,
                                  int64_t channels_last, const ffi::AnyBuffer& x,
                                  const ffi::AnyBuffer& gamma, const ffi::AnyBuffer& beta,
                                  ffi::AnyBuffer& y, ffi::AnyBuffer& mean,
                                  ffi::AnyBuffer& second) {
  ImageShape s;
  JAXMPS_RETURN_IF_ERROR(ReadImageShape(op, "x", x, channels_last, &s));
  JAXMPS_RETURN_IF_ERROR(
      CheckParams(op, x.element_type(), {{"gamma", &gamma}, {"beta", &beta}}, {s.c}));
  return DispatchFloat(op, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using A = typename Types<decltype(tag)>::Acc;
    const int64_t stats = per_image ? s.n * s.c : s.c;
    if (s.size() == 0) {  // statistics of no elements are NaN, as jnp.mean of nothing
      JAXMPS_RETURN_IF_ERROR(FillAsync(op, stream, mean.untyped_data(), stats * sizeof(A), 0xff));
      return FillAsync(op, stream, second.untyped_data(), stats * sizeof(A), 0xff);
    }
    DeviceLimits limits;
    JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
    const int max_vec = VectorWidth<T>(s.channels_last ? s.c : s.pixels(),
                                       {x.untyped_data(), y.untyped_data()});
    const StatsPlan plan = PlanStats<T, A>(s, per_image, /*arrays=*/1, max_vec, limits,
                                           /*allow_fused=*/true);
    ForwardParams<A> fp;
    fp.gamma = static_cast<const A*>(gamma.untyped_data());
    fp.beta = static_cast<const A*>(beta.untyped_data());
    fp.mean_out = static_cast<A*>(mean.untyped_data());
    fp.second_out = static_cast<A*>(second.untyped_data());
    fp.epsilon = A(epsilon);
    fp.second_is_rstd = per_image;
    return DispatchVector<T>(plan.vec, [&](auto v) {
      return LaunchStatsForward<T, A, decltype(v)::value>(
          op, stream, scratch, plan, static_cast<const T*>(x.untyped_data()),
          static_cast<T*>(y.untyped_data()), fp);
    });
  });
}

// Gradient handler body after validation: dx, and dgamma, dbeta (C,). `bind(gp, tag)` points
// the GradientParams at the statistics (and, for batch norm, the statistics' cotangents).
// Instance norm sums per (image, channel) into scratch, then over images in a fixed order.
template <typename Bind>
ffi::Error RunStatsGradient(std::string_view op, bool per_image, cudaStream_t stream,
                            ffi::ScratchAllocator& scratch, const ImageShape& s,
                            const ffi::AnyBuffer& dy, const ffi::AnyBuffer& x,
                            ffi::AnyBuffer& dx, ffi::AnyBuffer& dgamma, ffi::AnyBuffer& dbeta,
                            Bind&& bind) {
  return DispatchFloat(op, "x", x.element_type(), {}, [&](auto tag) {
    using T = typename Types<decltype(tag)>::T;
    using A = typename Types<decltype(tag)>::Acc;
    A* dg = static_cast<A*>(dgamma.untyped_data());
    A* db = static_cast<A*>(dbeta.untyped_data());
    if (s.size() == 0) {  // sums over no elements
      JAXMPS_RETURN_IF_ERROR(FillAsync(op, stream, dg, s.c * sizeof(A), 0));
      return FillAsync(op, stream, db, s.c * sizeof(A), 0);
    }
    DeviceLimits limits;
    JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
    const int max_vec = VectorWidth<T>(s.channels_last ? s.c : s.pixels(),
                                       {x.untyped_data(), dy.untyped_data(), dx.untyped_data()});
    const StatsPlan plan = PlanStats<T, A>(s, per_image, /*arrays=*/2, max_vec, limits,
                                           /*allow_fused=*/true);
    GradientParams<A> gp;
    bind(gp, tag);
    if (per_image) {
      JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, s.n * s.c, &gp.sum_g_out));
      JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, s.n * s.c, &gp.sum_gx_out));
    } else {  // per-channel sums are the parameter gradients themselves
      gp.sum_g_out = db;
      gp.sum_gx_out = dg;
    }
    JAXMPS_RETURN_IF_ERROR(DispatchVector<T>(plan.vec, [&](auto v) {
      return LaunchStatsGradient<T, A, decltype(v)::value>(
          op, stream, scratch, plan, static_cast<const T*>(dy.untyped_data()),
          static_cast<const T*>(x.untyped_data()), static_cast<T*>(dx.untyped_data()), gp);
    }));
    if (!per_image) return ffi::Error::Success();
    return LaunchSumOverImages<A>(op, stream, s.n, s.c, gp.sum_g_out, gp.sum_gx_out, dg, db);
  });
}

}  // namespace jaxmps::cuda
