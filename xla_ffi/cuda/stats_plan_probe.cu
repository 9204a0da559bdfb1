// Test hooks of the CUDA libraries: jaxmps_cuda_stats_plan (the statistics path PlanStats
// picks for an image shape on the current device), its vector width, its L2 slices and the
// resident path's waves.
#include "stats.cuh"

namespace jaxmps::cuda {
namespace {

// The plan of the forward (gradient = false) or gradient sweep of instance or batch norm.
template <typename T>
bool ProbePlan(const ImageShape& s, bool per_image, bool gradient, StatsPlan* out) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  DeviceLimits limits;
  if (CurrentDeviceLimits("stats_plan", &limits).failure()) return false;
  // The handlers' vector width for buffers aligned to 16 bytes (XLA's are).
  const int max_vec = VectorWidth<T>(s.channels_last ? s.c : s.pixels(), {});
  *out = PlanStats<T, A>(s, per_image, gradient ? 2 : 1, max_vec, limits,
                         /*allow_on_chip=*/true);
  return true;
}

// field(plan) of the plan for these arguments (see jaxmps_cuda_stats_plan), -1 when there is
// none (the hooks' error value).
template <typename F>
auto ProbedField(int64_t n, int64_t h, int64_t w, int64_t c, int channels_last, int per_image,
                 int itemsize, int gradient, F&& field) -> decltype(field(StatsPlan{})) {
  ImageShape s;
  s.n = n, s.h = h, s.w = w, s.c = c, s.channels_last = channels_last != 0;
  StatsPlan p;
  bool ok = false;
  switch (itemsize) {
    case 2: ok = ProbePlan<__half>(s, per_image != 0, gradient != 0, &p); break;
    case 4: ok = ProbePlan<float>(s, per_image != 0, gradient != 0, &p); break;
    case 8: ok = ProbePlan<double>(s, per_image != 0, gradient != 0, &p); break;
    default: break;
  }
  return ok ? field(p) : decltype(field(p))(-1);
}

}  // namespace
}  // namespace jaxmps::cuda

// Returns 0 (fused), 1 (cluster; *cluster = CTAs per group), 2 (chunked) or 3 (resident;
// *cluster = CTAs per group) for the forward
// (gradient = 0) or gradient sweep of instance (per_image = 1) or batch norm over an image of
// dtype size `itemsize` (2: float16/bfloat16, 4: float32, 8: float64); -1 on error.
extern "C" __attribute__((visibility("default"))) int jaxmps_cuda_stats_plan(
    int64_t n, int64_t h, int64_t w, int64_t c, int channels_last, int per_image, int itemsize,
    int gradient, int* cluster) {
  using jaxmps::cuda::StatsPath, jaxmps::cuda::StatsPlan;
  return jaxmps::cuda::ProbedField(
      n, h, w, c, channels_last, per_image, itemsize, gradient, [&](const StatsPlan& p) {
        *cluster = p.path == StatsPath::kResident ? int(p.chunks) : p.cluster;
        return int(p.path);
      });
}

// The number of L2 slices of that sweep when it is chunked, 0 when it runs on chip, -1 on error.
extern "C" __attribute__((visibility("default"))) int64_t jaxmps_cuda_stats_slices(
    int64_t n, int64_t h, int64_t w, int64_t c, int channels_last, int per_image, int itemsize,
    int gradient) {
  return jaxmps::cuda::ProbedField(
      n, h, w, c, channels_last, per_image, itemsize, gradient,
      [](const jaxmps::cuda::StatsPlan& p) { return p.on_chip() ? int64_t(0) : p.slices(); });
}

// The elements per vector (1, 2, 4 or 8) of that sweep's plan, -1 on error.
extern "C" __attribute__((visibility("default"))) int jaxmps_cuda_stats_vector(
    int64_t n, int64_t h, int64_t w, int64_t c, int channels_last, int per_image, int itemsize,
    int gradient) {
  return jaxmps::cuda::ProbedField(n, h, w, c, channels_last, per_image, itemsize, gradient,
                                   [](const jaxmps::cuda::StatsPlan& p) { return p.vec; });
}

// The waves of that sweep's resident plan (ResidentKernel), 0 when it takes another path, -1 on
// error.
extern "C" __attribute__((visibility("default"))) int64_t jaxmps_cuda_stats_waves(
    int64_t n, int64_t h, int64_t w, int64_t c, int channels_last, int per_image, int itemsize,
    int gradient) {
  using jaxmps::cuda::StatsPath, jaxmps::cuda::StatsPlan;
  return jaxmps::cuda::ProbedField(n, h, w, c, channels_last, per_image, itemsize, gradient,
                                   [](const StatsPlan& p) {
                                     return p.path == StatsPath::kResident ? p.slices() : 0;
                                   });
}
