// Per-channel statistics engine for instance and batch norm on CUDA: plans, deterministic block
// reductions, and the fused, cluster (Hopper) and chunked kernels with their launchers.
//
// A reduction *group* is what one statistic row is computed over: per (image, channel block)
// for instance norm, per channel block over the whole batch for batch norm. NHWC groups hold
// `lanes` vectors of `vec` channels per pixel row; NCHW groups hold one channel, read as vectors
// of `vec` consecutive pixels of each plane. A group is cut into *chunks* of rows.
//
// Fused path (the group fits in shared memory): one CTA per group loads it once, reduces,
// and applies from shared memory: x read once, y written once (gradient: dy, x read once).
// Cluster path (Hopper): the group is spread over a thread-block cluster of G CTAs, each
// keeping one chunk in shared memory; the CTAs swap their partial sums through distributed
// shared memory (each adds the G partials in rank order: the same bits everywhere), then apply
// from shared memory as the fused path does. Same traffic as fused, for groups of up to G
// times the shared memory of one CTA.
// Chunked path: a partial-sum kernel per chunk, a finalize kernel per statistic (fixed-order
// warp tree over chunks), and an apply kernel that walks chunks in reverse so that the data the
// partial kernel read last is re-read from L2. No atomics: results are bitwise repeatable.
// When the groups' data is larger than a share of L2 (kL2SliceShareNum / Den), the groups are
// swept in consecutive *slices* (StatsPlan::group_begin/group_end), partial -> finalize ->
// apply per slice, so that apply re-reads a slice from L2 rather than DRAM (measured on an
// H100: the unsliced apply re-read all 67 MB of a 32x64x64x128 float32 batch from DRAM).
// Slicing only chooses which groups a launch covers: chunks, partial layout and sums, and so
// the results, stay the same bits.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda_common.cuh"

namespace jaxmps::cuda {

constexpr int kStatsThreads = 256;
constexpr int kStatsWarps = kStatsThreads / 32;
constexpr int kChunkVectorsPerThread = 16;     // chunked path: vectors each thread reads
constexpr int64_t kFusedBudget = 100 << 10;    // fused tile bytes that leave 2 CTAs per SM
// Share of L2 (num / den) one chunked slice may read: the rest is left to the y/dx writes
// (which also allocate in L2), the partial sums and other streams, so that the slice's data
// is still there when apply re-reads it.
constexpr int64_t kL2SliceShareNum = 2, kL2SliceShareDen = 5;  // 40%

// Which kernels serve a plan (PlanStats picks fused, resident, cluster, chunked: the first that
// fits; resident_stats.cuh has the resident path).
enum class StatsPath { kFused, kCluster, kChunked, kResident };

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
  StatsPath path = StatsPath::kChunked;
  int cluster = 1;              // cluster path: CTAs per group (= chunks, one chunk each)
  int per_thread = 0;           // fused/cluster: vectors each thread keeps in shared memory
  int sums = 1;                 // sums per channel reduced together (1 or 2)
  int arrays = 1;               // image arrays kept on chip (forward: x; gradient: dy and x)
  // The groups [group_begin, group_end) one launch covers: all of them, or (chunked) one slice
  // of slice_groups consecutive groups (the last slice may be smaller). The resident path's one
  // launch covers all groups in waves of slice_groups (slices() waves).
  int64_t group_begin = 0, group_end = 0;
  int64_t slice_groups = 0;
  int64_t resident_rows = 0;    // resident path: rows each CTA keeps in shared memory
  int kept_batches = 1;         // resident path: commit groups of those rows' copies

