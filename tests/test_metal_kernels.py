"""Every Metal kernel against the jnp reference, on Linux: the .metal sources compiled as C++
by the emulator (xla_ffi/metal/emulator) and called through the Metal FFI handlers, i.e. the
validation and dispatch plans (grids, threadgroup sizes, bindings) that run on macOS. Same
grids as the CPU kernel tests (test_norm_native.py, test_conv_native.py), in the Metal dtypes
(no float64), under a shuffled thread schedule; plus schedule and SIMD-width invariance,
NaN/Inf propagation, handler errors, and the source conventions the emulator's positional
binding relies on."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from jaxmps._src import checks
from jaxmps._src import conv_kernels as ck
from jaxmps._src import norm_kernels as k
from jaxmps._src import padding as pad
from jaxmps._src.samples import ALL_OPS, WINDOW_OPS, kernel_calls
from metal_emu import emulator
from test_conv_native import GRID  # the CPU kernel tests' grids
from test_conv_oracles import random
from test_norm_native import SHAPES, WINDOWS

METAL_DIR = Path(__file__).resolve().parent.parent / "xla_ffi" / "metal"
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(autouse=True)
def shuffled_schedule():
    """Threads and threadgroups in a seeded random order: results must not depend on it."""
    with emulator().options(schedule="shuffle", seed=7):
        yield


def _image(shape, dtype, channels_last, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape, np.float32) * 1.5 + 0.25
    x = jnp.asarray(x).astype(dtype)
    return x if channels_last else jnp.transpose(x, (0, 3, 1, 2))


def _compare_calls(calls, dtype, scale=1.0):
    for kernel, args, params in calls:
        got = emulator().call(kernel, *args, **params)
        expected = kernel.call_reference(*args, **params)
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and g.dtype == e.dtype, (kernel.name, i)
            assert_close(g, e, dtype, scale, err_msg=f"{kernel.name} output {i}")


def _compare(op, x, channels_last, window, dtype, scale=1.0):
    _compare_calls(kernel_calls(op, x, channels_last, window), dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ALL_OPS)
def test_metal_matches_reference(op, shape, channels_last, dtype):
    x = _image(shape, dtype, channels_last)
    _compare(op, x, channels_last, (3, 2), dtype, scale=2.0 if dtype == "float32" else 1.0)


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_window_grid(op, window, channels_last):
    """Odd, even, rectangular and larger-than-image windows (float32: Metal has no float64)."""
    x = _image((2, 6, 7, 5), "float32", channels_last, seed=3)
    _compare(op, x, channels_last, window, "float32", scale=2.0)


@pytest.mark.parametrize("width", [8, 32, 64])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("op", ["instance_norm", "batch_norm"])
def test_reductions_under_every_schedule_and_simd_width(op, schedule, width):
    """The statistics kernels (threadgroup barriers, SIMD-group sums) with threads run in
    order, reversed or shuffled, and SIMD-groups of 8, 32 (Apple GPUs) or 64 lanes; the
    shape gives a multi-SIMD-group reduction (N*H*W = 84 per channel) and a partial group."""
    with emulator().options(schedule=schedule, seed=3, simd_width=width):
        _compare(op, _image((2, 6, 7, 3), "float32", False), False, (3, 3), "float32", 2.0)


def _assert_nan_and_inf_match(calls):
    for kernel, args, params in calls:
        got = emulator().call(kernel, *args, **params)
        expected = kernel.call_reference(*args, **params)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
            finite = np.isfinite(e)
            np.testing.assert_allclose(np.asarray(g)[finite], np.asarray(e)[finite],
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ALL_OPS)
def test_nan_and_inf_propagate(op):
    x = np.array(_image((1, 4, 4, 3), "float32", True))
    x[0, 1, 2, 1] = np.nan
    x[0, 3, 3, 0] = np.inf
    _assert_nan_and_inf_match(kernel_calls(op, jnp.asarray(x), True))


# ---- convolution -----------------------------------------------------------------------------


def conv_calls(x, w, b, strides=1, dilation=1, groups=1, padding="same", channels_last=True):
    """[(kernel, args, params)] of the three convolution kernels for conv2d(x, w, b) with a
    random output gradient dy."""
    s, d = checks.pair("test", "strides", strides), checks.pair("test", "dilation", dilation)
    h, wd = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    axes = [pad.forward_axis((h, wd)[i], w.shape[1 + i], s[i], d[i], padding, i)
            for i in range(2)]
    geometry = dict(stride_h=s[0], stride_w=s[1], dilation_h=d[0], dilation_w=d[1],
                    pad_top=axes[0].pad_before, pad_left=axes[1].pad_before, groups=groups,
                    channels_last=channels_last)
    out = (axes[0].output, axes[1].output)
    y_shape = (x.shape[0],) + (out + (w.shape[0],) if channels_last else (w.shape[0],) + out)
    dy = jax.random.normal(jax.random.PRNGKey(5), y_shape, jnp.float32).astype(x.dtype)
    return [(ck.conv2d_forward, (x, w, b), dict(geometry, output_h=out[0], output_w=out[1])),
            (ck.conv2d_data_gradient, (dy, w), dict(geometry, input_h=h, input_w=wd)),
            (ck.conv2d_weights_gradient, (dy, x),
             dict(geometry, kernel_h=w.shape[1], kernel_w=w.shape[2]))]


@pytest.mark.parametrize("kernel,padding,strides,dilation,groups,channels_last", GRID,
                         ids=lambda v: str(v).replace(" ", ""))
def test_conv_grid(kernel, padding, strides, dilation, groups, channels_last):
    """Kernel sizes, every padding mode, strides, dilations, groups and depthwise (float32)."""
    c_in = 6
    groups = c_in if groups == "depthwise" else groups
    c_out = 5 * groups if groups < c_in else c_in
    x = jnp.asarray(random((2, 9, 8, c_in), 0), jnp.float32)
    w = jnp.asarray(random((c_out,) + kernel + (c_in // groups,), 1), jnp.float32)
    b = jnp.asarray(random((c_out,), 2), jnp.float32)
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    _compare_calls(conv_calls(x, w, b, strides, dilation, groups, padding, channels_last),
                   "float32", scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_conv_every_dtype_and_layout(dtype, channels_last):
    """37 -> 18 channels (not multiples of 4), stride (2, 1), dilation (1, 2)."""
    x = jnp.asarray(random((2, 9, 7, 37), 0)).astype(dtype)
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    w = jnp.asarray(random((18, 3, 3, 37), 1) * 0.2, jnp.float32)
    b = jnp.asarray(random((18,), 2), jnp.float32)
    calls = conv_calls(x, w, b, (2, 1), (1, 2), 1, ((1, 0), (2, 1)), channels_last)
    _compare_calls(calls, dtype, scale=4.0)


@pytest.mark.parametrize("padding", ["same", "full", ((2, 1), (2, 2))])
def test_conv_image_smaller_than_kernel(padding):
    x = jnp.asarray(random((2, 3, 2, 5), 0), jnp.float32)
    w = jnp.asarray(random((4, 5, 5, 5), 1), jnp.float32)
    _compare_calls(conv_calls(x, w, jnp.asarray(random((4,), 2), jnp.float32),
                              padding=padding), "float32", scale=4.0)


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_conv_blocked_sizes(channels_last):
    """The CPU tests' blocked sizes (depth 9*40 = 360, 40 -> 35 channels); the weights
    gradient's 3*20*21 positions are summed in two chunks."""
    x = jnp.asarray(random((3, 20, 21, 40), 0), jnp.float32)
    if not channels_last:
        x = jnp.transpose(x, (0, 3, 1, 2))
    w = jnp.asarray(random((35, 3, 3, 40), 1) * 0.1, jnp.float32)
    calls = conv_calls(x, w, jnp.zeros(35), channels_last=channels_last)
    _compare_calls(calls, "float32", scale=50.0)


