"""GPU-only checks of the CUDA kernels: a tensor of more than 2^31 elements through the
instance-norm kernels (forward and gradient; every index must be 64-bit safe), checked against
the jnp reference on the same GPU, bitwise-repeatable results (no atomics) on the resident
statistics path, and the plan the library picks for the CUDA issue's shape. Skipped on hosts
without the CUDA backend (and GPUs with too little memory): a CPU
cannot run them, and tests/test_cuda_emulator.py covers the kernel logic there."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FFI_PLATFORM, tolerance
from jaxmps._src import ffi
from jaxmps._src import norm_kernels as k
from jaxmps._src.samples import ALL_OPS, kernel_calls
from test_norm_native import resident_waves

# 2 x 16384 x 16385 x 4 = 2_147_614_720 > 2^31 elements; the second image starts past 2^30
# and its last elements past 2^31. bfloat16 keeps one tensor at 4.3 GB.
SHAPE = (2, 16384, 16385, 4)
DTYPE = jnp.bfloat16
NEEDED_BYTES = 48 << 30


def _cuda_missing(memory_bytes: int = 0) -> str:
    """Why the CUDA tests cannot run here ("" when they can)."""
    if FFI_PLATFORM != "cuda":
        return "needs a CUDA device"
    if k.instance_norm_forward.native_target("cuda", DTYPE) is None:
        return "the CUDA backend is not built"
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit", memory_bytes) < memory_bytes:
        return f"needs a GPU with {memory_bytes >> 30} GB of memory"
    return ""


needs_cuda = pytest.mark.skipif(bool(_cuda_missing()), reason=_cuda_missing() or "ok")
needs_large_gpu = pytest.mark.skipif(bool(_cuda_missing(NEEDED_BYTES)),
                                     reason=_cuda_missing(NEEDED_BYTES) or "ok")


def _image(key):
    """A (N, H, W, C) image of distinct-enough values without a 2^31-element RNG call: the sum
    of a random row profile, a random column profile and a random per-pixel-row ripple."""
    k1, k2, k3 = jax.random.split(key, 3)
    n, h, w, c = SHAPE
    rows = jax.random.normal(k1, (n, h, 1, c), jnp.float32)
    cols = jax.random.normal(k2, (n, 1, w, c), jnp.float32) * 0.5 + 0.25
    ripple = jax.random.normal(k3, (1, 1, w, 1), jnp.float32) * 0.1
    return (rows + cols * (1.0 + ripple)).astype(DTYPE)


@jax.jit
def _max_error(got, expected):
    """max |got - expected| / (1 + |expected|), in float32, on the device."""
    g, e = got.astype(jnp.float32), expected.astype(jnp.float32)
    return jnp.max(jnp.abs(g - e) / (1.0 + jnp.abs(e)))


@needs_large_gpu
def test_instance_norm_over_2_31_elements():
    assert np.prod(SHAPE) > 2**31
    x = _image(jax.random.PRNGKey(0))
    c = SHAPE[3]
    gamma = jnp.linspace(0.5, 1.5, c, dtype=jnp.float32)
    beta = jnp.linspace(-0.25, 0.25, c, dtype=jnp.float32)
    params = dict(epsilon=1e-5, channels_last=True)

    native = k.instance_norm_forward.bind(x, gamma, beta, **params, implementation="native")
    reference = k.instance_norm_forward.bind(x, gamma, beta, **params,
                                             implementation="reference")
    tol = tolerance("bfloat16")
    for name, g, e in zip(("y", "mean", "rstd"), native, reference):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert float(_max_error(g, e)) < tol, name
    # The last pixel of the last image (index > 2^31) was written and normalised.
    assert bool(jnp.isfinite(native[0][-1, -1, -1, -1]))
    mean, rstd = reference[1], reference[2]
    del native, reference

    dy = _image(jax.random.PRNGKey(1))
    grad_params = dict(channels_last=True)
    native = k.instance_norm_gradient.bind(dy, x, gamma, mean, rstd, **grad_params,
                                           implementation="native")
    reference = k.instance_norm_gradient.bind(dy, x, gamma, mean, rstd, **grad_params,
                                              implementation="reference")
    g_dx, e_dx = native[0], reference[0]
    assert g_dx.shape == e_dx.shape and g_dx.dtype == e_dx.dtype
    assert float(_max_error(g_dx, e_dx)) < tol, "dx"
    # dgamma, dbeta: sums of 2^28 terms per image; two float32 summation orders differ by
    # rounding of order eps * sum |term|, far below 1e-5 per summed element.
    count = SHAPE[0] * SHAPE[1] * SHAPE[2]
    for name, g, e in zip(("dgamma", "dbeta"), native[1:], reference[1:]):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=1e-5 * count,
                                   err_msg=name)


@needs_cuda
@pytest.mark.parametrize("op", ALL_OPS)
def test_results_are_bitwise_repeatable(op):
    """Two runs on the same input give identical bits (instance and batch norm here take the
    resident path: partial sums added in a fixed order after one grid barrier)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 64, 64, 64), jnp.float32) * 2.0 + 1.0
    for kernel, args, params in kernel_calls(op, x, True, (5, 5)):
        first = kernel.bind(*args, **params, implementation="native")
        second = kernel.bind(*args, **params, implementation="native")
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=kernel.name)


@needs_cuda
def test_issue_shape_takes_the_resident_path():
    """At N=32, 64x64, C=128 NHWC (issue 4) instance and batch norm, forward and gradient,
    float32 and bfloat16, run the resident path (jaxmps_cuda_stats_plan = 3) with every SM
    holding one CTA: batch norm spreads its one group over all of them; instance norm runs
    its 32 images in waves (the L2 rule) and gives each image of a wave SMs // (images per
    wave) CTAs."""
    lib = ctypes.cdll.LoadLibrary(str(ffi._library_path("jaxmps_cuda")))
    sms = getattr(jax.devices()[0], "core_count", None)  # the SM count, where jaxlib has it
    for per_image in (0, 1):
        for itemsize in (4, 2):
            for gradient in (0, 1):
                ctas = ctypes.c_int(0)
                path = lib.jaxmps_cuda_stats_plan(
                    ctypes.c_int64(32), ctypes.c_int64(64), ctypes.c_int64(64),
                    ctypes.c_int64(128), 1, per_image, itemsize, gradient, ctypes.byref(ctas))
                assert path == 3, (per_image, itemsize, gradient)
                dtype = "float32" if itemsize == 4 else "bfloat16"
                waves = resident_waves(lib, (32, 64, 64, 128), dtype, gradient, per_image)
                assert 1 <= waves <= (8 if per_image else 1), waves
                expected = sms // -(-32 // waves) if per_image and sms else sms
                assert ctas.value == (expected or ctas.value) and ctas.value >= 1, ctas.value
