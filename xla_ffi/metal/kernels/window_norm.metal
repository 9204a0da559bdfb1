// Metal kernels of the window normalizations: spatial and cross-channel norm (one box-window
// kernel set: kh x kw x 1 or 1 x 1 x kc) and local contrast norm, forward and gradient.
#include "common.h"

// Clipped range of a size-k window around `center` on an axis of length `size`: the forward
// window S covers [center - k/2, center + (k-1)/2], the adjoint S^T [center - (k-1)/2,
// center + k/2] (MPS placement, KERNELS.md). Empty (lo > hi) never happens for k >= 1.
struct AxisRange {
  uint lo, hi;  // inclusive
};

inline AxisRange window_range(uint center, uint k, uint size, bool adjoint) {
  const int before = int(adjoint ? (k - 1) / 2 : k / 2);
  const int after = int(adjoint ? k / 2 : (k - 1) / 2);
  AxisRange r;
  r.lo = uint(max(int(center) - before, 0));
  r.hi = uint(min(int(center) + after, int(size) - 1));
  return r;
}

// Sums over the window around `at`: .x = sum of v, .y = sum of v^2 (out-of-image taps are 0).
template <typename S>
inline float2 window_sums(device const S* v, WindowParams p, ImageCoords at, bool adjoint) {
  const ImageGeometry g = p.image;
  const AxisRange rh = window_range(at.h, p.kh, g.h, adjoint);
  const AxisRange rw = window_range(at.w, p.kw, g.w, adjoint);
  const AxisRange rc = window_range(at.c, p.kc, g.c, adjoint);
  float2 s = float2(0.0f);
  for (uint c = rc.lo; c <= rc.hi; ++c) {
    for (uint h = rh.lo; h <= rh.hi; ++h) {
      for (uint w = rw.lo; w <= rw.hi; ++w) {
        const float u = float(v[image_offset(g, at.n, c, h, w)]);
        s.x += u;
        s.y += u * u;
      }
    }
  }
  return s;
}

inline float window_size(WindowParams p) { return float(p.kh * p.kw * p.kc); }

// ---- spatial and cross-channel norm: Y = X * T^-beta, T = delta + alpha/N * S[X^2] ----------

template <typename T>
kernel void window_norm_forward(device const T* x [[buffer(0)]],
                                device T* y [[buffer(1)]],
                                constant WindowParams& p [[buffer(2)]],
                                JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const ImageCoords at = image_coords(p.image, i);
  const float t = p.delta + p.alpha / window_size(p) * window_sums(x, p, at, false).y;
  y[i] = T(float(x[i]) * pow(t, -p.beta));
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(window_norm_forward)

// Per element: g_tb = g * T^-beta and q = g * X * T^(-beta-1), the two terms of
// dX = g T^-beta - (2 alpha beta / N) X S^T[g X T^(-beta-1)].
template <typename T>
kernel void window_norm_gradient_terms(device const T* dy [[buffer(0)]],
                                       device const T* x [[buffer(1)]],
                                       device float* g_tb [[buffer(2)]],
                                       device float* q [[buffer(3)]],
                                       constant WindowParams& p [[buffer(4)]],
                                       JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const ImageCoords at = image_coords(p.image, i);
  const float t = p.delta + p.alpha / window_size(p) * window_sums(x, p, at, false).y;
  const float tb = pow(t, -p.beta);
  const float g = float(dy[i]);
  g_tb[i] = g * tb;
  q[i] = g * float(x[i]) * tb / t;
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(window_norm_gradient_terms)

template <typename T>
kernel void window_norm_gradient(device const T* x [[buffer(0)]],
                                 device const float* g_tb [[buffer(1)]],
                                 device const float* q [[buffer(2)]],
                                 device T* dx [[buffer(3)]],
                                 constant WindowParams& p [[buffer(4)]],
                                 JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const ImageCoords at = image_coords(p.image, i);
  const float coef = 2.0f * p.alpha * p.beta / window_size(p);
  dx[i] = T(g_tb[i] - coef * float(x[i]) * window_sums(q, p, at, true).x);
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(window_norm_gradient)

// ---- local contrast norm: Y = pm + ps (X - p0 M) T^-beta, M = S[X]/N,
// T = delta + alpha (S[X^2]/N - M^2) ------------------------------------------------------------

struct LocalStatistics {
  float mean, t;
};

template <typename T>
inline LocalStatistics local_statistics(device const T* x, WindowParams p, ImageCoords at) {
  const float n = window_size(p);
  const float2 s = window_sums(x, p, at, false);
  LocalStatistics st;
  st.mean = s.x / n;
  st.t = p.delta + p.alpha * (s.y / n - st.mean * st.mean);
  return st;
}

template <typename T>
kernel void local_contrast_norm_forward(device const T* x [[buffer(0)]],
                                        device T* y [[buffer(1)]],
                                        constant WindowParams& p [[buffer(2)]],
                                        JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const LocalStatistics st = local_statistics(x, p, image_coords(p.image, i));
  y[i] = T(p.pm + p.ps * (float(x[i]) - p.p0 * st.mean) * pow(st.t, -p.beta));
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(local_contrast_norm_forward)

// Per element: A = g T^-beta, C = A (X - p0 M) / T and C*M, the terms of
// dX = ps (A - p0/N S^T[A] - 2 alpha beta/N (X S^T[C] - S^T[C M])).
template <typename T>
kernel void local_contrast_norm_gradient_terms(device const T* dy [[buffer(0)]],
                                               device const T* x [[buffer(1)]],
                                               device float* a [[buffer(2)]],
                                               device float* c [[buffer(3)]],
                                               device float* cm [[buffer(4)]],
                                               constant WindowParams& p [[buffer(5)]],
                                               JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const LocalStatistics st = local_statistics(x, p, image_coords(p.image, i));
  const float ai = float(dy[i]) * pow(st.t, -p.beta);
  const float ci = ai * (float(x[i]) - p.p0 * st.mean) / st.t;
  a[i] = ai;
  c[i] = ci;
  cm[i] = ci * st.mean;
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(local_contrast_norm_gradient_terms)

template <typename T>
kernel void local_contrast_norm_gradient(device const T* x [[buffer(0)]],
                                         device const float* a [[buffer(1)]],
                                         device const float* c [[buffer(2)]],
                                         device const float* cm [[buffer(3)]],
                                         device T* dx [[buffer(4)]],
                                         constant WindowParams& p [[buffer(5)]],
                                         JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.image.count) return;
  const ImageCoords at = image_coords(p.image, i);
  const float n = window_size(p);
  const float st_a = window_sums(a, p, at, true).x;
  const float st_c = window_sums(c, p, at, true).x;
  const float st_cm = window_sums(cm, p, at, true).x;
  dx[i] = T(p.ps * (a[i] - p.p0 / n * st_a -
                    2.0f * p.alpha * p.beta / n * (float(x[i]) * st_c - st_cm)));
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(local_contrast_norm_gradient)