def test_conv_weights_gradient_in_chunks():
    """A large image with few weights: the weights gradient sums its 2*48*40 positions in
    several chunks (partial sums, then their fixed-order sum)."""
    x = jnp.asarray(random((2, 48, 40, 2), 0), jnp.float32)
    w = jnp.asarray(random((2, 3, 3, 1), 1), jnp.float32)
    calls = conv_calls(x, w, jnp.zeros(2), groups=2, channels_last=True)
    _compare_calls(calls[2:], "float32", scale=10.0)


def test_conv_nan_and_inf_propagate():
    x = np.array(random((1, 5, 5, 3), 0), np.float32)
    x[0, 2, 2, 1] = np.nan
    x[0, 0, 4, 0] = np.inf
    w = jnp.asarray(random((2, 3, 3, 3), 1), jnp.float32)
    _assert_nan_and_inf_match(conv_calls(jnp.asarray(x), w, jnp.zeros(2)))


# ---- handler errors --------------------------------------------------------------------------


def _expect_error(match, kernel, results, *args, **params):
    """The handler's error for arguments the reference would not even trace: the `results`
    are declared like x (the handler validates before it looks at results)."""
    x = args[1] if kernel.name.endswith("gradient") else args[0]
    out_types = (jax.ShapeDtypeStruct(x.shape, x.dtype),) * results
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(emulator().call(kernel, *args, out_types=out_types, **params))


def test_handler_rejects_float64(x64):
    x = jnp.ones((1, 2, 2, 3), jnp.float64)
    _expect_error("jaxmps.spatial_norm: x has unsupported dtype float64 on this backend",
                  k.spatial_norm_forward, 1, x, kernel_h=3, kernel_w=3, alpha=1.0, beta=0.5,
                  delta=1.0, channels_last=True)


