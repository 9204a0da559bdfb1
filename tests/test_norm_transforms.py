"""The public normalization ops under JAX transformations: jit, vmap (in_axes variants, nested,
batched parameters), grad / value_and_grad (calling our gradient kernel), second order and
Hessian-vector products, jax.checkpoint, lax.scan over layers, and the dtype rules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmps
from conftest import assert_close

C = 4
GAMMA = jnp.linspace(0.5, 1.5, C)
BETA = jnp.linspace(-0.3, 0.3, C)

OPS = {
    "instance_norm": lambda x, impl, g=GAMMA, b=BETA: jaxmps.instance_norm(
        x, g, b, implementation=impl),
    "batch_norm": lambda x, impl, g=GAMMA, b=BETA: jaxmps.batch_norm(
        x, g, b, implementation=impl)[0],
    "spatial_norm": lambda x, impl, g=None, b=None: jaxmps.spatial_norm(
        x, (3, 2), beta=0.75, implementation=impl),
    "local_contrast_norm": lambda x, impl, g=None, b=None: jaxmps.local_contrast_norm(
        x, 3, implementation=impl),
    "cross_channel_norm": lambda x, impl, g=None, b=None: jaxmps.cross_channel_norm(
        x, 3, beta=0.75, implementation=impl),
}


def _x(shape=(2, 5, 4, C), seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.PRNGKey(seed), shape) + 0.2).astype(dtype)


def _loss(op, impl):
    return lambda x: jnp.sum(jnp.sin(OPS[op](x, impl)) * jnp.arange(x.size).reshape(x.shape)
                             / x.size)


@pytest.mark.parametrize("op", OPS)
def test_jit_grad_value_and_grad(op):
    x = _x()
    for impl in (None, "native"):
        v, g = jax.jit(jax.value_and_grad(_loss(op, impl)))(x)
        v_ref, g_ref = jax.value_and_grad(_loss(op, "reference"))(x)
        assert_close(v, v_ref, "float32", 10)
        assert_close(g, g_ref, "float32", 10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("in_axis", [0, 2, 4])
def test_vmap_any_axis(op, in_axis):
    xs = jnp.stack([_x(seed=s) for s in range(3)], axis=in_axis)
    got = jax.vmap(lambda x: OPS[op](x, None), in_axes=in_axis)(xs)
    expected = jnp.stack([OPS[op](jnp.take(xs, i, axis=in_axis), "reference")
                          for i in range(3)])
    assert_close(got, expected, "float32", 10)


@pytest.mark.parametrize("op", OPS)
def test_nested_vmap_and_vmap_of_grad(op):
    xs = jnp.stack([jnp.stack([_x(seed=3 * i + j) for j in range(2)]) for i in range(2)])
    got = jax.vmap(jax.vmap(jax.grad(_loss(op, None))))(xs)
    expected = jax.vmap(jax.vmap(jax.grad(_loss(op, "reference"))))(xs)
    assert_close(got, expected, "float32", 10)


@pytest.mark.parametrize("op", ["instance_norm", "batch_norm"])
def test_vmap_over_parameters(op):
    """Batched gamma/beta fold into the channel axis (exact for channel-wise statistics)."""
    x = _x()
    gs = jnp.stack([GAMMA, 2 * GAMMA, -GAMMA])
    bs = jnp.stack([BETA, BETA + 1, BETA * 0])

    def loss(g, b, impl):
        return jnp.sum(jnp.tanh(OPS[op](x, impl, g, b)) * jnp.arange(x.size).reshape(x.shape))

    got = jax.vmap(jax.grad(functools.partial(loss, impl=None), argnums=(0, 1)))(gs, bs)
    expected = [jax.grad(functools.partial(loss, impl="reference"), argnums=(0, 1))(g, b)
                for g, b in zip(gs, bs)]
    for i in range(2):
        assert_close(got[i], jnp.stack([e[i] for e in expected]), "float32", 50)


@pytest.mark.parametrize("op", OPS)
def test_second_order_and_hvp(x64, op):
    x = _x(dtype=jnp.float64)
    v = _x(seed=7, dtype=jnp.float64)
    f, f_ref = _loss(op, None), _loss(op, "reference")
    # Reverse-over-reverse.
    gg = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * v))(x)
    gg_ref = jax.grad(lambda x: jnp.sum(jax.grad(f_ref)(x) * v))(x)
    np.testing.assert_allclose(gg, gg_ref, rtol=1e-8, atol=1e-10)
    # Forward-over-reverse Hessian-vector product.
    hvp = jax.jvp(jax.grad(f), (x,), (v,))[1]
    np.testing.assert_allclose(hvp, gg_ref, rtol=1e-8, atol=1e-10)


def test_grad_calls_the_gradient_kernel():
    """jax.grad runs our gradient primitive, not autodiff of the forward."""
    jaxpr = str(jax.make_jaxpr(jax.grad(_loss("spatial_norm", None)))(_x()))
    assert "jaxmps_spatial_norm_gradient" in jaxpr
    assert "reduce_window" not in jaxpr


@pytest.mark.parametrize("op", OPS)
def test_checkpoint_and_scan_over_layers(op):
    x = _x()

    def model(x, impl):
        def layer(h, scale):
            h = jax.checkpoint(lambda h: OPS[op](h * scale, impl))(h)
            return h, jnp.mean(h)
        h, means = jax.lax.scan(layer, x, jnp.array([1.0, 0.5, 2.0]))
        return jnp.sum(h ** 2) + jnp.sum(means)

    got = jax.jit(jax.value_and_grad(functools.partial(model, impl=None)))(x)
    expected = jax.value_and_grad(functools.partial(model, impl="reference"))(x)
    assert_close(got[0], expected[0], "float32", 50)
    assert_close(got[1], expected[1], "float32", 50)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_inputs_keep_float32_parameters_and_statistics(dtype):
    x = _x(dtype=dtype)
    y, stats = jaxmps.batch_norm(x, GAMMA, BETA)
    assert y.dtype == dtype and stats.mean.dtype == jnp.float32
    y, state = jaxmps.instance_norm_forward(x, GAMMA, BETA)
    assert y.dtype == dtype and state.rstd.dtype == jnp.float32
    dgamma = jax.grad(lambda g: jnp.sum(jaxmps.instance_norm(x, g, BETA).astype(jnp.float32)))(
        GAMMA)
    assert dgamma.dtype == jnp.float32
    dx = jax.grad(lambda v: jnp.sum(jaxmps.spatial_norm(v, 3).astype(jnp.float32)))(x)
    assert dx.dtype == dtype


def test_forward_and_gradient_kernels_compose_like_grad():
    x = _x()
    dy = _x(seed=9)
    y, state = jaxmps.batch_norm_forward(x, GAMMA, BETA)
    dx, dgamma, dbeta = jaxmps.batch_norm_gradient(dy, x, state)
    _, vjp = jax.vjp(lambda x, g, b: jaxmps.batch_norm(x, g, b, implementation="reference")[0],
                     x, GAMMA, BETA)
    for got, expected in zip((dx, dgamma, dbeta), vjp(dy)):
        assert_close(got, expected, "float32", 20)
    for name in ("spatial_norm", "local_contrast_norm", "cross_channel_norm"):
        y, state = getattr(jaxmps, f"{name}_forward")(x, 3)
        dx = getattr(jaxmps, f"{name}_gradient")(dy, x, state)
        _, vjp = jax.vjp(lambda v: getattr(jaxmps, name)(v, 3, implementation="reference"), x)
        assert_close(dx, vjp(dy)[0], "float32", 20)
        assert_close(y, getattr(jaxmps, name)(x, 3, implementation="reference"), "float32")
    y, state = jaxmps.instance_norm_forward(x, GAMMA, BETA)
    dx, dgamma, dbeta = jaxmps.instance_norm_gradient(dy, x, state)
    _, vjp = jax.vjp(lambda x, g, b: jaxmps.instance_norm(x, g, b, implementation="reference"),
                     x, GAMMA, BETA)
    for got, expected in zip((dx, dgamma, dbeta), vjp(dy)):
        assert_close(got, expected, "float32", 20)


def test_states_are_pytrees_through_jit():
    x = _x()
    y, state = jax.jit(lambda x: jaxmps.instance_norm_forward(x, GAMMA, BETA))(x)
    dx = jax.jit(jaxmps.instance_norm_gradient)(jnp.ones_like(x), x, state)[0]
    assert dx.shape == x.shape
    _, sp_state = jax.jit(lambda x: jaxmps.spatial_norm_forward(x, 3))(x)
    assert jax.tree_util.tree_leaves(sp_state) == []


def test_gradient_through_batch_statistics():
    x = _x()

    def loss(x, impl):
        y, stats = jaxmps.batch_norm(x, GAMMA, BETA, implementation=impl)
        return jnp.sum(y[..., 0]) + jnp.sum(stats.mean ** 2) + jnp.sum(jnp.sqrt(stats.variance))

    assert_close(jax.grad(loss)(x, None), jax.grad(loss)(x, "reference"), "float32", 20)


def test_implementation_context_manager_and_env(monkeypatch):
    x = _x()
    f = jax.jit(lambda x: jaxmps.spatial_norm(x, 3))
    with jaxmps.use_implementation("reference"):
        text = jax.jit(lambda x: jaxmps.spatial_norm(x, 3)).lower(x).as_text()
    assert "custom_call" not in text
    monkeypatch.setenv("JAXMPS_IMPLEMENTATION", "reference")
    text = jax.jit(lambda x: jaxmps.instance_norm(x)).lower(x).as_text()
    assert "custom_call" not in text
    monkeypatch.setenv("JAXMPS_IMPLEMENTATION", "bogus")
    with pytest.raises(ValueError, match="JAXMPS_IMPLEMENTATION"):
        jaxmps.instance_norm(x)
    del f
