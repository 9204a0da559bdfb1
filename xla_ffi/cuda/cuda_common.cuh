// CUDA backend foundations shared by every .cu: storage types for the DispatchFloat tags,
// vector loads/stores, launch-error and scratch helpers returning ffi::Error, device limits.
#pragma once

#ifdef JAXMPS_CUDA_EMU
#include "emulator/cuda_emu.h"  // the same kernels on host threads (tests without a GPU)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>
#include <type_traits>

#include "jaxmps/ffi_common.h"

#ifdef JAXMPS_CUDA_EMU
// The emulator runs the handlers as XLA:CPU custom calls, which have no stream: decode one as
// null instead of asking XLA for it.
template <>
struct xla::ffi::CtxDecoding<xla::ffi::PlatformStream<cudaStream_t>> {
  using Type = cudaStream_t;
  static std::optional<Type> Decode(const XLA_FFI_Api*, XLA_FFI_ExecutionContext*,
                                    DiagnosticEngine&) {
    return nullptr;
  }
};
#endif

namespace jaxmps::cuda {

// ---- storage and accumulation types ---------------------------------------------------------

template <ffi::DataType dt>
struct Storage;
template <>
struct Storage<ffi::DataType::F16> {
  using type = __half;
};
template <>
struct Storage<ffi::DataType::BF16> {
  using type = __nv_bfloat16;
};
template <>
struct Storage<ffi::DataType::F32> {
  using type = float;
};
template <>
struct Storage<ffi::DataType::F64> {
  using type = double;
};

// T: element type in memory; Acc: arithmetic type (float32, float64 for float64 data), which
// is also the type of parameters and statistics (ParamDtype).
template <typename Tag>
struct Types {
  using T = typename Storage<Tag::value>::type;
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
};

__device__ __forceinline__ float ToAcc(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToAcc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToAcc(float v) { return v; }
__device__ __forceinline__ double ToAcc(double v) { return v; }

template <typename T, typename A>
__device__ __forceinline__ T FromAcc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// powf for the rare bases (0, negative, inf, NaN), out of line so that its ~100 instructions
// do not sit in every unrolled row of the streaming kernels' loops (instruction-cache
// footprint).
__device__ __noinline__ inline float PowNegEdge(float t, float beta) { return powf(t, -beta); }

// The hardware's approximate reciprocal and reciprocal square root (MUFU.RCP / MUFU.RSQ, within
// 1-2 ulp), flushing subnormal inputs: __fdividef(1, t) and rsqrtf add a rescaling of subnormal
// t (~5 instructions each, sm_90 SASS) that NegPower does not need, since it sends t below the
// smallest normal float to powf.
#ifdef JAXMPS_CUDA_EMU
// Exact values, but a subnormal input reads as zero (.ftz), as on the GPU.
inline float FlushSubnormal(float t) { return std::fpclassify(t) == FP_SUBNORMAL ? 0.0f * t : t; }
inline float RcpApprox(float t) { return 1.0f / FlushSubnormal(t); }
inline float RsqrtApprox(float t) { return 1.0f / std::sqrt(FlushSubnormal(t)); }
#else
__device__ __forceinline__ float RcpApprox(float t) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
}
__device__ __forceinline__ float RsqrtApprox(float t) {
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
}
#endif

// NegPower's beta decided at run time (per launch), as opposed to a compiled form kQ = 4 beta.
constexpr int kRuntimeBeta = -1;

// t^-beta (and t^(-beta-1), which every gradient needs) for the window norms' policies.
// Where beta = whole + quarters/4 (0 <= whole <= kMaxWhole) the power is a product of the
// hardware 1/t and rsqrt(t) (a few ulp). Float's exp2(-beta * log2 t) compiles to ~35
// instructions (a log2 polynomial, range checks) and was, with the gradients' correctly
// rounded division by t, about 40% of the streaming window kernels' instructions (sm_90
// SASS). MPS's defaults (5 for spatial and cross-channel, 0.5 for local contrast) and 0.75
// are of this form; other beta keep exp2/log2, inline (as a call, it made the register-heavy
// gradient loops save registers around it: more spills). Normal positive finite t only:
// anything else goes through powf, so edge cases match jnp.power.
// kQ = kRuntimeBeta: the form is chosen on the host (Make) and is uniform across a launch; its
// squarings and quarter roots are still predicated per element (~18 instructions for beta 5,
// the form's flags re-tested because predicate registers are few). kQ >= 0 compiles the form
// beta = kQ / 4 in (Compiled): 1/t^5 is then one MUFU.RCP and three multiplies. The products
// are the same operations in the same order either way, but nvcc may fuse multiplies and adds
// around them differently once beta is a constant: on an H100 the two differ in the last bit
// (each is still bitwise repeatable; the emulator, which fuses nothing, gives equal bits).
template <typename A, int kQ = kRuntimeBeta>
struct NegPower {
  static constexpr int kMaxWhole = 15;  // 1/t to the whole power by four squarings
  static_assert(kQ == kRuntimeBeta || (kQ >= 0 && kQ < 4 * (kMaxWhole + 1)));
  A beta = A(0);
  int whole = -1;    // -1: generic (exp2/log2)
  int quarters = 0;  // 0..3

