// Streaming stencil kernels for the window norms on CUDA (spatial and local contrast norm in
// both layouts, cross-channel norm NCHW): TryStreamWindow runs one when the window fits.
//
// The general tile engine (window.cuh) stages a tile plus halos in shared memory and sums
// windows there; that costs shared-memory traffic and index arithmetic per element and made it
// compute-bound (measured on H100: 4-5x the memory roofline). Here a CTA owns a strip of
// `te` columns x `ch` lanes and walks down the rows (the A0 axis) once:
// - each thread owns one (column, lane) and keeps the last K rows it loaded in registers, a
//   ring whose slots are compile-time constants because the row loop is unrolled by K (K is
//   the window height, a template parameter): the sum along A0 is K register adds;
// - the sums along A1 (the window width) go through a small double-buffered shared-memory row
//   exchange: one write and k1 reads per value, one barrier per row;
// - the gradient chains two such stencils in the same walk: window statistics and the gradient
//   quantities Q of row r - (K-1)/2 as soon as row r is in, then the adjoint sums of Q for the
//   output row K/2 further up, from a second register ring.
// x (and dy) are read once plus the strip halos (neighbouring strips re-read them from L2);
// y or dx is written once. Loads run StreamPlan::depth rows ahead of use (RowPipe) so that
// misses overlap (the CTAs are few per SM: their rows in flight keep the memory system busy).
// Window placement follows KERNELS.md: S covers [c - k//2, c + (k-1)//2], S^T the mirror.
#pragma once

#include <algorithm>
#include <cstdlib>

#include "cuda_common.cuh"

namespace jaxmps::cuda {

constexpr int kStreamMaxThreads = 512;
constexpr int kStreamMaxWindow = 7;  // window heights with a compiled ring (K = 1..7)

struct StreamPlan {
  int64_t dim[3] = {1, 1, 1};     // extents of A0 (streamed), A1 (exchanged), L (lanes)
  int64_t stride[3] = {0, 0, 1};  // element strides of A0, A1, L
  int64_t image_stride = 0;
  int k1 = 1;                     // window width along A1 (the height K is a template argument)
  int te = 32, ch = 8;            // columns (with halos) and lanes per CTA: te * ch threads
  int te_shift = 5, ch_shift = 3;
  bool lanes_fast = true;         // lanes fastest within a warp (L contiguous), else columns
  int out_cols = 1;               // output columns per CTA
  int col_halo = 0;               // columns left of the first output column
  int rows = 1;                   // output rows per CTA
  int depth = 2;                  // rows in flight per thread (AsyncRowPipe)
  int64_t tiles_l = 1, tiles_b = 1, tiles_a = 1, blocks = 0;
  __host__ __device__ int threads() const { return te * ch; }
  // Index of (column b, lane l) in an exchange row, and the distance between columns: lanes
  // or columns consecutive, whichever the warp's threads differ in (no bank conflicts).
  __host__ __device__ int slot(int b, int l) const { return lanes_fast ? b * ch + l : l * te + b; }
  __host__ __device__ int col_step() const { return lanes_fast ? ch : 1; }
};

// ---- rows read ahead -------------------------------------------------------------------------
// A thread walking down its column must have several rows' loads in flight: with few CTAs per
// SM, they are what keeps the memory system busy (Little's law: ~30-40 KB in flight per SM at
// HBM3 bandwidth and latency). The first version kept two rows ahead in registers shifted down
// one slot per row; the shift is a register move of the row loaded one step earlier, so every
// row waited on the previous row's load (sm_90 SASS: the MOV carries that load's scoreboard
// wait) and one row per thread was in flight, not two. The readers below never move a pending
// value. Both deliver NR arrays in lockstep: at step s, row first[a] + s of array a (zero
// outside the rows their RowWalk reads).

// The walk both readers share: array a steps through rows first[a] .. first[a] + count - 1
// and reads those in [max(lowest[a], 0), min(first[a] + count, rows)) of a live column (none
// past the walk: no wasted prefetch); the others read as zero.
template <typename T, int NR>
struct RowWalk {
  const T* next[NR];  // the next row of each array
  int next_row[NR], lo[NR], hi[NR];
  int64_t row_stride;
  bool live;

