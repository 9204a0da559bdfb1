// Host emulation of the CUDA features the jaxmps CUDA kernels use (thread indices, barriers,
// warp shuffles, dynamic shared memory, launches, the few runtime calls), so the very same
// kernel sources can be checked against the reference on a machine without a GPU.
#pragma once

// The half types' headers (host-usable) come first: they must not see the macros below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// ---- kernel-language keywords (replacing the CUDA headers' host-compiler definitions) --------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__

using std::sqrt;
using std::pow;

// CUDA's device min/max (by value; both operands converted to their common type).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}

// ---- runtime API: the real declarations, defined by cuda_emu.cc --------------------------------
#include <cuda_runtime_api.h>

namespace jaxmps::cuda::emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_idx, block_idx, block_dim, grid_dim;

// What the threads of one block share: barriers, the shuffle mailbox, shared memory.
struct Block {
  explicit Block(int threads, int64_t smem)
      : sync(threads), shared(size_t(smem) + 16), mailbox(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> mailbox;
};
inline thread_local Block* block = nullptr;

// The 16-byte aligned start of a block's dynamic shared memory.
inline unsigned char* SharedBase(Block& b) {
  auto p = reinterpret_cast<uintptr_t>(b.shared.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}
inline unsigned char* DynamicShared() { return SharedBase(*block); }

// What the blocks of one thread-block cluster share: their block states (distributed shared
// memory) and the cluster barrier. A plain launch runs clusters of one block.
struct Cluster {
  Cluster(int size, int threads) : sync(size * threads) {}
  std::barrier<> sync;
  std::vector<std::unique_ptr<Block>> blocks;
};
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;

inline unsigned ClusterRank() { return cluster_rank; }
inline void ClusterSync() { cluster->sync.arrive_and_wait(); }
// The address in block `rank`'s shared memory that `p` has in this block's (map_shared_rank).
template <typename T>
T* ClusterShared(T* p, unsigned rank) {
  const auto offset = reinterpret_cast<unsigned char*>(p) - DynamicShared();
  return reinterpret_cast<T*>(SharedBase(*cluster->blocks[rank]) + offset);
}

// Every lane of the warp posts v and reads the value posted by lane source(own lane).
template <typename T, typename Source>
T ShuffleFrom(T v, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned t = thread_idx.x, warp = t / 32, lane = t % 32;
  std::memcpy(&block->mailbox[t], &v, sizeof(T));
  block->warps[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &block->mailbox[warp * 32 + source(lane)], sizeof(T));
  block->warps[warp]->arrive_and_wait();
  return r;
}

template <typename T>
T ShuffleXor(T v, int offset) {
  return ShuffleFrom(v, [&](unsigned lane) { return lane ^ unsigned(offset); });
}

// CUDA's __shfl_up_sync / __shfl_down_sync within segments of `width` lanes: a
// lane whose source falls outside its segment keeps its own value.
template <typename T>
T ShuffleUp(T v, unsigned delta, int width = 32) {
  return ShuffleFrom(v, [&](unsigned lane) {
    return lane % unsigned(width) >= delta ? lane - delta : lane;
  });
}
template <typename T>
T ShuffleDown(T v, unsigned delta, int width = 32) {
  return ShuffleFrom(v, [&](unsigned lane) {
    return lane % unsigned(width) + delta < unsigned(width) ? lane + delta : lane;
  });
}

// Asynchronous global -> shared copies (cp.async) as the hardware may perform them: late. A
// copy's source bytes are taken when it is issued (the sources are read-only inputs), but
// they reach shared memory only when a wait lets their group land, so a kernel that reads a
// slot before waiting for it reads stale memory here too. Groups are per thread, as on the
// GPU; copies issued after the last commit belong to no group yet (only WaitAll lands them).
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  int size;
};
inline thread_local std::vector<std::vector<PendingCopy>> committed_copies;  // oldest first
inline thread_local std::vector<PendingCopy> open_copies;

// The first `src_size` bytes from src, the rest of `size` zeros (cp.async's zero fill: src is
// not read at all when src_size is 0).
inline void CopyAsync(void* dst, const void* src, int src_size, int size) {
  PendingCopy c{dst, {}, size};
  if (src_size > 0) std::memcpy(c.bytes, src, size_t(src_size));
  open_copies.push_back(c);
}
inline void CopyAsync(void* dst, const void* src, int size) { CopyAsync(dst, src, size, size); }
inline void CommitCopies() {
  committed_copies.push_back(std::move(open_copies));
  open_copies.clear();
}
inline void Land(const std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) std::memcpy(c.dst, c.bytes, size_t(c.size));
}
// cp.async.wait_group n: lands the oldest groups until at most the newest n are pending.
inline void WaitCopies(int newest_pending) {
  const size_t keep = size_t(std::max(newest_pending, 0));
  size_t landed = 0;
  for (; committed_copies.size() - landed > keep; ++landed) Land(committed_copies[landed]);
  committed_copies.erase(committed_copies.begin(), committed_copies.begin() + landed);
}
// cp.async.wait_all: every copy, committed or not.
inline void WaitAllCopies() {
  WaitCopies(0);
  Land(open_copies);
  open_copies.clear();
}

