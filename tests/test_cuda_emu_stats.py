"""The CUDA statistics engine (xla_ffi/cuda/stats.cuh) on the CUDA emulator, path by path:
fused (a group in one CTA), cluster (a group spread over a thread-block cluster that swaps
partial sums through distributed shared memory, Hopper only), chunked and resident (one
cooperative grid, one grid-wide barrier: resident_stats.cuh), each proven by the library's own
plan (jaxmps_cuda_stats_plan) and checked against the jnp reference.

Shapes are tiny: the emulated device 1 is an H100 with 16 KiB of shared memory per CTA, so a
few thousand elements already overflow one CTA."""

from __future__ import annotations

import ctypes

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmps._src.samples import kernel_calls
from test_cuda_emulator import _compare, _run, _targets
from test_norm_native import _image, resident_waves

FUSED, CLUSTER, CHUNKED, RESIDENT = "fused", "cluster", "chunked", "resident"
PATHS = {0: FUSED, 1: CLUSTER, 2: CHUNKED, 3: RESIDENT}
# Emulated devices (cuda_emu.cc); COOPERATIVE: 4 SMs of 64 KiB with cooperative launches.
H100, SMALL_H100, A100, COOPERATIVE = 0, 1, 2, 4


def _lib():
    return _targets()["_lib"]


@pytest.fixture
def device():
    """Selects an emulated device for one test; the full H100 again afterwards."""
    lib = _lib()
    yield lambda ordinal: lib.jaxmps_cuda_emu_select_device(ordinal)
    lib.jaxmps_cuda_emu_select_device(H100)


def _plan(nhwc, channels_last, dtype, gradient, per_image=True):
    """(path, CTAs per group) that PlanStats picks on the current emulated device (the
    cluster size, or the resident path's CTAs per group)."""
    n, h, w, c = nhwc
    cluster = ctypes.c_int(0)
    path = _lib().jaxmps_cuda_stats_plan(
        ctypes.c_int64(n), ctypes.c_int64(h), ctypes.c_int64(w), ctypes.c_int64(c),
        int(channels_last), int(per_image), jnp.dtype(dtype).itemsize, int(gradient),
        ctypes.byref(cluster))
    assert path in PATHS, path
    return PATHS[path], cluster.value


# (N, H, W, C) (logical NHWC), layout, dtype, op, then the (path, cluster size) of the forward
# and of the gradient sweep on the 16 KiB device: every path, cluster sizes 2, 4 and 8, both
# layouts, the three half/float dtypes, instance and batch norm.
CASES = [
    ((2, 12, 12, 8), True, "float32", "instance_norm", (FUSED, 1), (FUSED, 1)),
    ((2, 32, 32, 4), True, "float32", "instance_norm", (CLUSTER, 2), (CLUSTER, 4)),
    ((2, 32, 32, 4), True, "bfloat16", "instance_norm", (FUSED, 1), (CLUSTER, 2)),
    ((2, 24, 24, 8), True, "float16", "instance_norm", (FUSED, 1), (CLUSTER, 4)),
    ((2, 24, 24, 8), True, "float32", "instance_norm", (CLUSTER, 2), (CLUSTER, 8)),
    ((1, 60, 60, 8), True, "float32", "instance_norm", (CLUSTER, 8), (CHUNKED, 1)),
    ((1, 64, 64, 2), False, "float32", "instance_norm", (CLUSTER, 2), (CLUSTER, 4)),
    ((1, 64, 64, 2), False, "bfloat16", "instance_norm", (FUSED, 1), (CLUSTER, 2)),
    ((2, 24, 24, 8), True, "float32", "batch_norm", (CLUSTER, 4), (CLUSTER, 8)),
    ((2, 24, 24, 8), False, "float32", "batch_norm", (CLUSTER, 2), (CLUSTER, 2)),
]


def _case_id(case):
    shape, channels_last, dtype, op, fwd, grad = case
    layout = "NHWC" if channels_last else "NCHW"
    return f"{op}-{layout}-{dtype}-{'x'.join(map(str, shape))}-{fwd[0]}{fwd[1]}-{grad[0]}{grad[1]}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_each_path_matches_reference(device, case):
    shape, channels_last, dtype, op, fwd, grad = case
    device(SMALL_H100)
    per_image = op == "instance_norm"
    assert _plan(shape, channels_last, dtype, False, per_image) == fwd
    assert _plan(shape, channels_last, dtype, True, per_image) == grad
    x = _image(shape, dtype, channels_last, seed=7)
    _compare(op, x, channels_last, (3, 3), dtype, scale=2.0 if dtype == "float32" else 1.0)