  __device__ void Begin(const T* const (&base)[NR], const int (&first)[NR],
                        const int (&lowest)[NR], int count, int rows) {
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      next[a] = base[a] + int64_t(first[a]) * row_stride;
      next_row[a] = first[a];
      lo[a] = max(lowest[a], 0);
      hi[a] = min(first[a] + count, rows);
    }
  }
  __device__ bool Wanted(int a) const {
    return live && next_row[a] >= lo[a] && next_row[a] < hi[a];
  }
  __device__ void Advance(int a) {
    next[a] += row_stride;
    ++next_row[a];
  }
};

// The narrowest vector cp.async copies: narrower ones (2-byte scalars) use RegisterRowPipe.
constexpr int kAsyncCopyMinBytes = 4;

// Vectors of kAsyncCopyMinBytes or more: cp.async copies into a per-thread ring of depth + 1
// shared-memory slots, `depth` rows in flight (runtime, StreamPlan::depth, at most
// kStreamMaxDepth). The ring has one slot more than the rows in flight so that a slot is
// refilled a row after it was read.
constexpr int kStreamMaxDepth = 8;

// The planner's rows in flight for rows of a thread's `bytes` (see StreamDepth).
__host__ __device__ constexpr int PlannedStreamDepth(int bytes) {
  const int depth = (64 + bytes - 1) / bytes;
  return depth < 2 ? 2 : depth > kStreamMaxDepth ? kStreamMaxDepth : depth;
}

// Rows in flight of the compiled-window kernels' fixed rings (window height k: k slots).
__host__ __device__ constexpr int FixedStreamDepth(int k) { return k - 1; }

// kSlots > 0 (the compiled-window kernels, kSlots = the window height K): a ring of K slots
// with K - 1 rows in flight, so that the kernel's row loop, unrolled by K, names every slot
// and the wait count at compile time: no ring indices, wrap-arounds or runtime wait (sm_90
// SASS: ~40 of the spatial gradient's ~200 instructions per row step were this bookkeeping).
// kSlots = 0: StreamPlan::depth + 1 slots, indices at run time.
template <typename T, typename A, int VW, int NR, int kSlots>
struct AsyncRowPipe : RowWalk<T, NR> {
  using TV = Vec<T, VW>;
  using AV = Vec<A, VW>;
  using W = RowWalk<T, NR>;
  static_assert(kSlots == 0 || kSlots >= 2, "a fixed ring needs a row in flight");
  TV* ring;  // slot i of array a at ring[(i * NR + a) * threads + thread]
  int threads, depth, head, tail;

  __device__ void Init(unsigned char* shared, int threads_, int depth_, int64_t stride,
                       bool live_) {
    ring = reinterpret_cast<TV*>(shared);
    threads = threads_, depth = kSlots > 0 ? FixedStreamDepth(kSlots) : depth_,
    W::row_stride = stride,
    W::live = live_;
  }
  __device__ TV& Slot(int i, int a) { return ring[(i * NR + a) * threads + int(threadIdx.x)]; }
  // Starts the copies of the next row of every array into `slot` (zeros for rows the walk
  // does not read: no copy is then in flight to the slot either).
  __device__ void IssueInto(int slot) {
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      CopyOrZeroToSharedAsync<T, VW>(&Slot(slot, a), W::next[a], W::Wanted(a));
      W::Advance(a);
    }
    CommitCopiesToShared();  // one group per row, empty or not: the wait counts rows
  }
  __device__ void Start(const T* const (&base)[NR], const int (&first)[NR],
                        const int (&lowest)[NR], int count, int rows) {
    W::Begin(base, first, lowest, count, rows);
    if constexpr (kSlots > 0) {
#pragma unroll
      for (int i = 0; i < kSlots - 1; ++i) IssueInto(i);
    } else {
      head = 0, tail = 0;
      for (int i = 0; i < depth; ++i) {
        IssueInto(tail);
        ++tail;
      }
    }
  }
  // The next row of each array; `step` is the kernel's unrolled row index (s mod K).
  __device__ void Next(int step, AV (&out)[NR]) {
    if constexpr (kSlots > 0) {
      // Row s is in slot s mod K; K - 2 younger rows stay in flight. Row s + K - 1 goes into
      // the slot read a step ago.
      WaitCopiesToShared(kSlots - 2);
      Read(step, out);
      IssueInto((step + kSlots - 1) % kSlots);
    } else {
      // The oldest of the `depth` rows in flight has landed. The planner's depth (the usual
      // case) waits with a constant; the benchmarking knob's others through the switch of
      // WaitCopiesToShared (a jump table: ~6 more instructions per row).
      constexpr int kPlanned = PlannedStreamDepth(NR * VW * int(sizeof(T)));
      if (depth == kPlanned) {
        WaitCopiesToShared(kPlanned - 1);
      } else {
        WaitCopiesToShared(depth - 1);
      }
      Read(head, out);
      head = head == depth ? 0 : head + 1;
      IssueInto(tail);
      tail = tail == depth ? 0 : tail + 1;
    }
  }
  __device__ void Read(int slot, AV (&out)[NR]) {
#pragma unroll
    for (int a = 0; a < NR; ++a) {
      const TV raw = Slot(slot, a);
#pragma unroll
      for (int e = 0; e < VW; ++e) out[a].v[e] = ToAcc(raw.v[e]);
    }
  }
};

