"""Native kernels against the jnp reference: every normalization kernel (forward, gradient,
inference) x dtype x layout over a grid of shapes and windows; and proof from the lowered HLO
that the native path really calls our custom call."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmps
from conftest import FFI_PLATFORM, assert_close, require_native
from jaxmps._src import norm_kernels as k
from jaxmps._src.samples import ALL_OPS, DEFAULT_BETA, WINDOW_OPS, kernel_calls

DTYPES = ["float32", "float64", "float16", "bfloat16"]
# (N, H, W, C): N = 1, C = 1, C not a multiple of 4, 1x1 images, odd sizes.
SHAPES = [(2, 5, 7, 6), (1, 4, 3, 1), (1, 1, 1, 5), (3, 6, 6, 9)]
WINDOWS = [(1, 1), (2, 2), (3, 3), (2, 5), (4, 3), (8, 9)]


def _image(shape, dtype, channels_last, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 1.5 + 0.25
    x = x.astype(dtype)
    return x if channels_last else jnp.transpose(x, (0, 3, 1, 2))


def _compare(op, x, channels_last, window, dtype, scale=1.0, **overrides):
    """Every kernel of `op` (settings() attributes, with `overrides`) against its reference."""
    for kernel, args, params in kernel_calls(op, x, channels_last, window):
        params = {**params, **overrides}
        require_native(kernel, dtype)
        got = kernel.bind(*args, **params, implementation="native")
        expected = kernel.call_reference(*args, **params)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and g.dtype == e.dtype, (kernel.name, i)
            assert_close(g, e, dtype, scale, err_msg=f"{kernel.name} output {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ALL_OPS)
def test_native_matches_reference(request, op, shape, channels_last, dtype):
    if dtype == "float64":
        request.getfixturevalue("x64")
    x = _image(shape, dtype, channels_last)
    _compare(op, x, channels_last, (3, 2), dtype, scale=2.0 if dtype == "float32" else 1.0)


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_grid(x64, op, window, channels_last):
    """Odd, even, rectangular and larger-than-image windows, in float64 for a tight check."""
    x = _image((2, 6, 7, 5), "float64", channels_last, seed=3)
    _compare(op, x, channels_last, window, "float64")


# Spatial-window units take 16 to 64 channels, fewer on wide rows (SpatialUnits in
# xla_ffi/cpu/window_sum.h): several channel blocks with a ragged last one, at both widths;
# and batches of 1- and 3-channel images, whose planes the units take across images
# (PlanesAsChannels: 20 and 21 planes = a block of 16 and a ragged one spanning images).
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 70), (1, 3, 1100, 20), (20, 6, 7, 1),
                                   (7, 5, 6, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_ops_over_channel_blocks(op, shape, channels_last):
    x = _image(shape, "float32", channels_last, seed=5)
    _compare(op, x, channels_last, (3, 4), "float32", scale=2.0)


# Cross-channel norm CPU tiles (xla_ffi/cpu/cross_channel_norm.cc): NHWC windows of up to 16
# taps are summed per pixel in place, longer ones (and NCHW) by running sums over copied tiles;
# both sides of that boundary, and a window wider than the channels.
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("kernel_size", [1, 2, 5, 16, 17, 41])
def test_cross_channel_windows_on_both_tile_paths(x64, kernel_size, channels_last):
    x = _image((2, 3, 5, 40), "float64", channels_last, seed=7)
    _compare("cross_channel_norm", x, channels_last, (kernel_size, kernel_size), "float64")
    x32 = _image((2, 3, 5, 40), "float32", channels_last, seed=7)
    _compare("cross_channel_norm", x32, channels_last, (kernel_size, kernel_size), "float32",
             scale=2.0)


# T^-beta (NegPow, xla_ffi/cpu/window_sum.h) by form: integer beta (and negative), quarter- and
# half-integer (products of 1/T and its square roots), generic (exp/log), and past the largest
# power the product forms take (8).
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0, 1.75, 2.5, 5.0, 7.75, 8.0, 8.25,
                                  0.6, -1.0, -0.75])
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_ops_over_beta_forms(x64, op, beta):
    # delta 1.5 keeps T^-8 and its gradient well conditioned in float32 (LCN's default 0.25
    # with beta 8 amplifies the reference's own float32 rounding past the tolerance).
    for dtype, scale in (("float64", 1.0), ("float32", 2.0)):
        x = _image((2, 5, 6, 20), dtype, True, seed=9)
        _compare(op, x, True, (3, 3), dtype, scale=scale, beta=beta, delta=1.5)


# MPS's default beta: the CUDA kernels with its form (and, streaming, a square window's width)
# compiled in, against their general kernels (JAXMPS_CUDA_COMPILED_BETA=0) and the reference.
# Other backends ignore the knob.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", [(5, 5), (7, 7)], ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_default_beta_kernels(monkeypatch, op, window, channels_last, dtype):
    x = _image((2, 21, 19, 16), dtype, channels_last, seed=11)
    for kernel, args, params in kernel_calls(op, x, channels_last, window):
        params = {**params, "beta": DEFAULT_BETA[op]}
        require_native(kernel, dtype)
        outs = {}
        for knob in ("1", "0"):
            monkeypatch.setenv("JAXMPS_CUDA_COMPILED_BETA", knob)
            outs[knob] = [np.asarray(o)
                          for o in kernel.bind(*args, **params, implementation="native")]
        # nvcc may fuse multiplies and adds differently once beta is a constant: the last bit
        # can differ (measured on an H100), so the two are compared to the tolerance.
        for fixed, general in zip(outs["1"], outs["0"]):
            assert_close(fixed, general, dtype, 1.0, err_msg=f"{kernel.name} general beta")
        for g, e in zip(outs["1"], kernel.call_reference(*args, **params)):
            assert_close(g, e, dtype, 2.0, err_msg=f"{kernel.name} default beta")


# Instance/batch statistics units (xla_ffi/cpu/channel_sweep.h): NHWC chunks of 128 pixels,
# NCHW chunks of 2048 read 16 lanes at a time. 2350 pixels = several chunks with a ragged last
# one and a ragged lane tail; the offset makes a dropped or doubled chunk move the mean.
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ["instance_norm", "batch_norm"])
def test_statistics_over_pixel_chunks(op, channels_last):
    x = _image((2, 47, 50, 3), "float32", channels_last, seed=6) + 2.0
    _compare(op, x, channels_last, (3, 4), "float32", scale=2.0)


# NHWC statistics sum one block of 16 channels at a time down a chunk's pixels: 40 channels =
# two full blocks and a ragged one of 8; a per-channel offset makes a channel summed into the
# wrong slot (or dropped) move its mean.
@pytest.mark.parametrize("op", ["instance_norm", "batch_norm"])
def test_statistics_over_channel_blocks(op):
    x = _image((2, 9, 30, 40), "float32", True, seed=8) + jnp.linspace(-3.0, 3.0, 40)
    _compare(op, x, True, (3, 4), "float32", scale=2.0)


# Ops whose CPU work units run in compiled AVX-512 / AVX2 / baseline copies
# (ParallelForVectorized in xla_ffi/cpu/parallel.h).
VECTORIZED_OPS = (*WINDOW_OPS, "instance_norm", "batch_norm")

# The subprocess reruns this module's own comparison (_compare: every kernel of the op against
# its reference) under the ISA cap.
_ISA_SCRIPT = textwrap.dedent("""
    from test_norm_native import VECTORIZED_OPS, _compare, _image
    for op in VECTORIZED_OPS:
        for shape, channels_last, dtype in [((2, 5, 7, 70), True, "float32"),
                                            ((1, 6, 9, 20), False, "float32"),
                                            ((2, 4, 5, 19), True, "bfloat16"),
                                            ((1, 47, 50, 2), False, "float16")]:
            x = _image(shape, dtype, channels_last, seed=1)
            _compare(op, x, channels_last, (3, 4), dtype, scale=2.0)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_vectorized_ops_in_every_vector_copy(isa):
    """The AVX2 and portable copies of the vectorised kernels (the default here may be
    AVX-512), in a fresh process with JAXMPS_CPU_ISA capping the choice (cpu_isa.h)."""
    for op in VECTORIZED_OPS:
        for kernel, _, _ in kernel_calls(op, jnp.ones((1, 2, 2, 1)), True):
            require_native(kernel)
    env = dict(os.environ, JAXMPS_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                      env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_large_image_float32_accuracy():
    """Running window sums must not drift on a large image (O(1) sums, float32 data)."""
    x = _image((1, 384, 384, 2), "float32", True, seed=4) + 3.0
    for op in ("spatial_norm", "local_contrast_norm"):
        _compare(op, x, True, (7, 7), "float32", scale=5.0)


def resident_waves(lib, nhwc, dtype, gradient, per_image=True):
    """Waves of the resident plan of an NHWC instance (or batch) norm sweep (0: another path)
    from the test hook jaxmps_cuda_stats_waves of `lib`, a CUDA library or its emulator (the
    plan is that of its current device)."""
    probe = lib.jaxmps_cuda_stats_waves
    probe.restype = ctypes.c_int64
    n, h, w, c = nhwc
    return probe(ctypes.c_int64(n), ctypes.c_int64(h), ctypes.c_int64(w), ctypes.c_int64(c), 1,
                 int(per_image), jnp.dtype(dtype).itemsize, int(gradient))


# CUDA's resident statistics path runs instance norm's images in waves inside one cooperative
# launch (xla_ffi/cuda/resident_stats.cuh); the small images above take one. At the benchmark
# shape the float32 gradient takes several by the L2 rule (the default, or
# JAXMPS_CUDA_RESIDENT_WAVES=l2): native against the reference there, on CUDA also with one and
# three waves forced (the plan says how many ran). Other backends have no waves and run the
# shape once.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_instance_norm_in_resident_waves(monkeypatch, dtype):
    shape = (32, 64, 64, 128)
    x = _image(shape, dtype, True, seed=16) + 2.0
    # dgamma / dbeta add 131072 terms per channel; some land near zero (float32: ~1e-4 off of
    # sums of terms of magnitude ~1, against 4e-5 at the usual scale).
    scale = 10.0 if dtype == "float32" else 1.0
    cuda = None
    if FFI_PLATFORM == "cuda":
        cuda = ctypes.CDLL(str(jaxmps.backends()["cuda"].path))
    for knob in ("l2", "1", "3") if cuda is not None else ("l2",):
        monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", knob)
        if cuda is not None and knob != "l2":
            assert resident_waves(cuda, shape, dtype, gradient=True) == int(knob)
        _compare("instance_norm", x, True, (3, 3), dtype, scale=scale)
    if cuda is not None:  # unset means the rule
        monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", "l2")
        rule = resident_waves(cuda, shape, dtype, gradient=True)
        monkeypatch.delenv("JAXMPS_CUDA_RESIDENT_WAVES")
        assert resident_waves(cuda, shape, dtype, gradient=True) == rule


@pytest.mark.parametrize("op", ALL_OPS)
def test_nan_and_inf_propagate(op):
    x = np.array(_image((1, 4, 4, 3), "float32", True))
    x[0, 1, 2, 1] = np.nan
    x[0, 3, 3, 0] = np.inf
    for kernel, args, params in kernel_calls(op, jnp.asarray(x), True):
        require_native(kernel)
        got = kernel.bind(*args, **params, implementation="native")
        expected = kernel.call_reference(*args, **params)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
            finite = np.isfinite(e)
            np.testing.assert_allclose(np.asarray(g)[finite], np.asarray(e)[finite],
                                       rtol=1e-4, atol=1e-4)


PUBLIC_OPS = {
    "instance_norm": (lambda x, impl: jaxmps.instance_norm(x, implementation=impl),
                      ["instance_norm_forward", "instance_norm_gradient"]),
    "batch_norm": (lambda x, impl: jaxmps.batch_norm(x, implementation=impl)[0],
                   ["batch_norm_forward", "batch_norm_gradient"]),
    "spatial_norm": (lambda x, impl: jaxmps.spatial_norm(x, 3, implementation=impl),
                     ["spatial_norm_forward", "spatial_norm_gradient"]),
    "local_contrast_norm": (lambda x, impl: jaxmps.local_contrast_norm(
        x, 3, implementation=impl), ["local_contrast_norm_forward",
                                     "local_contrast_norm_gradient"]),
    "cross_channel_norm": (lambda x, impl: jaxmps.cross_channel_norm(
        x, implementation=impl), ["cross_channel_norm_forward",
                                  "cross_channel_norm_gradient"]),
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_hlo_contains_native_custom_call(op):
    fn, targets = PUBLIC_OPS[op]
    require_native(getattr(k, targets[0]))
    x = _image((2, 4, 4, 3), "float32", True)

    def loss(impl):
        return lambda v: jnp.sum(fn(v, impl) ** 2)

    native = jax.jit(jax.grad(loss("native"))).lower(x).as_text()
    auto = jax.jit(jax.grad(loss(None))).lower(x).as_text()
    reference = jax.jit(jax.grad(loss("reference"))).lower(x).as_text()
    for target in targets:
        assert f'@jaxmps_{target}' in native or f'"jaxmps_{target}' in native, target
        assert f"jaxmps_{target}" in auto, target
        assert "jaxmps_" + target not in reference.replace(f"jaxmps_{target}_", "")
    assert "custom_call" not in reference


def test_batch_norm_inference_hlo():
    require_native(k.batch_norm_inference)
    x = _image((2, 4, 4, 3), "float32", True)
    ones = jnp.ones(3)
    text = jax.jit(lambda v: jaxmps.batch_norm_inference(v, ones, ones * 0, ones * 0, ones)
                   ).lower(x).as_text()
    assert "jaxmps_batch_norm_inference" in text


def test_native_platform_is_reported():
    assert FFI_PLATFORM in ("cpu", "cuda")
    backend = jaxmps.backends()["cuda" if FFI_PLATFORM == "cuda" else "cpu"]
    assert backend.available, backend.error
