// Dispatch plans of the jaxmps Metal kernels: per FFI kernel, the launches with their grids,
// threadgroup sizes, bindings and threadgroup memory. Plain C++ shared by host and emulator.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/params.h"

namespace jaxmps::metal {

// How image data is stored; the kernels compute in float32 for all three. Metal function
// names end in the MSL type name: norm_moments_float, norm_moments_half, ...
enum class Storage { kFloat32, kFloat16, kBFloat16 };

inline const char* StorageSuffix(Storage s) {
  switch (s) {
    case Storage::kFloat16: return "half";
    case Storage::kBFloat16: return "bfloat";
    default: return "float";
  }
}

struct Size3 {
  uint32_t x = 1, y = 1, z = 1;
};

// [[buffer(i)]] of a launch: one of the plan's buffers, or constant bytes (setBytes).
struct Binding {
  int buffer = -1;
  std::vector<uint8_t> bytes;
};

struct Launch {
  std::string kernel;  // Metal function name
  Size3 groups;        // threadgroups per grid (dispatchThreadgroups)
  Size3 threads;       // threads per threadgroup
  std::vector<Binding> bindings;            // index i = [[buffer(i)]]
  std::vector<uint32_t> threadgroup_bytes;  // index i = [[threadgroup(i)]]
};

// The plan's buffers are numbered: first the FFI operands and results in the order the handler
// receives them (its "io" buffers), then float32 scratch buffers the runner allocates.
// Launches run in order, each seeing all writes of the previous ones.
struct Plan {
  int io_buffers = 0;
  std::vector<uint64_t> scratch_bytes;
  std::vector<Launch> launches;
};

// ---- sizing ----------------------------------------------------------------------------------

// Threads per threadgroup for one-thread-per-element kernels; small grids get one SIMD-group
// multiple just large enough.
constexpr uint32_t kElementwiseThreads = 256;
// Threads per threadgroup of the reductions (one threadgroup per statistic).
constexpr uint32_t kReductionThreads = 256;
// The kernels index with uint32; grids stay below 2^31 elements.
constexpr uint64_t kMaxElements = (uint64_t(1) << 31) - 1;

inline uint32_t RoundUp(uint32_t v, uint32_t m) { return (v + m - 1) / m * m; }

inline Binding Buffer(int index) { return Binding{index, {}}; }

template <typename T>
Binding Bytes(const T& value) {
  static_assert(std::is_trivially_copyable_v<T>);
  Binding b;
  b.bytes.resize(sizeof(T));
  std::memcpy(b.bytes.data(), &value, sizeof(T));
  return b;
}

inline ImageGeometry MakeGeometry(uint32_t n, uint32_t c, uint32_t h, uint32_t w,
                                  bool channels_last) {
  ImageGeometry g{};
  g.n = n, g.c = c, g.h = h, g.w = w;
  g.channels_last = channels_last ? 1 : 0;
  if (channels_last) {
    g.sc = 1, g.sw = c, g.sh = w * c, g.sn = h * w * c;
  } else {
    g.sw = 1, g.sh = w, g.sc = h * w, g.sn = c * h * w;
  }
  g.count = n * c * h * w;
  return g;
}

class PlanBuilder {
 public:
  PlanBuilder(int io_buffers, Storage storage) : storage_(storage) {
    plan_.io_buffers = io_buffers;
  }

  // A float32 scratch buffer of `floats` elements; returns its buffer index.
  int Scratch(uint64_t floats) {
    plan_.scratch_bytes.push_back(std::max<uint64_t>(floats, 1) * sizeof(float));
    return plan_.io_buffers + int(plan_.scratch_bytes.size()) - 1;
  }

  // One thread per element of `count` (times `layers`, thread_in_grid.y); the kernel returns
  // for thread_in_grid.x >= count.
  void Elementwise(const std::string& kernel, uint32_t count, std::vector<Binding> bindings,
                   uint32_t layers = 1) {
    const uint32_t threads = std::min(kElementwiseThreads, RoundUp(std::max(count, 1u), 32));
    Add(kernel, {(count + threads - 1) / threads, layers, 1}, {threads, 1, 1},
        std::move(bindings), {});
  }

