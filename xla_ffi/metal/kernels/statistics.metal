// Metal kernels of instance and batch normalization (MPSCNNInstanceNormalization,
// MPSCNNBatchNormalization and their gradients): per-channel statistics and the apply passes.
#include "common.h"

// The elements one statistic covers: row r = n * C + c (per image) or c (all images).
struct StatisticsRow {
  uint base;     // offset of the row's first element
  uint channel;
  uint count;    // elements in the row
};

inline StatisticsRow statistics_row(ImageGeometry g, uint per_image, uint r) {
  StatisticsRow row;
  if (per_image) {
    row.channel = r % g.c;
    row.base = (r / g.c) * g.sn + row.channel * g.sc;
    row.count = g.h * g.w;
  } else {
    row.channel = r;
    row.base = r * g.sc;
    row.count = g.n * g.h * g.w;
  }
  return row;
}

// Offset of element j of a row: image j / (H*W) of the row, pixel j % (H*W).
inline uint row_offset(ImageGeometry g, StatisticsRow row, uint j) {
  const uint pixels = g.h * g.w;
  const uint p = j % pixels;
  return row.base + (j / pixels) * g.sn + (p / g.w) * g.sh + (p % g.w) * g.sw;
}

// Statistics row of the element with coordinates `at`.
inline uint row_of(ImageGeometry g, uint per_image, ImageCoords at) {
  return per_image ? at.n * g.c + at.c : at.c;
}