// 2-byte vectors: a register ring of K raw rows, K the window height, refilled in place. The
// kernels unroll their row loop by K, so `step` (the unrolled index, s mod K) is a
// compile-time slot: no value ever moves between registers.
template <typename T, typename A, int VW, int NR, int K>
struct RegisterRowPipe : RowWalk<T, NR> {
  using TV = Vec<T, VW>;
  using AV = Vec<A, VW>;
  using W = RowWalk<T, NR>;
  TV ring[K][NR];

  __device__ void Init(unsigned char*, int, int, int64_t stride, bool live_) {
    W::row_stride = stride, W::live = live_;
  }
  __device__ TV Read(int a) {
    TV v{};
    if (W::Wanted(a)) v = LoadVec<T, VW>(W::next[a]);
    W::Advance(a);
    return v;
  }
  __device__ void Start(const T* const (&base)[NR], const int (&first)[NR],
                        const int (&lowest)[NR], int count, int rows) {
    W::Begin(base, first, lowest, count, rows);
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int a = 0; a < NR; ++a) ring[i][a] = Read(a);
  }
  __device__ void Next(int step, AV (&out)[NR]) {
#pragma unroll
    for (int a = 0; a < NR; ++a) {
#pragma unroll
      for (int e = 0; e < VW; ++e) out[a].v[e] = ToAcc(ring[step][a].v[e]);
      ring[step][a] = Read(a);
    }
  }
};

// Shared memory of a thread's rows in flight (AsyncRowPipe; none for RegisterRowPipe).
inline int64_t RowPipeSharedBytes(int vector_bytes, int arrays, int depth, int threads) {
  return vector_bytes >= kAsyncCopyMinBytes
             ? int64_t(depth + 1) * arrays * threads * vector_bytes
             : 0;
}

// Rows in flight per thread for AsyncRowPipe: enough for 64 bytes per thread (32-48 KB per SM
// at the 2-3 CTAs of 256 threads the wide kernels run), 2 to kStreamMaxDepth. Measured on an
// H200 (N=32, 64x64, C=128, window 5; benchmarks/gpu/sweep_depth.json): 2, 4, 8 and this rule
// within 3% of each other; going from one row in flight to two is what mattered (bfloat16
// spatial forward+backward 0.366 -> 0.299 ms). JAXMPS_CUDA_STREAM_DEPTH=1..8 overrides it.
inline int StreamDepth(int bytes_per_row) {
  const int v = IntKnob("JAXMPS_CUDA_STREAM_DEPTH");
  return v >= 1 && v <= kStreamMaxDepth ? v : PlannedStreamDepth(bytes_per_row);
}

// JAXMPS_CUDA_STREAM_LANES=1|2|4|8|16: lanes (vectors) per CTA of the NHWC streaming kernels,
// for benchmarks (see PlanStreamWindow); 0 = the planner's choice.
inline int StreamLanesKnob() {
  const int v = IntKnob("JAXMPS_CUDA_STREAM_LANES");
  return v == 1 || v == 2 || v == 4 || v == 8 || v == 16 ? v : 0;
}

// Lanes per thread of the spatial gradient's compiled-form kernels: 4 (one 16-byte float32
// vector, 128 registers, 2 CTAs per SM) rather than the general kernels' 2, which spreads the
// per-row work (addresses, ring indices, barrier) over twice the lanes. Measured on an H100
// (benchmarks/gpu/sweep_grad_vw.json): spatial forward+backward float32 0.174 -> 0.168 ms,
// bfloat16 0.176 -> 0.165. JAXMPS_CUDA_STREAM_GRAD_VW=2 restores two, for benchmarks.
inline int StreamGradientLanesKnob() {
  return Knob("JAXMPS_CUDA_STREAM_GRAD_VW") == "2" ? 2 : 4;
}

