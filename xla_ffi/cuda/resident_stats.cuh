// Grid-resident statistics path of instance and batch norm (NHWC, cooperative launch): the
// ResidentKernel forward/gradient kernel, its plan (PlanResident) and its launcher.
//
// Why: the chunked path reads x twice forward and x, dy twice backward (partial sums, then
// apply), 8 tensor passes where the model has 5, because a batch-norm group (all N*H*W rows of
// a channel) is far larger than any CTA or cluster. Here the whole grid is one persistent,
// cooperative launch of as many CTAs as the GPU holds at once (one per SM): each CTA owns a
// contiguous range of rows of one group, starts asynchronous copies (cp.async) of the back of
// its range (as many rows as fit: about 27 MiB over an H100's SMs) into shared memory, streams
// the front through registers for the partial sums meanwhile, then sums the kept rows. After
// one grid-wide barrier every CTA adds its group's partials in a fixed order (the same bits
// everywhere: results stay bitwise repeatable, no atomics) and applies: the streamed rows
// newest first, so that the re-read finds them in L2, then the shared-memory rows (no second
// read at all); outputs are stored evict-first. The forward's DRAM traffic is then about x
// once + y; the gradient still re-reads from DRAM the part of (x, dy) that neither shared
// memory nor L2 holds (float32 at N=32, 64x64, C=128: most of it).
#pragma once