// One threadgroup per row: mean and biased variance in two passes (as the reference), then
// the normalization coefficients y = (x - mean) * scale + offset.
// Writes mean, and rstd (per image: instance norm's saved state) or the variance (batch norm).
template <typename T>
kernel void norm_moments(device const T* x [[buffer(0)]],
                         device const float* gamma [[buffer(1)]],
                         device const float* beta [[buffer(2)]],
                         device float* mean_out [[buffer(3)]],
                         device float* spread_out [[buffer(4)]],
                         device float* scale_out [[buffer(5)]],
                         device float* offset_out [[buffer(6)]],
                         constant ChannelParams& p [[buffer(7)]],
                         threadgroup float* partials [[threadgroup(0)]],
                         JAXMPS_THREAD_ARGS) {
  const uint r = group_in_grid.x;
  const uint threads = group_size.x;
  const StatisticsRow row = statistics_row(p.image, p.per_image, r);
  float sum = 0.0f;
  for (uint j = thread_index; j < row.count; j += threads)
    sum += float(x[row_offset(p.image, row, j)]);
  const float mean = threadgroup_sum(sum, partials, lane, simd_group, simd_groups) /
                     float(row.count);
  float squares = 0.0f;
  for (uint j = thread_index; j < row.count; j += threads) {
    const float d = float(x[row_offset(p.image, row, j)]) - mean;
    squares += d * d;
  }
  const float variance = threadgroup_sum(squares, partials, lane, simd_group, simd_groups) /
                         float(row.count);
  if (thread_index == 0) {
    const float rstd = rsqrt(variance + p.epsilon);
    mean_out[r] = mean;
    spread_out[r] = p.per_image ? rstd : variance;
    scale_out[r] = gamma[row.channel] * rstd;
    offset_out[r] = beta[row.channel];
  }
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(norm_moments)

// y = (x - center[row]) * scale[row] + offset[row], one thread per element.
template <typename T>
kernel void normalize_apply(device const T* x [[buffer(0)]],
                            device const float* center [[buffer(1)]],
                            device const float* scale [[buffer(2)]],
                            device const float* offset [[buffer(3)]],
                            device T* y [[buffer(4)]],
                            constant ChannelParams& p [[buffer(5)]],
                            JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const uint r = row_of(p.image, p.per_image, image_coords(p.image, i));
  y[i] = T((float(x[i]) - center[r]) * scale[r] + offset[r]);
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(normalize_apply)

// One threadgroup per row: sum_g = sum dy and sum_gx = sum dy * xhat with
// xhat = (x - mean) * rstd, then the coefficients of dx = a*dy + b*(x - mean) + c:
//   a = gamma * rstd, b = -a * rstd * sum_gx / M, c = -a * sum_g / M   (M = row.count),
// plus, per channel (batch norm), the gradient through the returned statistics:
//   b += 2 * dvariance / M, c += dmean / M.
// `spread` is rstd per image, the variance per channel (rstd = rsqrt(variance + epsilon)).
// dmean and dvariance are read only per channel.
template <typename T>
kernel void norm_gradient_sums(device const T* dy [[buffer(0)]],
                               device const T* x [[buffer(1)]],
                               device const float* gamma [[buffer(2)]],
                               device const float* mean [[buffer(3)]],
                               device const float* spread [[buffer(4)]],
                               device const float* dmean [[buffer(5)]],
                               device const float* dvariance [[buffer(6)]],
                               device float* sum_g_out [[buffer(7)]],
                               device float* sum_gx_out [[buffer(8)]],
                               device float* coef_g [[buffer(9)]],
                               device float* coef_x [[buffer(10)]],
                               device float* coef_1 [[buffer(11)]],
                               constant ChannelParams& p [[buffer(12)]],
                               threadgroup float* partials [[threadgroup(0)]],
                               JAXMPS_THREAD_ARGS) {
  const uint r = group_in_grid.x;
  const uint threads = group_size.x;
  const StatisticsRow row = statistics_row(p.image, p.per_image, r);
  const float mu = mean[r];
  const float rstd = p.per_image ? spread[r] : rsqrt(spread[r] + p.epsilon);
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (uint j = thread_index; j < row.count; j += threads) {
    const uint i = row_offset(p.image, row, j);
    const float g = float(dy[i]);
    sum_g += g;
    sum_gx += g * (float(x[i]) - mu) * rstd;
  }
  sum_g = threadgroup_sum(sum_g, partials, lane, simd_group, simd_groups);
  sum_gx = threadgroup_sum(sum_gx, partials, lane, simd_group, simd_groups);
  if (thread_index == 0) {
    const float m = float(row.count);
    const float a = gamma[row.channel] * rstd;
    float b = -a * rstd * sum_gx / m;
    float c = -a * sum_g / m;
    if (!p.per_image) {
      b += 2.0f * dvariance[row.channel] / m;
      c += dmean[row.channel] / m;
    }
    sum_g_out[r] = sum_g;
    sum_gx_out[r] = sum_gx;
    coef_g[r] = a;
    coef_x[r] = b;
    coef_1[r] = c;
  }
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(norm_gradient_sums)

// dx = coef_g * dy + coef_x * (x - center) + coef_1 per row, one thread per element.
template <typename T>
kernel void normalize_gradient_apply(device const T* dy [[buffer(0)]],
                                     device const T* x [[buffer(1)]],
                                     device const float* center [[buffer(2)]],
                                     device const float* coef_g [[buffer(3)]],
                                     device const float* coef_x [[buffer(4)]],
                                     device const float* coef_1 [[buffer(5)]],
                                     device T* dx [[buffer(6)]],
                                     constant ChannelParams& p [[buffer(7)]],
                                     JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const uint r = row_of(p.image, p.per_image, image_coords(p.image, i));
  dx[i] = T(coef_g[r] * float(dy[i]) + coef_x[r] * (float(x[i]) - center[r]) + coef_1[r]);
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(normalize_gradient_apply)

// Instance norm parameter gradients: dgamma[c] = sum over images of sum_gx[n, c] (and dbeta
// from sum_g), one thread per channel, images added in order (deterministic).
kernel void sum_over_images(device const float* sum_g [[buffer(0)]],
                            device const float* sum_gx [[buffer(1)]],
                            device float* dgamma [[buffer(2)]],
                            device float* dbeta [[buffer(3)]],
                            constant ChannelParams& p [[buffer(4)]],
                            JAXMPS_THREAD_ARGS) {
  const uint c = thread_in_grid.x;
  if (c >= p.image.c) return;
  float g = 0.0f, gx = 0.0f;
  for (uint n = 0; n < p.image.n; ++n) {
    g += sum_g[n * p.image.c + c];
    gx += sum_gx[n * p.image.c + c];
  }
  dgamma[c] = gx;
  dbeta[c] = g;
}
JAXMPS_REGISTER_KERNEL(sum_over_images)

// Batch norm inference coefficients: scale = gamma * rsqrt(variance + epsilon), offset = beta
// (applied as (x - mean) * scale + offset), one thread per channel.
kernel void batch_norm_inference_coefficients(device const float* gamma [[buffer(0)]],
                                              device const float* beta [[buffer(1)]],
                                              device const float* variance [[buffer(2)]],
                                              device float* scale [[buffer(3)]],
                                              device float* offset [[buffer(4)]],
                                              constant ChannelParams& p [[buffer(5)]],
                                              JAXMPS_THREAD_ARGS) {
  const uint c = thread_in_grid.x;
  if (c >= p.image.c) return;
  scale[c] = gamma[c] * rsqrt(variance[c] + p.epsilon);
  offset[c] = beta[c];
}
JAXMPS_REGISTER_KERNEL(batch_norm_inference_coefficients)