// JAXMPS_CUDA_STREAM_BALANCED=0: NHWC strips as wide as the CTA allows (the last one narrow),
// for benchmarks; by default strips of equal width (see PlanStreamWindow).
inline bool StreamBalancedKnob() { return Knob("JAXMPS_CUDA_STREAM_BALANCED") != "0"; }

// kFixed: the compiled-window kernels' fixed ring of K slots (AsyncRowPipe's kSlots = K).
template <typename T, typename A, int VW, int NR, int K, bool kFixed>
using RowPipe = std::conditional_t<(int(sizeof(T)) * VW >= kAsyncCopyMinBytes),
                                   AsyncRowPipe<T, A, VW, NR, kFixed ? K : 0>,
                                   RegisterRowPipe<T, A, VW, NR, K>>;

// Arrays a streaming kernel reads row by row: x, and dy for the gradient.
template <bool kGrad>
constexpr int kStreamArrays = kGrad ? 2 : 1;

// Window sums along A1 of the exchange planes for the window [b - lo, b - lo + k1); K1 > 0 is
// k1 compiled in (the loop then fully unrolled, no trip count or index arithmetic).
template <int NQ, int K1, typename A, int VW>
__device__ __forceinline__ void SumAcross(const StreamPlan& p, const Vec<A, VW>* ex,
                                          int plane, int at, int lo, Vec<A, VW> (&out)[NQ]) {
  const int step = p.col_step();
  const int first = at - lo * step;
#pragma unroll
  for (int q = 0; q < NQ; ++q) out[q] = ex[q * plane + first];  // not 0 + the first term
  auto add = [&](int d) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const Vec<A, VW> v = ex[q * plane + first + d * step];
#pragma unroll
      for (int e = 0; e < VW; ++e) out[q].v[e] += v.v[e];
    }
  };
  if constexpr (K1 > 0) {
#pragma unroll
    for (int d = 1; d < K1; ++d) add(d);
  } else {
#pragma unroll 4
    for (int d = 1; d < p.k1; ++d) add(d);
  }
}

// Window sums along A0 of F(x) over the ring (row r - i in slot (j - i) mod K).
template <typename Policy, int K, int VW, typename A>
__device__ __forceinline__ void SumDown(const Policy& pol, const Vec<A, VW> (&ring)[K], int j,
                                        Vec<A, VW> (&f)[Policy::kF]) {
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      A fi[Policy::kF];
      pol.Transform(ring[(j - i + K) % K].v[e], fi);
#pragma unroll
      for (int q = 0; q < Policy::kF; ++q) f[q].v[e] = i == 0 ? fi[q] : f[q].v[e] + fi[q];
    }
}

template <typename T, int VW, typename A>
__device__ __forceinline__ void StoreLanes(T* p, const Vec<A, VW>& v) {
  Vec<T, VW> o;
#pragma unroll
  for (int e = 0; e < VW; ++e) o.v[e] = FromAcc<T>(v.v[e]);
  StoreVec<T, VW>(p, o);
}

// Several lanes per thread multiply the registers of the rings: such CTAs stay at 256 threads
// and are held to 3 per SM (<= 85 registers), except the local contrast gradient, whose three
// rings spill too much there (2 per SM). Measured on H100 for the spatial gradient: 0.229 ->
// 0.209 ms (f32), 0.307 -> 0.250 ms (bf16) against no bound.
constexpr int kStreamWideThreads = 256;

template <typename Policy, bool kGrad, int VW>
constexpr int StreamMinBlocks() {
  return VW == 1 ? 1 : kGrad && (Policy::kGS > 1 || VW > 2) ? 2 : 3;
}