namespace jaxmps::cuda {

constexpr int kResidentThreads = 512;
constexpr int kResidentUnroll = 4;  // rows each thread has in flight per batch of loads
// A CTA gets at least this many sweep steps of rows: small tensors use fewer, fuller CTAs.
constexpr int64_t kResidentMinSteps = 8;

// Rows per sweep step (threads t and t + lanes * k share channel lane t % lanes).
__host__ __device__ inline int ResidentStep(const StatsPlan& p) {
  return kResidentThreads / int(p.lanes);
}

// Shared memory: [coefficient table (C)][reduction rows (threads * vec)][finalize sub-sums
// (2 * quarters * C)][resident tile: resident_rows rows of x (and dy) vectors].
__host__ __device__ inline int64_t ResidentQuarters(const StatsPlan& p) {
  return p.c < kResidentThreads ? kResidentThreads / p.c : 1;  // threads per channel, finalize
}
__host__ __device__ inline int64_t Align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Byte offsets of the sections after the coefficient table; `tile` is also the fixed size.
struct ResidentOffsets {
  int64_t red, fin, tile;
};
template <typename A>
__host__ __device__ inline ResidentOffsets ResidentSections(const StatsPlan& p) {
  ResidentOffsets o;
  o.red = Align16(p.c * sizeof(Coef<A>));
  o.fin = o.red + Align16(int64_t(kResidentThreads) * p.vec * sizeof(A));
  o.tile = o.fin + Align16(2 * ResidentQuarters(p) * p.c * sizeof(A));
  return o;
}

template <typename T, typename A, int V>
struct ResidentLayout {
  Coef<A>* coef;
  A* red;
  A* fin;
  Vec<T, V>* tile;
  __device__ ResidentLayout(const StatsPlan& p, unsigned char* smem) {
    const ResidentOffsets o = ResidentSections<A>(p);
    coef = reinterpret_cast<Coef<A>*>(smem);
    red = reinterpret_cast<A*>(smem + o.red);
    fin = reinterpret_cast<A*>(smem + o.fin);
    tile = reinterpret_cast<Vec<T, V>*>(smem + o.tile);
  }
};

template <typename T, typename A>
int64_t ResidentFixedBytes(const StatsPlan& p) {
  return ResidentSections<A>(p).tile;
}
template <typename T, typename A>
int64_t ResidentSharedBytes(const StatsPlan& p) {
  return ResidentFixedBytes<T, A>(p) + p.resident_rows * p.c * int64_t(sizeof(T)) * p.arrays;
}

// StoreVec with the evict-first hint (st.global.cs): outputs are not re-read here, so they
// should not push out of L2 the inputs the apply phase still re-reads.
template <typename T, int V>
__device__ __forceinline__ void StoreVecStreaming(T* p, const Vec<T, V>& value) {
  using R = typename RawWord<sizeof(T) * V>::type;
  R raw;
  memcpy(&raw, &value, sizeof(raw));
  __stcs(reinterpret_cast<R*>(p), raw);
}

// Rows first, first + step, ... (count of them; step may be negative) in batches of
// kResidentUnroll: load(row, u) for the whole batch, then use(row, u), so that each thread
// keeps a batch of loads in flight.
template <typename Load, typename Use>
__device__ __forceinline__ void SweepRows(int64_t first, int64_t count, int64_t step, Load&& load,
                                          Use&& use) {
  int64_t m = 0;
  for (; m + kResidentUnroll <= count; m += kResidentUnroll) {
#pragma unroll
    for (int u = 0; u < kResidentUnroll; ++u) load(first + (m + u) * step, u);
#pragma unroll
    for (int u = 0; u < kResidentUnroll; ++u) use(first + (m + u) * step, u);
  }
  for (; m < count; ++m) {
    load(first + m * step, 0);
    use(first + m * step, 0);
  }
}

// How many of rows first, first + step, ... lie below `end`.
__device__ __forceinline__ int64_t RowsBelow(int64_t first, int64_t end, int64_t step) {
  return first < end ? (end - first + step - 1) / step : 0;
}

// Forward (kGrad = false: out = y, fp's statistics written) or gradient (out = dx, gp's sums
// written) of the groups of plan p (path kResident), in one cooperative launch of p.blocks()
// CTAs, in waves of p.slice_groups groups: in wave w, CTA b holds part b % p.chunks of group
// w * p.slice_groups + b / p.chunks (nothing past the last group). Several waves when one
// wave's rows beyond shared memory would not fit in L2 (PlanResident): each wave's apply then
// re-reads its streamed rows from L2 rather than DRAM, for one grid barrier more per wave.
// `partial`: 2 * blocks * C sums per wave.
template <typename T, typename A, int V, bool kGrad>
__global__ void __launch_bounds__(kResidentThreads, 1)
    ResidentKernel(StatsPlan p, const T* __restrict__ x, const T* __restrict__ dy,
                   T* __restrict__ out, ForwardParams<A> fp, GradientParams<A> gp, A* partial) {
  JAXMPS_DYNAMIC_SHARED(smem);
  const ResidentLayout<T, A, V> sh(p, smem);
  const int t = threadIdx.x, lanes = int(p.lanes), step = ResidentStep(p);
  const int lane = t % lanes, phase = t / lanes;
  const bool active = phase < step;
  const int64_t c = p.c, blocks = gridDim.x, b = blockIdx.x;
  const int64_t part = b % p.chunks;
  const int64_t r0 = min(p.rows, part * p.chunk_rows), r1 = min(p.rows, r0 + p.chunk_rows);
  const int64_t rs = max(r0, r1 - p.resident_rows);  // rows [rs, r1) stay in shared memory
  const int64_t tile_rows = p.resident_rows;
  auto tile_at = [&](int64_t r, int array) -> Vec<T, V>& {
    return sh.tile[(array * tile_rows + (r - rs)) * lanes + lane];
  };
  for (int64_t wave = 0, g0 = 0; g0 < p.groups; ++wave, g0 += p.slice_groups) {
    // The group is CTA-uniform, so CTAs past the last group skip whole phases (and their
    // __syncthreads) but still take every grid barrier.
    const int64_t g = g0 + b / p.chunks;
    const bool in_wave = g < p.groups;
    A* const wave_partial = partial + wave * 2 * blocks * c;
    const int64_t group_base = g * p.rows * c;  // element (row 0, channel 0) of group g
    const int64_t base = group_base + lane * V; // element (row 0, this lane's channels)
    const int64_t stat0 = p.per_image ? g * c : 0;  // statistic of channel 0
    // Partial sums of the group's first CTA in this wave's table.
    const int64_t first_of_group = (b / p.chunks) * p.chunks;

    // ---- 1. partial sums over the CTA's rows; the back rows are kept in shared memory ------
    Vec<T, V> xv[kResidentUnroll], gv[kResidentUnroll];
    A ref[V], rstd[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      ref[e] = A(0), rstd[e] = A(1);
      if (!in_wave) continue;
      const int64_t k = stat0 + lane * V + e;
      if constexpr (kGrad) {
        ref[e] = gp.mean[k];
        rstd[e] = RstdOf(gp, k);
      } else {
        ref[e] = ToAcc(x[base + e]);  // shift: row 0 of the group (see PartialKernel)
      }
    }
    A acc[2][V] = {};
    auto add = [&](int64_t, int u) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if constexpr (kGrad) {
          const A gg = ToAcc(gv[u].v[e]);
          acc[0][e] += gg;
          acc[1][e] += gg * (ToAcc(xv[u].v[e]) - ref[e]) * rstd[e];
        } else {
          const A d = ToAcc(xv[u].v[e]) - ref[e];
          acc[0][e] += d;
          acc[1][e] += d * d;
        }
      }
    };
    auto load_global = [&](int64_t r, int u) {
      xv[u] = LoadVec<T, V>(x + base + r * c);
      if constexpr (kGrad) gv[u] = LoadVec<T, V>(dy + base + r * c);
    };
    auto load_kept = [&](int64_t r, int u) {
      xv[u] = tile_at(r, 0);
      if constexpr (kGrad) gv[u] = tile_at(r, 1);
    };
    const int64_t kept = RowsBelow(rs + phase, r1, step);
    if (in_wave) {
      if (active) {
        // The kept rows go straight to shared memory, all of them in flight at once, while the
        // streamed rows are summed from registers (and are the most recent reads when the apply
        // re-reads them from L2). Evict-first: the kept rows are never re-read from global memory,
        // so they should not take L2 space from the streamed rows (measured on an H200 at N=32,
        // 64x64, C=128: DRAM bytes unchanged within 1%, L2 already kept what it could; the hint
        // states the intent and costs nothing).
        // With p.kept_batches > 1 the kept rows are copied in that many commit groups and each
        // is summed as soon as it has landed, so that the sums of the first overlap the copies
        // of the last instead of all waiting for the whole tile. The rows are added in the same
        // order either way (the same bits).
        constexpr L2Policy kOnce = L2Policy::kEvictFirst;
        const int batches = p.kept_batches;
        auto batch_begin = [&](int j) { return kept * j / batches; };
        for (int j = 0; j < batches; ++j) {
          for (int64_t m = batch_begin(j); m < batch_begin(j + 1); ++m) {
            const int64_t r = rs + phase + m * step;
            CopyToSharedAsync<kOnce, T, V>(&tile_at(r, 0), x + base + r * c);
            if constexpr (kGrad) CopyToSharedAsync<kOnce, T, V>(&tile_at(r, 1), dy + base + r * c);
          }
          CommitCopiesToShared();
        }
        SweepRows(r0 + phase, RowsBelow(r0 + phase, rs, step), step, load_global, add);
        for (int j = 0; j < batches; ++j) {
          WaitCopiesToShared(batches - 1 - j);  // batch j has landed (groups land in order)
          SweepRows(rs + phase + batch_begin(j) * step, batch_begin(j + 1) - batch_begin(j), step,
                    load_kept, add);
        }
      }

      // CTA totals: a fixed pairwise tree over the row phases (log2(step) roundings deep: a
      // running sum over up to 512 phases measurably drifted from the reference in float32),
      // then the CTA's partials.
      for (int s = 0; s < 2; ++s) {
        if (active) {
#pragma unroll
          for (int e = 0; e < V; ++e) sh.red[t * V + e] = acc[s][e];  // = red[phase * c + slot]
        }
        __syncthreads();
        for (int len = step; len > 1;) {
          const int half = (len + 1) / 2;
          for (int64_t i = t; i < int64_t(len - half) * c; i += kResidentThreads) {
            sh.red[i] += sh.red[i + half * c];
          }
          __syncthreads();
          len = half;
        }
        for (int64_t slot = t; slot < c; slot += kResidentThreads) {
          wave_partial[(s * blocks + b) * c + slot] = sh.red[slot];
        }
        __syncthreads();
      }
    }  // in_wave

