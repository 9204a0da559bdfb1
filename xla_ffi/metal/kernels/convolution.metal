// Metal kernels of the convolution family (MPSCNNConvolution and MPSCNNConvolutionGradient):
// forward, data gradient, and weights + bias gradient (partial sums, then a fixed-order finish).
#include "common.h"

// Index of weight (o, ky, kx, c) in OHWI order.
inline uint weight_index(ConvParams p, uint o, uint ky, uint kx, uint c) {
  return ((o * p.kh + ky) * p.kw + kx) * p.ig + c;
}

// Input coordinate of tap k for output coordinate out on one axis (may be outside the image).
inline int input_coordinate(uint out, uint k, int stride, int dilation, int pad) {
  return int(out) * stride - pad + int(k) * dilation;
}

// Output coordinate whose tap k reads input coordinate in, or -1 when none does.
inline int output_coordinate(uint in, uint k, int stride, int dilation, int pad, uint size) {
  const int num = int(in) + pad - int(k) * dilation;
  if (num < 0 || num % stride != 0) return -1;
  const int out = num / stride;
  return out < int(size) ? out : -1;
}

// y[n, o, oy, ox] = bias[o] + sum over taps inside x and c < ig of W[o, ky, kx, c] *
// x[n, g*ig + c, iy, ix]; one thread per output element.
template <typename T>
kernel void conv2d_forward(device const T* x [[buffer(0)]],
                           device const float* weights [[buffer(1)]],
                           device const float* bias [[buffer(2)]],
                           device T* y [[buffer(3)]],
                           constant ConvParams& p [[buffer(4)]],
                           JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.y.count) return;
  const ImageCoords at = image_coords(p.y, i);
  const uint first_channel = (at.c / p.og) * p.ig;
  float acc = bias[at.c];
  for (uint ky = 0; ky < p.kh; ++ky) {
    const int iy = input_coordinate(at.h, ky, p.stride_h, p.dilation_h, p.pad_top);
    if (iy < 0 || iy >= int(p.x.h)) continue;
    for (uint kx = 0; kx < p.kw; ++kx) {
      const int ix = input_coordinate(at.w, kx, p.stride_w, p.dilation_w, p.pad_left);
      if (ix < 0 || ix >= int(p.x.w)) continue;
      const uint base = image_offset(p.x, at.n, first_channel, uint(iy), uint(ix));
      const uint w = weight_index(p, at.c, ky, kx, 0);
      for (uint c = 0; c < p.ig; ++c) acc += weights[w + c] * float(x[base + c * p.x.sc]);
    }
  }
  y[i] = T(acc);
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(conv2d_forward)

// dx[n, g*ig + c, iy, ix] = sum over the (ky, kx, oy, ox) whose tap reads (iy, ix) and the
// output channels o of group g of W[o, ky, kx, c] * dy[n, o, oy, ox]; one thread per dx element
// (the exact adjoint of conv2d_forward in x, gathered instead of scattered: no atomics).
template <typename T>
kernel void conv2d_data_gradient(device const T* dy [[buffer(0)]],
                                 device const float* weights [[buffer(1)]],
                                 device T* dx [[buffer(2)]],
                                 constant ConvParams& p [[buffer(3)]],
                                 JAXMPS_THREAD_ARGS) {
  const uint i = thread_in_grid.x;
  if (i >= p.x.count) return;
  const ImageCoords at = image_coords(p.x, i);
  const uint group = at.c / p.ig, c = at.c % p.ig;
  float acc = 0.0f;
  for (uint ky = 0; ky < p.kh; ++ky) {
    const int oy = output_coordinate(at.h, ky, p.stride_h, p.dilation_h, p.pad_top, p.y.h);
    if (oy < 0) continue;
    for (uint kx = 0; kx < p.kw; ++kx) {
      const int ox = output_coordinate(at.w, kx, p.stride_w, p.dilation_w, p.pad_left, p.y.w);
      if (ox < 0) continue;
      for (uint o = group * p.og; o < (group + 1) * p.og; ++o) {
        acc += weights[weight_index(p, o, ky, kx, c)] *
               float(dy[image_offset(p.y, at.n, o, uint(oy), uint(ox))]);
      }
    }
  }
  dx[i] = T(acc);
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(conv2d_data_gradient)

// Number of weights; the bias gradient elements follow them in the partial sums.
inline uint weight_count(ConvParams p) { return p.y.c * p.kh * p.kw * p.ig; }

// Partial sums over chunk s = thread_in_grid.y of the N*OH*OW output positions: element e <
// weight_count is dW[o, ky, kx, c] = sum dy[n, o, oy, ox] * x[n, g*ig + c, iy, ix]; element
// weight_count + o is db[o] = sum dy[n, o, oy, ox]. partial[s * elements + e].
template <typename T>
kernel void conv2d_weights_gradient_partial(device const T* dy [[buffer(0)]],
                                            device const T* x [[buffer(1)]],
                                            device float* partial [[buffer(2)]],
                                            constant ConvParams& p [[buffer(3)]],
                                            JAXMPS_THREAD_ARGS) {
  const uint e = thread_in_grid.x, s = thread_in_grid.y;
  const uint weights = weight_count(p), elements = weights + p.y.c;
  if (e >= elements) return;
  const uint pixels = p.y.h * p.y.w, positions = p.y.n * pixels;
  const uint chunk = (positions + p.splits - 1) / p.splits;
  const uint begin = min(s * chunk, positions), end = min(begin + chunk, positions);
  float acc = 0.0f;
  if (e < weights) {
    const uint c = e % p.ig, kx = (e / p.ig) % p.kw, ky = (e / (p.ig * p.kw)) % p.kh;
    const uint o = e / (p.ig * p.kw * p.kh);
    const uint channel = (o / p.og) * p.ig + c;
    for (uint j = begin; j < end; ++j) {
      const uint n = j / pixels, oy = (j % pixels) / p.y.w, ox = j % p.y.w;
      const int iy = input_coordinate(oy, ky, p.stride_h, p.dilation_h, p.pad_top);
      const int ix = input_coordinate(ox, kx, p.stride_w, p.dilation_w, p.pad_left);
      if (iy < 0 || iy >= int(p.x.h) || ix < 0 || ix >= int(p.x.w)) continue;
      acc += float(dy[image_offset(p.y, n, o, oy, ox)]) *
             float(x[image_offset(p.x, n, channel, uint(iy), uint(ix))]);
    }
  } else {
    const uint o = e - weights;
    for (uint j = begin; j < end; ++j) {
      acc += float(dy[image_offset(p.y, j / pixels, o, (j % pixels) / p.y.w, j % p.y.w)]);
    }
  }
  partial[s * elements + e] = acc;
}
JAXMPS_INSTANTIATE_STORAGE_TYPES(conv2d_weights_gradient_partial)

// dweights and dbias: the chunks' partial sums added in chunk order (deterministic).
kernel void conv2d_weights_gradient_finish(device const float* partial [[buffer(0)]],
                                           device float* dweights [[buffer(1)]],
                                           device float* dbias [[buffer(2)]],
                                           constant ConvParams& p [[buffer(3)]],
                                           JAXMPS_THREAD_ARGS) {
  const uint e = thread_in_grid.x;
  const uint weights = weight_count(p), elements = weights + p.y.c;
  if (e >= elements) return;
  float total = 0.0f;
  for (uint s = 0; s < p.splits; ++s) total += partial[s * elements + e];
  if (e < weights) {
    dweights[e] = total;
  } else {
    dbias[e - weights] = total;
  }
}
JAXMPS_REGISTER_KERNEL(conv2d_weights_gradient_finish)