  __host__ __device__ bool on_chip() const { return path != StatsPath::kChunked; }
  __host__ __device__ int width() const { return lanes * vec; }   // channel slots reduced per CTA
  __host__ __device__ int64_t planes() const { return per_image ? 1 : n; }
  // CTAs of one launch over the plan's groups [group_begin, group_end) (resident: of one wave;
  // its launch loops over the waves).
  __host__ __device__ int64_t blocks() const {
    if (path == StatsPath::kResident) return slice_groups * chunks;
    return (group_end - group_begin) * (path == StatsPath::kFused ? 1 : chunks);
  }
  // The first statistic of group g; stat_of_group(groups) = stats. Consecutive groups hold
  // consecutive statistics, so groups [g0, g1) hold statistics [stat_of_group(g0),
  // stat_of_group(g1)) (NHWC: the channel blocks of an image tile its channels in order).
  __host__ __device__ int64_t stat_of_group(int64_t g) const {
    if (!channels_last) return g;
    const int64_t img = per_image ? g / cblocks : 0, cb = per_image ? g % cblocks : g;
    const int64_t channel = cb * width();
    return img * c + (channel < c ? channel : c);
  }
  int64_t slices() const { return CeilDiv(groups, slice_groups); }
  // The plan restricted to the slice of groups starting at g0.
  StatsPlan slice(int64_t g0) const {
    StatsPlan s = *this;
    s.group_begin = g0;
    s.group_end = std::min(groups, g0 + slice_groups);
    return s;
  }
  // Dynamic shared memory: the tile, then per-warp reduction rows, reduced totals and the
  // per-slot coefficient table (see SharedLayout).
  template <typename T, typename A>
  int64_t shared_bytes() const {
    const int64_t tile = on_chip() ? int64_t(per_thread) * kStatsThreads * vec * sizeof(T) * arrays : 0;
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
    const int64_t tile_vectors = p.on_chip() ? int64_t(p.per_thread) * kStatsThreads * p.arrays : 0;
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
  if (fp.mean_out != nullptr) {  // null: another CTA of the group writes the statistics
    fp.mean_out[k] = mean;
    fp.second_out[k] = fp.second_is_rstd ? rstd : var;
  }
  return Coef<A>{mean, A(0), rstd * fp.gamma[ch], fp.beta[ch]};
}

// Forward coefficients from s0, s1 = sums of (x - shift) and (x - shift)^2 over the statistic's
// p.count elements; shift is one of them, so the variance keeps its accuracy when |mean| >> std.
template <typename A>
__device__ __forceinline__ Coef<A> ForwardCoefFromShiftedSums(const StatsPlan& p,
                                                              const ForwardParams<A>& fp,
                                                              int64_t k, A shift, A s0, A s1) {
  const A inv_m = A(1) / A(p.count);
  const A shifted_mean = s0 * inv_m;
  const A var = max(s1 * inv_m - shifted_mean * shifted_mean, A(0));
  return ForwardCoef(p, fp, k, shift + shifted_mean, var);
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
  if (gp.sum_g_out != nullptr) {  // null: another CTA of the group writes the sums
    gp.sum_g_out[k] = sum_g;
    gp.sum_gx_out[k] = sum_gx;
  }
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

// ---- on-chip kernels: the group (fused) or one chunk of it (cluster) kept in shared memory ---

// The group a CTA works on and the chunks [q0, q1) it holds: all of them (fused, one CTA per
// group) or the one of its cluster rank (cluster: the CTAs of group g are g*G .. g*G+G-1).
struct TileSpan {
  int64_t g, q0, q1;
};
template <bool kCluster>
__device__ __forceinline__ TileSpan MyTile(const StatsPlan& p) {
  if constexpr (kCluster) {
    const int64_t q = ClusterRank();
    return {p.group_begin + int64_t(blockIdx.x) / p.cluster, q, q + 1};
  } else {
    return {p.group_begin + int64_t(blockIdx.x), 0, p.chunks};
  }
}

// Visits the vectors thread t owns in its tile in a fixed order: f(m, element_index), with m
// the running index of the vector in the thread's shared-memory column.
template <typename F>
__device__ __forceinline__ void ForEachTileVector(const StatsPlan& p, const TileSpan& tile,
                                                  F&& f) {
  int m = 0;
  for (int64_t q = tile.q0; q < tile.q1; ++q) {
    const Cursor cur = MakeCursor(p, tile.g, q, threadIdx.x);
#pragma unroll 4
    for (int s = 0; s < cur.count; ++s) f(m + s, cur.base + s * cur.stride);
    m += cur.count;
  }
}

// The group's totals of the n values BlockReduce left in `totals`: this CTA's own (fused), or
// (cluster) the sum over the cluster's CTAs read through distributed shared memory, added in
// rank order so that every CTA gets the same bits, written to `red` (free after BlockReduce:
// the caller must __syncthreads after reading it and before the next BlockReduce).
template <bool kCluster, typename A>
__device__ __forceinline__ const A* GroupTotals(const StatsPlan& p, int n, A* totals, A* red) {
  if constexpr (kCluster) {
    ClusterSync();  // every CTA's partials are written
    for (int i = threadIdx.x; i < n; i += kStatsThreads) {
      A sum = 0;
      for (int r = 0; r < p.cluster; ++r) sum += ClusterShared(totals, unsigned(r))[i];
      red[i] = sum;
    }
    // Every CTA has read the others' partials: they may now be overwritten, or their CTA exit
    // (a CTA's shared memory must outlive the remote reads).
    ClusterSync();
    return red;
  } else {
    (void)p, (void)n, (void)red;
    return totals;
  }
}

// Each thread's coefficients for its vector slots, from the shared table.
template <typename A, int V>
__device__ __forceinline__ void ReadCoefs(const StatsPlan& p, const Coef<A>* table,
                                          Coef<A> (&cf)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) cf[e] = table[MySlot<V>(p, e)];
}

// Forward over one tile: load x once into shared memory, mean, then the exact variance of the
// centred values (second pass over shared memory), then y.
template <typename T, typename A, int V, bool kCluster>
__device__ __forceinline__ void ForwardTile(const StatsPlan& p, const T* __restrict__ x,
                                            T* __restrict__ y, const ForwardParams<A>& fp) {
  JAXMPS_DYNAMIC_SHARED(smem);
  SharedLayout<T, A, V> sh(p, smem);
  const TileSpan tile = MyTile<kCluster>(p);
  const int t = threadIdx.x, width = p.width();
  const A inv_m = A(1) / A(p.count);

  A acc[1][V] = {};
  ForEachTileVector(p, tile, [&](int m, int64_t at) {
    const Vec<T, V> v = LoadVec<T, V>(x + at);
    sh.tile[m * kStatsThreads + t] = v;
#pragma unroll
    for (int e = 0; e < V; ++e) acc[0][e] += ToAcc(v.v[e]);
  });
  BlockReduce<A, 1, V>(p, acc, sh.red, sh.totals);
  const A* sums = GroupTotals<kCluster>(p, width, sh.totals, sh.red);
  if (t < width) sh.coef[t].mean = sums[t] * inv_m;
  __syncthreads();
  Coef<A> cf[V];
  ReadCoefs<A, V>(p, sh.coef, cf);
  // Exact second pass over shared memory: the variance of the centred values.
#pragma unroll
  for (int e = 0; e < V; ++e) acc[0][e] = 0;
  ForEachTileVector(p, tile, [&](int m, int64_t) {
    const Vec<T, V> v = sh.tile[m * kStatsThreads + t];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A d = ToAcc(v.v[e]) - cf[e].mean;
      acc[0][e] += d * d;
    }
  });
  BlockReduce<A, 1, V>(p, acc, sh.red, sh.totals);
  sums = GroupTotals<kCluster>(p, width, sh.totals, sh.red);
  if (t < width) {
    const SlotIndex si = SlotOf(p, tile.g, t);
    ForwardParams<A> own = fp;  // statistics outputs: written by a cluster's rank 0 only
    if (kCluster && tile.q0 != 0) own.mean_out = own.second_out = nullptr;
    if (si.valid) sh.coef[t] = ForwardCoef(p, own, si.k, sh.coef[t].mean, sums[t] * inv_m);
  }
  __syncthreads();
  ReadCoefs<A, V>(p, sh.coef, cf);
  ForEachTileVector(p, tile, [&](int m, int64_t at) {
    const Vec<T, V> v = sh.tile[m * kStatsThreads + t];
    StoreVec<T, V>(y + at, ApplyCoef<T, A, V, false>(cf, v, v));
  });
}