    GridSync();

    if (in_wave) {
      // ---- 2. the group's statistics: its CTAs' partials in order, the same in every CTA ----
      const int64_t quarters = ResidentQuarters(p);
      for (int64_t i = t; i < quarters * c; i += kResidentThreads) {
        const int64_t q = i / c, slot = i % c;
        const int64_t j0 = q * p.chunks / quarters, j1 = (q + 1) * p.chunks / quarters;
        // Loads in batches of kBatch (one L2 round trip each), added in order.
        constexpr int kBatch = 8;
        const A* p0 = wave_partial + first_of_group * c + slot;
        const A* p1 = wave_partial + (blocks + first_of_group) * c + slot;
        A s0 = 0, s1 = 0;
        int64_t j = j0;
        for (; j + kBatch <= j1; j += kBatch) {
          A v0[kBatch], v1[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            v0[u] = LoadCoherent(p0 + (j + u) * c);
            v1[u] = LoadCoherent(p1 + (j + u) * c);
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            s0 += v0[u];
            s1 += v1[u];
          }
        }
        for (; j < j1; ++j) {
          s0 += LoadCoherent(p0 + j * c);
          s1 += LoadCoherent(p1 + j * c);
        }
        sh.fin[i] = s0;
        sh.fin[quarters * c + i] = s1;
      }
      __syncthreads();
      ForwardParams<A> fp_own = fp;
      GradientParams<A> gp_own = gp;
      if (part != 0) {  // the group's first CTA writes the statistics outputs
        fp_own.mean_out = nullptr;
        gp_own.sum_g_out = nullptr;
      }
      for (int64_t slot = t; slot < c; slot += kResidentThreads) {
        A s0 = 0, s1 = 0;
        for (int64_t q = 0; q < quarters; ++q) {
          s0 += sh.fin[q * c + slot];
          s1 += sh.fin[(quarters + q) * c + slot];
        }
        const int64_t k = stat0 + slot;
        if constexpr (kGrad) {
          sh.coef[slot] = GradientCoef(p, gp_own, k, s0, s1);
        } else {  // sums shifted by row 0 of the group, as on the chunked path
          sh.coef[slot] =
              ForwardCoefFromShiftedSums(p, fp_own, k, ToAcc(x[group_base + slot]), s0, s1);
        }
      }
      __syncthreads();
    }  // in_wave

