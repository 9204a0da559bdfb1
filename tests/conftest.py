"""Shared test fixtures: float64 mode, the platform under test, and whether native kernels
must be present (CI and GPU runs set JAXMPS_REQUIRE_NATIVE=1 so a missing library fails
instead of silently testing the reference against itself)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxmps._src import ffi

PLATFORM = jax.default_backend()  # "cpu" or "gpu"
# Full float32 matmul/convolution precision for every reference computed in the tests (XLA on
# GPUs defaults to TF32, which would hide or fake differences of 1e-3).
jax.config.update("jax_default_matmul_precision", "highest")
FFI_PLATFORM = "cuda" if PLATFORM == "gpu" else PLATFORM


def native_available(kernel, dtype="float32") -> bool:
    return kernel.native_target(FFI_PLATFORM, np.dtype(dtype)) is not None


def require_native(kernel, dtype="float32"):
    """Skips (or fails where native kernels are required) when `kernel` has no native
    implementation for `dtype` on the platform under test."""
    if native_available(kernel, dtype):
        return
    if FFI_PLATFORM in kernel.xla_native:
        pytest.skip(f"{kernel.name} on {FFI_PLATFORM} is XLA's own lowering by design "
                    "(no custom call to compare)")
    message = (f"no native {kernel.name} for {np.dtype(dtype).name} on {FFI_PLATFORM}: "
               f"{'; '.join(f'{k}: {b.error}' for k, b in ffi.backends().items())}")
    if os.environ.get("JAXMPS_REQUIRE_NATIVE") == "1" and not (
            FFI_PLATFORM == "cuda" and np.dtype(dtype) == np.float64):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def x64():
    """Enables float64 for one test."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def tolerance(dtype):
    dtype = np.dtype(dtype)
    return {"float64": 1e-10, "float32": 2e-5, "float16": 1.5e-2, "bfloat16": 6e-2}[dtype.name]


def assert_close(actual, expected, dtype, scale=1.0, err_msg=""):
    tol = tolerance(dtype) * scale
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tol, atol=tol, err_msg=err_msg)
