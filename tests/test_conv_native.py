"""conv2d on the native kernels against XLA's convolution (lax.conv_general_dilated with the
MPS pads) and the numpy loops: a grid of kernels, strides, dilations, groups, depthwise, every
padding mode, odd channel counts, images smaller than the kernel; every dtype and layout;
blocked sizes; each CPU micro-kernel; and the lowered HLO of the native path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmps
from conftest import assert_close, require_native
from jaxmps._src import checks
from jaxmps._src import conv_kernels as k
from jaxmps._src import padding as pad
from test_conv_oracles import conv_loop, random

PADDINGS = ["valid", "same", "same_bottom_right", "full", ((2, 0), (1, 3))]
KERNELS = [(2, 3), (3, 4), (1, 1), (5, 5)]
STRIDES = [1, 2, (2, 3), 3]
DILATIONS = [1, (2, 1), 2]
GROUPS = [1, 2, "depthwise"]


def _require_all(dtype="float32"):
    for kernel in k.ALL:
        require_native(kernel, dtype)


def lax_conv(x, w, b, strides, dilation, groups, padding, channels_last=True):
    """XLA's own convolution with the pads of jaxmps' padding rule (independent of jaxmps'
    kernels and reference)."""
    x_nhwc = x if channels_last else jnp.transpose(x, (0, 2, 3, 1))
    s, d = checks.pair("test", "strides", strides), checks.pair("test", "dilation", dilation)
    pads = [pad.forward_axis(x_nhwc.shape[1 + i], w.shape[1 + i], s[i], d[i], padding, i)
            for i in range(2)]
    y = lax.conv_general_dilated(x_nhwc, w, s, [(p.pad_before, p.pad_after) for p in pads],
                                 rhs_dilation=d, dimension_numbers=("NHWC", "OHWI", "NHWC"),
                                 feature_group_count=groups, precision=lax.Precision.HIGHEST)
    y = y + (0 if b is None else b)
    return y if channels_last else jnp.transpose(y, (0, 3, 1, 2))


def _value_and_grads(conv):
    """Jitted (y, dx, dw, db) of sum(y * probe) for a conv(x, w, b) callable."""
    def loss(x, w, b):
        y = conv(x, w, b)
        probe = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
        return jnp.sum(y * probe), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


GRID = [(kernel, padding, STRIDES[(i + j) % 4], DILATIONS[(i + 2 * j) % 3],
         GROUPS[(i + j) % 3], (i + j) % 2 == 0)
        for i, kernel in enumerate(KERNELS) for j, padding in enumerate(PADDINGS)]


@pytest.mark.parametrize("kernel,padding,strides,dilation,groups,channels_last", GRID,
                         ids=lambda v: str(v).replace(" ", ""))
def test_conv2d_grid_against_xla_convolution(kernel, padding, strides, dilation, groups,
                                             channels_last):
    """float32: NHWC runs the row-pointer kernels, NCHW the packed GEMM (float64 and the half
    types run the packed GEMM too, see the dtype test)."""
    _require_all()
    c_in = 6
    depthwise = groups == "depthwise"
    groups = c_in if depthwise else groups
    # depthwise: channel multiplier 1 or 2 (by layout); others 5 outputs per group
    c_out = (c_in if channels_last else 2 * c_in) if depthwise else 5 * groups
    x = random((2, 9, 8, c_in), 0, np.float32)
    w = random((c_out,) + kernel + (c_in // groups,), 1, np.float32)
    b = random((c_out,), 2, np.float32)
    if not channels_last:
        x = x.transpose(0, 3, 1, 2)
    fmt = "NHWC" if channels_last else "NCHW"
    kw = dict(strides=strides, dilation=dilation, groups=groups, padding=padding)
    (_, y), grads = _value_and_grads(lambda x, w, b: jaxmps.conv2d(
        x, w, b, data_format=fmt, implementation="native", **kw))(x, w, b)
    (_, y_xla), grads_xla = _value_and_grads(lambda x, w, b: lax_conv(
        x, w, b, strides, dilation, groups, padding, channels_last))(x, w, b)
    assert y.shape == y_xla.shape
    assert_close(y, y_xla, "float32", scale=5.0)
    for name, g, e in zip(("dx", "dw", "db"), grads, grads_xla):
        assert_close(g, e, "float32", scale=20.0, err_msg=name)


@pytest.mark.parametrize("padding", ["same", "full", ((2, 1), (2, 2))])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_image_smaller_than_kernel_matches_numpy_loop(request, padding, dtype):
    if dtype == "float64":
        request.getfixturevalue("x64")
    _require_all(dtype)
    x, w, b = (random(s, i, dtype) for i, s in enumerate([(2, 3, 2, 5), (4, 5, 5, 5), (4,)]))
    y = jaxmps.conv2d(x, w, b, padding=padding, implementation="native")
    plans = [pad.forward_axis(x.shape[1 + i], 5, 1, 1, padding, i) for i in range(2)]
    expected = conv_loop(x.astype(np.float64), w.astype(np.float64), b, (1, 1), (1, 1),
                         [p.pad_before for p in plans], [p.output for p in plans], 1)
    assert_close(y, expected, dtype, scale=5.0)


def test_valid_padding_with_an_image_smaller_than_the_kernel_is_an_error():
    with pytest.raises(ValueError, match="jaxmps.conv2d: the output would be empty"):
        jaxmps.conv2d(jnp.ones((1, 3, 3, 2)), jnp.ones((2, 5, 5, 2)), padding="valid")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("groups", [1, 37], ids=["dense", "depthwise"])
def test_kernels_match_reference_in_every_dtype_and_layout(request, dtype, channels_last,
                                                           groups):
    """The three kernels, native vs reference, 37 -> 74 channels (not multiples of 4)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    _require_all(dtype)
    params = dict(stride_h=2, stride_w=1, dilation_h=1, dilation_w=2, pad_top=1, pad_left=2,
                  groups=groups, channels_last=channels_last)
    pdt = jnp.float64 if dtype == "float64" else jnp.float32
    x = jnp.asarray(random((2, 9, 7, 37), 0)).astype(dtype)
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    w = jnp.asarray(random((74, 3, 3, 37 // groups), 1) * 0.2, pdt)
    b = jnp.asarray(random((74,), 2), pdt)

    def run(impl):
        (y,) = k.conv2d_forward.bind(x, w, b, output_h=5, output_w=7, implementation=impl,
                                     **params)
        dy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape).astype(dtype)
        (dx,) = k.conv2d_data_gradient.bind(dy, w, input_h=9, input_w=7, implementation=impl,
                                            **params)
        dw, db = k.conv2d_weights_gradient.bind(dy, x, kernel_h=3, kernel_w=3,
                                                implementation=impl, **params)
        return y, dx, dw, db

    scale = 4.0 if groups == 1 else 1.0

    for name, got, expected in zip(("y", "dx", "dw", "db"), run("native"), run("reference")):
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        assert_close(got, expected, dtype, scale=scale, err_msg=name)


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_blocked_sizes(channels_last):
    """Depth > one packed block (K = 9*40 = 360), several pixel blocks and reduction slots."""
    _require_all()
    x = jnp.asarray(random((3, 20, 21, 40), 0), jnp.float32)
    w = jnp.asarray(random((35, 3, 3, 40), 1) * 0.1, jnp.float32)
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    fmt = "NHWC" if channels_last else "NCHW"
    results = [_value_and_grads(lambda x, w, b: jaxmps.conv2d(
        x, w, b, data_format=fmt, implementation=impl))(x, w, jnp.zeros(35))
        for impl in ("native", "reference")]
    (_, y), grads = results[0]
    (_, y_ref), grads_ref = results[1]
    assert_close(y, y_ref, "float32", scale=5.0)
    for g, e in zip(grads, grads_ref):
        assert_close(g, e, "float32", scale=50.0)


_ISA_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxmps._src import conv_kernels as k
    rng = np.random.default_rng(0)
    # (dtype, layout, groups, input channels, output channels): O/G = 11 and 16 take the full
    # AVX2 tile (6x16), O/G = 6 the half-width one (12x8); 1 -> 12 has one input channel.
    cases = [("float32", True, 2, 30, 22), ("float64", True, 2, 30, 22),
             ("float32", True, 1, 5, 6), ("float32", False, 1, 5, 6),
             ("float32", False, 1, 5, 16), ("float32", True, 1, 1, 12)]
    for dtype, channels_last, groups, c_in, c_out in cases:
        jax.config.update("jax_enable_x64", dtype == "float64")
        params = dict(stride_h=1, stride_w=2, dilation_h=1, dilation_w=1, pad_top=1,
                      pad_left=0, groups=groups, channels_last=channels_last)
        layout = (lambda a: a) if channels_last else (lambda a: a.transpose(0, 3, 1, 2))
        x = jnp.asarray(layout(rng.standard_normal((2, 11, 9, c_in))), dtype)
        w = jnp.asarray(rng.standard_normal((c_out, 3, 2, c_in // groups)), dtype)
        dy = jnp.asarray(layout(rng.standard_normal((2, 11, 4, c_out))), dtype)
        for impl in ("native", "reference"):
            y, = k.conv2d_forward.bind(x, w, w[:, 0, 0, 0], output_h=11, output_w=4,
                                       implementation=impl, **params)
            dx, = k.conv2d_data_gradient.bind(dy, w, input_h=11, input_w=9,
                                              implementation=impl, **params)
            dw, db = k.conv2d_weights_gradient.bind(dy, x, kernel_h=3, kernel_w=2,
                                                    implementation=impl, **params)
            out = [np.asarray(v, np.float64) for v in (y, dx, dw, db)]
            if impl == "native":
                native = out
        err = max(float(np.max(np.abs(a - b)) / (1 + np.max(np.abs(b))))
                  for a, b in zip(native, out))
        assert err < (1e-5 if dtype == "float32" else 1e-12), (dtype, c_in, c_out, err)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_micro_kernel_variant(isa):
    """The AVX2 and portable micro-kernels (the default here may be AVX-512) in a fresh
    process with JAXMPS_CPU_ISA capping the choice."""
    _require_all()
    env = dict(os.environ, JAXMPS_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_nan_and_inf_propagate():
    _require_all()
    x = np.array(random((1, 5, 5, 3), 0), np.float32)
    x[0, 2, 2, 1] = np.nan
    x[0, 0, 4, 0] = np.inf
    w = jnp.asarray(random((2, 3, 3, 3), 1), jnp.float32)
    y = jaxmps.conv2d(jnp.asarray(x), w, implementation="native")
    y_ref = jaxmps.conv2d(jnp.asarray(x), w, implementation="reference")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    finite = np.isfinite(y_ref)
    np.testing.assert_allclose(np.asarray(y)[finite], np.asarray(y_ref)[finite], rtol=1e-5,
                               atol=1e-5)


# ---- HLO: the native path calls our kernels, and only the gradients that are needed ---------


def _custom_calls(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return {name for name in ("jaxmps_conv2d_forward", "jaxmps_conv2d_data_gradient",
                              "jaxmps_conv2d_weights_gradient") if name in text}


def test_hlo_calls_only_the_gradients_that_are_needed():
    _require_all()
    x, w, b = jnp.ones((2, 6, 6, 4)), jnp.ones((5, 3, 3, 4)), jnp.ones((5,))

    def loss(impl):
        return lambda x, w, b: jnp.sum(jaxmps.conv2d(x, w, b, implementation=impl) ** 2)

    fwd = "jaxmps_conv2d_forward"
    data, weights = "jaxmps_conv2d_data_gradient", "jaxmps_conv2d_weights_gradient"
    assert _custom_calls(lambda x: jaxmps.conv2d(x, w, implementation="native"), x) == {fwd}
    assert _custom_calls(jax.grad(loss("native")), x, w, b) == {fwd, data}
    assert _custom_calls(jax.grad(loss("native"), argnums=(1, 2)), x, w, b) == {fwd, weights}
    assert _custom_calls(jax.grad(loss(None), argnums=(0, 1)), x, w, b) == {fwd, data, weights}
    assert _custom_calls(jax.grad(loss("reference"), argnums=(0, 1)), x, w, b) == set()


# ---- small layers: one input channel per group, tile widths, rows spanning images -----------


def _check_against_xla(x, w, b, layout, **kw):
    """y, dx, dw, db of the native conv2d against XLA's convolution (float32)."""
    channels_last = layout == "NHWC"
    if not channels_last:
        x = x.transpose(0, 3, 1, 2)
    (_, y), grads = _value_and_grads(lambda x, w, b: jaxmps.conv2d(
        x, w, b, data_format=layout, implementation="native", **kw))(x, w, b)
    (_, y_xla), grads_xla = _value_and_grads(lambda x, w, b: lax_conv(
        x, w, b, kw.get("strides", 1), kw.get("dilation", 1), kw.get("groups", 1),
        kw.get("padding", "same"), channels_last))(x, w, b)
    assert_close(y, y_xla, "float32", scale=5.0)
    for name, g, e in zip(("dx", "dw", "db"), grads, grads_xla):
        assert_close(g, e, "float32", scale=20.0, err_msg=name)


# (input channels, output channels per group): groups = input channels, one input channel per
# group. 1 -> 16 is the demo's first layer (a GEMM of 9-deep rows, as O/G >= 8 picks), 3 x 3
# and 2 x 8 a depthwise layer with channel multiplier 3 (direct loops) and 8 (GEMM).
SINGLE_CHANNEL = [(1, 16), (3, 3), (2, 8)]


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("channels,multiplier", SINGLE_CHANNEL, ids=str)
@pytest.mark.parametrize("strides", [1, 2])
def test_one_input_channel_per_group(layout, channels, multiplier, strides):
    _require_all()
    x = random((5, 7, 6, channels), 0, np.float32)
    w = random((channels * multiplier, 3, 3, 1), 1, np.float32)
    b = random((channels * multiplier,), 2, np.float32)
    _check_against_xla(x, w, b, layout, strides=strides, groups=channels)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("outputs", [16, 24, 40, 6])
def test_every_tile_width(layout, outputs):
    """On AVX-512, O = 16, 40 and 6 run the half-width tile (14x16), 24 the full one (14x32);
    on AVX2, 6 the half-width tile (12x8), the others the full one (6x16). I = 20: the taps of
    a packed panel's rows change within the panel."""
    _require_all()
    x = random((3, 6, 5, 20), 0, np.float32)
    w = random((outputs, 3, 2, 20), 1, np.float32) * 0.3
    b = random((outputs,), 2, np.float32)
    _check_against_xla(x, w, b, layout, padding=((1, 0), (1, 1)))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_fully_connected_rows_are_images(layout):
    """A kernel covering the whole 3x2 image ("valid", one output pixel): each GEMM row is an
    image, so the 33 images fill several 14-row tiles and weights-gradient chunks."""
    _require_all()
    x = random((33, 3, 2, 7), 0, np.float32)
    w = random((10, 3, 2, 7), 1, np.float32)
    b = random((10,), 2, np.float32)
    _check_against_xla(x, w, b, layout, padding="valid")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("kernel,stride,dilation,pads,groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 3), (3, 2), (1, 2), (0, 2), 2),     # stride > kernel: unreached input pixels
    ((3, 1), (2, 1), (2, 1), (-1, 0), 6),    # depthwise, a negative (cropping) pad
    ((1, 1), (2, 2), (1, 1), (0, 0), 3),
], ids=str)
def test_gradients_by_vjp_match_the_explicit_gradients(kernel, stride, dilation, pads, groups,
                                                       channels_last, dtype):
    """The CUDA lowering of the gradient kernels (XLA's VJP of the forward,
    reference/conv.py *_by_vjp) against the explicit zero-inserted / batch-grouped
    convolutions of the reference kernels, on uneven geometries."""
    from jaxmps._src.reference import conv as ref

    kh, kw = kernel
    params = dict(stride_h=stride[0], stride_w=stride[1], dilation_h=dilation[0],
                  dilation_w=dilation[1], pad_top=pads[0], pad_left=pads[1], groups=groups,
                  channels_last=channels_last)
    h, w, c, o = 11, 10, 6, 12
    oh = (h + 2 * pads[0] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (w + 2 * pads[1] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    x = jnp.asarray(random((2, h, w, c), 3)).astype(dtype)
    dy = jnp.asarray(random((2, oh, ow, o), 4)).astype(dtype)
    if not channels_last:
        x, dy = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(dy, (0, 3, 1, 2))
    weights = jnp.asarray(random((o, kh, kw, c // groups), 5) * 0.3, jnp.float32)

    expected = ref.conv2d_data_gradient(dy, weights, input_h=h, input_w=w, **params)
    got = ref.conv2d_data_gradient_by_vjp(dy, weights, input_h=h, input_w=w, **params)
    expected += ref.conv2d_weights_gradient(dy, x, kernel_h=kh, kernel_w=kw, **params)
    got += ref.conv2d_weights_gradient_by_vjp(dy, x, kernel_h=kh, kernel_w=kw, **params)
    for name, g, e in zip(("dx", "dweights", "dbias"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert_close(g, e, dtype, scale=4.0, err_msg=name)