  // One threadgroup per row of a reduction over `row_length` elements, with one float of
  // threadgroup memory per thread (enough for the per-SIMD-group partials at any SIMD width).
  void Rows(const std::string& kernel, uint32_t rows, uint32_t row_length,
            std::vector<Binding> bindings) {
    uint32_t threads = 32;
    while (threads < row_length && threads < kReductionThreads) threads *= 2;
    Add(kernel, {rows, 1, 1}, {threads, 1, 1}, std::move(bindings),
        {RoundUp(threads * uint32_t(sizeof(float)), 16)});
  }

  // Name of a kernel templated on the storage type.
  std::string Typed(const char* kernel) const {
    return std::string(kernel) + "_" + StorageSuffix(storage_);
  }

  Plan Finish() { return std::move(plan_); }

 private:
  void Add(const std::string& kernel, Size3 groups, Size3 threads, std::vector<Binding> bindings,
           std::vector<uint32_t> threadgroup_bytes) {
    if (groups.x == 0) return;  // empty grid: nothing to run
    plan_.launches.push_back(
        {kernel, groups, threads, std::move(bindings), std::move(threadgroup_bytes)});
  }

  Storage storage_;
  Plan plan_;
};

// ---- instance and batch norm -----------------------------------------------------------------

inline ChannelParams MakeChannelParams(const ImageGeometry& g, bool per_image, float epsilon) {
  return ChannelParams{g, per_image ? 1u : 0u, epsilon};
}

// Statistics rows: N*C per image (instance norm) or C (batch norm), and their length.
inline uint32_t StatisticsRows(const ImageGeometry& g, bool per_image) {
  return per_image ? g.n * g.c : g.c;
}
inline uint32_t StatisticsRowLength(const ImageGeometry& g, bool per_image) {
  return per_image ? g.h * g.w : g.n * g.h * g.w;
}

// Forward of instance norm (per_image) or training batch norm.
// io: x 0, gamma 1, beta 2 | y 3, mean 4, rstd (instance) or variance (batch) 5.
inline Plan PlanNormForward(Storage storage, const ImageGeometry& g, bool per_image,
                            float epsilon) {
  enum { kX, kGamma, kBeta, kY, kMean, kSpread, kIo };
  PlanBuilder b(kIo, storage);
  const uint32_t rows = StatisticsRows(g, per_image);
  const int scale = b.Scratch(rows), offset = b.Scratch(rows);
  const Binding params = Bytes(MakeChannelParams(g, per_image, epsilon));
  b.Rows(b.Typed("norm_moments"), rows, StatisticsRowLength(g, per_image),
         {Buffer(kX), Buffer(kGamma), Buffer(kBeta), Buffer(kMean), Buffer(kSpread),
          Buffer(scale), Buffer(offset), params});
  b.Elementwise(b.Typed("normalize_apply"), g.count,
                {Buffer(kX), Buffer(kMean), Buffer(scale), Buffer(offset), Buffer(kY), params});
  return b.Finish();
}

// Gradient of instance norm. io: dy 0, x 1, gamma 2, mean 3, rstd 4 | dx 5, dgamma 6, dbeta 7.
inline Plan PlanInstanceNormGradient(Storage storage, const ImageGeometry& g) {
  enum { kDy, kX, kGamma, kMean, kRstd, kDx, kDgamma, kDbeta, kIo };
  PlanBuilder b(kIo, storage);
  const uint32_t rows = StatisticsRows(g, true);
  const int sum_g = b.Scratch(rows), sum_gx = b.Scratch(rows);
  const int coef_g = b.Scratch(rows), coef_x = b.Scratch(rows), coef_1 = b.Scratch(rows);
  const Binding params = Bytes(MakeChannelParams(g, true, 0.0f));
  // dmean/dvariance (slots 5, 6) are only read per channel; Metal still wants a buffer there.
  b.Rows(b.Typed("norm_gradient_sums"), rows, StatisticsRowLength(g, true),
         {Buffer(kDy), Buffer(kX), Buffer(kGamma), Buffer(kMean), Buffer(kRstd), Buffer(kMean),
          Buffer(kMean), Buffer(sum_g), Buffer(sum_gx), Buffer(coef_g), Buffer(coef_x),
          Buffer(coef_1), params});
  b.Elementwise(b.Typed("normalize_gradient_apply"), g.count,
                {Buffer(kDy), Buffer(kX), Buffer(kMean), Buffer(coef_g), Buffer(coef_x),
                 Buffer(coef_1), Buffer(kDx), params});
  b.Elementwise("sum_over_images", g.c,
                {Buffer(sum_g), Buffer(sum_gx), Buffer(kDgamma), Buffer(kDbeta), params});
  return b.Finish();
}

// Gradient of training batch norm. io: dy 0, x 1, gamma 2, mean 3, variance 4, dmean 5,
// dvariance 6 | dx 7, dgamma 8, dbeta 9.
inline Plan PlanBatchNormGradient(Storage storage, const ImageGeometry& g,
                                  float epsilon) {
  enum { kDy, kX, kGamma, kMean, kVariance, kDmean, kDvariance, kDx, kDgamma, kDbeta, kIo };
  PlanBuilder b(kIo, storage);
  const uint32_t rows = StatisticsRows(g, false);
  const int coef_g = b.Scratch(rows), coef_x = b.Scratch(rows), coef_1 = b.Scratch(rows);
  const Binding params = Bytes(MakeChannelParams(g, false, epsilon));
  // Per channel the row sums are the parameter gradients themselves: dbeta = sum g,
  // dgamma = sum g * xhat.
  b.Rows(b.Typed("norm_gradient_sums"), rows, StatisticsRowLength(g, false),
         {Buffer(kDy), Buffer(kX), Buffer(kGamma), Buffer(kMean), Buffer(kVariance),
          Buffer(kDmean), Buffer(kDvariance), Buffer(kDbeta), Buffer(kDgamma), Buffer(coef_g),
          Buffer(coef_x), Buffer(coef_1), params});
  b.Elementwise(b.Typed("normalize_gradient_apply"), g.count,
                {Buffer(kDy), Buffer(kX), Buffer(kMean), Buffer(coef_g), Buffer(coef_x),
                 Buffer(coef_1), Buffer(kDx), params});
  return b.Finish();
}

// Batch norm with given statistics. io: x 0, gamma 1, beta 2, mean 3, variance 4 | y 5.
inline Plan PlanBatchNormInference(Storage storage, const ImageGeometry& g,
                                   float epsilon) {
  enum { kX, kGamma, kBeta, kMean, kVariance, kY, kIo };
  PlanBuilder b(kIo, storage);
  const int scale = b.Scratch(g.c), offset = b.Scratch(g.c);
  const Binding params = Bytes(MakeChannelParams(g, false, epsilon));
  b.Elementwise("batch_norm_inference_coefficients", g.c,
                {Buffer(kGamma), Buffer(kBeta), Buffer(kVariance), Buffer(scale), Buffer(offset),
                 params});
  b.Elementwise(b.Typed("normalize_apply"), g.count,
                {Buffer(kX), Buffer(kMean), Buffer(scale), Buffer(offset), Buffer(kY), params});
  return b.Finish();
}

// ---- window norms ----------------------------------------------------------------------------

// Spatial (kc = 1) and cross-channel (kh = kw = 1) norm. io: x 0 | y 1.
inline Plan PlanWindowNormForward(Storage storage, const WindowParams& p) {
  PlanBuilder b(2, storage);
  b.Elementwise(b.Typed("window_norm_forward"), p.image.count, {Buffer(0), Buffer(1), Bytes(p)});
  return b.Finish();
}

// io: dy 0, x 1 | dx 2. The first pass stores the per-element terms whose adjoint window sums
// the second pass needs.
inline Plan PlanWindowNormGradient(Storage storage, const WindowParams& p) {
  PlanBuilder b(3, storage);
  const int g_tb = b.Scratch(p.image.count), q = b.Scratch(p.image.count);
  b.Elementwise(b.Typed("window_norm_gradient_terms"), p.image.count,
                {Buffer(0), Buffer(1), Buffer(g_tb), Buffer(q), Bytes(p)});
  b.Elementwise(b.Typed("window_norm_gradient"), p.image.count,
                {Buffer(1), Buffer(g_tb), Buffer(q), Buffer(2), Bytes(p)});
  return b.Finish();
}

// io: x 0 | y 1.
inline Plan PlanLocalContrastNormForward(Storage storage, const WindowParams& p) {
  PlanBuilder b(2, storage);
  b.Elementwise(b.Typed("local_contrast_norm_forward"), p.image.count,
                {Buffer(0), Buffer(1), Bytes(p)});
  return b.Finish();
}

// io: dy 0, x 1 | dx 2.
inline Plan PlanLocalContrastNormGradient(Storage storage, const WindowParams& p) {
  PlanBuilder b(3, storage);
  const uint32_t n = p.image.count;
  const int a = b.Scratch(n), c = b.Scratch(n), cm = b.Scratch(n);
  b.Elementwise(b.Typed("local_contrast_norm_gradient_terms"), n,
                {Buffer(0), Buffer(1), Buffer(a), Buffer(c), Buffer(cm), Bytes(p)});
  b.Elementwise(b.Typed("local_contrast_norm_gradient"), n,
                {Buffer(1), Buffer(a), Buffer(c), Buffer(cm), Buffer(2), Bytes(p)});
  return b.Finish();
}

// ---- convolution -----------------------------------------------------------------------------

// io: x 0, weights 1, bias 2 | y 3. One thread per output element.
inline Plan PlanConv2dForward(Storage storage, ConvParams p) {
  PlanBuilder b(4, storage);
  p.splits = 1;
  b.Elementwise(b.Typed("conv2d_forward"), p.y.count,
                {Buffer(0), Buffer(1), Buffer(2), Buffer(3), Bytes(p)});
  return b.Finish();
}

// io: dy 0, weights 1 | dx 2. One thread per dx element.
inline Plan PlanConv2dDataGradient(Storage storage, ConvParams p) {
  PlanBuilder b(3, storage);
  p.splits = 1;
  b.Elementwise(b.Typed("conv2d_data_gradient"), p.x.count,
                {Buffer(0), Buffer(1), Buffer(2), Bytes(p)});
  return b.Finish();
}

// Chunks of the weights gradient's sum over the N*OH*OW positions: enough threads for the GPU
// (elements * splits about 2^15 when there are few weights) while each chunk keeps at least
// 256 positions; at most 64 chunks.
inline uint32_t WeightsGradientSplits(uint32_t elements, uint32_t positions) {
  const uint32_t by_length = std::max(1u, positions / 256);
  const uint32_t by_threads = std::max(1u, ((1u << 15) + elements - 1) / std::max(elements, 1u));
  return std::min({by_length, by_threads, 64u});
}

// io: dy 0, x 1 | dweights 2, dbias 3. Partial sums per chunk into scratch, then their sum.
inline Plan PlanConv2dWeightsGradient(Storage storage, ConvParams p) {
  PlanBuilder b(4, storage);
  const uint32_t elements = p.y.c * p.kh * p.kw * p.ig + p.y.c;
  p.splits = WeightsGradientSplits(elements, p.y.n * p.y.h * p.y.w);
  const int partial = b.Scratch(uint64_t(elements) * p.splits);
  b.Elementwise(b.Typed("conv2d_weights_gradient_partial"), elements,
                {Buffer(0), Buffer(1), Buffer(partial), Bytes(p)}, p.splits);
  b.Elementwise("conv2d_weights_gradient_finish", elements,
                {Buffer(partial), Buffer(2), Buffer(3), Bytes(p)});
  return b.Finish();
}

}  // namespace jaxmps::metal
