// The x86 vector extensions the CPU kernels pick their compiled copies by (AVX-512 > AVX2+FMA >
// the baseline target), detected once; JAXMPS_CPU_ISA=avx2|portable caps the choice.
#pragma once

#include <cstdlib>
#include <string_view>

namespace jaxmps::cpu {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) || defined(__i386__)
#define JAXMPS_CPU_X86 1
#else
#define JAXMPS_CPU_X86 0
#endif

// The best extension set this CPU runs, capped by the environment variable JAXMPS_CPU_ISA
// (avx2 or portable), read once: it lets tests run every compiled copy on one AVX-512 host.
inline Isa CpuIsa() {
  static const Isa isa = [] {
    Isa best = Isa::kPortable;
#if JAXMPS_CPU_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && best == Isa::kAvx2) best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("JAXMPS_CPU_ISA");
    const std::string_view v = cap == nullptr ? "" : cap;
    if (v == "portable") best = Isa::kPortable;
    if (v == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
    return best;
  }();
  return isa;
}

}  // namespace jaxmps::cpu
