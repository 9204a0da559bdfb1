"""Bad input gets a ValueError/TypeError at trace time naming the op and argument; the native
handlers validate too (InvalidArgument naming op and argument) when called directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmps
from conftest import require_native
from jaxmps._src import norm_kernels as k

X = jnp.ones((2, 4, 4, 3))

ALL = {
    "instance_norm": lambda x, **kw: jaxmps.instance_norm(x, **kw),
    "batch_norm": lambda x, **kw: jaxmps.batch_norm(x, **kw),
    "spatial_norm": lambda x, **kw: jaxmps.spatial_norm(x, 3, **kw),
    "local_contrast_norm": lambda x, **kw: jaxmps.local_contrast_norm(x, 3, **kw),
    "cross_channel_norm": lambda x, **kw: jaxmps.cross_channel_norm(x, 3, **kw),
}


@pytest.mark.parametrize("op", ALL)
def test_wrong_rank(op):
    with pytest.raises(ValueError, match=rf"jaxmps\.{op}: x must be a 4-d NHWC image, "
                                         r"got shape \(4, 4, 3\)"):
        ALL[op](X[0])


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_dtype(op, dtype):
    with pytest.raises(TypeError, match=rf"jaxmps\.{op}: x must have a float dtype"):
        ALL[op](X.astype(dtype))


@pytest.mark.parametrize("op", ALL)
def test_unknown_data_format_and_implementation(op):
    with pytest.raises(ValueError, match=rf"jaxmps\.{op}: data_format must be 'NHWC' or "
                                         r"'NCHW', got 'HWCN'"):
        ALL[op](X, data_format="HWCN")
    with pytest.raises(ValueError, match=rf"jaxmps\.{op}: implementation must be one of"):
        ALL[op](X, implementation="metal")


@pytest.mark.parametrize("fn", [jaxmps.instance_norm, lambda x, g, b: jaxmps.batch_norm(x, g, b)])
def test_parameters_of_wrong_length(fn):
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\).*got \(4,\)"):
        fn(X, jnp.ones(4), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\).*got \(3, 1\)"):
        fn(X, jnp.ones(3), jnp.zeros((3, 1)))


def test_nchw_channel_count_comes_from_axis_1():
    with pytest.raises(ValueError, match=r"gamma must have shape \(2,\)"):
        jaxmps.instance_norm(jnp.ones((1, 2, 5, 5)), jnp.ones(5), data_format="NCHW")


@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm"])
@pytest.mark.parametrize("bad", [0, -1, (3, 0), (2, 2, 2), 2.5, True])
def test_bad_kernel_size(op, bad):
    with pytest.raises(ValueError, match=rf"jaxmps\.{op}: kernel_size must be"):
        getattr(jaxmps, op)(X, bad)


def test_bad_cross_channel_kernel_size():
    with pytest.raises(ValueError, match=r"jaxmps\.cross_channel_norm: kernel_size must be a "
                                         r"positive integer, got 0"):
        jaxmps.cross_channel_norm(X, 0)


@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm", "cross_channel_norm"])
def test_negative_alpha(op):
    with pytest.raises(ValueError, match=rf"jaxmps\.{op}: alpha must be >= 0, got -1.0"):
        getattr(jaxmps, op)(X, 3, alpha=-1.0)
    with pytest.raises(TypeError, match=rf"jaxmps\.{op}: beta must be a Python float"):
        getattr(jaxmps, op)(X, 3, beta=jnp.array(1.0))


def test_negative_epsilon_and_missing_inference_parameters():
    with pytest.raises(ValueError, match=r"jaxmps\.instance_norm: epsilon must be >= 0"):
        jaxmps.instance_norm(X, epsilon=-1e-5)
    with pytest.raises(ValueError, match=r"jaxmps\.batch_norm_inference: gamma is required"):
        jaxmps.batch_norm_inference(X, None, None, jnp.zeros(3), jnp.ones(3))


def test_gradient_kernels_check_their_inputs():
    y, state = jaxmps.instance_norm_forward(X)
    with pytest.raises(ValueError, match=r"instance_norm_gradient: dy must have the shape of x"):
        jaxmps.instance_norm_gradient(jnp.ones((2, 4, 4, 2)), X, state)
    with pytest.raises(TypeError, match=r"state must be an InstanceNormGradientState"):
        jaxmps.instance_norm_gradient(y, X, object())
    _, sp = jaxmps.spatial_norm_forward(X, 3)
    with pytest.raises(TypeError, match=r"spatial_norm_gradient: state must be a "
                                        r"SpatialNormGradientState"):
        jaxmps.spatial_norm_gradient(y, X, jaxmps.batch_norm_forward(X)[1])
    assert jaxmps.spatial_norm_gradient(y, X, sp).shape == X.shape


def test_native_handlers_validate_shapes_and_dtypes():
    """Bypassing Python validation, the C++ handler itself returns InvalidArgument."""
    require_native(k.instance_norm_forward)
    params = dict(epsilon=1e-5, channels_last=True, implementation="native")
    with pytest.raises(Exception, match=r"jaxmps\.instance_norm: gamma must have shape \(3,\), "
                                        r"got \(5,\)"):
        jax.block_until_ready(k.instance_norm_forward.bind(X, jnp.ones(5), jnp.zeros(5),
                                                           **params))
    with pytest.raises(Exception, match=r"jaxmps\.batch_norm: gamma must have dtype float32, "
                                        r"got float16"):
        jax.block_until_ready(k.batch_norm_forward.bind(
            X, jnp.ones(3, jnp.float16), jnp.zeros(3), **params))


def test_native_is_an_error_where_no_kernel_exists(monkeypatch):
    from jaxmps._src import ffi
    monkeypatch.setattr(ffi, "native_target", lambda *a: None)
    with pytest.raises(NotImplementedError, match=r"implementation='native' but no native "
                                                  r"kernel is available on (cpu|cuda)"):
        jax.jit(lambda x: jaxmps.instance_norm(x, implementation="native")).lower(X)
    # With implementation=None the same program silently uses the reference.
    text = jax.jit(lambda x: jaxmps.instance_norm(x)).lower(X).as_text()
    assert "custom_call" not in text
    x = X * jnp.arange(32.0).reshape(2, 4, 4, 1)
    np.testing.assert_allclose(jax.jit(lambda x: jaxmps.instance_norm(x))(x),
                               (x - x.mean((1, 2), keepdims=True))
                               / jnp.sqrt(x.var((1, 2), keepdims=True) + 1e-5), atol=1e-5)
