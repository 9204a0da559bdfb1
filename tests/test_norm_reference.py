"""The jnp reference against numpy loops written from the formulas, and its closed-form
gradients against autodiff of the reference forward and float64 finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxmps
import numpy_oracles as oracle
from jaxmps._src.reference import norm as ref
from jaxmps._src.samples import ALL_OPS, kernel_calls, settings

WINDOWS = [(1, 1), (2, 3), (3, 3), (4, 4), (5, 2), (9, 7)]  # (9, 7) exceeds the 4x5 image


@pytest.fixture
def x(x64):
    return jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5, 6), jnp.float64) + 0.3


def test_instance_norm_matches_formula(x):
    g, b = np.linspace(0.5, 1.5, 6), np.linspace(-1, 1, 6)
    y, mean, rstd = ref.instance_norm_forward(x, g, b, epsilon=1e-3, channels_last=True)
    np.testing.assert_allclose(y, oracle.instance_norm(np.asarray(x), g, b, 1e-3), rtol=1e-12)
    np.testing.assert_allclose(mean, np.asarray(x).mean(axis=(1, 2)), rtol=1e-12)


def test_batch_norm_matches_formula(x):
    g, b = np.linspace(0.5, 1.5, 6), np.linspace(-1, 1, 6)
    y, mean, var = ref.batch_norm_forward(x, g, b, epsilon=1e-3, channels_last=True)
    y_np, mean_np, var_np = oracle.batch_norm(np.asarray(x), g, b, 1e-3)
    np.testing.assert_allclose(y, y_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, mean_np, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, var_np, rtol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
def test_window_norms_match_formulas(x, window):
    xs = np.asarray(x)
    kh, kw = window
    sp = settings("spatial_norm", window)
    y = ref.spatial_norm_forward(x, **sp, channels_last=True)[0]
    np.testing.assert_allclose(y, oracle.spatial_norm(xs, kh, kw, sp["alpha"], sp["beta"],
                                                      sp["delta"]), rtol=1e-12)
    lc = settings("local_contrast_norm", window)
    y = ref.local_contrast_norm_forward(x, **lc, channels_last=True)[0]
    args = [lc[n] for n in ("alpha", "beta", "delta", "p0", "pm", "ps")]
    np.testing.assert_allclose(y, oracle.local_contrast_norm(xs, kh, kw, *args), rtol=1e-10)
    cc = settings("cross_channel_norm", window)
    y = ref.cross_channel_norm_forward(x, **cc, channels_last=True)[0]
    np.testing.assert_allclose(y, oracle.cross_channel_norm(xs, kh, cc["alpha"], cc["beta"],
                                                            cc["delta"]), rtol=1e-12)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_layouts_agree(x, op, channels_last):
    """Each reference kernel gives the same result in NCHW as in NHWC."""
    def to_nchw(v):
        return jnp.transpose(v, (0, 3, 1, 2)) if v.ndim == 4 else v
    nhwc = kernel_calls(op, x, True, window=(2, 3))
    nchw = kernel_calls(op, jnp.transpose(x, (0, 3, 1, 2)), False, window=(2, 3))
    for (kern, args, params), (_, args2, params2) in zip(nhwc, nchw):
        args2 = [to_nchw(a) for a in args]
        for a, b in zip(kern.call_reference(*args, **params),
                        kern.call_reference(*args2, **params2)):
            np.testing.assert_allclose(to_nchw(a), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("window", [(1, 1), (2, 3), (4, 4), (9, 7)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_closed_form_gradient_matches_autodiff(x, op, window, channels_last):
    """The gradient kernel's closed form equals jax.vjp of the reference forward."""
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    calls = kernel_calls(op, x, channels_last, window)
    (fwd, fargs, fparams), (grad, gargs, gparams) = calls[0], calls[1]
    dy = gargs[0]
    if op in ("instance_norm", "batch_norm"):
        def f(xx, gamma, beta):
            return fwd.call_reference(xx, gamma, beta, **fparams)
        outs, vjp = jax.vjp(f, *fargs)
        cot = (dy,) + tuple(jnp.zeros_like(o) for o in outs[1:])
        if op == "batch_norm":
            cot = (dy, gargs[5], gargs[6])
        expected = vjp(cot)
    else:
        _, vjp = jax.vjp(lambda xx: fwd.call_reference(xx, **fparams), x)
        expected = vjp((dy,))
    got = grad.call_reference(*gargs, **gparams)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-10)


PUBLIC = {
    "instance_norm": lambda x, g, b: jaxmps.instance_norm(x, g, b, epsilon=1e-2,
                                                          implementation="reference"),
    "batch_norm": lambda x, g, b: jaxmps.batch_norm(x, g, b, implementation="reference")[0],
    "spatial_norm": lambda x, g, b: jaxmps.spatial_norm(x, (2, 3), alpha=0.5, beta=0.75,
                                                        implementation="reference"),
    "local_contrast_norm": lambda x, g, b: jaxmps.local_contrast_norm(
        x, (3, 2), delta=0.5, p0=0.7, implementation="reference"),
    "cross_channel_norm": lambda x, g, b: jaxmps.cross_channel_norm(
        x, 4, beta=0.75, implementation="reference"),
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_finite_differences_orders_1_and_2(x64, op):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, 5), jnp.float64)
    g = jnp.linspace(0.5, 1.5, 5)
    b = jnp.linspace(-0.5, 0.5, 5)
    fn = PUBLIC[op]
    args = (x, g, b) if op in ("instance_norm", "batch_norm") else (x,)
    f = (lambda *a: fn(*a)) if len(args) == 3 else (lambda xx: fn(xx, None, None))
    check_grads(f, args, order=2, modes=["rev"], atol=1e-6, rtol=1e-6)
