// CPU storage types for the four float dtypes (float16/bfloat16 as 16-bit words with exact
// round-to-nearest-even conversions) and the dtype-tag -> storage/accumulator mapping.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "jaxmps/ffi_common.h"

namespace jaxmps::cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float ToFloat(BFloat16 v) { return BitsToFloat(uint32_t(v.bits) << 16); }
inline BFloat16 FromFloatBF16(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}

inline float ToFloat(Half v) {
#if defined(__FLT16_MANT_DIG__)
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
#else
  uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1f,
           man = v.bits & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (man << 13));
  if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp(float(man), -24);
  return BitsToFloat(sign | ((exp + 112) << 23) | (man << 13));
#endif
}
inline Half FromFloatF16(float f) {
#if defined(__FLT16_MANT_DIG__)
  _Float16 h = static_cast<_Float16>(f);
  Half v;
  std::memcpy(&v.bits, &h, 2);
  return v;
#else
  // Portable round-to-nearest-even float -> binary16.
  uint32_t u = FloatToBits(f), sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};
  if (a < 0x38800000u) {  // subnormal or zero
    float r = std::fabs(f) * 16777216.f;  // 2^24
    return {uint16_t(sign | uint32_t(std::nearbyint(r)))};
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return {uint16_t(sign | (m >> 13))};
#endif
}

// Load/store in the accumulation type (float for half types, the type itself otherwise).
inline float Load(const Half& v) { return ToFloat(v); }
inline float Load(const BFloat16& v) { return ToFloat(v); }
inline float Load(const float& v) { return v; }
inline double Load(const double& v) { return v; }

template <typename T>
inline void Store(T* dst, double v) {
  if constexpr (std::is_same_v<T, Half>) {
    *dst = FromFloatF16(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    *dst = FromFloatBF16(static_cast<float>(v));
  } else {
    *dst = static_cast<T>(v);
  }
}

template <ffi::DataType dt>
struct Storage;
template <>
struct Storage<ffi::DataType::F16> {
  using type = Half;
};
template <>
struct Storage<ffi::DataType::BF16> {
  using type = BFloat16;
};
template <>
struct Storage<ffi::DataType::F32> {
  using type = float;
};
template <>
struct Storage<ffi::DataType::F64> {
  using type = double;
};

// Element type, accumulation type (float32, or float64 for float64 data) and parameter type.
template <typename Tag>
struct Types {
  using T = typename Storage<Tag::value>::type;
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using Param = Acc;
};

}  // namespace jaxmps::cpu