  static NegPower Make(double beta) {
    NegPower p;
    p.beta = A(beta);
    const double q = 4.0 * beta;
    if (beta >= 0 && beta < kMaxWhole + 1 && q == std::nearbyint(q)) {
      p.whole = int(std::floor(beta));
      p.quarters = int(q) - 4 * p.whole;
    }
    return p;
  }

  // Whether beta is the form q / 4.
  bool Is(int q) const { return whole >= 0 && 4 * whole + quarters == q; }
  // This power with its form compiled in (Is(Q) must hold).
  template <int Q>
  NegPower<A, Q> Compiled() const {
    NegPower<A, Q> p;
    p.beta = beta, p.whole = whole, p.quarters = quarters;
    return p;
  }

  // t^-beta; with `next`, also *next = t^(-beta-1).
  __device__ __forceinline__ A Of(A t, A* next = nullptr) const {
    constexpr bool kFixed = kQ != kRuntimeBeta;
    const int w = kFixed ? kQ / 4 : whole;
    const int qu = kFixed ? kQ % 4 : quarters;
    A v;
    if constexpr (std::is_same_v<A, double>) {
      v = pow(t, -beta);
    } else {
      if (!(t >= 1.17549435e-38f && t < INFINITY)) {  // not a normal positive float
        v = PowNegEdge(t, beta);
      } else if (w < 0) {
        v = exp2f(-beta * log2f(t));
      } else {
        const A r = RcpApprox(t);
        v = A(1);
        A p = r;  // r^(2^b)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          if (w & (1 << b)) v *= p;
          p *= p;
        }
        if (qu != 0) {
          const A h = RsqrtApprox(t);  // t^-1/2
          if (qu == 2) {
            v *= h;  // the t^-1/4 root only where it is used (not for LCN's default 0.5)
          } else {
            const A h2 = h * RsqrtApprox(h);  // t^-1/4
            v *= qu == 1 ? h2 : h * h2;
          }
        }
        if (next) *next = v * r;
        return v;
      }
    }
    if (next) *next = v / t;
    return v;
  }
};

// The value of benchmarking knob (environment variable) `name`, "" when unset. Read at each
// launch, so that one process can time several settings.
inline std::string_view Knob(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string_view() : std::string_view(value);
}
// Knob `name` read as an integer (atoi); 0 when unset or not a number. Callers check the range.
inline int IntKnob(const char* name) {
  const std::string_view v = Knob(name);
  return v.empty() ? 0 : std::atoi(v.data());  // getenv's string: terminated
}

// Whether a window launch takes its policy's compiled beta form (Policy::Compiled: beta is the
// op's MPS default). JAXMPS_CUDA_COMPILED_BETA=0 turns the compiled kernels off, so that a
// benchmark can compare the two in one process.
template <typename Policy>
bool UseCompiledBeta(const Policy& pol) {
  return pol.Compilable() && Knob("JAXMPS_CUDA_COMPILED_BETA") != "0";
}

#ifdef JAXMPS_CUDA_EMU
// Launches of kernels with a compiled beta form: lets the emulator tests tell which ran.
inline std::atomic<int64_t> compiled_beta_launches{0};
#endif

// ---- vectors: V consecutive elements moved with one 2/4/8/16-byte access ---------------------