def test_clusters_only_on_hopper(device):
    """The issue-4 shape: clusters of 8 on an H100, chunking on a compute-capability-8 GPU
    (whose sm_80 cluster kernels are empty and must never launch). Both emulated devices
    report no cooperative launches: a real H100 takes the resident path first (see the
    resident tests on the cooperative device)."""
    shape = (32, 64, 64, 128)
    for dtype in ("float32", "bfloat16"):
        for gradient in (False, True):
            device(H100)
            assert _plan(shape, True, dtype, gradient) == (CLUSTER, 8)
            device(A100)
            assert _plan(shape, True, dtype, gradient) == (CHUNKED, 1)


def _vector(nhwc, channels_last, dtype, gradient, per_image=True):
    n, h, w, c = nhwc
    return _lib().jaxmps_cuda_stats_vector(
        ctypes.c_int64(n), ctypes.c_int64(h), ctypes.c_int64(w), ctypes.c_int64(c),
        int(channels_last), int(per_image), jnp.dtype(dtype).itemsize, int(gradient))


def test_nchw_on_chip_vectors_hold_at_most_four(device):
    """NCHW planes on chip take vectors of at most 4 elements, even for 2-byte types whose
    16-byte vectors hold 8 (PlanStats: 8 slots cost registers and reductions, not bytes);
    NHWC keeps 16-byte vectors. Each plan is run against the reference."""
    device(H100)
    for dtype, nhwc_vector in (("bfloat16", 8), ("float16", 8), ("float32", 4)):
        for per_image, op in ((True, "instance_norm"), (False, "batch_norm")):
            for gradient in (False, True):
                assert _plan((4, 16, 16, 6), False, dtype, gradient, per_image)[0] in (FUSED,
                                                                                      CLUSTER)
                assert _vector((4, 16, 16, 6), False, dtype, gradient, per_image) == 4
                assert _vector((4, 16, 16, 64), True, dtype, gradient, per_image) == nhwc_vector
            x = _image((4, 16, 16, 6), dtype, False, seed=8)
            _compare(op, x, False, (3, 3), dtype, scale=2.0 if dtype == "float32" else 1.0)


def _outputs(op, x, channels_last):
    return [np.asarray(o) for kernel, args, params in kernel_calls(op, x, channels_last)
            for o in _run(kernel, args, params)]


def test_cluster_path_is_bitwise_repeatable(device):
    device(SMALL_H100)
    shape = (2, 24, 24, 8)
    assert _plan(shape, True, "float32", False)[0] == CLUSTER
    assert _plan(shape, True, "float32", True)[0] == CLUSTER
    x = _image(shape, "float32", True, seed=8) * 3.0 + 20.0
    first, second = _outputs("instance_norm", x, True), _outputs("instance_norm", x, True)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


def test_cluster_path_nan_stays_in_its_group(device):
    """A NaN in image 0, channel 1 poisons exactly that (image, channel)'s statistics, y and dx
    and dgamma[1]; every other output stays finite and matches the reference."""
    device(SMALL_H100)
    shape = (2, 32, 32, 4)
    assert _plan(shape, True, "float32", False)[0] == CLUSTER
    assert _plan(shape, True, "float32", True)[0] == CLUSTER
    x = np.array(_image(shape, "float32", True, seed=9))
    x[0, 5, 7, 1] = np.nan
    x = jnp.asarray(x)
    (fwd, fargs, fparams), (grad, gargs, gparams) = kernel_calls("instance_norm", x, True)
    y, mean, rstd = (np.asarray(o) for o in _run(fwd, fargs, fparams))
    dx, dgamma, dbeta = (np.asarray(o) for o in _run(grad, gargs, gparams))
    poisoned = np.zeros(y.shape, bool)
    poisoned[0, :, :, 1] = True
    np.testing.assert_array_equal(np.isnan(y), poisoned)
    np.testing.assert_array_equal(np.isnan(dx), poisoned)
    np.testing.assert_array_equal(np.isnan(mean), poisoned[:, 0, 0, :])
    np.testing.assert_array_equal(np.isnan(dgamma), [False, True, False, False])
    assert np.isfinite(dbeta).all()
    _compare("instance_norm", x, True, (3, 3), "float32", scale=2.0)


