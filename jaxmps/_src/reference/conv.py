"""Reference forward, data-gradient and weights-gradient kernels of the MPS convolution family.

Formulas: ``shared/MPS_SEMANTICS.md`` section 8 and the contract in ``xla_ffi/KERNELS.md``.
Weights are MPS OHWI ``[O][KH][KW][I/G]``; images NHWC or NCHW. The input position of tap
(ky, kx) for output pixel (oy, ox) is ``(oy*stride_h - pad_top + ky*dilation_h,
ox*stride_w - pad_left + kx*dilation_w)``; positions outside the image read zero. Output sizes
are explicit (the padding rules live in ``padding.py``), so the pad after the image is whatever
makes that size, possibly negative (rows cropped). Built on ``lax.conv_general_dilated`` (XLA's
own convolution) in float32 (float64 for float64 data) at HIGHEST precision; the gradients are
the exact adjoints written as convolutions, the same ones JAX's autodiff of the forward uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .norm import acc_dtype


def _acc(x):
    return x.astype(acc_dtype(x.dtype))


def _dimension_numbers(channels_last: bool) -> lax.ConvDimensionNumbers:
    """(lhs, rhs, out) specs as (batch/out-feature, feature/in-feature, H, W) axis indices."""
    image = (0, 3, 1, 2) if channels_last else (0, 1, 2, 3)
    return lax.ConvDimensionNumbers(image, (0, 3, 1, 2), image)


def _spatial(shape, channels_last: bool):
    return (shape[1], shape[2]) if channels_last else (shape[2], shape[3])


def _pad_after(size_in: int, size_out: int, stride: int, extent: int, before: int) -> int:
    """Pad after the input so that a window of `extent` at `stride` gives `size_out` outputs."""
    return (size_out - 1) * stride + extent - size_in - before


def transpose_weights(weights, groups: int):
    """OHWI weights (O, KH, KW, I/G) -> (I, KH, KW, O/G): in/out swapped within each group and
    flipped in both spatial axes. The adjoint convolution's weights; an involution."""
    o, kh, kw, ig = weights.shape
    og = o // groups
    w = weights.reshape(groups, og, kh, kw, ig)
    w = jnp.transpose(w, (0, 4, 2, 3, 1)).reshape(groups * ig, kh, kw, og)
    return w[:, ::-1, ::-1, :]


def conv2d_forward(x, weights, bias, *, stride_h: int, stride_w: int, dilation_h: int,
                   dilation_w: int, pad_top: int, pad_left: int, groups: int, output_h: int,
                   output_w: int, channels_last: bool):
    """y = bias + cross-correlation of x with weights. Returns (y,)."""
    xa = _acc(x)
    h, w = _spatial(x.shape, channels_last)
    _, kh, kw, _ = weights.shape
    pads = ((pad_top, _pad_after(h, output_h, stride_h, (kh - 1) * dilation_h + 1, pad_top)),
            (pad_left, _pad_after(w, output_w, stride_w, (kw - 1) * dilation_w + 1, pad_left)))
    y = lax.conv_general_dilated(
        xa, weights.astype(xa.dtype), (stride_h, stride_w), pads,
        rhs_dilation=(dilation_h, dilation_w), dimension_numbers=_dimension_numbers(
            channels_last), feature_group_count=groups, precision=lax.Precision.HIGHEST)
    shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    y = y + bias.astype(xa.dtype).reshape(shape)
    return (y.astype(x.dtype),)


def conv2d_data_gradient(dy, weights, *, stride_h: int, stride_w: int, dilation_h: int,
                         dilation_w: int, pad_top: int, pad_left: int, groups: int,
                         input_h: int, input_w: int, channels_last: bool):
    """dx = adjoint of the forward in x: dy with (stride - 1) zeros inserted, convolved at
    stride 1 with the flipped, in/out-swapped weights. Returns (dx,)."""
    ga = _acc(dy)
    oh, ow = _spatial(dy.shape, channels_last)
    _, kh, kw, _ = weights.shape
    ext_h, ext_w = (kh - 1) * dilation_h + 1, (kw - 1) * dilation_w + 1
    lo_h, lo_w = ext_h - 1 - pad_top, ext_w - 1 - pad_left
    inserted_h, inserted_w = (oh - 1) * stride_h + 1, (ow - 1) * stride_w + 1
    pads = ((lo_h, _pad_after(inserted_h, input_h, 1, ext_h, lo_h)),
            (lo_w, _pad_after(inserted_w, input_w, 1, ext_w, lo_w)))
    dx = lax.conv_general_dilated(
        ga, transpose_weights(weights, groups).astype(ga.dtype), (1, 1), pads,
        lhs_dilation=(stride_h, stride_w), rhs_dilation=(dilation_h, dilation_w),
        dimension_numbers=_dimension_numbers(channels_last), feature_group_count=groups,
        precision=lax.Precision.HIGHEST)
    return (dx.astype(dy.dtype),)