template <int Bytes>
struct RawWord;
template <>
struct RawWord<2> {
  using type = unsigned short;
};
template <>
struct RawWord<4> {
  using type = unsigned int;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<16> {
  using type = uint4;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> LoadVec(const T* p) {
  using R = typename RawWord<sizeof(T) * V>::type;
  R raw = __ldg(reinterpret_cast<const R*>(p));
  Vec<T, V> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, V>& value) {
  using R = typename RawWord<sizeof(T) * V>::type;
  R raw;
  memcpy(&raw, &value, sizeof(raw));
  *reinterpret_cast<R*>(p) = raw;
}

// ---- asynchronous global -> shared copies (sm_80+ cp.async) ----------------------------------
// CopyToSharedAsync starts a copy of one vector into shared memory without staging it in
// registers, so a thread can have many in flight. CommitCopiesToShared closes a group of the
// copies started since the last commit; WaitCopiesToShared(n) waits until at most the newest n
// groups are still in flight, WaitAllCopiesToShared for every copy. A thread may then read what
// it copied itself with no barrier. Vectors of 2 bytes copy synchronously (cp.async moves 4, 8
// or 16). The emulator lands each group only when a wait allows it (cuda_emu.h), so reading a
// copy too early reads stale memory there as it can on a GPU.
// kEvictFirst marks the source lines evict-first in L2: for data never re-read from global
// memory, which should not take L2 space from data that is.
enum class L2Policy { kNormal, kEvictFirst };

template <L2Policy kPolicy, typename T, int V>
__device__ __forceinline__ void CopyToSharedAsync(Vec<T, V>* dst, const T* src) {
  constexpr int kBytes = int(sizeof(T)) * V;
#ifdef JAXMPS_CUDA_EMU
  if constexpr (kBytes >= 4) {
    emu::CopyAsync(dst, src, kBytes);
    return;
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBytes >= 4) {
    const unsigned d = unsigned(__cvta_generic_to_shared(dst));
    // .cg (L2 only) for whole 16-byte vectors, .ca (which also allows L1) for narrower ones:
    // .cg takes only 16.
    if constexpr (kPolicy == L2Policy::kEvictFirst && kBytes == 16) {
      asm volatile(
          "{\n.reg .b64 pol;\n"
          "createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
          "cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, pol;\n}\n" ::"r"(d),
          "l"(src)
          : "memory");
    } else if constexpr (kPolicy == L2Policy::kEvictFirst) {
      asm volatile(
          "{\n.reg .b64 pol;\n"
          "createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
          "cp.async.ca.shared.global.L2::cache_hint [%0], [%1], %2, pol;\n}\n" ::"r"(d),
          "l"(src), "n"(kBytes)
          : "memory");
    } else if constexpr (kBytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src),
                   "n"(kBytes)
                   : "memory");
    }
    return;
  }
#endif
  *dst = LoadVec<T, V>(src);
}

// CopyToSharedAsync of `src` when `copy`, else zeros into *dst, both without a branch: the
// zero-fill form of cp.async (source size 0 reads nothing, so `src` may then point anywhere).
// The streaming window kernels' rows outside the image are such zeros.
template <typename T, int V>
__device__ __forceinline__ void CopyOrZeroToSharedAsync(Vec<T, V>* dst, const T* src, bool copy) {
  constexpr int kBytes = int(sizeof(T)) * V;
#ifdef JAXMPS_CUDA_EMU
  if constexpr (kBytes >= 4) {
    emu::CopyAsync(dst, src, copy ? kBytes : 0, kBytes);
    return;
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBytes >= 4) {
    const unsigned d = unsigned(__cvta_generic_to_shared(dst));
    const int src_bytes = copy ? kBytes : 0;
    if constexpr (kBytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                   "r"(src_bytes)
                   : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src),
                   "n"(kBytes), "r"(src_bytes)
                   : "memory");
    }
    return;
  }
#endif
  *dst = copy ? LoadVec<T, V>(src) : Vec<T, V>{};
}

