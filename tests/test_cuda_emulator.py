"""The CUDA kernels' own source, run on the host by the CUDA emulator (libjaxmps_cuda_emu,
xla_ffi/cuda/emulator: threads, barriers and warp shuffles emulated), against the jnp reference:
every normalization kernel, both layouts, the fused and the chunked statistics paths, window
sizes around the tile halos. Lets GPU-less CI check the CUDA kernel logic; the GPU run
(scripts/gpu_run.sh) checks the real thing."""

from __future__ import annotations

import ctypes
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from jaxmps._src import ffi
from jaxmps._src.kernel import Kernel, ffi_attributes
from jaxmps._src.samples import ALL_OPS, DEFAULT_BETA, WINDOW_OPS, kernel_calls
from test_norm_native import _image

SUFFIX = "_cuda_emu"
_TARGETS: Dict[str, str] = {}


def _targets() -> Dict[str, str]:
    """Registers the emulator's handlers for XLA:CPU once; skips (fails when native kernels
    are required) if the library was not built."""
    if not _TARGETS:
        path = ffi._library_path("jaxmps_cuda_emu")
        if path is None:
            message = "libjaxmps_cuda_emu was not built (needs the CUDA headers)"
            if os.environ.get("JAXMPS_REQUIRE_NATIVE") == "1":
                pytest.fail(message)
            pytest.skip(message)
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.jaxmps_target_name.restype = ctypes.c_char_p
        lib.jaxmps_target_handler.restype = ctypes.c_void_p
        for i in range(lib.jaxmps_target_count()):
            name = lib.jaxmps_target_name(i).decode()
            handler = ctypes.c_void_p(lib.jaxmps_target_handler(i))
            jax.ffi.register_ffi_target(name + SUFFIX, jax.ffi.pycapsule(handler),
                                        platform="cpu")
            _TARGETS[name] = name + SUFFIX
        _TARGETS["_lib"] = lib  # keep it loaded
    return _TARGETS


def _run(kernel: Kernel, args, params):
    out_types = jax.eval_shape(lambda *a: kernel.call_reference(*a, **params), *args)
    call = jax.ffi.ffi_call(_targets()[kernel.target], out_types)
    with jax.default_device(jax.devices("cpu")[0]):
        return call(*args, **ffi_attributes(params))