// K: the window height (compiled: the rings' slots); K1: its width compiled in, or 0 (p.k1).
template <typename T, typename A, typename Policy, bool kGrad, int K, int VW, int K1>
__global__ void __launch_bounds__(VW == 1 ? kStreamMaxThreads : kStreamWideThreads,
                                  (StreamMinBlocks<Policy, kGrad, VW>()))
    StreamWindowKernel(StreamPlan p, Policy pol, const T* __restrict__ x,
                       const T* __restrict__ dy, T* __restrict__ out) {
  constexpr int NF = Policy::kF, NG = Policy::kG, NGS = Policy::kGS;
  const int k1 = K1 > 0 ? K1 : p.k1;
  using AV = Vec<A, VW>;
  JAXMPS_DYNAMIC_SHARED(smem);
  const int plane = p.threads();
  AV* const fx = reinterpret_cast<AV*>(smem);  // [2][NF][plane]: sums of F(x) along A0
  AV* const qx = fx + 2 * NF * plane;          // [2][NGS][plane]: sums of Q along A0

  int64_t t = blockIdx.x;
  const int64_t tl = t % p.tiles_l;
  t /= p.tiles_l;
  const int64_t tb = t % p.tiles_b;
  t /= p.tiles_b;
  const int ta = int(t % p.tiles_a);
  const int64_t img = t / p.tiles_a;
  int b, l;
  if (p.lanes_fast) {
    l = threadIdx.x & (p.ch - 1), b = threadIdx.x >> p.ch_shift;
  } else {
    b = threadIdx.x & (p.te - 1), l = threadIdx.x >> p.te_shift;
  }
  const int64_t gl = (tl * p.ch + l) * VW, gb = tb * p.out_cols - p.col_halo + b;
  const bool live = gl < p.dim[2] && gb >= 0 && gb < p.dim[1];
  const int64_t offset = img * p.image_stride + (live ? gb * p.stride[1] + gl * p.stride[2] : 0);
  const int me = p.slot(b, l);
  const bool out_col = b >= p.col_halo && b < p.col_halo + p.out_cols && live;
  const int rows = int(p.dim[0]);
  const int h0 = ta * p.rows, h1 = min(h0 + p.rows, rows);
  const int64_t row_stride = p.stride[0];

  constexpr int NR = kStreamArrays<kGrad>;
  RowPipe<T, A, VW, NR, K, (K1 > 0)> pipe;  // compiled widths: a fixed ring (K >= 3)
  pipe.Init(reinterpret_cast<unsigned char*>(fx + 2 * (NF + (kGrad ? NGS : 0)) * plane), plane,
            p.depth, row_stride, live);
  AV ring[K];  // x of the last K rows: row (r - i) in slot (j - i) mod K at unrolled step j
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int e = 0; e < VW; ++e) ring[i].v[e] = A(0);

  if constexpr (!kGrad) {
    // Row r completes the window of output row r - (K-1)/2.
    const int r0 = h0 - K / 2, steps = (h1 - h0) + K - 1;
    pipe.Start({x + offset}, {r0}, {r0}, steps, rows);
    T* o = out + offset + int64_t(h0) * row_stride;
    for (int s0 = 0; s0 < steps; s0 += K) {
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int s = s0 + j;
        if (s >= steps) break;  // uniform across the CTA
        AV in[NR];
        pipe.Next(j, in);
        ring[j] = in[0];
        if (s < K - 1) continue;
        AV f[NF];
        SumDown<Policy, K, VW>(pol, ring, j, f);
        AV* const ex = fx + (s & 1) * NF * plane;
#pragma unroll
        for (int q = 0; q < NF; ++q) ex[q * plane + me] = f[q];
        __syncthreads();
        if (out_col) {
          AV sum[NF];
          SumAcross<NF, K1, A, VW>(p, ex, plane, me, k1 / 2, sum);
          const AV& xc = ring[(j - (K - 1) / 2 + K) % K];
          AV y;
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            A se[NF];
#pragma unroll
            for (int q = 0; q < NF; ++q) se[q] = sum[q].v[e];
            y.v[e] = pol.Forward(xc.v[e], se);
          }
          StoreLanes<T, VW>(o, y);
        }
        o += row_stride;
      }
    }
  } else {
    // Step s loads x row r = r0 + s and dy row hq = r - (K-1)/2, and exchanges, behind one
    // barrier, the sums along A0 of F(x) (window rows ending at r: the statistics of row hq)
    // and of Q over the last K Q rows (ending at hq - 1: the adjoint window of output row
    // h = hq - 1 - K/2). After the barrier it finishes Q of row hq (zero outside the image:
    // the adjoint sums' zero padding) and dx of row h. Q lives on columns
    // [k1/2, te - (k1-1)/2), dx on the output columns.
    const int r0 = h0 - (K - 1), steps = (h1 - h0) + 2 * (K - 1) + 1;
    // dy row of step s: r0 + s - (K-1) + K/2, used from step K - 1 on (the first Q row,
    // r0 + K/2): the rows before it are not read.
    pipe.Start({x + offset, dy + offset}, {r0, r0 - (K - 1) + K / 2}, {r0, r0 + K / 2}, steps,
               rows);
    const bool q_col = b >= k1 / 2 && b < p.te - (k1 - 1) / 2 && live;
    AV qring[NG][K];  // Q of the last K rows: the one of step s in slot s mod K
#pragma unroll
    for (int q = 0; q < NG; ++q)
#pragma unroll
      for (int i = 0; i < K; ++i)
#pragma unroll
        for (int e = 0; e < VW; ++e) qring[q][i].v[e] = A(0);
    T* o = out + offset + int64_t(h0) * row_stride;
    for (int s0 = 0; s0 < steps; s0 += K) {
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int s = s0 + j;
        if (s >= steps) break;  // uniform across the CTA
        const AV xo = ring[j];  // x of row r - K = h, about to leave the ring
        AV in[NR];
        pipe.Next(j, in);
        ring[j] = in[0];
        if (s < K - 1) continue;
        const bool emit = s >= 2 * K - 1;
        const int hq = r0 + s - (K - 1) / 2;
        const AV& g = in[1];
        AV f[NF];
        SumDown<Policy, K, VW>(pol, ring, j, f);
        AV* const ex = fx + (s & 1) * NF * plane;
#pragma unroll
        for (int q = 0; q < NF; ++q) ex[q * plane + me] = f[q];
        AV* const eq = qx + (s & 1) * NGS * plane;
        if (emit) {
          AV adj[NGS];
#pragma unroll
          for (int q = 0; q < NGS; ++q)
#pragma unroll
            for (int e = 0; e < VW; ++e) adj[q].v[e] = A(0);
#pragma unroll
          for (int i = 1; i <= K; ++i)
#pragma unroll
            for (int q = 0; q < NGS; ++q)
#pragma unroll
              for (int e = 0; e < VW; ++e) adj[q].v[e] += qring[q][(j - i + K) % K].v[e];
#pragma unroll
          for (int q = 0; q < NGS; ++q) eq[q * plane + me] = adj[q];
        }
        __syncthreads();
        if (emit && out_col) {
          AV st[NGS];
          SumAcross<NGS, K1, A, VW>(p, eq, plane, me, (k1 - 1) / 2, st);
          AV dx;
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            A qe[NG], se[NGS];
#pragma unroll
            for (int q = 0; q < NG; ++q) qe[q] = qring[q][(j - 1 - K / 2 + 2 * K) % K].v[e];
#pragma unroll
            for (int q = 0; q < NGS; ++q) se[q] = st[q].v[e];
            dx.v[e] = pol.Combine(xo.v[e], qe, se);
          }
          StoreLanes<T, VW>(o, dx);
        }
        if (emit) o += row_stride;
#pragma unroll
        for (int q = 0; q < NG; ++q)
#pragma unroll
          for (int e = 0; e < VW; ++e) qring[q][j].v[e] = A(0);
        if (q_col && hq >= 0 && hq < rows) {
          AV sum[NF];
          SumAcross<NF, K1, A, VW>(p, ex, plane, me, k1 / 2, sum);
          const AV& xq = ring[(j - (K - 1) / 2 + K) % K];
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            A se[NF], qe[NG];
#pragma unroll
            for (int q = 0; q < NF; ++q) se[q] = sum[q].v[e];
            pol.Inner(xq.v[e], g.v[e], se, qe);
#pragma unroll
            for (int q = 0; q < NG; ++q) qring[q][j].v[e] = qe[q];
          }
        }
      }
    }
  }
}