__device__ __forceinline__ void CommitCopiesToShared() {
#ifdef JAXMPS_CUDA_EMU
  emu::CommitCopies();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// `newest_pending` is a runtime value (the wait takes an immediate): 0..7, larger ones wait
// as 7 would (more than needed, never less).
__device__ __forceinline__ void WaitCopiesToShared(int newest_pending) {
#ifdef JAXMPS_CUDA_EMU
  emu::WaitCopies(min(newest_pending, 7));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (newest_pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
  }
#else
  (void)newest_pending;
#endif
}

__device__ __forceinline__ void WaitAllCopiesToShared() {
#ifdef JAXMPS_CUDA_EMU
  emu::WaitAllCopies();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The widest vector (in elements, at most 16 bytes) whose width divides `extent` and whose
// accesses stay aligned at every listed base pointer.
template <typename T>
inline int VectorWidth(int64_t extent, std::initializer_list<const void*> bases) {
  int v = 16 / int(sizeof(T));
  for (; v > 1; v /= 2) {
    bool ok = extent % v == 0;
    for (const void* p : bases) ok = ok && reinterpret_cast<uintptr_t>(p) % (v * sizeof(T)) == 0;
    if (ok) break;
  }
  return v;
}

// Calls f(std::integral_constant<int, V>) for the runtime width v (a power of two, <= 16 bytes).
template <typename T, typename F>
ffi::Error DispatchVector(int v, F&& f) {
  switch (v) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4:
      if constexpr (sizeof(T) * 4 <= 16) return f(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (sizeof(T) * 8 <= 16) return f(std::integral_constant<int, 8>{});
      break;
  }
  return ffi::Error(ffi::ErrorCode::kInternal, "jaxmps: unsupported CUDA vector width");
}

// Dynamic shared memory of a kernel (one declaration per kernel).
#ifdef JAXMPS_CUDA_EMU
#define JAXMPS_DYNAMIC_SHARED(name) unsigned char* name = ::jaxmps::cuda::emu::DynamicShared()
#else
#define JAXMPS_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- thread-block clusters (Hopper, compute capability >= 9.0) -------------------------------
// JAXMPS_CLUSTER_CODE is 1 where cluster kernels have a body: the sm_90+ device pass and the
// emulator. Elsewhere (sm_80 pass, host pass) cluster kernels compile empty and are never
// launched (PlanStats asks for compute capability 9 first).
#if defined(JAXMPS_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define JAXMPS_CLUSTER_CODE 1
#else
#define JAXMPS_CLUSTER_CODE 0
#endif

#if JAXMPS_CLUSTER_CODE
// This CTA's rank in its cluster, a barrier over all threads of the cluster (also orders
// shared-memory writes before it against reads after it), and the address `p` (in this CTA's
// shared memory) has in the shared memory of the CTA of rank `rank`.
#ifdef JAXMPS_CUDA_EMU
__device__ __forceinline__ unsigned ClusterRank() { return emu::ClusterRank(); }
__device__ __forceinline__ void ClusterSync() { emu::ClusterSync(); }
template <typename T>
__device__ __forceinline__ T* ClusterShared(T* p, unsigned rank) {
  return emu::ClusterShared(p, rank);
}
#else
__device__ __forceinline__ unsigned ClusterRank() {
  return cooperative_groups::this_cluster().block_rank();
}
__device__ __forceinline__ void ClusterSync() { cooperative_groups::this_cluster().sync(); }
template <typename T>
__device__ __forceinline__ T* ClusterShared(T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
#endif
#else
// Declared for templates that name them in branches this target never compiles into a kernel.
__device__ __forceinline__ unsigned ClusterRank() { return 0; }
__device__ __forceinline__ void ClusterSync() {}
template <typename T>
__device__ __forceinline__ T* ClusterShared(T* p, unsigned) {
  return p;
}
#endif

// ---- grid-wide barrier (cooperative launches, LaunchCooperative) -----------------------------
// GridSync: a barrier over every thread of the grid that also orders the global-memory writes
// before it against the reads after it. LoadCoherent: a load of data another CTA wrote in the
// same kernel (before a GridSync): from L2, never through the incoherent L1/read-only cache.
#ifdef JAXMPS_CUDA_EMU
__device__ __forceinline__ void GridSync() { emu::ClusterSync(); }  // grid = one cluster there
template <typename T>
__device__ __forceinline__ T LoadCoherent(const T* p) {
  return *p;
}
#else
__device__ __forceinline__ void GridSync() { cooperative_groups::this_grid().sync(); }
template <typename T>
__device__ __forceinline__ T LoadCoherent(const T* p) {
  return __ldcg(p);
}
#endif

// ---- host-side helpers -----------------------------------------------------------------------

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t CeilPow2(int64_t v) {
  int64_t r = 1;
  while (r < v) r *= 2;
  return r;
}

// Reports the last launch error (or an earlier asynchronous failure) as an FFI error.
inline ffi::Error LaunchError(std::string_view op, std::string_view what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return Internal(op, "CUDA launch of ", what, " failed: ", cudaGetErrorName(err), ": ",
                    cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// Grid size for a 1-d launch of `blocks` blocks (CUDA allows up to 2^31 - 1 in x).
inline ffi::Error CheckGrid(std::string_view op, int64_t blocks) {
  if (blocks > int64_t(0x7fffffff)) {
    return InvalidArgument(op, "input too large for one CUDA launch (", blocks, " blocks)");
  }
  return ffi::Error::Success();
}

// kernel<<<blocks, threads, smem, stream>>>(args...), then the launch error as an FFI error.
template <typename... Params, typename... Args>
ffi::Error Launch(std::string_view op, std::string_view what, void (*kernel)(Params...),
                  int64_t blocks, int threads, int64_t smem, cudaStream_t stream,
                  Args&&... args) {
  JAXMPS_RETURN_IF_ERROR(CheckGrid(op, blocks));
  if (blocks == 0) return ffi::Error::Success();
#ifdef JAXMPS_CUDA_EMU
  (void)stream;
  emu::Launch(kernel, blocks, threads, smem, std::forward<Args>(args)...);
#else
  kernel<<<unsigned(blocks), threads, size_t(smem), stream>>>(std::forward<Args>(args)...);
#endif
  return LaunchError(op, what);
}

// The launch configuration of `blocks` CTAs of `threads` with one launch attribute (a cluster
// shape or the cooperative flag), for cudaLaunchKernelEx.
struct ExtendedConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1] = {};
  ExtendedConfig(int64_t blocks, int threads, int64_t smem, cudaStream_t stream,
                 const cudaLaunchAttribute& attr) {
    attribute[0] = attr;
    // Positional: the emulator's gridDim/blockDim macros would rewrite the field names.
    config = cudaLaunchConfig_t{dim3(unsigned(blocks), 1, 1), dim3(unsigned(threads), 1, 1),
                                size_t(smem), stream, attribute, 1};
  }
};

inline cudaLaunchAttribute ClusterAttribute(int cluster) {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = unsigned(cluster);
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

inline cudaLaunchAttribute CooperativeAttribute() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeCooperative;
  a.val.cooperative = 1;
  return a;
}

// How many clusters of `cluster` CTAs (`threads`, `smem` each) of `kernel` the device can hold
// at once; 0 when it cannot run them at all (then take another path). Call AllowSharedMemory
// first.
template <typename Kernel>
int MaxActiveClusters(Kernel kernel, int cluster, int threads, int64_t smem) {
  ExtendedConfig c(cluster, threads, smem, nullptr, ClusterAttribute(cluster));
  int count = 0;
  if (cudaOccupancyMaxActiveClusters(&count, reinterpret_cast<const void*>(kernel), &c.config) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // a refusal is an answer (0), not a sticky error
    return 0;
  }
  return count;
}

// How many CTAs (`threads`, `smem` each) of `kernel` one SM holds at once; 0 when none fits.
// Call AllowSharedMemory first.
template <typename Kernel>
int MaxActiveBlocksPerSM(Kernel kernel, int threads, int64_t smem) {
  int count = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &count, reinterpret_cast<const void*>(kernel), threads, size_t(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

#ifndef JAXMPS_CUDA_EMU  // the emulator launches through emu::LaunchCluster
// cudaLaunchKernelEx(config, kernel, args...), then the launch error as an FFI error. With
// `refused` given, a cooperative grid the driver will not co-schedule sets *refused and returns
// success instead (nothing ran; the caller takes another path).
template <typename... Params, typename... Args>
ffi::Error LaunchExtended(std::string_view op, std::string_view what, void (*kernel)(Params...),
                          const ExtendedConfig& c, bool* refused, Args&&... args) {
  const cudaError_t err = cudaLaunchKernelEx(&c.config, kernel, std::forward<Args>(args)...);
  if (refused != nullptr && err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    *refused = true;
    return ffi::Error::Success();
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Internal(op, "CUDA launch of ", what, " failed: ", cudaGetErrorName(err), ": ",
                    cudaGetErrorString(err));
  }
  return LaunchError(op, what);
}
#endif

// Launch of `blocks` CTAs in clusters of `cluster` consecutive CTAs (blocks % cluster == 0)
// through cudaLaunchKernelEx, then the launch error as an FFI error.
template <typename... Params, typename... Args>
ffi::Error LaunchCluster(std::string_view op, std::string_view what, void (*kernel)(Params...),
                         int64_t blocks, int cluster, int threads, int64_t smem,
                         cudaStream_t stream, Args&&... args) {
  JAXMPS_RETURN_IF_ERROR(CheckGrid(op, blocks));
  if (blocks % cluster != 0) return Internal(op, what, ": grid not a multiple of the cluster");
  if (blocks == 0) return ffi::Error::Success();
#ifdef JAXMPS_CUDA_EMU
  (void)stream;
  emu::LaunchCluster(kernel, blocks, cluster, threads, smem, std::forward<Args>(args)...);
  return LaunchError(op, what);
#else
  return LaunchExtended(op, what, kernel,
                        ExtendedConfig(blocks, threads, smem, stream, ClusterAttribute(cluster)),
                        /*refused=*/nullptr, std::forward<Args>(args)...);
#endif
}

// Cooperative launch of `blocks` CTAs that must all be resident at once (at most
// MaxActiveBlocksPerSM * SMs; the kernel may call GridSync), then the launch error. A grid the
// driver still will not co-schedule (the occupancy query does not see every limit, e.g. MPS
// thread limits) runs nothing and sets *refused.
template <typename... Params, typename... Args>
ffi::Error LaunchCooperative(std::string_view op, std::string_view what,
                             void (*kernel)(Params...), int64_t blocks, int threads, int64_t smem,
                             cudaStream_t stream, bool* refused, Args&&... args) {
  *refused = false;
  JAXMPS_RETURN_IF_ERROR(CheckGrid(op, blocks));
  if (blocks == 0) return ffi::Error::Success();
#ifdef JAXMPS_CUDA_EMU
  (void)stream;  // the emulator runs the whole grid concurrently, as one cluster
  if (emu::CooperativeRefused()) {
    *refused = true;
    return ffi::Error::Success();
  }
  emu::LaunchCluster(kernel, blocks, int(blocks), threads, smem, std::forward<Args>(args)...);
  return LaunchError(op, what);
#else
  return LaunchExtended(op, what, kernel,
                        ExtendedConfig(blocks, threads, smem, stream, CooperativeAttribute()),
                        refused, std::forward<Args>(args)...);
#endif
}

// Typed device workspace from XLA's scratch allocator (freed when the handler returns; XLA's
// allocator orders reuse after the work queued on this stream).
template <typename U>
ffi::Error AllocateScratch(ffi::ScratchAllocator& scratch, std::string_view op, int64_t count,
                           U** out) {
  if (count <= 0) {
    *out = nullptr;
    return ffi::Error::Success();
  }
#ifdef JAXMPS_CUDA_EMU
  // XLA:CPU has no device allocator; the emulator's scratch lives until the process ends.
  (void)scratch, (void)op;
  *out = static_cast<U*>(::operator new(size_t(count) * sizeof(U), std::align_val_t(16)));
  return ffi::Error::Success();
#endif
  // XLA accepts alignments up to 16 bytes here (its allocator hands out 256-byte aligned
  // blocks anyway); asking for more fails the allocation.
  auto mem = scratch.Allocate(size_t(count) * sizeof(U), 16);
  if (!mem.has_value()) {
    return Internal(op, "could not allocate ", count * int64_t(sizeof(U)),
                    " bytes of CUDA scratch memory");
  }
  *out = static_cast<U*>(*mem);
  return ffi::Error::Success();
}

struct DeviceLimits {
  int sm_count = 0;
  int64_t max_smem_per_block = 48 << 10;  // with the opt-in attribute set on the kernel
  int compute_major = 0;                   // >= 9: thread-block clusters (Hopper)
  int64_t l2_bytes = 0;
  bool cooperative = false;                // cooperative launches (grid-wide barriers)
};

// Limits of the current device (the one whose context XLA made current), cached per ordinal.
inline ffi::Error CurrentDeviceLimits(std::string_view op, DeviceLimits* out) {
  static std::mutex mu;
  static DeviceLimits cache[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess || device < 0 || device >= 64) {
    return Internal(op, "cannot query the current CUDA device: ", cudaGetErrorString(err));
  }
  std::lock_guard<std::mutex> lock(mu);
  DeviceLimits& d = cache[device];
  if (d.sm_count == 0) {
    int sms = 0, smem = 0, major = 0, l2 = 0, cooperative = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) !=
            cudaSuccess) {
      return Internal(op, "cannot query CUDA device attributes: ",
                      cudaGetErrorString(cudaGetLastError()));
    }
    d.sm_count = sms;
    d.max_smem_per_block = smem;
    d.compute_major = major;
    d.l2_bytes = l2;
    d.cooperative = cooperative != 0;
  }
  *out = d;
  return ffi::Error::Success();
}

// Lets `kernel` use `bytes` of dynamic shared memory (beyond the default 48 KiB).
template <typename Kernel>
ffi::Error AllowSharedMemory(std::string_view op, Kernel kernel, int64_t bytes) {
  if (bytes <= (48 << 10)) return ffi::Error::Success();
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) {
    return Internal(op, "cannot raise the shared-memory limit to ", bytes,
                    " bytes: ", cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace jaxmps::cuda
