// Metal's small vector types (uint3, float2, ...) for the C++ emulator: .x/.y/.z/.w members,
// component-wise arithmetic and conversions. Plain C++, no Metal macros (the runtime uses it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace jaxmps::metal_emu {

template <typename T, int N>
struct Vec;

// Storage with named components; Vec<T, N> adds the operators on top.
template <typename T>
struct Vec<T, 2> {
  T x{}, y{};
  constexpr Vec() = default;
  constexpr explicit Vec(T s) : x(s), y(s) {}
  constexpr Vec(T a, T b) : x(a), y(b) {}
  template <typename U>
  constexpr explicit Vec(const Vec<U, 2>& v) : x(T(v.x)), y(T(v.y)) {}
  constexpr T& operator[](int i) { return i == 0 ? x : y; }
  constexpr T operator[](int i) const { return i == 0 ? x : y; }
};

template <typename T>
struct Vec<T, 3> {
  T x{}, y{}, z{};
  constexpr Vec() = default;
  constexpr explicit Vec(T s) : x(s), y(s), z(s) {}
  constexpr Vec(T a, T b, T c) : x(a), y(b), z(c) {}
  template <typename U>
  constexpr explicit Vec(const Vec<U, 3>& v) : x(T(v.x)), y(T(v.y)), z(T(v.z)) {}
  constexpr T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
  constexpr T operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }
};

template <typename T>
struct Vec<T, 4> {
  T x{}, y{}, z{}, w{};
  constexpr Vec() = default;
  constexpr explicit Vec(T s) : x(s), y(s), z(s), w(s) {}
  constexpr Vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  template <typename U>
  constexpr explicit Vec(const Vec<U, 4>& v) : x(T(v.x)), y(T(v.y)), z(T(v.z)), w(T(v.w)) {}
  constexpr T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  constexpr T operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};

template <typename T, int N, typename F>
constexpr Vec<T, N> Map2(const Vec<T, N>& a, const Vec<T, N>& b, F f) {
  Vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = f(a[i], b[i]);
  return r;
}

#define JAXMPS_EMU_VEC_OPERATOR(op)                                                       \
  template <typename T, int N>                                                            \
  constexpr Vec<T, N> operator op(const Vec<T, N>& a, const Vec<T, N>& b) {               \
    return Map2(a, b, [](T u, T v) { return T(u op v); });                               \
  }                                                                                       \
  template <typename T, int N>                                                            \
  constexpr Vec<T, N> operator op(const Vec<T, N>& a, T s) { return a op Vec<T, N>(s); }  \
  template <typename T, int N>                                                            \
  constexpr Vec<T, N> operator op(T s, const Vec<T, N>& a) { return Vec<T, N>(s) op a; }  \
  template <typename T, int N>                                                            \
  constexpr Vec<T, N>& operator op##=(Vec<T, N>& a, const Vec<T, N>& b) { return a = a op b; }

JAXMPS_EMU_VEC_OPERATOR(+)
JAXMPS_EMU_VEC_OPERATOR(-)
JAXMPS_EMU_VEC_OPERATOR(*)
JAXMPS_EMU_VEC_OPERATOR(/)
#undef JAXMPS_EMU_VEC_OPERATOR

template <typename T, int N>
constexpr bool operator==(const Vec<T, N>& a, const Vec<T, N>& b) {
  for (int i = 0; i < N; ++i)
    if (!(a[i] == b[i])) return false;
  return true;
}

using uint2 = Vec<uint32_t, 2>;
using uint3 = Vec<uint32_t, 3>;
using uint4 = Vec<uint32_t, 4>;
using int2 = Vec<int32_t, 2>;
using int3 = Vec<int32_t, 3>;
using int4 = Vec<int32_t, 4>;
using float2 = Vec<float, 2>;
using float3 = Vec<float, 3>;
using float4 = Vec<float, 4>;

}  // namespace jaxmps::metal_emu
