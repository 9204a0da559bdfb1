"""The convolution ops under JAX transformations: vmap (images only -> folded into N, batched
weights -> folded into groups, any in_axes, vmap of grad), jit, float64 finite differences,
second order (gradient of the gradient kernels) for conv2d, conv_transpose2d and
fully_connected on the default (native where available) path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import jaxmps
from conftest import assert_close
from test_conv_oracles import random

KW = dict(strides=(2, 1), dilation=(1, 2), groups=2, padding="same")

OPS = {
    "conv2d": (lambda x, w, b, impl: jaxmps.conv2d(x, w, b, implementation=impl, **KW),
               (2, 6, 5, 4), (6, 3, 2, 2)),
    "conv_transpose2d": (lambda x, w, b, impl: jaxmps.conv_transpose2d(
        x, w, b, implementation=impl, **KW), (2, 4, 3, 4), (6, 2, 3, 2)),
    "fully_connected": (lambda x, w, b, impl: jaxmps.fully_connected(
        x, w, b, implementation=impl), (2, 3, 2, 4), (6, 3, 2, 4)),
}


def _inputs(op, seed=0):
    _, x_shape, w_shape = OPS[op]
    return (jnp.asarray(random(x_shape, seed), jnp.float32),
            jnp.asarray(random(w_shape, seed + 1) * 0.3, jnp.float32),
            jnp.asarray(random((w_shape[0],), seed + 2), jnp.float32))


def _call(op, impl=None):
    return lambda x, w, b: OPS[op][0](x, w, b, impl)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batched", ["x", "w", "all"])
def test_vmap_matches_a_loop(op, batched):
    inputs = [_inputs(op, seed) for seed in range(3)]
    xs, ws, bs = (jnp.stack(v) for v in zip(*inputs))
    axes = {"x": (0, None, None), "w": (None, 0, None), "all": (0, 0, 0)}[batched]
    args = [v if a == 0 else v[0] for v, a in zip((xs, ws, bs), axes)]
    got = jax.vmap(_call(op), in_axes=axes)(*args)
    expected = jnp.stack([_call(op, "reference")(*[v[i] if a == 0 else v for v, a in
                                                  zip(args, axes)]) for i in range(3)])
    assert_close(got, expected, "float32", scale=5.0)


@pytest.mark.parametrize("op", OPS)
def test_vmap_of_grad_and_nonzero_in_axes(op):
    inputs = [_inputs(op, seed) for seed in range(3)]
    xs, ws, bs = (jnp.stack(v, axis=1) for v in zip(*inputs))  # vmapped axis 1

    def loss(impl):
        return lambda x, w, b: jnp.sum(jnp.sin(_call(op, impl)(x, w, b)))

    got = jax.jit(jax.vmap(jax.grad(loss(None), argnums=(0, 1, 2)), in_axes=1))(xs, ws, bs)
    for i in range(3):
        expected = jax.grad(loss("reference"), argnums=(0, 1, 2))(*inputs[i])
        for g, e in zip(got, expected):
            assert_close(g[i], e, "float32", scale=10.0)


@pytest.mark.parametrize("op", OPS)
def test_grads_against_finite_differences(x64, op):
    x, w, b = (v.astype(jnp.float64) for v in _inputs(op))
    check_grads(_call(op), (x, w, b), order=1, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_second_order_matches_reference(x64, op):
    """Hessian-vector products through the gradient kernels (their JVPs come from the
    reference) equal those of the reference everywhere."""
    x, w, b = (v.astype(jnp.float64) for v in _inputs(op))
    v = [jnp.asarray(random(t.shape, 9 + i)) for i, t in enumerate((x, w, b))]

    def hvp(impl):
        loss = lambda x, w, b: jnp.sum(jnp.tanh(_call(op, impl)(x, w, b)))
        grad = jax.grad(loss, argnums=(0, 1, 2))
        return jax.jvp(grad, (x, w, b), tuple(v))[1]

    for g, e in zip(hvp(None), hvp("reference")):
        assert_close(g, e, "float64", scale=10.0)


def test_conv2d_second_order_against_finite_differences(x64):
    x, w, b = (v.astype(jnp.float64) for v in _inputs("conv2d"))
    check_grads(lambda x, w: jax.grad(lambda x, w: jnp.sum(_call("conv2d")(x, w, b) ** 2),
                                      argnums=(0, 1))(x, w),
                (x, w), order=1, modes=("rev",), eps=1e-4)


def test_jit_does_not_retrace_and_layouts_agree():
    x, w, b = _inputs("conv2d")
    traces = []

    @jax.jit
    def f(x, w, b):
        traces.append(1)
        return jaxmps.conv2d(x, w, b, **KW)

    y1, y2 = f(x, w, b), f(x + 1, w, b)
    assert len(traces) == 1 and y1.shape == y2.shape
    y_nchw = jaxmps.conv2d(jnp.transpose(x, (0, 3, 1, 2)), w, b, data_format="NCHW", **KW)
    assert_close(jnp.transpose(y_nchw, (0, 2, 3, 1)), y1, "float32")


def test_use_implementation_context_selects_reference():
    x, w, b = _inputs("conv2d")
    with jaxmps.use_implementation("reference"):
        text = jax.jit(lambda x: jaxmps.conv2d(x, w, b, **KW)).lower(x).as_text()
    assert "jaxmps_conv2d" not in text