    // ---- 3. apply: the streamed rows newest first (L2), then the shared-memory rows --------
    if (in_wave && active) {
      Coef<A> cf[V];
#pragma unroll
      for (int e = 0; e < V; ++e) cf[e] = sh.coef[lane * V + e];
      auto store = [&](int64_t r, int u) {
        StoreVecStreaming<T, V>(out + base + r * c,
                                ApplyCoef<T, A, V, kGrad>(cf, xv[u], kGrad ? gv[u] : xv[u]));
      };
      // Streamed rows first, newest first, while L2 still holds them (measured on an H200: with
      // the kept rows' outputs written first, the forward re-read 32 MB of x from DRAM).
      const int64_t streamed = RowsBelow(r0 + phase, rs, step);
      if (streamed > 0) {
        SweepRows(r0 + phase + (streamed - 1) * step, streamed, -int64_t(step), load_global, store);
      }
      SweepRows(rs + phase, kept, step, load_kept, store);
    }  // in_wave && active
  }  // waves
}

// ---- host side ------------------------------------------------------------------------------

// CTAs of ResidentKernel<T, A, V, kGrad> with `smem` bytes each that the current device holds
// at once (0: none), cached per (device, kernel, smem): the occupancy query is not free.
template <typename T, typename A, int V, bool kGrad>
int64_t ResidentCapacity(const DeviceLimits& limits, int64_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t>, int64_t> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, smem);
  auto it = cache.find(key);
  if (it == cache.end()) {
    const auto kernel = ResidentKernel<T, A, V, kGrad>;
    const int per_sm = AllowSharedMemory("stats", kernel, smem).success()
                           ? MaxActiveBlocksPerSM(kernel, kResidentThreads, smem)
                           : 0;
    it = cache.emplace(key, int64_t(per_sm) * limits.sm_count).first;
  }
  return it->second;
}