def test_handler_checks_shapes_and_windows():
    x = jnp.ones((2, 3, 3, 4), jnp.float32)
    _expect_error(r"jaxmps.instance_norm: gamma must have shape \(4,\), got \(3,\)",
                  k.instance_norm_forward, 3, x, jnp.ones(3), jnp.zeros(4), epsilon=1e-3,
                  channels_last=True)
    _expect_error(r"jaxmps.batch_norm: dy must have the shape of x \(2, 3, 3, 4\)",
                  k.batch_norm_gradient, 3, jnp.ones((2, 3, 3, 3)), x, *[jnp.ones(4)] * 5,
                  epsilon=1e-3, channels_last=True)
    _expect_error("jaxmps.cross_channel_norm: kernel_size must be a positive integer, got 0",
                  k.cross_channel_norm_forward, 1, x, kernel_size=0, alpha=1.0, beta=0.5,
                  delta=1.0, channels_last=True)


def test_conv_handler_checks_groups_and_channels():
    x, w = jnp.ones((1, 5, 5, 6)), jnp.ones((4, 3, 3, 4))
    geometry = dict(stride_h=1, stride_w=1, dilation_h=1, dilation_w=1, pad_top=1, pad_left=1,
                    channels_last=True)
    with pytest.raises(Exception, match=r"jaxmps.conv2d: groups \(1\) must divide the input"):
        jax.block_until_ready(emulator().call(
            ck.conv2d_forward, x, w, jnp.ones(4), groups=1, output_h=5, output_w=5,
            out_types=(jax.ShapeDtypeStruct((1, 5, 5, 4), jnp.float32),), **geometry))
    with pytest.raises(Exception, match="jaxmps.conv2d: dy must have O = 4 channels"):
        jax.block_until_ready(emulator().call(
            ck.conv2d_data_gradient, jnp.ones((1, 5, 5, 3)), w, groups=1, input_h=5,
            input_w=5, out_types=(jax.ShapeDtypeStruct((1, 5, 5, 4), jnp.float32),),
            **geometry))


# ---- the conventions positional binding relies on --------------------------------------------

SIGNATURE = re.compile(r"kernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)


def _metal_sources():
    return sorted(METAL_DIR.glob("kernels/*.metal")) + sorted(METAL_DIR.glob("emulator/*.metal"))


def test_kernel_parameters_are_in_binding_order():
    """The emulator binds parameters by position, Metal by [[buffer(i)]]/[[threadgroup(i)]]
    index: both agree when every kernel lists buffers 0, 1, ..., then threadgroup memory 0, 1,
    ..., then JAXMPS_THREAD_ARGS, as checked here for every kernel."""
    kernels = 0
    for path in _metal_sources():
        for name, params in SIGNATURE.findall(path.read_text()):
            kernels += 1
            parts = [p.strip() for p in params.split(",")]
            assert parts[-1] == "JAXMPS_THREAD_ARGS", (path.name, name)
            kinds = [re.search(r"\[\[(buffer|threadgroup)\((\d+)\)\]\]", p) for p in parts[:-1]]
            assert all(kinds), (path.name, name, parts)
            buffers = [int(m.group(2)) for m in kinds if m.group(1) == "buffer"]
            groups = [int(m.group(2)) for m in kinds if m.group(1) == "threadgroup"]
            assert buffers == list(range(len(buffers))), (path.name, name)
            assert groups == list(range(len(groups))), (path.name, name)
            assert [m.group(1) for m in kinds] == ["buffer"] * len(buffers) + [
                "threadgroup"] * len(groups), (path.name, name)
    assert kernels >= 16


def test_no_threadgroup_variables_and_every_source_is_emulated():
    """Threadgroup memory must be a kernel argument (a threadgroup variable in a kernel body
    would not be shared between the emulator's simulated threads); every .metal source of the
    library is compiled into the emulator."""
    declaration = re.compile(r"\bthreadgroup\s+[\w:<>]+\s+\w+\s*[\[;=]")
    for path in _metal_sources() + sorted(METAL_DIR.glob("kernels/*.h")):
        code = re.sub(r"//[^\n]*", "", path.read_text())
        assert not declaration.search(code), path.name
    emulated = (METAL_DIR / "emulator" / "kernels.cc").read_text()
    for path in METAL_DIR.glob("kernels/*.metal"):
        assert f'#include "../kernels/{path.name}"' in emulated, path.name


def test_every_library_kernel_is_instantiated_for_each_storage_type():
    names = [n for n in emulator().kernel_names() if not n.startswith("emu_")]
    typed = {n.rsplit("_", 1)[0] for n in names if n.endswith(("_float", "_half", "_bfloat"))}
    for base in typed:
        assert {f"{base}_float", f"{base}_half", f"{base}_bfloat"} <= set(names), base