// Gradient over one tile: load dy and x once into shared memory, sums of g and g * xhat,
// then dx from shared memory.
template <typename T, typename A, int V, bool kCluster>
__device__ __forceinline__ void GradientTile(const StatsPlan& p, const T* __restrict__ dy,
                                             const T* __restrict__ x, T* __restrict__ dx,
                                             const GradientParams<A>& gp) {
  JAXMPS_DYNAMIC_SHARED(smem);
  SharedLayout<T, A, V> sh(p, smem);
  Vec<T, V>* gtile = sh.tile + int64_t(p.per_thread) * kStatsThreads;
  const TileSpan tile = MyTile<kCluster>(p);
  const int t = threadIdx.x, width = p.width();

  // The input statistics of the thread's slots (xhat = (x - mean) * rstd).
  const Cursor c0 = MakeCursor(p, tile.g, tile.q0, t);
  A mean[V], rstd[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t k = c0.kbase + e * c0.kstep;
    const bool live = p.channels_last ? c0.channel < p.c : true;
    mean[e] = live ? gp.mean[k] : A(0);
    rstd[e] = live ? RstdOf(gp, k) : A(0);
  }
  A acc[2][V] = {};
  ForEachTileVector(p, tile, [&](int m, int64_t at) {
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
  const A* sums = GroupTotals<kCluster>(p, 2 * width, sh.totals, sh.red);
  if (t < width) {
    const SlotIndex si = SlotOf(p, tile.g, t);
    GradientParams<A> own = gp;  // the sums: written by a cluster's rank 0 only
    if (kCluster && tile.q0 != 0) own.sum_g_out = own.sum_gx_out = nullptr;
    if (si.valid) sh.coef[t] = GradientCoef(p, own, si.k, sums[t], sums[width + t]);
  }
  __syncthreads();
  Coef<A> cf[V];
  ReadCoefs<A, V>(p, sh.coef, cf);
  ForEachTileVector(p, tile, [&](int m, int64_t at) {
    StoreVec<T, V>(dx + at, ApplyCoef<T, A, V, true>(cf, sh.tile[m * kStatsThreads + t],
                                                     gtile[m * kStatsThreads + t]));
  });
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    FusedForwardKernel(StatsPlan p, const T* __restrict__ x, T* __restrict__ y,
                       ForwardParams<A> fp) {
  ForwardTile<T, A, V, false>(p, x, y, fp);
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    FusedGradientKernel(StatsPlan p, const T* __restrict__ dy, const T* __restrict__ x,
                        T* __restrict__ dx, GradientParams<A> gp) {
  GradientTile<T, A, V, false>(p, dy, x, dx, gp);
}

// Cluster kernels: launched in clusters of p.cluster CTAs (LaunchCluster); empty where the
// target has no clusters (sm_80), where PlanStats never picks them.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    ClusterForwardKernel(StatsPlan p, const T* __restrict__ x, T* __restrict__ y,
                         ForwardParams<A> fp) {
#if JAXMPS_CLUSTER_CODE
  ForwardTile<T, A, V, true>(p, x, y, fp);
#endif
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kStatsThreads)
    ClusterGradientKernel(StatsPlan p, const T* __restrict__ dy, const T* __restrict__ x,
                          T* __restrict__ dx, GradientParams<A> gp) {
#if JAXMPS_CLUSTER_CODE
  GradientTile<T, A, V, true>(p, dy, x, dx, gp);
#endif
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
  const int64_t g = p.group_begin + blockIdx.x / p.chunks, q = blockIdx.x % p.chunks;
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

// One warp per statistic of the plan's groups: sums its chunks' partials in a fixed order
// (lanes strided over chunks, then a butterfly) and writes the statistic outputs and the
// apply coefficients.
constexpr int kFinalizeWarps = 8;

template <typename T, typename A, bool kGrad>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
    FinalizeKernel(StatsPlan p, const T* __restrict__ x, const A* __restrict__ partial,
                   ForwardParams<A> fp, GradientParams<A> gp, Coef<A>* __restrict__ coef) {
  const int64_t k =
      p.stat_of_group(p.group_begin) + int64_t(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= p.stat_of_group(p.group_end)) return;
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
    coef[k] = ForwardCoefFromShiftedSums(p, fp, k, ToAcc(x[FirstElement(p, k)]), s0, s1);
  }
}

// Applies per-statistic coefficients chunk by chunk over the plan's groups, last chunk first
// (L2 reuse, see top).
template <typename T, typename A, int V, bool kGrad>
__global__ void __launch_bounds__(kStatsThreads)
    ApplyKernel(StatsPlan p, const T* __restrict__ x, const T* __restrict__ dy,
                const Coef<A>* __restrict__ coef, T* __restrict__ out) {
  const int64_t b = int64_t(gridDim.x) - 1 - blockIdx.x;
  const int64_t g = p.group_begin + b / p.chunks, q = b % p.chunks;
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

// dgamma[c] = sum_n sum_gx[n, c], dbeta[c] = sum_n sum_g[n, c], images in order. One thread
// per (output, channel), 64 per CTA (more CTAs in flight than one per 128 channels); each
// issues the loads of kSumImagesUnroll images before adding them in order, so it waits on
// memory once per batch of images rather than once per image. Same additions, same order.
constexpr int kSumImagesThreads = 64;
constexpr int kSumImagesUnroll = 8;

template <typename A>
__global__ void __launch_bounds__(kSumImagesThreads)
    SumOverImagesKernel(int64_t n, int64_t c, const A* __restrict__ sum_g,
                        const A* __restrict__ sum_gx, A* __restrict__ dgamma,
                        A* __restrict__ dbeta) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= 2 * c) return;
  const bool gx = i >= c;
  const int64_t ch = gx ? i - c : i;
  const A* in = (gx ? sum_gx : sum_g) + ch;
  A total = 0;
  int64_t img = 0;
  for (; img + kSumImagesUnroll <= n; img += kSumImagesUnroll) {
    A v[kSumImagesUnroll];
#pragma unroll
    for (int u = 0; u < kSumImagesUnroll; ++u) v[u] = __ldg(in + (img + u) * c);
#pragma unroll
    for (int u = 0; u < kSumImagesUnroll; ++u) total += v[u];
  }
  for (; img < n; ++img) total += __ldg(in + img * c);
  (gx ? dgamma : dbeta)[ch] = total;
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

}  // namespace jaxmps::cuda

#include "resident_stats.cuh"  // the resident path: builds on the kernel helpers above

namespace jaxmps::cuda {

// ---- host side: planning and launching ------------------------------------------------------

// Whether the current device can run clusters of plan p's cluster kernel (forward or
// gradient). Answers are cached per (device, kernel, shared memory, cluster size): the
// occupancy query would otherwise run on every call of the handler.
template <typename T, typename A>
bool ClusterRunnable(const StatsPlan& p, bool gradient) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int64_t, int>, bool> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  bool runnable = false;
  (void)DispatchVector<T>(p.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const void* kernel = gradient ? reinterpret_cast<const void*>(ClusterGradientKernel<T, A, V>)
                                  : reinterpret_cast<const void*>(ClusterForwardKernel<T, A, V>);
    const int64_t smem = p.shared_bytes<T, A>();
    std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_tuple(device, kernel, smem, p.cluster);
    auto it = cache.find(key);
    if (it == cache.end()) {
      const bool ok = AllowSharedMemory("stats", kernel, smem).success() &&
                      MaxActiveClusters(kernel, p.cluster, kStatsThreads, smem) > 0;
      it = cache.emplace(key, ok).first;
    }
    runnable = it->second;
    return ffi::Error::Success();
  });
  return runnable;
}

// Groups per slice of a chunked sweep: as many as keep the data of one slice (every array the
// partial kernel reads, of `item_bytes` elements) within the L2 slice share, at least one;
// then evened out over the slices that takes, so the last slice is not a small tail. All
// groups in one slice where the data fits, or where L2's size is unknown (l2_bytes = 0).
inline int64_t SliceGroups(const StatsPlan& p, int64_t item_bytes, const DeviceLimits& limits) {
  const int64_t group_channels = p.channels_last ? std::min<int64_t>(p.width(), p.c) : 1;
  const int64_t group_bytes = p.count * group_channels * item_bytes * p.arrays;
  const int64_t budget = limits.l2_bytes * kL2SliceShareNum / kL2SliceShareDen;
  if (budget <= 0 || group_bytes * p.groups <= budget) return p.groups;
  const int64_t fitting = std::max<int64_t>(1, budget / group_bytes);
  // A slice must still fill the GPU: measured on H100 (batch norm, N=32, 64x64, C=128 f32),
  // four slices of 256 partial-kernel CTAs each ran the partial sums at 1.6 TB/s and added three
  // finalize launches (~4.6 us each): forward 0.098 -> 0.141 ms (NCHW, slices of 1280 CTAs:
  // 0.092 -> 0.124 ms). Slice only tensors large enough that every slice keeps at least 32
  // CTAs per SM (unmeasured on a GPU: no such size was benchmarked).
  if (fitting * p.chunks < 32 * int64_t(limits.sm_count)) return p.groups;
  return CeilDiv(p.groups, CeilDiv(p.groups, fitting));
}

// The statistics path tried first after the fused one: resident, or what the benchmarking
// knob JAXMPS_CUDA_STATS_PATH=cluster|chunked (KERNELS.md) asks for (cluster: no resident path;
// chunked: neither resident nor cluster).
inline StatsPath PreferredStatsPath() {
  const std::string_view v = Knob("JAXMPS_CUDA_STATS_PATH");
  if (v == "cluster") return StatsPath::kCluster;
  if (v == "chunked") return StatsPath::kChunked;
  return StatsPath::kResident;
}

// Plans a statistics sweep over image `s`. `arrays`: images kept on chip by the fused and
// cluster paths (forward 1, gradient 2); `max_vec`: widest legal vector (VectorWidth over C
// for NHWC, H*W for NCHW); `allow_on_chip`: false for apply-only sweeps (inference);
// `allow_resident`: false to re-plan a refused cooperative grid. Picks the fused path, else the
// resident path (NHWC, cooperative launches), else the cluster path (compute capability >= 9),
// else chunking.
template <typename T, typename A>
StatsPlan PlanStats(const ImageShape& s, bool per_image, int arrays, int max_vec,
                    const DeviceLimits& limits, bool allow_on_chip, bool allow_resident = true) {
  StatsPlan base;
  base.n = s.n, base.c = s.c, base.hw = s.pixels();
  base.channels_last = s.channels_last;
  base.per_image = per_image;
  base.stats = per_image ? s.n * s.c : s.c;
  base.count = per_image ? s.pixels() : s.n * s.pixels();
  base.arrays = arrays;

  // NHWC: lanes vectors of vec channels per row; NCHW: vectors of vec pixels, one channel.
  // `cluster`: CTAs per group on the cluster path (each holds one of that many chunks).
  auto configure = [&](int vec, int lanes, StatsPath path, int cluster) {
    StatsPlan p = base;
    p.vec = vec, p.lanes = lanes, p.path = path;
    p.cluster = path == StatsPath::kCluster ? cluster : 1;
    p.sums = p.on_chip() ? arrays : 2;  // on-chip forward reduces one sum at a time
    const bool fused = path == StatsPath::kFused, clustered = path == StatsPath::kCluster;
    int64_t rows_step = kStatsThreads;
    if (p.channels_last) {
      rows_step = kStatsThreads / lanes;
      p.cblocks = CeilDiv(s.c, int64_t(lanes) * vec);
      p.rows = per_image ? s.pixels() : s.n * s.pixels();
      p.groups = (per_image ? s.n : 1) * p.cblocks;
      p.chunk_rows = fused       ? p.rows
                     : clustered ? CeilDiv(p.rows, cluster)
                                 : rows_step * kChunkVectorsPerThread;
      p.chunks = clustered ? cluster : CeilDiv(p.rows, p.chunk_rows);
    } else {  // clustered: the cluster's chunks cover the group's planes (cluster % planes == 0)
      p.rows = s.pixels() / vec;
      p.groups = p.stats;
      p.chunks_per_plane = fused ? 1 : clustered ? cluster / p.planes() : 0;
      p.chunk_rows = p.chunks_per_plane > 0 ? CeilDiv(p.rows, p.chunks_per_plane)
                                            : int64_t(kStatsThreads) * kChunkVectorsPerThread;
      if (p.chunks_per_plane == 0) p.chunks_per_plane = CeilDiv(p.rows, p.chunk_rows);
      p.chunks = p.planes() * p.chunks_per_plane;
    }
    // A fused CTA holds all of its group's chunks, a cluster CTA one.
    p.per_thread = p.on_chip() ? int(std::min<int64_t>(
                                     (fused ? p.chunks : 1) * CeilDiv(p.chunk_rows, rows_step),
                                     1 << 20))
                               : 0;
    p.group_end = p.groups;
    p.slice_groups = p.on_chip() ? p.groups : SliceGroups(p, sizeof(T), limits);
    return p;
  };
  // NCHW on chip: at most 4 slots per vector. Every slot of a thread's vector holds the same
  // channel, yet each is reduced and carries its own coefficients: 8-slot vectors (the 2-byte
  // types) compile to 62-74 registers against 48 for 4 slots (sm_90 ptxas -v; 3 fused-gradient
  // CTAs per SM instead of 5) and reduce twice as many values, for the same bytes per CTA. On
  // the H200 the 8-slot bfloat16 NCHW instance-norm gradient ran 2.5x slower than float32's
  // 4-slot one over twice the bytes (RESULTS.md; the cap is not yet re-measured there).
  const int max_on_chip_vec = s.channels_last ? max_vec : std::min(max_vec, 4);
  auto max_lanes = [&](int vec) -> int {
    if (!s.channels_last) return 1;
    return int(std::min<int64_t>(32, CeilPow2(CeilDiv(s.c, vec))));
  };
  // NHWC rows narrower than this waste most of each 32-byte sector and make the fused path
  // slower than chunking (measured on H200: 2x); the chunked apply re-reads from L2 anyway.
  const int64_t min_row_bytes = std::min<int64_t>(64, s.c * int64_t(sizeof(T)));
  // Visits the on-chip candidates of `path` in order of preference (a smaller tile budget,
  // which leaves 2 CTAs per SM, first; then wider vectors, wider rows, smaller clusters) and
  // returns the first that fits and `accept`s.
  auto first_fit = [&](StatsPath path, std::initializer_list<int> clusters, auto&& accept,
                       StatsPlan* out) {
    for (int64_t budget : {std::min(kFusedBudget, limits.max_smem_per_block),
                           limits.max_smem_per_block}) {
      for (int vec = max_on_chip_vec; vec >= 1; vec /= 2) {
        for (int lanes = max_lanes(vec); lanes >= 1; lanes /= 2) {
          if (s.channels_last && int64_t(lanes) * vec * int64_t(sizeof(T)) < min_row_bytes) break;
          for (int cluster : clusters) {
            const int64_t planes = per_image ? 1 : s.n;
            if (!s.channels_last && cluster % planes != 0) continue;
            const StatsPlan p = configure(vec, lanes, path, cluster);
            if (p.per_thread < (1 << 20) && p.shared_bytes<T, A>() <= budget && accept(p)) {
              *out = p;
              return true;
            }
          }
        }
      }
    }
    return false;
  };
  StatsPlan plan;
  if (allow_on_chip) {
    if (first_fit(StatsPath::kFused, {1}, [](const StatsPlan&) { return true; }, &plan)) {
      return plan;
    }
    const StatsPath preferred = PreferredStatsPath();
    if (preferred == StatsPath::kResident && allow_resident &&
        PlanResident<T, A>(base, max_vec, limits, &plan)) {
      return plan;
    }
    // Portable cluster sizes (<= 8 CTAs), on devices with clusters that can co-schedule them.
    const auto runnable = [&](const StatsPlan& p) { return ClusterRunnable<T, A>(p, arrays == 2); };
    if (preferred != StatsPath::kChunked && limits.compute_major >= 9 &&
        first_fit(StatsPath::kCluster, {2, 4, 8}, runnable, &plan)) {
      return plan;
    }
  }
  // Chunked: rows of up to 128 bytes per CTA (a full cache line when C allows).
  const int lanes = int(std::min<int64_t>(
      max_lanes(max_vec), std::max<int64_t>(1, 128 / (max_vec * int64_t(sizeof(T))))));
  return configure(max_vec, lanes, StatsPath::kChunked, 1);
}

// The sweep of resident plan p planned without the resident path (cluster or chunked), for
// when the driver refuses its cooperative grid.
template <typename T, typename A>
ffi::Error PlanWithoutResident(std::string_view op, const StatsPlan& p, StatsPlan* out) {
  DeviceLimits limits;
  JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
  ImageShape s;  // the plan keeps the pixel count only: one row of hw pixels plans the same
  s.n = p.n, s.c = p.c, s.h = p.hw, s.w = 1, s.channels_last = p.channels_last;
  *out = PlanStats<T, A>(s, p.per_image, p.arrays, p.vec, limits, /*allow_on_chip=*/true,
                         /*allow_resident=*/false);
  return ffi::Error::Success();
}

// Finalize kernel CTAs for the statistics of plan p's groups.
inline int64_t FinalizeBlocks(const StatsPlan& p) {
  return CeilDiv(p.stat_of_group(p.group_end) - p.stat_of_group(p.group_begin), kFinalizeWarps);
}

// Chunked forward, slice by slice. `partial` and `coef` are indexed by statistic over all
// groups: every slice fills its own entries, as one unsliced sweep would.
template <typename T, typename A, int V>
ffi::Error LaunchChunkedForward(std::string_view op, cudaStream_t stream, const StatsPlan& p,
                                const T* x, T* y, const ForwardParams<A>& fp, A* partial,
                                Coef<A>* coef) {
  for (int64_t g0 = 0; g0 < p.groups; g0 += p.slice_groups) {
    const StatsPlan sp = p.slice(g0);
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the partial-sum kernel", PartialKernel<T, A, V, false>,
                                  sp.blocks(), kStatsThreads, sp.shared_bytes<T, A>(), stream,
                                  sp, x, nullptr, GradientParams<A>{}, partial));
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the finalize kernel", FinalizeKernel<T, A, false>,
                                  FinalizeBlocks(sp), kFinalizeWarps * 32, 0, stream, sp, x,
                                  partial, fp, GradientParams<A>{}, coef));
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the apply kernel", ApplyKernel<T, A, V, false>,
                                  sp.blocks(), kStatsThreads, 0, stream, sp, x, nullptr, coef,
                                  y));
  }
  return ffi::Error::Success();
}