def test_sum_over_images_unrolled_and_tail(device):
    """dgamma/dbeta add 9 images: one unrolled batch of 8, then the tail."""
    device(H100)
    x = _image((9, 5, 6, 4), "float32", True, seed=10)
    _compare("instance_norm", x, True, (3, 3), "float32", scale=2.0)


# The resident path on the cooperative device: (N, H, W, C), dtype, op, then (path, CTAs per
# group) of the forward and of the gradient. Every case streams part of each CTA's rows and
# keeps the rest in shared memory (the 8x32x32x6 forward keeps all of them); C = 6 leaves
# 2 of 512 threads idle (3 lanes of 2 channels); 7x19x23x16 splits 3059 rows unevenly.
RESIDENT_CASES = [
    ((8, 16, 16, 32), "float32", "batch_norm", (RESIDENT, 4), (RESIDENT, 4)),
    ((4, 16, 16, 64), "bfloat16", "batch_norm", (RESIDENT, 2), (RESIDENT, 2)),
    ((8, 32, 32, 6), "float32", "batch_norm", (RESIDENT, 4), (RESIDENT, 4)),
    ((7, 19, 23, 16), "float16", "batch_norm", (RESIDENT, 2), (RESIDENT, 2)),
    ((3, 32, 40, 16), "float32", "instance_norm", (RESIDENT, 1), (RESIDENT, 1)),
    ((2, 48, 48, 16), "bfloat16", "instance_norm", (RESIDENT, 2), (RESIDENT, 2)),
]


@pytest.mark.parametrize("case", RESIDENT_CASES,
                         ids=[_case_id((c[0], True) + c[1:]) for c in RESIDENT_CASES])
def test_resident_path_matches_reference(device, case):
    shape, dtype, op, fwd, grad = case
    device(COOPERATIVE)
    per_image = op == "instance_norm"
    assert _plan(shape, True, dtype, False, per_image) == fwd
    assert _plan(shape, True, dtype, True, per_image) == grad
    # An offset mean: the forward's shifted sums must keep float32 variances accurate.
    x = _image(shape, dtype, True, seed=11) * 2.0 + 5.0
    _compare(op, x, True, (3, 3), dtype, scale=2.0 if dtype == "float32" else 1.0)


@pytest.mark.parametrize("batches", ["3", "8"])
@pytest.mark.parametrize("shape, dtype, op", [
    ((8, 16, 16, 32), "float32", "batch_norm"),  # 6-7 kept rows per thread forward, 3-4 gradient
    ((2, 48, 48, 16), "bfloat16", "instance_norm"),
])
def test_resident_kept_rows_in_batches(device, monkeypatch, batches, shape, dtype, op):
    """JAXMPS_CUDA_RESIDENT_BATCHES: the kept rows copied in that many commit groups, each
    summed once it has landed (the emulator lands a group only when a wait allows it): the
    same bits as one group, and the reference."""
    device(COOPERATIVE)
    assert _plan(shape, True, dtype, True, op == "instance_norm")[0] == RESIDENT
    x = _image(shape, dtype, True, seed=17) * 2.0 + 5.0
    whole = _outputs(op, x, True)
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_BATCHES", batches)
    for a, b in zip(whole, _outputs(op, x, True)):
        assert a.tobytes() == b.tobytes()
    _compare(op, x, True, (3, 3), dtype, scale=2.0 if dtype == "float32" else 1.0)