// Waves of the resident path: by the L2 rule of PlanResident (unset, or
// JAXMPS_CUDA_RESIDENT_WAVES=l2 or any value other than a count), or =1..kResidentMaxWaves a
// fixed count (returned; 0 means the rule). At N=32, 64x64, C=128 NHWC on an H100 the rule
// gives instance norm's forward one wave and its gradient two, in both dtypes. Measured there
// in two sweeps, forward+backward ms (benchmarks/gpu/sweep_waves.json / sweep_prefetch_h100.json):
// float32 0.197 / 0.191 in one wave, 0.189 / 0.188 by the rule, 0.188 / 0.189 / 0.199 in
// 2 / 3 / 4 (first sweep); bfloat16 0.106 / 0.107, 0.106 / 0.109, 0.112 / 0.133 / 0.156. Nsight
// Compute: the float32 gradient in two waves reads 164 MB of DRAM instead of 215 (98 us
// instead of 104). Natively checked against the reference by
// tests/test_norm_native.py::test_instance_norm_in_resident_waves.
constexpr int64_t kResidentMaxWaves = 8;
inline int64_t ResidentWavesKnob() {
  const int64_t n = IntKnob("JAXMPS_CUDA_RESIDENT_WAVES");  // "l2" or unset: 0
  return n >= 1 && n <= kResidentMaxWaves ? n : 0;
}
// Commit groups of the kept-row copies, each summed once it has landed
// (StatsPlan::kept_batches): JAXMPS_CUDA_RESIDENT_BATCHES=2..kResidentMaxBatches; unset or
// anything else: 1, the whole tile waited for at once. A benchmarking knob, not yet measured
// on a GPU (scripts/gpu_knob_sweep.py --knob JAXMPS_CUDA_RESIDENT_BATCHES=1,2,4,8).
constexpr int kResidentMaxBatches = 8;  // cp.async.wait_group takes 0..7
inline int ResidentBatchesKnob() {
  const int n = IntKnob("JAXMPS_CUDA_RESIDENT_BATCHES");
  return n >= 1 && n <= kResidentMaxBatches ? n : 1;
}
// The L2 rule's share of L2 that one wave's streamed rows may take (the rest holds what the
// kernel writes meanwhile, and other data).
constexpr double kResidentL2Share = 0.75;