// Chunked gradient, slice by slice (see LaunchChunkedForward).
template <typename T, typename A, int V>
ffi::Error LaunchChunkedGradient(std::string_view op, cudaStream_t stream, const StatsPlan& p,
                                 const T* dy, const T* x, T* dx, const GradientParams<A>& gp,
                                 A* partial, Coef<A>* coef) {
  for (int64_t g0 = 0; g0 < p.groups; g0 += p.slice_groups) {
    const StatsPlan sp = p.slice(g0);
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the partial-sum kernel", PartialKernel<T, A, V, true>,
                                  sp.blocks(), kStatsThreads, sp.shared_bytes<T, A>(), stream,
                                  sp, x, dy, gp, partial));
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the finalize kernel", FinalizeKernel<T, A, true>,
                                  FinalizeBlocks(sp), kFinalizeWarps * 32, 0, stream, sp, x,
                                  partial, ForwardParams<A>{}, gp, coef));
    JAXMPS_RETURN_IF_ERROR(Launch(op, "the apply kernel", ApplyKernel<T, A, V, true>,
                                  sp.blocks(), kStatsThreads, 0, stream, sp, x, dy, coef, dx));
  }
  return ffi::Error::Success();
}

// The resident launch `resident(&refused)`; where the driver refuses the cooperative grid
// (nothing ran), the sweep re-planned without the resident path, run by `again(plan, vec)`
// with vec a std::integral_constant of the new plan's vector width.
template <typename T, typename A, typename Resident, typename Again>
ffi::Error ResidentOrFallback(std::string_view op, const StatsPlan& p, Resident&& resident,
                              Again&& again) {
  bool refused = false;
  JAXMPS_RETURN_IF_ERROR(resident(&refused));
  if (!refused) return ffi::Error::Success();
  StatsPlan fallback;
  JAXMPS_RETURN_IF_ERROR((PlanWithoutResident<T, A>(op, p, &fallback)));
  return DispatchVector<T>(fallback.vec, [&](auto v) { return again(fallback, v); });
}