// Fills a StreamPlan for a window of height k0 along dim[0] and width k1 along dim[1] over
// lanes dim[2], `vw` lanes per thread; false when this kernel does not serve the layout
// (lanes and columns both strided) or the window.
inline bool PlanStreamWindow(const int64_t (&dim)[3], const int64_t (&stride)[3],
                             int64_t image_stride, int64_t n, int k0, int k1, bool gradient,
                             int elem_bytes, int vw, int sm_count, StreamPlan* out) {
  StreamPlan p;
  for (int a = 0; a < 3; ++a) p.dim[a] = dim[a], p.stride[a] = stride[a];
  p.image_stride = image_stride;
  p.k1 = k1;
  if (k0 < 1 || k0 > kStreamMaxWindow || k1 < 1 || dim[0] > (int64_t(1) << 30)) return false;
  p.lanes_fast = stride[2] == 1;
  if (!p.lanes_fast && stride[1] != 1) return false;
  const int halo = gradient ? 2 * (k1 - 1) : k1 - 1;
  if (dim[1] == 1 && k1 == 1) {
    p.te = 1;  // no exchange axis (cross-channel NCHW): all threads on lanes
    p.ch = 256;
  } else if (p.lanes_fast) {
    // At least 32-byte runs of lanes per column (one memory sector), 32 or 64 columns.
    p.ch = vw > 1 ? 8 : std::max(1, 32 / elem_bytes);  // 32-128 bytes per column
    p.te = 256 / p.ch;
    if (p.te - halo < 16 && vw == 1) p.te *= 2;
    // Benchmarking knob: fewer lanes per CTA and as many columns as the row and its halo (any
    // count: lanes are fastest, so columns need not be a power of two), up to 256 threads.
    if (const int lanes = StreamLanesKnob(); lanes > 0 && vw > 1) {
      p.ch = lanes;
      p.te = int(std::min<int64_t>(dim[1] + halo, kStreamWideThreads / lanes));
    }
  } else {
    p.te = 32;  // a warp reads 32 consecutive columns of one lane
    if (p.te - halo < 16) p.te = 64;
    p.ch = 256 / p.te;
  }
  if (p.te - halo < (vw > 1 ? 8 : 1) ||
      p.te * p.ch > (vw > 1 ? kStreamWideThreads : kStreamMaxThreads)) {
    return false;
  }
  // Strips of equal width (lanes fastest: columns need not be a power of two): at W=64 a
  // 5-wide forward's three strips are 22 + 21 + 21 output columns, 26 threads wide, not
  // 28 + 28 + 8 in strips of 32 (78 columns computed for 64 instead of 96). Measured on an
  // H100 (benchmarks/gpu/sweep_balanced.json): faster in every case, e.g. bfloat16 spatial
  // forward+backward 0.176 -> 0.164 ms, local contrast forward 0.083 -> 0.072 (float32).
  if (p.lanes_fast && p.te > 1 && StreamBalancedKnob()) {
    const int64_t strips = CeilDiv(dim[1], int64_t(p.te - halo));
    p.te = int(CeilDiv(dim[1], strips)) + halo;
  }
  p.te_shift = 0, p.ch_shift = 0;
  for (int v = p.te; v > 1; v >>= 1) ++p.te_shift;
  for (int v = p.ch; v > 1; v >>= 1) ++p.ch_shift;
  p.out_cols = p.te - halo;
  p.col_halo = gradient ? k1 - 1 : k1 / 2;
  p.tiles_l = CeilDiv(dim[2], int64_t(p.ch) * vw);
  p.tiles_b = CeilDiv(dim[1], p.out_cols);
  // Whole columns when that gives enough CTAs, else shorter row runs (each re-walks the
  // window's extra rows: keep runs at least 8 windows long).
  const int64_t per_image = p.tiles_l * p.tiles_b;
  // Measured on H100 (N=32, 64x64, C=128): 4 CTAs per SM and runs of >= 8 windows beat 8/4,
  // 16/3 and 32/2 for the gradient (231 vs 248, 277, 346 us) and are within 10% forward.
  const int64_t want = 4 * int64_t(sm_count);
  int64_t rows = dim[0];
  while (n * per_image * CeilDiv(dim[0], rows) < want && rows > 8 * k0) {
    rows = CeilDiv(rows, 2);
  }
  p.rows = int(rows);
  p.tiles_a = CeilDiv(dim[0], p.rows);
  p.blocks = n * p.tiles_a * per_image;
  *out = p;
  return true;
}

