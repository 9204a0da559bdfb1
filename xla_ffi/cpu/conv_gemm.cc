// Register-blocked GEMM micro-kernels for the CPU convolution kernels, compiled for AVX-512,
// AVX2+FMA and portable code in one translation unit and chosen once from the CPU's features.
#include "conv_gemm.h"

#include <cstdlib>
#include <cstring>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#define JAXMPS_CONV_X86 1
#else
#define JAXMPS_CONV_X86 0
#endif

namespace jaxmps::cpu {
namespace {

// Accumulator tile helpers shared by both micro-kernel bodies.
template <typename Vec, int MR, int NV>
__attribute__((always_inline)) inline void ZeroTile(Vec (&acc)[MR][NV]) {
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec{};
  }
}

// c[r][j*VW ...] = (accumulate ? c : 0) + acc[r][j]; C rows need only element alignment.
template <typename T, typename Vec, int MR, int NV, int VW>
__attribute__((always_inline)) inline void StoreTile(const Vec (&acc)[MR][NV], T* c,
                                                    int64_t ldc, bool accumulate) {
  typedef T VecU __attribute__((vector_size(VW * sizeof(T)), aligned(sizeof(T))));
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      VecU* dst = reinterpret_cast<VecU*>(c + r * ldc + j * VW);
      *dst = accumulate ? *dst + acc[r][j] : acc[r][j];
    }
  }
}

// MR rows x NV vectors of VW lanes. The accumulators live in registers (MR * NV of them): the
// loops have constant bounds and are fully unrolled, so the compiler keeps acc[][] in
// registers; each step loads NV vectors of B and broadcasts MR scalars of A.
template <typename T, int MR, int NV, int VW>
__attribute__((always_inline)) inline void MicroKernelBody(int64_t kc, const T* a, const T* b,
                                                          T* c, int64_t ldc, bool accumulate) {
  typedef T Vec __attribute__((vector_size(VW * sizeof(T))));
  constexpr int NR = NV * VW;
  Vec acc[MR][NV];
  ZeroTile(acc);
  for (int64_t k = 0; k < kc; ++k) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const Vec*>(b + k * NR + j * VW);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const T ar = a[k * MR + r];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += ar * bv[j];
    }
  }
  StoreTile<T, Vec, MR, NV, VW>(acc, c, ldc, accumulate);
}

#if JAXMPS_CONV_X86
// RowsKernelFn body: as MicroKernelBody, with A read through MR row pointers per tap.
template <typename T, int MR, int NV, int VW>
__attribute__((always_inline)) inline void RowsKernelBody(int64_t taps, int64_t depth,
                                                         const T* const* rows, const T* b,
                                                         T* c, int64_t ldc, bool accumulate) {
  typedef T Vec __attribute__((vector_size(VW * sizeof(T))));
  constexpr int NR = NV * VW;
  Vec acc[MR][NV];
  ZeroTile(acc);
  for (int64_t t = 0; t < taps; ++t, b += depth * NR) {
    const T* a[MR];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) a[r] = rows[t * MR + r];
    for (int64_t k = 0; k < depth; ++k) {
      Vec bv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const Vec*>(b + k * NR + j * VW);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const T ar = a[r][k];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[r][j] += ar * bv[j];
      }
    }
  }
  StoreTile<T, Vec, MR, NV, VW>(acc, c, ldc, accumulate);
}

// 14 x 32 floats: 28 zmm accumulators, 2 B loads + 14 broadcasts per 28 FMAs.
__attribute__((target("avx512f,fma"))) void FloatAvx512(int64_t kc, const float* a,
                                                        const float* b, float* c, int64_t ldc,
                                                        bool accumulate) {
  MicroKernelBody<float, 14, 2, 16>(kc, a, b, c, ldc, accumulate);
}

__attribute__((target("avx512f,fma"))) void FloatRowsAvx512(int64_t taps, int64_t depth,
                                                            const float* const* rows,
                                                            const float* b, float* c,
                                                            int64_t ldc, bool accumulate) {
  RowsKernelBody<float, 14, 2, 16>(taps, depth, rows, b, c, ldc, accumulate);
}

