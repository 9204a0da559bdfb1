// Compiles Metal Shading Language kernel sources as C++20 for the emulator: address-space
// qualifiers, attributes, half/bfloat, vector types, math, barriers and SIMD-group functions.
#pragma once

// Every standard header the emulator needs comes first: the address-space macros below
// (`thread`, `device`, ...) would break them.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"
#include "vector_types.h"

// Metal attributes ([[buffer(0)]], [[thread_position_in_grid]], ...) are unknown to g++ and
// ignored: parameters bind by position instead (runtime.h), which is why the kernels list
// buffers in [[buffer(i)]] order, then [[threadgroup(i)]] memory, then JAXMPS_THREAD_ARGS
// (tests/test_metal_kernels.py checks that order in the sources).
#pragma GCC diagnostic ignored "-Wattributes"
#pragma GCC diagnostic ignored "-Wunused-parameter"

// ---- scalar and vector types (global, like Metal's built-in types) ----------------------------

using uint = std::uint32_t;
using ushort = std::uint16_t;
using uchar = std::uint8_t;
using half = _Float16;  // IEEE binary16 with round-to-nearest-even conversions, as Metal's half

// Metal's bfloat (MSL 3.1): the top 16 bits of a float32, round-to-nearest-even conversion.
struct bfloat {
  std::uint16_t bits = 0;
  bfloat() = default;
  explicit bfloat(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = std::uint16_t((u >> 16) | 0x40);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = std::uint16_t(u >> 16);
    }
  }
  operator float() const {
    std::uint32_t u = std::uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

using jaxmps::metal_emu::float2;
using jaxmps::metal_emu::float3;
using jaxmps::metal_emu::float4;
using jaxmps::metal_emu::int2;
using jaxmps::metal_emu::int3;
using jaxmps::metal_emu::int4;
using jaxmps::metal_emu::uint2;
using jaxmps::metal_emu::uint3;
using jaxmps::metal_emu::uint4;

// ---- the metal namespace: math, barriers, SIMD-group functions -------------------------------

namespace metal {

inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
inline float powr(float x, float y) { return std::pow(x, y); }
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <typename T>
inline T abs(T x) {
  return x < T(0) ? T(-x) : x;
}
template <typename T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2,
                                  mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(unsigned(a) | unsigned(b));
}

// All simulated threads of a threadgroup share one OS thread, so memory is coherent and the
// flags need no fence; the barrier itself really waits for every thread.
inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(),
                                unsigned line = __builtin_LINE()) {
  jaxmps::metal_emu::ThreadgroupBarrier(file, line);
}

// A SIMD-group barrier: an exchange of nothing, which waits for every live lane.
inline void simdgroup_barrier(mem_flags, const char* file = __builtin_FILE(),
                              unsigned line = __builtin_LINE()) {
  std::uint64_t active;
  jaxmps::metal_emu::SimdExchange(nullptr, 0, &active, file, line);
}

namespace emu_detail {

// The lanes' values of one SIMD-group function call.
template <typename T>
struct Lanes {
  static_assert(sizeof(T) <= jaxmps::metal_emu::kSimdSlotBytes, "SIMD value too large");
  const unsigned char* slots;
  std::uint64_t active;
  bool live(unsigned lane) const { return lane < 64 && ((active >> lane) & 1); }
  T get(unsigned lane) const {
    T v;
    std::memcpy(&v, slots + lane * jaxmps::metal_emu::kSimdSlotBytes, sizeof(T));
    return v;
  }
  // Metal leaves reads of an inactive lane undefined: return poison (NaN for floats).
  T read(unsigned lane) const {
    if (live(lane)) return get(lane);
    T v;
    std::memset(&v, jaxmps::metal_emu::kPoisonByte, sizeof(T));
    return v;
  }
};

template <typename T>
Lanes<T> Exchange(T value, const char* file, unsigned line) {
  Lanes<T> lanes;
  lanes.slots = jaxmps::metal_emu::SimdExchange(&value, sizeof(T), &lanes.active, file, line);
  return lanes;
}

}  // namespace emu_detail

#define JAXMPS_EMU_WHERE const char *file = __builtin_FILE(), unsigned line = __builtin_LINE()

namespace emu_detail {
inline unsigned CallerLane() { return jaxmps::metal_emu::CurrentThread().lane; }
}  // namespace emu_detail

namespace emu_detail {
// `value` folded with f over the live lanes' values, in lane order.
template <typename T, typename F>
T FoldLanes(const Lanes<T>& lanes, T value, F f) {
  for (unsigned i = 0; i < 64; ++i)
    if (lanes.live(i)) value = f(value, lanes.get(i));
  return value;
}
}  // namespace emu_detail