def conv2d_weights_gradient(dy, x, *, stride_h: int, stride_w: int, dilation_h: int,
                            dilation_w: int, pad_top: int, pad_left: int, groups: int,
                            kernel_h: int, kernel_w: int, channels_last: bool):
    """dW[o,ky,kx,c] = sum_{n,oy,ox} dy[n,oy,ox,o] x[n,iy,ix,g*I/G+c], db[o] = sum dy, summed
    over the batch: a convolution of x (batch and feature axes swapped) with dy as the window,
    one group per batch group. Returns (dweights, dbias)."""
    xa, ga = _acc(x), _acc(dy)
    h, w = _spatial(x.shape, channels_last)
    oh, ow = _spatial(dy.shape, channels_last)
    # Window = dy dilated by the stride, sliding by the dilation over the padded x.
    pads = ((pad_top, _pad_after(h, kernel_h, dilation_h, (oh - 1) * stride_h + 1, pad_top)),
            (pad_left, _pad_after(w, kernel_w, dilation_w, (ow - 1) * stride_w + 1, pad_left)))
    image = (3, 0, 1, 2) if channels_last else (1, 0, 2, 3)
    numbers = lax.ConvDimensionNumbers(image, image, (3, 0, 1, 2))
    dw = lax.conv_general_dilated(
        xa, ga, (dilation_h, dilation_w), pads, rhs_dilation=(stride_h, stride_w),
        dimension_numbers=numbers, batch_group_count=groups, precision=lax.Precision.HIGHEST)
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    return dw, jnp.sum(ga, axis=axes)


# ---- the gradients as XLA's own transposes of the forward --------------------------------------
# On platforms where XLA's convolution is the native implementation (CUDA), the gradient
# kernels lower to the VJP of the forward: XLA (and cuDNN) then see the formulation they
# build for jax.grad of a convolution, which they are tuned for, instead of the explicit
# zero-inserted / batch-grouped convolutions above. Same values (both are the exact adjoints).


def conv2d_data_gradient_by_vjp(dy, weights, *, input_h: int, input_w: int, groups: int,
                                channels_last: bool, **geometry):
    """conv2d_data_gradient as the VJP in x of conv2d_forward. Returns (dx,)."""
    n = dy.shape[0]
    oh, ow = _spatial(dy.shape, channels_last)
    c = weights.shape[3] * groups
    shape = (n, input_h, input_w, c) if channels_last else (n, c, input_h, input_w)
    bias = jnp.zeros((weights.shape[0],), weights.dtype)

    def forward(x):
        return conv2d_forward(x, weights, bias, groups=groups, output_h=oh, output_w=ow,
                              channels_last=channels_last, **geometry)[0]
    # The primal (a convolution of zeros) is dead code for XLA: only the transpose remains.
    _, vjp = jax.vjp(forward, jnp.zeros(shape, dy.dtype))
    return vjp(dy)


def conv2d_weights_gradient_by_vjp(dy, x, *, kernel_h: int, kernel_w: int, groups: int,
                                   channels_last: bool, **geometry):
    """conv2d_weights_gradient as the VJP in the weights of conv2d_forward (summed over the
    batch) and the sum of dy. Returns (dweights, dbias)."""
    oh, ow = _spatial(dy.shape, channels_last)
    o = dy.shape[3] if channels_last else dy.shape[1]
    i = x.shape[3] if channels_last else x.shape[1]
    pdt = acc_dtype(dy.dtype)
    bias = jnp.zeros((o,), pdt)

    def forward(weights):
        return conv2d_forward(x, weights, bias, groups=groups, output_h=oh, output_w=ow,
                              channels_last=channels_last, **geometry)[0]
    _, vjp = jax.vjp(forward, jnp.zeros((o, kernel_h, kernel_w, i // groups), pdt))
    (dw,) = vjp(dy)
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    return dw, jnp.sum(_acc(dy), axis=axes)
