"""The public convolution ops: conv_transpose2d and fully_connected against the numpy loops and
einsum, the MPS gradient kernels with each gradient_option and with gradient states, the HWIO
weights format, and clear trace-time errors for bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmps
from conftest import assert_close
from jaxmps._src import padding as pad
from test_conv_oracles import conv_transpose_loop, random

IMPLS = [None, "reference"]


# ---- conv_transpose2d --------------------------------------------------------------------------

TRANSPOSE_CASES = [
    # (kernel, strides, dilation, groups, padding, output_size)
    ((3, 3), 2, 1, 1, "same", None),
    ((2, 3), (2, 1), (2, 1), 2, "valid", None),
    ((4, 4), 3, 1, 1, "full", None),
    ((3, 2), 2, 1, 2, "same_bottom_right", (10, 9)),
    ((1, 1), 2, 1, 1, ((1, 0), (0, 2)), None),
    ((5, 5), 1, 1, 4, "same", None),
]


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_conv_transpose2d_matches_zero_insertion_loop(x64, case, impl):
    kernel, strides, dilation, groups, padding, output_size = case
    x = random((2, 5, 4, 4), 0)
    w = random((2 * groups,) + kernel + (4 // groups,), 1)
    b = random((2 * groups,), 2)
    y = jaxmps.conv_transpose2d(x, w, b, strides=strides, dilation=dilation, groups=groups,
                                padding=padding, output_size=output_size, implementation=impl)
    s = (strides, strides) if isinstance(strides, int) else strides
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    plans = [pad.transpose_axis(x.shape[1 + i], kernel[i], s[i], d[i], padding, i,
                                None if output_size is None else output_size[i])
             for i in range(2)]
    expected = conv_transpose_loop(x, w, b, s, d, [p.pad_before for p in plans],
                                   [p.output for p in plans], groups)
    assert y.shape == expected.shape
    assert_close(y, expected, "float64")


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_transpose2d_gradients_are_the_vjp_of_the_loop(x64, impl):
    x, w, b = random((2, 4, 5, 4), 0), random((6, 3, 2, 2), 1), random((6,), 2)
    kw = dict(strides=(2, 3), dilation=(1, 2), groups=2, padding="same")

    def loop(x, w, b):  # the same transpose as zero insertion + lax conv, autodiffed by JAX
        z = jnp.zeros((2, 7, 13, 4)).at[:, ::2, ::3, :].set(x)
        p = [pad.transpose_axis((4, 5)[i], (3, 2)[i], (2, 3)[i], (1, 2)[i], "same", i)
             for i in range(2)]
        return jax.lax.conv_general_dilated(
            z, w, (1, 1), [(q.pad_before, q.pad_after) for q in p], rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "OHWI", "NHWC"), feature_group_count=2) + b

    f = lambda x, w, b: jaxmps.conv_transpose2d(x, w, b, implementation=impl, **kw)
    y, vjp = jax.vjp(f, x, w, b)
    y_loop, vjp_loop = jax.vjp(loop, x, w, b)
    assert_close(y, y_loop, "float64")
    dy = random(y.shape, 3)
    for g, e in zip(vjp(dy), vjp_loop(dy)):
        assert_close(g, e, "float64")
    dx, dw, db = jaxmps.conv_transpose2d_gradient(dy, x, w, implementation=impl, **kw)
    for g, e in zip((dx, dw, db), vjp_loop(dy)):
        assert_close(g, e, "float64")


# ---- fully connected ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_fully_connected_flattens_in_mps_order(x64, impl, data_format):
    x, w, b = random((3, 4, 2, 5), 0), random((7, 4, 2, 5), 1), random((7,), 2)
    expected = np.einsum("nhwc,ohwc->no", x, w) + b
    xin = x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)
    assert_close(jaxmps.fully_connected(xin, w, b, data_format=data_format,
                                        implementation=impl), expected, "float64")
    # (O, H*W*C) weights over the same image, and HWIO (H*W*C, O) Flax Dense kernels.
    flat = w.reshape(7, -1)
    assert_close(jaxmps.fully_connected(xin, flat, b, data_format=data_format,
                                        implementation=impl), expected, "float64")
    assert_close(jaxmps.fully_connected(x.reshape(3, -1), flat.T, b, weights_format="HWIO",
                                        implementation=impl), expected, "float64")


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_connected_gradients(x64, impl):
    x, w, b = random((3, 10), 0), random((4, 10), 1), random((4,), 2)
    f = lambda x, w, b: jaxmps.fully_connected(x, w, b, implementation=impl)
    y, vjp = jax.vjp(f, x, w, b)
    dy = random(y.shape, 3)
    expected = (dy @ w, dy.T @ x, dy.sum(0))
    for g, e in zip(vjp(dy), expected):
        assert g.shape == e.shape
        assert_close(g, e, "float64")
    y2, state = jaxmps.fully_connected_forward(x, w, b, implementation=impl)
    assert_close(y2, y, "float64")
    for g, e in zip(jaxmps.fully_connected_gradient(dy, x, state), expected):
        assert_close(g, e, "float64")


# ---- gradient kernels, options, states -----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_conv2d_gradient_options_and_state(x64, impl):
    x, w, b = random((2, 7, 6, 4), 0), random((6, 3, 2, 2), 1), random((6,), 2)
    kw = dict(strides=2, dilation=(1, 2), groups=2, padding="same")
    y, vjp = jax.vjp(lambda x, w, b: jaxmps.conv2d(x, w, b, implementation=impl, **kw), x, w, b)
    dy = random(y.shape, 3)
    dx_e, dw_e, db_e = vjp(dy)
    y2, state = jaxmps.conv2d_forward(x, w, b, implementation=impl, **kw)
    assert isinstance(state, jaxmps.ConvolutionGradientState)
    assert_close(y2, y, "float64")
    for weights, extra in ((state, {}), (w, kw)):
        dx, dw, db = jaxmps.conv2d_gradient(dy, x, weights, implementation=impl, **extra)
        for g, e in zip((dx, dw, db), (dx_e, dw_e, db_e)):
            assert_close(g, e, "float64")
        dx, dw, db = jaxmps.conv2d_gradient(dy, x, weights, gradient_option="data",
                                            implementation=impl, **extra)
        assert dw is None and db is None
        assert_close(dx, dx_e, "float64")
        dx, dw, db = jaxmps.conv2d_gradient(dy, x, weights, gradient_option="weights_and_bias",
                                            implementation=impl, **extra)
        assert dx is None
        assert_close(dw, dw_e, "float64")
        assert_close(db, db_e, "float64")
    # The state is a pytree: it crosses jit.
    dx_jit = jax.jit(lambda s: jaxmps.conv2d_gradient(dy, x, s, gradient_option="data")[0])(
        state)
    assert_close(dx_jit, dx_e, "float64")


def test_hwio_weights_and_gradients(x64):
    x, w = random((2, 6, 5, 4), 0), random((3, 3, 2, 6), 1)  # HWIO, groups 2
    ohwi = np.transpose(w, (3, 0, 1, 2))
    y = jaxmps.conv2d(x, w, weights_format="HWIO", groups=2)
    assert_close(y, jaxmps.conv2d(x, ohwi, groups=2), "float64")
    dw = jax.grad(lambda w: jnp.sum(jaxmps.conv2d(x, w, weights_format="HWIO", groups=2) ** 2)
                  )(w)
    dw_ohwi = jax.grad(lambda w: jnp.sum(jaxmps.conv2d(x, w, groups=2) ** 2))(ohwi)
    assert_close(dw, np.transpose(dw_ohwi, (1, 2, 3, 0)), "float64")
    _, state = jaxmps.conv2d_forward(x, w, weights_format="HWIO", groups=2)
    dy = random(y.shape, 3)
    assert jaxmps.conv2d_gradient(dy, x, state)[1].shape == w.shape


def test_half_inputs_keep_float32_parameters():
    x = jnp.asarray(random((1, 5, 5, 3), 0), jnp.bfloat16)
    w, b = random((2, 3, 3, 3), 1).astype(np.float32), random((2,), 2).astype(np.float32)
    y = jaxmps.conv2d(x, w, b)
    assert y.dtype == jnp.bfloat16
    dx, dw, db = jax.grad(lambda x, w, b: jnp.sum(jaxmps.conv2d(x, w, b).astype(jnp.float32)),
                          argnums=(0, 1, 2))(x, w, b)
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    _, state = jaxmps.conv2d_forward(x, w.astype(jnp.bfloat16))
    assert state.weights.dtype == jnp.float32


# ---- errors ----------------------------------------------------------------------------------

X = jnp.ones((2, 6, 6, 4))
W = jnp.ones((8, 3, 3, 4))

ERRORS = [
    (lambda: jaxmps.conv2d(X, jnp.ones((8, 3, 3, 3))), ValueError,
     r"jaxmps.conv2d: weights must have I/groups = 4//1 = 4 input channels per group"),
    (lambda: jaxmps.conv2d(X, jnp.ones((8, 3, 3, 2)), groups=3), ValueError,
     r"jaxmps.conv2d: groups must divide the input channels \(4\) and the output channels"),
    (lambda: jaxmps.conv2d(X, jnp.ones((6, 3, 3, 2)), groups=4), ValueError,
     r"groups must divide"),
    (lambda: jaxmps.conv2d(X, jnp.ones((8, 3, 4))), ValueError,
     r"jaxmps.conv2d: weights must be a 4-d OHWI array \(O, KH, KW, I/groups\), got shape"),
    (lambda: jaxmps.conv2d(X, W, strides=0), ValueError,
     r"jaxmps.conv2d: strides must be a positive integer, got 0"),
    (lambda: jaxmps.conv2d(X, W, dilation=(1, -2)), ValueError,
     r"jaxmps.conv2d: dilation must be a positive integer, got -2"),
    (lambda: jaxmps.conv2d(X, W, groups=0), ValueError, r"groups must be a positive integer"),
    (lambda: jaxmps.conv2d(X, W, padding="SAME"), ValueError,
     r"jaxmps.conv2d: padding must be one of"),
    (lambda: jaxmps.conv2d(X, W, padding=((1, 1), (1,))), ValueError, r"padding must be"),
    (lambda: jaxmps.conv2d(X, W, bias=jnp.ones(7)), ValueError,
     r"jaxmps.conv2d: bias must have shape \(8,\)"),
    (lambda: jaxmps.conv2d(X, W, weights_format="OIHW"), ValueError, r"weights_format must"),
    (lambda: jaxmps.conv2d(X[0], W), ValueError, r"x must be a 4-d NHWC image"),
    (lambda: jaxmps.conv2d(X.astype(jnp.int32), W), TypeError, r"x must have a float dtype"),
    (lambda: jaxmps.conv2d(X, W, padding="valid", dilation=3), ValueError,
     r"the output would be empty"),
    (lambda: jaxmps.conv2d_gradient(jnp.ones((2, 6, 6, 8)), X, W, gradient_option="bias"),
     ValueError, r"jaxmps.conv2d_gradient: gradient_option must be one of"),
    (lambda: jaxmps.conv2d_gradient(jnp.ones((2, 5, 6, 8)), X, W), ValueError,
     r"dy must have the forward output's shape \(2, 6, 6, 8\)"),
    (lambda: jaxmps.conv2d_gradient(jnp.ones((2, 6, 6, 8)), X[:, :5],
                                    jaxmps.conv2d_forward(X, W)[1]),
     ValueError, r"x must have the forward input's shape"),
    (lambda: jaxmps.conv_transpose2d_gradient(
        jnp.ones((2, 6, 6, 8)), X, jaxmps.conv2d_forward(X, W)[1]), ValueError,
     r"state must come from conv_transpose2d_forward"),
    (lambda: jaxmps.conv_transpose2d(X, W, output_size=(0, 3)), ValueError,
     r"output_size must be a positive integer"),
    (lambda: jaxmps.fully_connected(X, jnp.ones((3, 5))), ValueError,
     r"jaxmps.fully_connected: weights must have H\*W\*C = 144 features"),
    (lambda: jaxmps.fully_connected(X, jnp.ones((3, 6, 6, 5))), ValueError,
     r"weights must cover the whole input"),
]


@pytest.mark.parametrize("index", range(len(ERRORS)))
def test_bad_input_raises_a_clear_error_at_trace_time(index):
    fn, error, pattern = ERRORS[index]
    with pytest.raises(error, match=pattern):
        fn()
