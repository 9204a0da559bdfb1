"""Independent truth for the convolution family: small numpy loops written from the MPS
formulas (MPS_SEMANTICS.md section 8), and the tests that the jnp reference kernels match them
and jax.vjp of the reference forward, plus the MPS padding rules on known cases."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmps._src import padding as pad
from jaxmps._src.reference import conv as ref

# ---- numpy oracles (NHWC images, OHWI weights, float64) ----------------------------------------


def _taps(out_size, in_size, stride, dilation, kernel, pad_before):
    """For each (output index, tap): the input index or -1 when outside the image."""
    o = np.arange(out_size)[:, None] * stride - pad_before + np.arange(kernel)[None, :] * dilation
    return np.where((o >= 0) & (o < in_size), o, -1)


def conv_loop(x, w, b, stride, dilation, pads, out_hw, groups):
    """y[n,oy,ox,o] = b[o] + sum W[o,ky,kx,c] x[n, oy*sh-pt+ky*dh, ox*sw-pl+kx*dw, g*Ig+c]."""
    n, h, wd, c = x.shape
    o_ch, kh, kw, ig = w.shape
    og = o_ch // groups
    rows = _taps(out_hw[0], h, stride[0], dilation[0], kh, pads[0])
    cols = _taps(out_hw[1], wd, stride[1], dilation[1], kw, pads[1])
    y = np.zeros((n, out_hw[0], out_hw[1], o_ch)) + (0 if b is None else b)
    for oy, ox, ky, kx in itertools.product(range(out_hw[0]), range(out_hw[1]), range(kh),
                                            range(kw)):
        iy, ix = rows[oy, ky], cols[ox, kx]
        if iy < 0 or ix < 0:
            continue
        for g in range(groups):
            xs = x[:, iy, ix, g * ig:(g + 1) * ig]                   # (N, Ig)
            ws = w[g * og:(g + 1) * og, ky, kx, :]                     # (Og, Ig)
            y[:, oy, ox, g * og:(g + 1) * og] += xs @ ws.T
    return y


def conv_data_gradient_loop(dy, w, stride, dilation, pads, in_hw, groups):
    """dx = sum over taps that read input pixel (iy, ix) of W * dy (scatter form)."""
    n, oh, ow, o_ch = dy.shape
    _, kh, kw, ig = w.shape
    og = o_ch // groups
    rows = _taps(oh, in_hw[0], stride[0], dilation[0], kh, pads[0])
    cols = _taps(ow, in_hw[1], stride[1], dilation[1], kw, pads[1])
    dx = np.zeros((n, in_hw[0], in_hw[1], ig * groups))
    for oy, ox, ky, kx in itertools.product(range(oh), range(ow), range(kh), range(kw)):
        iy, ix = rows[oy, ky], cols[ox, kx]
        if iy < 0 or ix < 0:
            continue
        for g in range(groups):
            dx[:, iy, ix, g * ig:(g + 1) * ig] += (
                dy[:, oy, ox, g * og:(g + 1) * og] @ w[g * og:(g + 1) * og, ky, kx, :])
    return dx


def conv_weights_gradient_loop(dy, x, stride, dilation, pads, kernel_hw, groups):
    """dW[o,ky,kx,c] = sum_{n,oy,ox} dy[n,oy,ox,o] x[n,iy,ix,g*Ig+c]; db = sum dy."""
    n, oh, ow, o_ch = dy.shape
    _, h, wd, c = x.shape
    kh, kw = kernel_hw
    ig, og = c // groups, o_ch // groups
    rows = _taps(oh, h, stride[0], dilation[0], kh, pads[0])
    cols = _taps(ow, wd, stride[1], dilation[1], kw, pads[1])
    dw = np.zeros((o_ch, kh, kw, ig))
    for oy, ox, ky, kx in itertools.product(range(oh), range(ow), range(kh), range(kw)):
        iy, ix = rows[oy, ky], cols[ox, kx]
        if iy < 0 or ix < 0:
            continue
        for g in range(groups):
            dw[g * og:(g + 1) * og, ky, kx, :] += (
                dy[:, oy, ox, g * og:(g + 1) * og].T @ x[:, iy, ix, g * ig:(g + 1) * ig])
    return dw, dy.sum(axis=(0, 1, 2))


def conv_transpose_loop(x, w, b, stride, dilation, pads, out_hw, groups):
    """MPS transpose: insert (stride-1) zeros between source pixels, then a stride-1
    cross-correlation with the weights as given (no flip), pads on the zero-inserted image."""
    n, h, wd, c = x.shape
    z = np.zeros((n, (h - 1) * stride[0] + 1, (wd - 1) * stride[1] + 1, c))
    z[:, ::stride[0], ::stride[1], :] = x
    return conv_loop(z, w, b, (1, 1), dilation, pads, out_hw, groups)


# ---- shared test geometry ----------------------------------------------------------------------


def random(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def geometry_params(stride, dilation, pads, groups, channels_last=True):
    return dict(stride_h=stride[0], stride_w=stride[1], dilation_h=dilation[0],
                dilation_w=dilation[1], pad_top=pads[0], pad_left=pads[1], groups=groups,
                channels_last=channels_last)


# (kernel, stride, dilation, groups, (pad_top, pad_left), (H, W)), channels 6 in, 4 out*g
GEOMETRIES = [
    ((2, 3), (1, 1), (1, 1), 1, (1, 1), (5, 6)),
    ((3, 4), (2, 1), (1, 2), 2, (0, 3), (7, 9)),
    ((1, 1), (3, 2), (1, 1), 3, (0, 0), (7, 5)),
    ((5, 5), (1, 1), (2, 1), 6, (4, 2), (6, 6)),
    ((3, 3), (2, 3), (1, 1), 1, (-1, 2), (8, 7)),
    ((5, 5), (1, 2), (1, 1), 2, (2, 2), (3, 3)),  # image smaller than the kernel
]


def _sizes(kernel, stride, dilation, pads, hw):
    """Output size when the pad after equals the pad before (a valid, arbitrary choice)."""
    return tuple((hw[i] + 2 * pads[i] - ((kernel[i] - 1) * dilation[i] + 1)) // stride[i] + 1
                 for i in range(2))


@pytest.mark.parametrize("case", GEOMETRIES, ids=str)
def test_reference_kernels_match_numpy_loops(x64, case):
    kernel, stride, dilation, groups, pads, hw = case
    c_in, c_out = 6, 4 * groups if groups != 6 else 6
    x = random((2,) + hw + (c_in,), 0)
    w = random((c_out,) + kernel + (c_in // groups,), 1)
    b = random((c_out,), 2)
    out = _sizes(kernel, stride, dilation, pads, hw)
    params = geometry_params(stride, dilation, pads, groups)
    (y,) = ref.conv2d_forward(x, w, b, output_h=out[0], output_w=out[1], **params)
    np.testing.assert_allclose(y, conv_loop(x, w, b, stride, dilation, pads, out, groups),
                               rtol=1e-12, atol=1e-12)
    dy = random(y.shape, 3)
    (dx,) = ref.conv2d_data_gradient(dy, w, input_h=hw[0], input_w=hw[1], **params)
    np.testing.assert_allclose(
        dx, conv_data_gradient_loop(dy, w, stride, dilation, pads, hw, groups),
        rtol=1e-12, atol=1e-12)
    dw, db = ref.conv2d_weights_gradient(dy, x, kernel_h=kernel[0], kernel_w=kernel[1],
                                         **params)
    dw_loop, db_loop = conv_weights_gradient_loop(dy, x, stride, dilation, pads, kernel, groups)
    np.testing.assert_allclose(dw, dw_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db_loop, rtol=1e-12, atol=1e-12)
    # The gradient kernels are the exact VJP of the forward kernel.
    _, vjp = jax.vjp(lambda x, w, b: ref.conv2d_forward(x, w, b, output_h=out[0],
                                                        output_w=out[1], **params)[0], x, w, b)
    for got, expected in zip((dx, dw, db), vjp(jnp.asarray(dy))):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_nchw_is_the_nhwc_kernel_transposed(x64):
    kernel, stride, dilation, groups, pads, hw = GEOMETRIES[1]
    x, w, b = random((2,) + hw + (6,), 0), random((8,) + kernel + (3,), 1), random((8,), 2)
    out = _sizes(kernel, stride, dilation, pads, hw)
    nhwc = geometry_params(stride, dilation, pads, groups, True)
    nchw = geometry_params(stride, dilation, pads, groups, False)
    (y,) = ref.conv2d_forward(x, w, b, output_h=out[0], output_w=out[1], **nhwc)
    (y_t,) = ref.conv2d_forward(x.transpose(0, 3, 1, 2), w, b, output_h=out[0],
                                output_w=out[1], **nchw)
    np.testing.assert_allclose(y_t, np.asarray(y).transpose(0, 3, 1, 2), rtol=1e-12)


def test_transpose_weights_is_an_involution(x64):
    w = random((6, 3, 2, 4), 0)
    np.testing.assert_array_equal(ref.transpose_weights(ref.transpose_weights(w, 3), 3), w)
    assert ref.transpose_weights(w, 3).shape == (12, 3, 2, 2)


# ---- padding rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5, 6, 7, 16])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_bottom_right_is_tensorflow_same(size, kernel, stride, dilation):
    extent = (kernel - 1) * dilation + 1
    (lo, hi), = lax.padtype_to_pads((size,), (extent,), (stride,), "SAME")
    plan = pad.forward_axis(size, kernel, stride, dilation, "same_bottom_right", 0)
    assert (plan.pad_before, plan.pad_after) == (lo, hi)
    assert plan.output == -(-size // stride)


@pytest.mark.parametrize("size", [5, 6, 7, 16])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_mps_same_puts_the_odd_pad_top_left(size, kernel, stride):
    tf = pad.forward_axis(size, kernel, stride, 1, "same_bottom_right", 0)
    mps = pad.forward_axis(size, kernel, stride, 1, "same", 0)
    assert mps.output == tf.output
    if stride > kernel:  # MPS then centers the unread pixels too (may crop); TF never crops
        extra = (mps.output - 1) * stride + kernel - size
        left = int((extra + 1) / 2)  # C division, truncating toward zero
        assert (mps.pad_before, mps.pad_after) == (left, extra - left)
        return
    assert (mps.pad_before, mps.pad_after) in ((tf.pad_before, tf.pad_after),
                                               (tf.pad_after, tf.pad_before))
    assert mps.pad_before >= mps.pad_after


def test_padding_known_values():
    # Stride 1: "same" pads kd//2 before (MPS offset 0), "full" kd-1 on each side.
    assert pad.forward_axis(10, 4, 1, 1, "same", 0) == (10, 2, 1)
    assert pad.forward_axis(10, 4, 1, 1, "same_bottom_right", 0) == (10, 1, 2)
    assert pad.forward_axis(10, 3, 1, 2, "full", 0) == (14, 4, 4)
    assert pad.forward_axis(10, 3, 1, 1, "valid", 0) == (8, 0, 0)
    # MPS valid is centered: 10 pixels, 3 taps, stride 4 read 7 of them, the 3 unread
    # split as 1 on the top (pad -1) and 2 at the bottom (C division truncates -2/2 to -1).
    assert pad.forward_axis(10, 3, 4, 1, "valid", 0) == (2, -1, -2)
    assert pad.forward_axis(2, 5, 1, 1, "valid", 0).output < 1  # empty: rejected by the ops
    assert pad.forward_axis(7, 3, 2, 1, ((1, 2), (0, 0)), 0) == (4, 1, 2)
    # Transposes: "same" gives (H - 1) * stride + 1 (MPS DestSizeReverse).
    assert pad.transpose_axis(5, 3, 2, 1, "same", 0) == (9, 1, 1)
    assert pad.transpose_axis(5, 3, 2, 1, "valid", 0).output == 7
    assert pad.transpose_axis(5, 3, 2, 1, "full", 0).output == 11
    assert pad.transpose_axis(5, 3, 2, 1, "same", 0, output=10) == (10, 2, 1)
