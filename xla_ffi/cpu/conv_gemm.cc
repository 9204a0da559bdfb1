// Register-blocked GEMM micro-kernels for the CPU convolution kernels, compiled for AVX-512,
// AVX2+FMA and portable code in one translation unit and chosen once from the CPU's features.
#include "conv_gemm.h"

#include <cstring>

#include "cpu_isa.h"

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
__attribute__((always_inline)) inline void MicroKernelBody(int64_t kc, const T* a, int64_t lda,
                                                          const T* b, T* c, int64_t ldc,
                                                          bool accumulate) {
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
      const T ar = a[k * lda + r];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += ar * bv[j];
    }
  }
  StoreTile<T, Vec, MR, NV, VW>(acc, c, ldc, accumulate);
}

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

// JAXMPS_TILE defines Name, the MicroKernelFn of an MR x (NV * VW) tile of T compiled with the
// function attributes ATTRS (a target, or nothing for the default target); JAXMPS_TILE_ROWS
// also defines Name##Rows, its RowsKernelFn.
#define JAXMPS_TILE(Name, T, MR, NV, VW, ATTRS)                                             \
  ATTRS void Name(int64_t kc, const T* a, int64_t lda, const T* b, T* c, int64_t ldc,       \
                  bool accumulate) {                                                       \
    MicroKernelBody<T, MR, NV, VW>(kc, a, lda, b, c, ldc, accumulate);                     \
  }
#define JAXMPS_TILE_ROWS(Name, T, MR, NV, VW, ATTRS)                                        \
  JAXMPS_TILE(Name, T, MR, NV, VW, ATTRS)                                                  \
  ATTRS void Name##Rows(int64_t taps, int64_t depth, const T* const* rows, const T* b,     \
                        T* c, int64_t ldc, bool accumulate) {                              \
    RowsKernelBody<T, MR, NV, VW>(taps, depth, rows, b, c, ldc, accumulate);               \
  }
#define JAXMPS_AVX512 __attribute__((target("avx512f,fma")))
#define JAXMPS_AVX2 __attribute__((target("avx2,fma")))
#define JAXMPS_DEFAULT_TARGET

#if JAXMPS_CPU_X86
// 14 x 32 floats: 28 zmm accumulators, 2 B loads + 14 broadcasts per 28 FMAs.
JAXMPS_TILE_ROWS(FloatAvx512, float, 14, 2, 16, JAXMPS_AVX512)
// 14 x 16 floats: 14 zmm accumulators (enough independent FMAs to hide their latency), for
// 16-column GEMMs that the 32-wide tile would compute half in vain.
JAXMPS_TILE_ROWS(FloatNarrowAvx512, float, 14, 1, 16, JAXMPS_AVX512)
// 6 x 16 floats: 12 ymm accumulators (of 16 registers).
JAXMPS_TILE_ROWS(FloatAvx2, float, 6, 2, 8, JAXMPS_AVX2)
// 12 x 8 floats: 12 ymm accumulators, for GEMMs of at most 8 columns.
JAXMPS_TILE_ROWS(FloatNarrowAvx2, float, 12, 1, 8, JAXMPS_AVX2)
// float64 is for checks, not speed: one tile per ISA and no row-pointer kernels.
JAXMPS_TILE(DoubleAvx512, double, 12, 2, 8, JAXMPS_AVX512)
JAXMPS_TILE(DoubleAvx2, double, 6, 2, 4, JAXMPS_AVX2)
#endif  // JAXMPS_CPU_X86

// 4 x 8 floats (4 x 4 doubles) in SSE2 (x86-64 baseline) or whatever the default target is.
JAXMPS_TILE_ROWS(FloatPortable, float, 4, 2, 4, JAXMPS_DEFAULT_TARGET)
JAXMPS_TILE(DoublePortable, double, 4, 2, 2, JAXMPS_DEFAULT_TARGET)

// Whether the half-width tile of full width `nr` suits a GEMM of `columns` columns.
bool PreferNarrow(int64_t columns, int64_t nr) {
  const int64_t tail = columns % nr;
  return tail > 0 && tail <= nr / 2;
}

}  // namespace

const MicroKernel<float>& FloatMicroKernel(int64_t columns) {
  static const Isa isa = CpuIsa();
  switch (isa) {
#if JAXMPS_CPU_X86
    case Isa::kAvx512: {
      static const MicroKernel<float> wide{14, 32, FloatAvx512, FloatAvx512Rows, "avx512"};
      static const MicroKernel<float> narrow{14, 16, FloatNarrowAvx512, FloatNarrowAvx512Rows,
                                             "avx512"};
      return PreferNarrow(columns, wide.nr) ? narrow : wide;
    }
    case Isa::kAvx2: {
      static const MicroKernel<float> wide{6, 16, FloatAvx2, FloatAvx2Rows, "avx2"};
      static const MicroKernel<float> narrow{12, 8, FloatNarrowAvx2, FloatNarrowAvx2Rows, "avx2"};
      return PreferNarrow(columns, wide.nr) ? narrow : wide;
    }
#endif
    default: {
      static const MicroKernel<float> portable{4, 8, FloatPortable, FloatPortableRows,
                                               "portable"};
      return portable;
    }
  }
}

const MicroKernel<double>& DoubleMicroKernel(int64_t /*columns*/) {
  static const MicroKernel<double> kernel = [] {
    switch (CpuIsa()) {
#if JAXMPS_CPU_X86
      case Isa::kAvx512: return MicroKernel<double>{12, 16, DoubleAvx512, nullptr, "avx512"};
      case Isa::kAvx2: return MicroKernel<double>{6, 8, DoubleAvx2, nullptr, "avx2"};
#endif
      default: return MicroKernel<double>{4, 4, DoublePortable, nullptr, "portable"};
    }
  }();
  return kernel;
}

}  // namespace jaxmps::cpu