def _compare(op, x, channels_last, window, dtype, scale=1.0, **overrides):
    for kernel, args, params in kernel_calls(op, x, channels_last, window):
        params = {**params, **overrides}
        got = _run(kernel, args, params)
        expected = kernel.call_reference(*args, **params)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and g.dtype == e.dtype, (kernel.name, i)
            assert_close(g, e, dtype, scale, err_msg=f"{kernel.name} output {i}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_small_images(request, op, channels_last, dtype):
    """C = 6 (2-wide vectors, a partial channel block), odd spatial sizes."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    x = _image((2, 5, 7, 6), dtype, channels_last)
    _compare(op, x, channels_last, (3, 2), dtype, scale=2.0 if dtype == "float32" else 1.0)


# (N, H, W, C) of groups too large for one CTA's shared memory (227 KiB): partial sums,
# finalize, reverse apply (more than 58K float32 elements per channel even one channel wide).
CHUNKED = {True: (1, 256, 240, 4), False: (1, 256, 260, 2)}


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ["instance_norm", "batch_norm"])
def test_statistics_chunked_path(op, channels_last):
    x = _image(CHUNKED[channels_last], "float32", channels_last, seed=1) * 4.0 + 10.0
    _compare(op, x, channels_last, (3, 3), "float32", scale=5.0)


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", [(1, 1), (2, 5), (4, 3), (9, 8)], ids=str)
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_sizes_across_tiles(op, window, channels_last):
    """Images spanning several tiles in every direction, odd/even/rectangular windows."""
    x = _image((1, 19, 37, 10), "float32", channels_last, seed=2)
    _compare(op, x, channels_last, window, "float32", scale=2.0)


def test_window_global_work_area():
    """A window whose halo does not fit in shared memory runs from global scratch."""
    x = _image((1, 9, 8, 3), "float32", True, seed=3)
    _compare("spatial_norm", x, True, (120, 110), "float32", scale=2.0)


# The streaming window kernel (stream_window.cuh): window heights 1..7 are compiled rings,
# row runs split when images are few (here 90 rows > 8 windows), strips of 24..56 columns,
# 8 (float32) or 16 (half types) channels per CTA; NCHW walks rows of W-contiguous columns.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", [(5, 5), (7, 3), (6, 9), (3, 1)], ids=str)
@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm"])
def test_streaming_window_kernel(op, window, channels_last, dtype):
    x = _image((1, 90, 41, 20), dtype, channels_last, seed=4)
    _compare(op, x, channels_last, window, dtype, scale=2.0)


@pytest.mark.parametrize("depth", ["1", "3", "8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_streaming_window_rows_in_flight(monkeypatch, depth, channels_last, dtype):
    """The streaming kernels read rows ahead through a shared-memory ring of cp.async copies,
    `depth` rows in flight (JAXMPS_CUDA_STREAM_DEPTH; 2-byte scalars, here bfloat16 NCHW, use
    a register ring instead). The emulator lands a copy only when a wait lets it, so a slot read
    before its copy was waited for, or refilled while still needed, gives wrong values."""
    monkeypatch.setenv("JAXMPS_CUDA_STREAM_DEPTH", depth)
    x = _image((1, 40, 23, 8), dtype, channels_last, seed=7)
    _compare("local_contrast_norm", x, channels_last, (5, 3), dtype, scale=2.0)


@pytest.mark.parametrize("default_beta", [False, True], ids=["beta", "default_beta"])
@pytest.mark.parametrize("lanes", ["1", "2", "4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm"])
def test_streaming_window_lanes_per_cta(monkeypatch, op, dtype, lanes, default_beta):
    """JAXMPS_CUDA_STREAM_LANES: fewer lane vectors per CTA, each strip as wide as the row and
    its halo (41 + 4 or 41 + 8 columns, not a power of two) or as 256 threads allow (lanes 4:
    64 columns, so two strips); with MPS's beta, the kernels with it and the width compiled in."""
    monkeypatch.setenv("JAXMPS_CUDA_STREAM_LANES", lanes)
    x = _image((2, 23, 41, 24), dtype, True, seed=10)
    overrides = {"beta": DEFAULT_BETA[op]} if default_beta else {}
    _compare(op, x, True, (5, 5), dtype, scale=2.0, **overrides)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("lanes", ["2", "4"])
@pytest.mark.parametrize("channels", [24, 6])
def test_streaming_spatial_gradient_lanes_per_thread(monkeypatch, channels, lanes, window,
                                                     channels_last, dtype):
    """The compiled-form spatial gradient with four lanes per thread (the default) or two
    (JAXMPS_CUDA_STREAM_GRAD_VW=2); 6 channels do not split into four-lane vectors and take
    two; NCHW keeps one lane per thread."""
    monkeypatch.setenv("JAXMPS_CUDA_STREAM_GRAD_VW", lanes)
    x = _image((2, 23, 41, channels), dtype, channels_last, seed=12)
    _compare("spatial_norm", x, channels_last, (window, window), dtype, scale=2.0,
             beta=DEFAULT_BETA["spatial_norm"])


@pytest.mark.parametrize("balanced", ["0", "1"])
@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm"])
def test_streaming_window_strip_widths(monkeypatch, op, balanced):
    """NHWC strips of equal width (default) or as wide as 256 threads allow with a narrow last
    one (JAXMPS_CUDA_STREAM_BALANCED=0): 70 columns in three strips either way."""
    monkeypatch.setenv("JAXMPS_CUDA_STREAM_BALANCED", balanced)
    x = _image((1, 19, 70, 16), "float32", True, seed=13)
    _compare(op, x, True, (5, 5), "float32", scale=2.0)


@pytest.mark.parametrize("window", [(1, 3), (2, 1)], ids=str)
def test_streaming_window_register_ring_short_windows(window):
    """2-byte scalars (float16 NCHW) read ahead through a register ring of K rows, K the
    window height: the shortest rings, K = 1 and 2."""
    x = _image((1, 30, 19, 6), "float16", False, seed=8)
    _compare("local_contrast_norm", x, False, window, "float16", scale=2.0)


@pytest.mark.parametrize("op", ["spatial_norm", "local_contrast_norm"])
def test_streaming_window_nan_stays_in_its_windows(op):
    """A NaN reaches exactly the outputs whose windows (forward, and adjoint for dx) cover it."""
    x = np.array(_image((1, 30, 30, 8), "float32", True, seed=5))
    x[0, 12, 17, 3] = np.nan
    _compare(op, jnp.asarray(x), True, (5, 3), "float32", scale=2.0)


# T^-beta on CUDA (NegPower, cuda_common.cuh) by form: products of 1/t and rsqrt(t) for
# beta = whole + quarters/4 up to 15.75 (each quarter, whole powers with each of the four
# squarings' bits), exp2/log2 past that and for other or negative beta; the forward uses t^-beta
# alone, the gradients t^(-beta-1) too. NHWC runs the streaming kernels (spatial, local
# contrast) and the lane kernel (cross-channel), NCHW the streaming kernels.
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 8.0, 11.75, 15.75, 16.0,
                                  0.6, -0.75])
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_ops_over_beta_forms(op, beta, channels_last):
    # delta 1.5 and small x keep T^-16 and its gradient well conditioned in float32.
    x = _image((1, 9, 11, 8), "float32", channels_last, seed=9) * 0.5
    _compare(op, x, channels_last, (3, 3), "float32", scale=2.0, beta=beta, delta=1.5)


