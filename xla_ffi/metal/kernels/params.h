// The parameter structs the host passes to the Metal kernels with setBytes: one definition for
// the kernels (MSL), the dispatch plans (host C++, namespace jaxmps::metal) and the emulator.
#pragma once

// Only 4-byte fields, so that MSL and C++ lay the structs out identically.
#ifndef __METAL_VERSION__
#include <cstdint>
namespace jaxmps::metal {
#endif

// A 4-d image in either layout: sizes, element strides of the logical axes, element count.
struct ImageGeometry {
  uint32_t n, c, h, w;
  uint32_t sn, sc, sh, sw;
  uint32_t channels_last;
  uint32_t count;
};

// Instance and batch norm: statistics are per row, row = n * C + c (per_image = 1, instance
// norm) or row = c over all images (per_image = 0, batch norm).
struct ChannelParams {
  ImageGeometry image;
  uint32_t per_image;
  float epsilon;
};

// Spatial, cross-channel and local contrast norm: a box window of kh x kw pixels x kc channels
// (spatial: kc = 1; cross-channel: kh = kw = 1) with MPS placement, zero padding.
struct WindowParams {
  ImageGeometry image;
  uint32_t kh, kw, kc;
  float alpha, beta, delta, p0, pm, ps;
};

// Convolution (KERNELS.md): x (N, I, H, W) -> y (N, O, OH, OW) with OHWI weights
// (O, kh, kw, ig), groups of ig input and og output channels; input row of tap ky for output
// row oy: oy * stride_h - pad_top + ky * dilation_h (columns alike). The weights gradient sums
// the N*OH*OW output positions in `splits` chunks (one partial sum per chunk, then a fixed-order
// sum), so that large images still give enough threads.
struct ConvParams {
  ImageGeometry x, y;
  uint32_t kh, kw, groups, ig, og;
  int32_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
  uint32_t splits;
};

#ifndef __METAL_VERSION__
}  // namespace jaxmps::metal
#endif