// 6 x 16 floats: 12 ymm accumulators (of 16 registers).
__attribute__((target("avx2,fma"))) void FloatAvx2(int64_t kc, const float* a, const float* b,
                                                   float* c, int64_t ldc, bool accumulate) {
  MicroKernelBody<float, 6, 2, 8>(kc, a, b, c, ldc, accumulate);
}

__attribute__((target("avx2,fma"))) void FloatRowsAvx2(int64_t taps, int64_t depth,
                                                       const float* const* rows, const float* b,
                                                       float* c, int64_t ldc, bool accumulate) {
  RowsKernelBody<float, 6, 2, 8>(taps, depth, rows, b, c, ldc, accumulate);
}

#endif  // JAXMPS_CONV_X86

// 4 x 8 floats in SSE2 (x86-64 baseline) or whatever the default target is.
void FloatPortable(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                   bool accumulate) {
  MicroKernelBody<float, 4, 2, 4>(kc, a, b, c, ldc, accumulate);
}

void FloatRowsPortable(int64_t taps, int64_t depth, const float* const* rows, const float* b,
                       float* c, int64_t ldc, bool accumulate) {
  RowsKernelBody<float, 4, 2, 4>(taps, depth, rows, b, c, ldc, accumulate);
}

#if JAXMPS_CONV_X86
__attribute__((target("avx512f,fma"))) void DoubleAvx512(int64_t kc, const double* a,
                                                         const double* b, double* c,
                                                         int64_t ldc, bool accumulate) {
  MicroKernelBody<double, 12, 2, 8>(kc, a, b, c, ldc, accumulate);
}

__attribute__((target("avx2,fma"))) void DoubleAvx2(int64_t kc, const double* a,
                                                    const double* b, double* c, int64_t ldc,
                                                    bool accumulate) {
  MicroKernelBody<double, 6, 2, 4>(kc, a, b, c, ldc, accumulate);
}

#endif  // JAXMPS_CONV_X86

void DoublePortable(int64_t kc, const double* a, const double* b, double* c, int64_t ldc,
                    bool accumulate) {
  MicroKernelBody<double, 4, 2, 2>(kc, a, b, c, ldc, accumulate);
}

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

Isa DetectIsa() {
  Isa best = Isa::kPortable;
#if JAXMPS_CONV_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && best == Isa::kAvx2) best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("JAXMPS_CONV_ISA");
  if (cap != nullptr) {
    std::string_view v(cap);
    if (v == "portable") best = Isa::kPortable;
    if (v == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
}

}  // namespace

const MicroKernel<float>& FloatMicroKernel() {
  static const MicroKernel<float> kernel = [] {
    switch (DetectIsa()) {
#if JAXMPS_CONV_X86
      case Isa::kAvx512:
        return MicroKernel<float>{14, 32, FloatAvx512, FloatRowsAvx512, "avx512"};
      case Isa::kAvx2: return MicroKernel<float>{6, 16, FloatAvx2, FloatRowsAvx2, "avx2"};
#endif
      default: return MicroKernel<float>{4, 8, FloatPortable, FloatRowsPortable, "portable"};
    }
  }();
  return kernel;
}

const MicroKernel<double>& DoubleMicroKernel() {
  static const MicroKernel<double> kernel = [] {
    switch (DetectIsa()) {
#if JAXMPS_CONV_X86
      // float64 is for checks, not speed: no row-pointer kernels (they need float rows).
      case Isa::kAvx512: return MicroKernel<double>{12, 16, DoubleAvx512, nullptr, "avx512"};
      case Isa::kAvx2: return MicroKernel<double>{6, 8, DoubleAvx2, nullptr, "avx2"};
#endif
      default: return MicroKernel<double>{4, 4, DoublePortable, nullptr, "portable"};
    }
  }();
  return kernel;
}

}  // namespace jaxmps::cpu