// The resident plan for `base` (a statistics plan's shape fields) with vectors of `vec`
// channels, if the device and shape allow it: NHWC, C a multiple of vec with at most
// kResidentThreads vectors per row, cooperative launches, and a CTA per SM for every group of
// a wave. Instance norm's groups (images) may run in several waves, each spread over all the
// CTAs (ResidentWavesKnob): with one wave, the rows beyond shared memory (the N=32, 64x64,
// C=128 float32 gradient: 80% of x and dy) are re-read at apply from L2 only as far as L2
// holds them, the rest from DRAM; a wave of fewer groups keeps more of each in shared memory.
template <typename T, typename A>
bool PlanResident(const StatsPlan& base, int vec, const DeviceLimits& limits, StatsPlan* out) {
  if (!base.channels_last || !limits.cooperative || base.c % vec != 0 ||
      base.c / vec > kResidentThreads) {
    return false;
  }
  StatsPlan p = base;
  p.path = StatsPath::kResident;
  p.vec = vec;
  p.lanes = int(p.c / vec);
  p.cblocks = 1;
  p.groups = p.per_image ? p.n : 1;
  p.rows = p.per_image ? p.hw : p.n * p.hw;
  p.sums = 2;
  p.group_begin = 0, p.group_end = p.groups;
  const int64_t row_bytes = p.c * int64_t(sizeof(T)) * p.arrays;
  const int64_t fixed = ResidentFixedBytes<T, A>(p);
  if (fixed >= limits.max_smem_per_block) return false;
  const int64_t max_resident_rows = (limits.max_smem_per_block - fixed) / row_bytes;
  p.resident_rows = max_resident_rows;
  int64_t capacity = 0;
  (void)DispatchVector<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t smem = ResidentSharedBytes<T, A>(p);
    capacity = p.arrays == 2 ? ResidentCapacity<T, A, V, true>(limits, smem)
                             : ResidentCapacity<T, A, V, false>(limits, smem);
    return ffi::Error::Success();
  });
  // Waves of `wave_groups` groups: chunks per group, rows per chunk, rows kept per CTA.
  auto shape = [&](int64_t wave_groups, StatsPlan* q) {
    const int64_t per_group = capacity / wave_groups;
    if (per_group < 1) return false;
    q->slice_groups = wave_groups;
    q->chunks = std::max<int64_t>(
        1, std::min(per_group, CeilDiv(q->rows, kResidentMinSteps * ResidentStep(*q))));
    q->chunk_rows = CeilDiv(q->rows, q->chunks);
    q->resident_rows = std::min(max_resident_rows, q->chunk_rows);
    return true;
  };
  // Bytes of one wave's rows that do not stay in shared memory (re-read at apply).
  auto streamed = [&](const StatsPlan& q) {
    return double(q.slice_groups) *
           double(std::max<int64_t>(0, q.rows - q.chunks * q.resident_rows)) * double(row_bytes);
  };
  if (!shape(p.groups, &p)) return false;  // one wave must fit (else a cluster/chunked path)
  const int64_t knob = ResidentWavesKnob();
  int64_t waves = knob > 0 ? knob : 1;
  if (knob == 0) {
    while (waves < std::min(p.groups, kResidentMaxWaves) &&
           streamed(p) > kResidentL2Share * double(limits.l2_bytes)) {
      ++waves;
      (void)shape(CeilDiv(p.groups, waves), &p);
    }
  } else {
    (void)shape(CeilDiv(p.groups, std::min(waves, p.groups)), &p);
  }
  p.kept_batches = ResidentBatchesKnob();
  *out = p;
  return true;
}

// Forward (kGrad = false: x -> out = y) or gradient (dy, x -> out = dx) on the resident path;
// *refused: the driver would not co-schedule the grid and nothing ran (LaunchCooperative).
template <typename T, typename A, int V, bool kGrad>
ffi::Error LaunchResident(std::string_view op, cudaStream_t stream,
                          ffi::ScratchAllocator& scratch, const StatsPlan& p, const T* x,
                          const T* dy, T* out, const ForwardParams<A>& fp,
                          const GradientParams<A>& gp, bool* refused) {
  const auto kernel = ResidentKernel<T, A, V, kGrad>;
  const int64_t smem = ResidentSharedBytes<T, A>(p);
  JAXMPS_RETURN_IF_ERROR(AllowSharedMemory(op, kernel, smem));
  A* partial = nullptr;
  JAXMPS_RETURN_IF_ERROR(
      AllocateScratch(scratch, op, 2 * p.blocks() * p.c * p.slices(), &partial));  // per wave
  return LaunchCooperative(op, kGrad ? "the resident gradient kernel" : "the resident forward kernel",
                           kernel, p.blocks(), kResidentThreads, smem, stream, refused, p, x,
                           dy, out, fp, gp, partial);
}

}  // namespace jaxmps::cuda
