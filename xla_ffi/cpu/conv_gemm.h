// Packed-panel GEMM core of the CPU convolution kernels: register-blocked micro-kernels chosen
// at run time for the CPU (AVX-512, AVX2+FMA, portable), panel packing and the blocked driver.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace jaxmps::cpu {

// c[MR x NR] (row stride ldc) = (accumulate ? c : 0) + sum_k a[k*lda + 0..MR) x b[k][0..NR):
// `a` is an A panel, k-major with MR (or more: lda) elements per depth step (a packed panel
// has lda = MR), `b` a packed B panel (kc x NR, k-major, 64-byte aligned).
template <typename Acc>
using MicroKernelFn = void (*)(int64_t kc, const Acc* a, int64_t lda, const Acc* b, Acc* c,
                               int64_t ldc, bool accumulate);

// The same tile read straight from images through row pointers (no A packing): c[MR x NR] =
// (accumulate ? c : 0) + sum_{t < taps} sum_{k < depth} rows[t*MR + r][k] * b[(t*depth + k)*NR
// + j]. Rows that read padding point at a zero buffer of `depth` elements.
template <typename Acc>
using RowsKernelFn = void (*)(int64_t taps, int64_t depth, const Acc* const* rows,
                              const Acc* b, Acc* c, int64_t ldc, bool accumulate);

template <typename Acc>
struct MicroKernel {
  int64_t mr = 0, nr = 0;
  MicroKernelFn<Acc> fn = nullptr;
  RowsKernelFn<Acc> rows_fn = nullptr;
  const char* isa = "";
};

// The best micro-kernel this CPU runs (AVX-512 > AVX2+FMA > portable) for a GEMM of `columns`
// output columns: a half-width tile (14x16 floats on AVX-512, 12x8 on AVX2) where the full
// width would leave half of the last column panel idle (columns % NR in [1, NR/2]: the 16
// output channels of small layers), the full-width tile otherwise. The environment variable
// JAXMPS_CPU_ISA=avx2|portable caps the choice (cpu_isa.h; to test every variant on one host).
const MicroKernel<float>& FloatMicroKernel(int64_t columns);
const MicroKernel<double>& DoubleMicroKernel(int64_t columns);

template <typename Acc>
inline const MicroKernel<Acc>& SelectMicroKernel(int64_t columns) {
  if constexpr (std::is_same_v<Acc, double>) {
    return DoubleMicroKernel(columns);
  } else {
    return FloatMicroKernel(columns);
  }
}

// Scratch memory for packed panels, 64-byte aligned so the B panels load as whole vectors.
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t count) { Resize(count); }
  void Resize(size_t count) {
    if (count <= size_) return;
    size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    size_ = count;
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  size_t size_ = 0;
};

// The per-thread scratch buffers one work unit may hold at the same time.
enum ScratchSlot : int { kPointerTable, kAPanels, kBPanels, kCBlock, kRowList };

// Per-thread scratch of at least `count` elements, kept and reused by later work units and
// calls on the same thread (small units would otherwise spend much of their time in malloc).
template <typename T, ScratchSlot Slot>
T* ThreadScratch(size_t count) {
  static thread_local AlignedBuffer<T> buffer;
  buffer.Resize(std::max<size_t>(count, 1));
  return buffer.data();
}

inline int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Reduction depth per packed block: an A panel (MR x kc) and a B panel (kc x NR) stay in L1/L2.
constexpr int64_t kDepthBlock = 256;

// Packs a K x N operand (value(k, n)) into B panels for the driver: for each depth block of
// `block` rows, ceil(N / NR) panels of (block depth x NR), zero-filled past N. Returns the
// element count written (K * RoundUp(N, NR)). The row-pointer kernels take block = K.
template <typename Acc, typename Value>
int64_t PackB(int64_t k, int64_t n, int64_t nr, Value&& value, Acc* dst,
              int64_t block = kDepthBlock) {
  const int64_t n_pad = RoundUp(n, nr);
  for (int64_t k0 = 0; k0 < k; k0 += block) {
    const int64_t kl = std::min(block, k - k0);
    Acc* block = dst + k0 * n_pad;
    for (int64_t j0 = 0; j0 < n_pad; j0 += nr) {
      Acc* panel = block + j0 * kl;
      for (int64_t kk = 0; kk < kl; ++kk) {
        for (int64_t jj = 0; jj < nr; ++jj) {
          const int64_t col = j0 + jj;
          panel[kk * nr + jj] = col < n ? Acc(value(k0 + kk, col)) : Acc(0);
        }
      }
    }
  }
  return k * n_pad;
}

// C (m x n, row stride ldc >= RoundUp(n, NR), RoundUp(m, MR) rows allocated) = (accumulate ?
// C : 0) + A B, where B was packed by PackB (depth k) and pack_a(k0, kl, dst) packs rows
// [0, RoundUp(m, MR)) x depth [k0, k0 + kl) of A into MR-row panels (kl x MR each, k-major,
// zero rows past m). `apack` holds RoundUp(m, MR) * min(k, kDepthBlock) elements.
template <typename Acc, typename PackA>
void GemmPacked(const MicroKernel<Acc>& mk, int64_t m, int64_t n, int64_t k, const Acc* bpack,
                PackA&& pack_a, Acc* apack, Acc* c, int64_t ldc, bool accumulate) {
  const int64_t m_pad = RoundUp(m, mk.mr), n_pad = RoundUp(n, mk.nr);
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m_pad; ++i) std::fill(c + i * ldc, c + i * ldc + n_pad, Acc(0));
    }
    return;
  }
  for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
    const int64_t kl = std::min(kDepthBlock, k - k0);
    pack_a(k0, kl, apack);
    const Acc* bblock = bpack + k0 * n_pad;
    const bool acc = accumulate || k0 > 0;
    for (int64_t j0 = 0; j0 < n_pad; j0 += mk.nr) {
      for (int64_t i0 = 0; i0 < m_pad; i0 += mk.mr) {
        mk.fn(kl, apack + i0 * kl, mk.mr, bblock + j0 * kl, c + i0 * ldc + j0, ldc, acc);
      }
    }
  }
}

}  // namespace jaxmps::cpu