def test_resident_path_is_bitwise_repeatable_and_knob_selects_paths(device, monkeypatch):
    device(COOPERATIVE)
    shape = (8, 16, 16, 32)
    x = _image(shape, "float32", True, seed=12) * 3.0 + 20.0
    first, second = _outputs("batch_norm", x, True), _outputs("batch_norm", x, True)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    # The benchmarking knob (KERNELS.md) steps back to the cluster and chunked paths, which
    # must agree with the resident one to rounding.
    for knob, path in (("cluster", CLUSTER), ("chunked", CHUNKED)):
        monkeypatch.setenv("JAXMPS_CUDA_STATS_PATH", knob)
        assert _plan(shape, True, "float32", False, per_image=False)[0] == path
        for a, b in zip(first, _outputs("batch_norm", x, True)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_resident_path_needs_cooperative_launches(device):
    """Without cooperative launches (the other emulated devices) the same shapes keep the
    cluster or chunked path."""
    device(SMALL_H100)
    for shape, dtype, op, _, _ in RESIDENT_CASES:
        for gradient in (False, True):
            assert _plan(shape, True, dtype, gradient, op == "instance_norm")[0] != RESIDENT


@pytest.mark.parametrize("op, shape", [("batch_norm", (8, 16, 16, 32)),
                                       ("instance_norm", (3, 32, 40, 16))])
def test_refused_cooperative_launch_falls_back(device, op, shape):
    """When the driver refuses the resident path's cooperative grid (as under MPS thread
    limits, which the occupancy query does not see), the same sweep runs on the path planned
    without it, with the same results to rounding."""
    device(COOPERATIVE)
    lib = _lib()
    per_image = op == "instance_norm"
    assert _plan(shape, True, "float32", False, per_image)[0] == RESIDENT
    assert _plan(shape, True, "float32", True, per_image)[0] == RESIDENT
    x = _image(shape, "float32", True, seed=13) * 2.0 + 5.0
    resident = _outputs(op, x, True)
    lib.jaxmps_cuda_emu_refuse_cooperative(1)
    try:
        refused = _outputs(op, x, True)
        _compare(op, x, True, (3, 3), "float32", scale=2.0)
    finally:
        lib.jaxmps_cuda_emu_refuse_cooperative(0)
    for a, b in zip(resident, refused):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


# The resident path's waves (ResidentKernel, PlanResident): instance norm's images run in waves
# of groups over all the CTAs, each wave with its own partial sums and grid barrier.
SMALL_L2 = 5  # the cooperative device with a 64 KiB L2 (cuda_emu.cc)


def _waves(nhwc, dtype, gradient, per_image=True):
    return resident_waves(_lib(), nhwc, dtype, gradient, per_image)


@pytest.mark.parametrize("shape, dtype, knob, waves", [
    ((4, 32, 40, 16), "float32", "1", 1),
    ((4, 32, 40, 16), "float32", "2", 2),
    ((4, 48, 48, 16), "bfloat16", "4", 4),
    ((3, 32, 40, 16), "float32", "2", 2),  # the second wave has one group: 2 CTAs sit it out
    ((3, 80, 79, 6), "float16", "3", 3),
])
def test_resident_waves_match_reference(device, monkeypatch, shape, dtype, knob, waves):
    device(COOPERATIVE)
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", knob)
    for gradient in (False, True):
        assert _plan(shape, True, dtype, gradient)[0] == RESIDENT
        assert _waves(shape, dtype, gradient) == waves
    x = _image(shape, dtype, True, seed=14) * 2.0 + 5.0
    _compare("instance_norm", x, True, (3, 3), dtype, scale=2.0 if dtype == "float32" else 1.0)
    # One wave (all groups at once) gives the same results to rounding; batch norm has one
    # group and ignores the knob.
    waved = _outputs("instance_norm", x, True)
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", "1")
    assert _waves(shape, dtype, True) == 1
    tol = 2e-5 if dtype == "float32" else 1e-2
    for a, b in zip(waved, _outputs("instance_norm", x, True)):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", knob)
    assert _waves(shape, dtype, True, per_image=False) == 1


def test_resident_waves_auto_rule_follows_l2(device, monkeypatch):
    """"l2": as few waves as keep one wave's streamed rows within 3/4 of L2. With a 64 KiB L2
    the 4 x 16 x 32 x 16 float32 gradient (4 images of 64 KiB of x and dy, each on one CTA
    that keeps ~52 of them) takes two (4 images stream ~50 KiB, 2 ~25 KiB); with the H100's
    50 MiB, one. Unset, the knob means the rule."""
    shape = (4, 16, 32, 16)
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", "l2")
    device(COOPERATIVE)
    assert _waves(shape, "float32", True) == 1
    device(SMALL_L2)
    assert _waves(shape, "float32", True) == 2
    x = _image(shape, "float32", True, seed=15) * 2.0 + 5.0
    _compare("instance_norm", x, True, (3, 3), "float32", scale=2.0)
    monkeypatch.delenv("JAXMPS_CUDA_RESIDENT_WAVES")
    assert _waves(shape, "float32", True) == 2
    monkeypatch.setenv("JAXMPS_CUDA_RESIDENT_WAVES", "1")
    assert _waves(shape, "float32", True) == 1
