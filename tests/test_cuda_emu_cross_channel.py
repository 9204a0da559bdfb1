"""The NHWC cross-channel norm's lane kernel (xla_ffi/cuda/lane_window.cuh: one 16-byte vector
per thread, a pixel's channels on consecutive lanes of a warp, window halos by warp shuffles)
run by the CUDA emulator against the jnp reference, forward and gradient, with every case
checked to have taken the path it should: the lane kernel when a pixel's C / VW vectors are a
power of two <= 32 lanes and the window's halo k // 2 fits one neighbouring vector, else the
row kernel (window.cuh)."""

from __future__ import annotations

import ctypes

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmps._src.kernel import Kernel
from jaxmps._src import norm_kernels
from test_cuda_emulator import _compare, _run, _targets
from test_norm_native import _image

OP = "cross_channel_norm"
# 35 pixels: C = 128 float32 is 1120 vectors, several blocks of either kernel with a partial
# last one; C = 4 is 35 vectors, a partial warp.
SHAPE = (1, 5, 7)


def _lane_launches() -> int:
    lib = _targets()["_lib"]
    lib.jaxmps_cuda_emu_lane_window_launches.restype = ctypes.c_int64
    return lib.jaxmps_cuda_emu_lane_window_launches()


def _expect_lane_kernel(channels: int, kernel_size: int, dtype: str) -> bool:
    """The rule of the issue, written independently of the C++: 16-byte vectors narrowed until
    they divide C (XLA's buffers are 16-byte aligned), C / VW lanes a power of two <= 32, the
    halo k // 2 at most one vector."""
    vw = 16 // np.dtype(jnp.dtype(dtype)).itemsize
    while channels % vw:
        vw //= 2
    lanes = channels // vw
    return lanes <= 32 and lanes & (lanes - 1) == 0 and kernel_size // 2 <= vw


def _compare_on_path(x, kernel_size, dtype, expect_lane):
    before = _lane_launches()
    _compare(OP, x, True, (kernel_size, 1), dtype, scale=2.0)
    launches = _lane_launches() - before
    assert launches == (2 if expect_lane else 0), (
        f"expected the {'lane' if expect_lane else 'row'} kernel for both directions, "
        f"the lane kernel ran {launches} times")


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("channels", [4, 8, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lane_kernel_channels_and_windows(dtype, channels, kernel_size):
    """float32: C = 4..128 take the lane kernel, 256 (64 lanes) the row kernel; bfloat16: all."""
    x = _image(SHAPE + (channels,), dtype, True, seed=channels + kernel_size)
    _compare_on_path(x, kernel_size, dtype, _expect_lane_kernel(channels, kernel_size, dtype))


@pytest.mark.parametrize("channels,kernel_size", [(8, 1), (16, 4), (64, 9), (256, 17)],
                         ids=str)
def test_lane_kernel_float16(channels, kernel_size):
    """16 and 17 reach the largest compiled halo (8 = VW)."""
    x = _image(SHAPE + (channels,), "float16", True, seed=7)
    _compare_on_path(x, kernel_size, "float16", True)


def test_lane_kernel_float64(x64):
    """Two-element vectors: C = 8 is 4 lanes, k = 5 the largest halo (2)."""
    x = _image(SHAPE + (8,), "float64", True, seed=8)
    _compare_on_path(x, 5, "float64", True)


@pytest.mark.parametrize(
    "dtype,channels,kernel_size",
    [("float32", 12, 3),     # 3 lanes: not a power of two
     ("float32", 512, 5),    # 128 lanes: more than a warp
     ("float32", 64, 11),    # halo 5 > VW = 4
     ("bfloat16", 128, 19),  # halo 9 > VW = 8
     ("bfloat16", 6, 3),     # VW = 2, 3 lanes
     ("float32", 2, 5)],     # VW = 2, one lane, halo 2: the lane kernel still applies
    ids=str)
def test_dispatch_boundaries(dtype, channels, kernel_size):
    x = _image(SHAPE + (channels,), dtype, True, seed=9)
    _compare_on_path(x, kernel_size, dtype, _expect_lane_kernel(channels, kernel_size, dtype))


def _forward(x, kernel_size) -> np.ndarray:
    kernel: Kernel = norm_kernels.cross_channel_norm_forward
    params = dict(kernel_size=kernel_size, alpha=0.8, beta=0.75, delta=1.25, channels_last=True)
    (y,) = _run(kernel, (x,), params)
    return np.asarray(y)


@pytest.mark.parametrize("channel", [0, 3, 17, 31])
def test_nan_stays_in_its_windows(channel):
    """A NaN at channel c0 of one pixel (a lane's first/last element, or inside one) reaches
    exactly y at channels [c0 - (k-1)//2, c0 + k//2] of that pixel, and both directions match
    the reference (whose NaNs are where the windows put them)."""
    k, c = 5, 32
    x = np.array(_image(SHAPE + (c,), "float32", True, seed=10))
    x[0, 2, 3, channel] = np.nan
    x = jnp.asarray(x)
    assert _expect_lane_kernel(c, k, "float32")
    _compare_on_path(x, k, "float32", True)
    nan = np.isnan(_forward(x, k))
    expected = np.zeros_like(nan)
    expected[0, 2, 3, max(0, channel - (k - 1) // 2):channel + k // 2 + 1] = True
    np.testing.assert_array_equal(nan, expected)