// Forward sweep: y and the statistics outputs (fp.mean_out, fp.second_out).
template <typename T, typename A, int V>
ffi::Error LaunchStatsForward(std::string_view op, cudaStream_t stream,
                              ffi::ScratchAllocator& scratch, const StatsPlan& p, const T* x,
                              T* y, const ForwardParams<A>& fp) {
  const int64_t smem = p.shared_bytes<T, A>();
  if (p.path == StatsPath::kFused) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, FusedForwardKernel<T, A, V>, smem));
    return Launch(op, "the fused forward kernel", FusedForwardKernel<T, A, V>, p.blocks(),
                  kStatsThreads, smem, stream, p, x, y, fp);
  }
  if (p.path == StatsPath::kCluster) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, ClusterForwardKernel<T, A, V>, smem));
    return LaunchCluster(op, "the cluster forward kernel", ClusterForwardKernel<T, A, V>,
                         p.blocks(), p.cluster, kStatsThreads, smem, stream, p, x, y, fp);
  }
  if (p.path == StatsPath::kResident) {
    return ResidentOrFallback<T, A>(
        op, p,
        [&](bool* refused) {
          return LaunchResident<T, A, V, false>(op, stream, scratch, p, x, nullptr, y, fp,
                                                GradientParams<A>{}, refused);
        },
        [&](const StatsPlan& fallback, auto v) {
          return LaunchStatsForward<T, A, decltype(v)::value>(op, stream, scratch, fallback, x,
                                                              y, fp);
        });
  }
  A* partial = nullptr;
  Coef<A>* coef = nullptr;
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, 2 * p.stats * p.chunks, &partial));
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, p.stats, &coef));
  return LaunchChunkedForward<T, A, V>(op, stream, p, x, y, fp, partial, coef);
}