// Whether cooperative launches are refused (test hook jaxmps_cuda_emu_refuse_cooperative, as
// a driver does when it cannot co-schedule the grid).
bool CooperativeRefused();

// A GPU's float arithmetic keeps subnormals (the kernels are not built with -ftz), but XLA:CPU
// runs custom calls with them flushed (MXCSR FTZ/DAZ), which new threads inherit: each
// emulated thread turns the flushing off.
inline void KeepSubnormals() {
#if defined(__SSE__)
  _mm_setcsr(_mm_getcsr() & ~(0x8000u | 0x0040u));  // FTZ, DAZ
#endif
}

// Runs kernel(args...) over `blocks` blocks of `threads` threads in clusters of
// `cluster_size` consecutive blocks: the blocks of one cluster run concurrently (each thread
// on its own host thread), clusters one after another.
template <typename... Params, typename... Args>
void LaunchCluster(void (*kernel)(Params...), int64_t blocks, int cluster_size, int threads,
                   int64_t smem, Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  for (int64_t first = 0; first < blocks; first += cluster_size) {
    Cluster state(cluster_size, threads);
    for (int r = 0; r < cluster_size; ++r)
      state.blocks.push_back(std::make_unique<Block>(threads, smem));
    std::vector<std::thread> pool;
    pool.reserve(size_t(cluster_size) * threads);
    for (int r = 0; r < cluster_size; ++r) {
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          KeepSubnormals();
          thread_idx = {unsigned(t), 0, 0};
          block_idx = {unsigned(first + r), 0, 0};
          block_dim = {unsigned(threads), 1, 1};
          grid_dim = {unsigned(blocks), 1, 1};
          block = state.blocks[r].get();
          cluster = &state;
          cluster_rank = unsigned(r);
          std::apply(kernel, params);
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

// Runs kernel(args...) over `blocks` blocks of `threads` threads, one block at a time.
template <typename... Params, typename... Args>
void Launch(void (*kernel)(Params...), int64_t blocks, int threads, int64_t smem,
            Args&&... args) {
  LaunchCluster(kernel, blocks, 1, threads, smem, std::forward<Args>(args)...);
}

}  // namespace jaxmps::cuda::emu

#define threadIdx (::jaxmps::cuda::emu::thread_idx)
#define blockIdx (::jaxmps::cuda::emu::block_idx)
#define blockDim (::jaxmps::cuda::emu::block_dim)
#define gridDim (::jaxmps::cuda::emu::grid_dim)
#define __syncthreads() (::jaxmps::cuda::emu::block->sync.arrive_and_wait())
#define __shfl_xor_sync(mask, value, offset) (::jaxmps::cuda::emu::ShuffleXor((value), (offset)))
#define __shfl_up_sync(mask, ...) (::jaxmps::cuda::emu::ShuffleUp(__VA_ARGS__))
#define __shfl_down_sync(mask, ...) (::jaxmps::cuda::emu::ShuffleDown(__VA_ARGS__))
