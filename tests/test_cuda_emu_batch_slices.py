"""L2 slicing of the chunked statistics sweeps (xla_ffi/cuda/stats.cuh, issue 4): when the data
of the groups is larger than a share of L2, partial -> finalize -> apply run slice by slice of
consecutive groups, so that apply re-reads its slice from L2. Slicing must not change a bit.

The emulated device 3 is device 1 (an H100 with 16 KiB of shared memory per CTA) with a 1 MiB
L2, so a few hundred thousand elements are cut into slices; device 1 runs the very same chunked
plan in one slice. Each case checks the slice counts the library plans (jaxmps_cuda_stats_slices),
then that the sliced outputs equal the unsliced ones bit for bit and match the jnp reference."""

from __future__ import annotations

import ctypes

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmps._src.samples import kernel_calls
from test_cuda_emu_stats import SMALL_H100, _lib, device  # noqa: F401 (device: a fixture)
from conftest import assert_close
from test_cuda_emulator import _run
from test_norm_native import _image

SLICED_H100 = 3  # device 1 with a 1 MiB L2 (cuda_emu.cc)


def _slices(nhwc, channels_last, dtype, gradient, per_image):
    """Slices of the chunked sweep PlanStats plans on the current device (0: not chunked)."""
    lib = _lib()
    lib.jaxmps_cuda_stats_slices.restype = ctypes.c_int64
    slices = lib.jaxmps_cuda_stats_slices(
        *(ctypes.c_int64(d) for d in nhwc), int(channels_last), int(per_image),
        jnp.dtype(dtype).itemsize, int(gradient))
    assert slices >= 0, slices
    return slices


# (N, H, W, C) (logical NHWC), layout, dtype, op, then the slices of the forward and of the
# gradient sweep on the 1 MiB device (None: that sweep is on chip, not chunked). NHWC slices
# hold one channel block (C = 100: the last block is partial); NCHW slices hold many channels
# (batch) or planes (instance), the last slice fewer than the others.
CASES = [
    ((3, 32, 32, 100), True, "float32", "batch_norm", 4, 4),
    ((3, 32, 32, 100), True, "bfloat16", "batch_norm", 2, 2),
    ((3, 32, 32, 100), False, "float32", "batch_norm", 3, 6),
    ((3, 32, 32, 100), False, "bfloat16", "batch_norm", 2, 3),
    ((2, 48, 48, 64), True, "float32", "instance_norm", 4, 4),
    ((2, 48, 48, 64), True, "bfloat16", "instance_norm", 2, 2),
    ((1, 192, 192, 5), False, "float32", "instance_norm", 3, 5),
    ((1, 192, 192, 5), False, "bfloat16", "instance_norm", None, 3),
]


def _case_id(case):
    shape, channels_last, dtype, op, fwd, grad = case
    layout = "NHWC" if channels_last else "NCHW"
    return f"{op}-{layout}-{dtype}-{'x'.join(map(str, shape))}-slices{fwd}-{grad}"


def _outputs(op, x, channels_last):
    """(kernel name, emulated output, reference output) of every output of the forward and
    the gradient call."""
    return [(kernel.name, np.asarray(got), expected)
            for kernel, args, params in kernel_calls(op, x, channels_last)
            for got, expected in zip(_run(kernel, args, params),
                                     kernel.call_reference(*args, **params))]


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sliced_sweep_is_bitwise_unsliced_and_matches_reference(device, case):
    shape, channels_last, dtype, op, fwd, grad = case
    per_image = op == "instance_norm"
    x = _image(shape, dtype, channels_last, seed=11) * 3.0 + 5.0

    device(SMALL_H100)
    for gradient, sliced in ((False, fwd), (True, grad)):
        assert _slices(shape, channels_last, dtype, gradient, per_image) == (1 if sliced else 0)
    unsliced = _outputs(op, x, channels_last)

    device(SLICED_H100)
    for gradient, sliced in ((False, fwd), (True, grad)):
        assert _slices(shape, channels_last, dtype, gradient, per_image) == (sliced or 0)
    sliced_outputs = _outputs(op, x, channels_last)

    assert len(sliced_outputs) == len(unsliced)
    scale = 5.0 if dtype == "float32" else 1.0
    for i, ((name, got, expected), (_, plain, _)) in enumerate(zip(sliced_outputs, unsliced)):
        assert got.tobytes() == plain.tobytes(), f"{name} output {i}: sliced != unsliced"
        assert_close(got, expected, dtype, scale, err_msg=f"{name} output {i}")


def test_issue4_shape_is_not_sliced_on_h100(device):
    """The issue-4 batch norm (32x64x64x128) on the full H100 (50 MiB L2: 20 MiB per slice)
    would fit one 16 MiB channel block (NHWC) or 19-40 channels (NCHW) per slice, but such
    slices hold fewer than 32 partial-kernel CTAs per SM: measured slower on an H100 (forward
    0.098 -> 0.141 ms NHWC f32), so the planner keeps one sweep."""
    shape = (32, 64, 64, 128)
    device(0)
    for channels_last in (True, False):
        for dtype in ("float32", "bfloat16"):
            for gradient in (False, True):
                slices = _slices(shape, channels_last, dtype, gradient, False)
                assert slices in (0, 1), (channels_last, dtype, gradient, slices)