// Gradient sweep: dx, and the per-statistic sums in gp.sum_g_out / gp.sum_gx_out.
template <typename T, typename A, int V>
ffi::Error LaunchStatsGradient(std::string_view op, cudaStream_t stream,
                               ffi::ScratchAllocator& scratch, const StatsPlan& p, const T* dy,
                               const T* x, T* dx, const GradientParams<A>& gp) {
  const int64_t smem = p.shared_bytes<T, A>();
  if (p.path == StatsPath::kFused) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, FusedGradientKernel<T, A, V>, smem));
    return Launch(op, "the fused gradient kernel", FusedGradientKernel<T, A, V>, p.blocks(),
                  kStatsThreads, smem, stream, p, dy, x, dx, gp);
  }
  if (p.path == StatsPath::kCluster) {
    JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, ClusterGradientKernel<T, A, V>, smem));
    return LaunchCluster(op, "the cluster gradient kernel", ClusterGradientKernel<T, A, V>,
                         p.blocks(), p.cluster, kStatsThreads, smem, stream, p, dy, x, dx, gp);
  }
  if (p.path == StatsPath::kResident) {
    return ResidentOrFallback<T, A>(
        op, p,
        [&](bool* refused) {
          return LaunchResident<T, A, V, true>(op, stream, scratch, p, x, dy, dx,
                                               ForwardParams<A>{}, gp, refused);
        },
        [&](const StatsPlan& fallback, auto v) {
          return LaunchStatsGradient<T, A, decltype(v)::value>(op, stream, scratch, fallback, dy,
                                                               x, dx, gp);
        });
  }
  A* partial = nullptr;
  Coef<A>* coef = nullptr;
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, 2 * p.stats * p.chunks, &partial));
  JAXMPS_RETURN_IF_ERROR(AllocateScratch(scratch, op, p.stats, &coef));
  return LaunchChunkedGradient<T, A, V>(op, stream, p, dy, x, dx, gp, partial, coef);
}

// dgamma, dbeta (C,) from per-image sums (N, C), summed over images in order.
template <typename A>
ffi::Error LaunchSumOverImages(std::string_view op, cudaStream_t stream, int64_t n, int64_t c,
                               const A* sum_g, const A* sum_gx, A* dgamma, A* dbeta) {
  return Launch(op, "the sum-over-images kernel", SumOverImagesKernel<A>,
                CeilDiv(2 * c, kSumImagesThreads), kSumImagesThreads, 0, stream, n, c, sum_g,
                sum_gx, dgamma, dbeta);
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
                                           /*allow_on_chip=*/true);
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
                                           /*allow_on_chip=*/true);
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