template <typename T>
T simd_sum(T v, JAXMPS_EMU_WHERE) {
  return emu_detail::FoldLanes(emu_detail::Exchange(v, file, line), T(0),
                               [](T a, T b) { return T(a + b); });
}

template <typename T>
T simd_max(T v, JAXMPS_EMU_WHERE) {
  return emu_detail::FoldLanes(emu_detail::Exchange(v, file, line), v, max<T>);
}

template <typename T>
T simd_min(T v, JAXMPS_EMU_WHERE) {
  return emu_detail::FoldLanes(emu_detail::Exchange(v, file, line), v, min<T>);
}

template <typename T>
T simd_prefix_exclusive_sum(T v, JAXMPS_EMU_WHERE) {
  auto lanes = emu_detail::Exchange(v, file, line);
  T total = T(0);
  for (unsigned i = 0; i < emu_detail::CallerLane(); ++i)
    if (lanes.live(i)) total = T(total + lanes.get(i));
  return total;
}

template <typename T>
T simd_prefix_inclusive_sum(T v, JAXMPS_EMU_WHERE) {
  return T(simd_prefix_exclusive_sum(v, file, line) + v);
}

// Value of lane `source`.
template <typename T>
T simd_shuffle(T v, ushort source, JAXMPS_EMU_WHERE) {
  return emu_detail::Exchange(v, file, line).read(source);
}

template <typename T>
T simd_broadcast(T v, ushort source, JAXMPS_EMU_WHERE) {
  return emu_detail::Exchange(v, file, line).read(source);
}

// Value of lane + delta; the upper `delta` lanes keep their own value (Metal's rule).
template <typename T>
T simd_shuffle_down(T v, ushort delta, JAXMPS_EMU_WHERE) {
  auto lanes = emu_detail::Exchange(v, file, line);
  const unsigned source = emu_detail::CallerLane() + delta;
  return source >= jaxmps::metal_emu::CurrentThread().simd_width ? v : lanes.read(source);
}

// Value of lane - delta; the lower `delta` lanes keep their own value.
template <typename T>
T simd_shuffle_up(T v, ushort delta, JAXMPS_EMU_WHERE) {
  auto lanes = emu_detail::Exchange(v, file, line);
  return emu_detail::CallerLane() < delta ? v : lanes.read(emu_detail::CallerLane() - delta);
}

template <typename T>
T simd_shuffle_xor(T v, ushort mask, JAXMPS_EMU_WHERE) {
  return emu_detail::Exchange(v, file, line).read(emu_detail::CallerLane() ^ mask);
}

inline bool simd_all(bool b, JAXMPS_EMU_WHERE) {
  return emu_detail::FoldLanes(emu_detail::Exchange(b, file, line), true,
                               [](bool a, bool c) { return a && c; });
}

inline bool simd_any(bool b, JAXMPS_EMU_WHERE) {
  return emu_detail::FoldLanes(emu_detail::Exchange(b, file, line), false,
                               [](bool a, bool c) { return a || c; });
}

// True in the lowest live lane.
inline bool simd_is_first(JAXMPS_EMU_WHERE) {
  auto lanes = emu_detail::Exchange(true, file, line);
  for (unsigned i = 0; i < 64; ++i)
    if (lanes.live(i)) return i == emu_detail::CallerLane();
  return false;
}

#undef JAXMPS_EMU_WHERE
}  // namespace metal

// ---- address spaces, function qualifiers, feature macros --------------------------------------

// `threadgroup` also names the [[threadgroup(i)]] attribute, so it cannot expand to nothing:
// `register` is a no-op specifier on parameters that g++ still accepts, and a keyword is a
// valid (ignored) attribute name. Threadgroup memory must therefore be a kernel parameter, as
// jaxmps kernels do; a threadgroup variable declared in a kernel body would not be shared.
#pragma GCC diagnostic ignored "-Wregister"
#define kernel
#define device
#define threadgroup register
#define thread
#define constant const

#define __METAL_VERSION__ 310
#define __HAVE_BFLOAT__ 1

// Kernel instantiation (see kernels/common.h for the Metal versions): register each kernel
// under its Metal function name.
#define JAXMPS_EMU_CAT2(a, b) a##b
#define JAXMPS_EMU_CAT(a, b) JAXMPS_EMU_CAT2(a, b)
#define JAXMPS_INSTANTIATE_KERNEL(name, T)                                     \
  [[maybe_unused]] static const bool JAXMPS_EMU_CAT(jaxmps_emu_kernel_, __COUNTER__) = \
      ::jaxmps::metal_emu::RegisterKernel<&name<T>>(#name "_" #T);
#define JAXMPS_REGISTER_KERNEL(name)                                           \
  [[maybe_unused]] static const bool JAXMPS_EMU_CAT(jaxmps_emu_kernel_, __COUNTER__) = \
      ::jaxmps::metal_emu::RegisterKernel<&name>(#name);