def _compiled_beta_launches() -> int:
    lib = _targets()["_lib"]
    lib.jaxmps_cuda_emu_compiled_beta_launches.restype = ctypes.c_int64
    return lib.jaxmps_cuda_emu_compiled_beta_launches()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_compiled_beta_kernels(monkeypatch, op, window, channels_last, dtype):
    """The op's default beta with a square window of odd size (streaming kernels) or any window
    (cross-channel NHWC, lane kernel) runs kernels with the window width and beta's form
    compiled in: on the emulator, which fuses no multiply-adds, the same bits as the general
    kernels (JAXMPS_CUDA_COMPILED_BETA=0; on a GPU the last bit may differ), both
    close to the reference, and the launch tally shows which ran. Cross-channel NCHW windows
    run along one axis only (width 1): never compiled."""
    x = _image((2, 21, 19, 16), dtype, channels_last, seed=11)
    compiled = not (op == "cross_channel_norm" and not channels_last)
    for kernel, args, params in kernel_calls(op, x, channels_last, (window, window)):
        params = {**params, "beta": DEFAULT_BETA[op]}
        outs = {}
        for knob in ("1", "0"):
            monkeypatch.setenv("JAXMPS_CUDA_COMPILED_BETA", knob)
            before = _compiled_beta_launches()
            outs[knob] = [np.asarray(o) for o in _run(kernel, args, params)]
            ran = _compiled_beta_launches() - before
            assert ran == (1 if compiled and knob == "1" else 0), (kernel.name, knob, ran)
        for fixed, general in zip(outs["1"], outs["0"]):
            np.testing.assert_array_equal(fixed, general, err_msg=kernel.name)
        for g, e in zip(outs["1"], kernel.call_reference(*args, **params)):
            assert_close(g, e, dtype, 2.0, err_msg=f"{kernel.name} compiled beta")


def test_power_of_subnormal_window_sums():
    """T below the smallest normal float (here delta = 0 and x = 1e-20: T ~ 1e-40) goes to
    powf, not to the flushing hardware reciprocal square root (emulated: a subnormal input
    reads as zero, as rsqrt.approx.ftz does), which would give inf. Expected values from the
    formula in float64 (numpy; XLA:CPU flushes subnormals, so the reference cannot serve)."""
    x = np.full((1, 6, 7, 8), 1e-20, np.float32)
    kernel, args, params = kernel_calls("spatial_norm", jnp.asarray(x), True, (3, 3))[0]
    params = {**params, "alpha": 1.0, "beta": 0.25, "delta": 0.0}
    (got,) = _run(kernel, args, params)
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (1, 1), (1, 1), (0, 0)))
    s = sum(sq[:, i:i + 6, j:j + 7] for i in range(3) for j in range(3))
    expected = x * (s / 9.0) ** -0.25
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("window", [1, 4, 7])
def test_streaming_cross_channel_nchw(window, dtype):
    """Cross-channel NCHW streams down the channels, four pixels per thread when H*W % 4 == 0."""
    x = _image((2, 10, 12, 24), dtype, False, seed=6)
    _compare("cross_channel_norm", x, False, (window, 1), dtype, scale=2.0)