// Runs the streaming kernel for a window of height k0 when PlanStreamWindow accepts the
// layout; *ran = false leaves the op to the general engine. Several lanes per thread (4 for
// the forward, 2 for the gradient: one 4- to 16-byte access) when lanes are contiguous and
// aligned, which spreads the per-row work (addresses, barriers, loop control) over them.
template <typename T, typename A, typename Policy, bool kGrad>
ffi::Error TryStreamWindow(std::string_view op, cudaStream_t stream, const int64_t (&dim)[3],
                           const int64_t (&stride)[3], int64_t image_stride, int64_t n, int k0,
                           int k1, const Policy& pol, const T* x, const T* dy, T* out,
                           bool* ran) {
  *ran = false;
  if constexpr (std::is_same_v<A, double>) {
    return ffi::Error::Success();  // float64 keeps the general engine
  } else {
    DeviceLimits limits;
    JAXMPS_RETURN_IF_ERROR(CurrentDeviceLimits(op, &limits));
    // Square windows of odd size 3..7 (MPS's default is 5 x 5) with the op's default beta:
    // kernels with the width and the beta form compiled in (fewer instructions per element:
    // no trip count or index arithmetic in the sums across, 1/t^5 in four instructions).
    // Other windows and beta take the general kernels (values equal to the last bit).
    const bool compiled = k1 == k0 && k0 % 2 == 1 && k0 >= 3 && UseCompiledBeta(pol);
    // Lanes per thread: 4 forward; the gradient's rings hold three times the values: two lanes
    // keep the general kernels within registers, the compiled spatial forms take four.
    constexpr bool kWideGradient = kGrad && Policy::kGS == 1;
    // Several lanes need lanes contiguous and every axis and pointer aligned to them; a layout
    // that does not allow the lanes wanted tries the next narrower count (4 -> 2 -> 1 for the
    // gradient, 4 -> 1 forward).
    StreamPlan p;
    auto plan = [&](int v) {
      bool ok = v == 1 || (stride[2] == 1 && dim[2] % v == 0 && image_stride % v == 0 &&
                           stride[0] % v == 0 && stride[1] % v == 0);
      for (const void* ptr : {static_cast<const void*>(x), static_cast<const void*>(dy),
                              static_cast<const void*>(out)})
        ok = ok && reinterpret_cast<uintptr_t>(ptr) % (v * sizeof(T)) == 0;
      return ok && PlanStreamWindow(dim, stride, image_stride, n, k0, k1, kGrad,
                                    int(sizeof(T)), v, limits.sm_count, &p);
    };
    int vw = !kGrad ? 4 : kWideGradient && compiled ? StreamGradientLanesKnob() : 2;
    while (!plan(vw)) {
      if (vw == 1) return ffi::Error::Success();
      vw = kGrad && vw == 4 ? 2 : 1;
    }
    constexpr int arrays = kStreamArrays<kGrad>;
    p.depth = compiled ? FixedStreamDepth(k0) : StreamDepth(arrays * vw * int(sizeof(T)));
    const int64_t smem =
        2 * int64_t(Policy::kF + (kGrad ? Policy::kGS : 0)) * p.threads() * vw *
            int64_t(sizeof(A)) +
        RowPipeSharedBytes(vw * int(sizeof(T)), arrays, p.depth, p.threads());
    if (smem > limits.max_smem_per_block) return ffi::Error::Success();
    *ran = true;
    const char* what = kGrad ? "the streaming window gradient kernel"
                             : "the streaming window forward kernel";
#ifdef JAXMPS_CUDA_EMU
    if (compiled) ++compiled_beta_launches;
#endif
    auto launch = [&](auto vw_constant) {
      constexpr int V = decltype(vw_constant)::value;
      auto go = [&](auto kernel, const auto& policy) {
        JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, kernel, smem));
        return Launch(op, what, kernel, p.blocks, p.threads(), smem, stream, p, policy, x, dy,
                      out);
      };
      if (compiled) {
        using C = typename Policy::Compiled;
        const C fixed = pol.Compile();
        switch (k0) {
          case 3: return go(StreamWindowKernel<T, A, C, kGrad, 3, V, 3>, fixed);
          case 5: return go(StreamWindowKernel<T, A, C, kGrad, 5, V, 5>, fixed);
          default: return go(StreamWindowKernel<T, A, C, kGrad, 7, V, 7>, fixed);
        }
      }
      if constexpr (kGrad && V == 4) {  // compiled forms only (not reached otherwise)
        return Internal(op, "no general 4-lane streaming gradient kernel");
      } else {
        switch (k0) {
          case 1: return go(StreamWindowKernel<T, A, Policy, kGrad, 1, V, 0>, pol);
          case 2: return go(StreamWindowKernel<T, A, Policy, kGrad, 2, V, 0>, pol);
          case 3: return go(StreamWindowKernel<T, A, Policy, kGrad, 3, V, 0>, pol);
          case 4: return go(StreamWindowKernel<T, A, Policy, kGrad, 4, V, 0>, pol);
          case 5: return go(StreamWindowKernel<T, A, Policy, kGrad, 5, V, 0>, pol);
          case 6: return go(StreamWindowKernel<T, A, Policy, kGrad, 6, V, 0>, pol);
          default: return go(StreamWindowKernel<T, A, Policy, kGrad, 7, V, 0>, pol);
        }
      }
    };
    if (vw == 4) {
      if constexpr (!kGrad || kWideGradient) return launch(std::integral_constant<int, 4>{});
    }
    if constexpr (kGrad) {
      if (vw == 2) return launch(std::integral_constant<int, 2>{});
    }
    return launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace jaxmps::cuda
