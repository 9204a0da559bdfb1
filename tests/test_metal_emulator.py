"""The Metal emulator's own primitives, through small kernels in
xla_ffi/metal/emulator/selftest.metal: thread-position builtins, threadgroup barriers (a kernel
without its barrier must fail), threadgroup memory, every SIMD-group function (full and partial
SIMD-groups, several SIMD widths), storage conversions, and the errors it reports for kernels
that break Metal's rules or launches that do not match a kernel's parameters."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from metal_emu import emulator

SEEDED = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]


@pytest.fixture(params=SEEDED, ids=lambda s: f"{s[0]}{s[1] or ''}")
def schedule(request):
    """Emulator options naming one schedule (order in which simulated threads run)."""
    return dict(schedule=request.param[0], seed=request.param[1])


def _run(kernel, groups, threads, buffers, threadgroup_bytes=(), **options):
    emu = emulator()
    with emu.options(**options):
        error = emu.launch(kernel, groups, threads, buffers, threadgroup_bytes)
    assert error is None, error


def _ids(groups, threads, width):
    """Builtins of every thread, in threadgroup-major order: the kernel's 20 columns."""
    rows = []
    for gz, gy, gx in itertools.product(*(range(g) for g in groups[::-1])):
        for tz, ty, tx in itertools.product(*(range(t) for t in threads[::-1])):
            t = tx + threads[0] * (ty + threads[1] * tz)
            total = int(np.prod(threads))
            rows.append([gx * threads[0] + tx, gy * threads[1] + ty, gz * threads[2] + tz,
                         gx, gy, gz, tx, ty, tz, *threads, *groups,
                         t, t % width, t // width, width, -(-total // width)])
    return np.array(rows, np.uint32)


@pytest.mark.parametrize("groups,threads,width", [
    ((2, 1, 1), (40, 1, 1), 32),   # a partial second SIMD-group
    ((3, 2, 2), (4, 3, 2), 8),     # 3-d grid and threadgroups
    ((1, 1, 1), (1, 1, 1), 32),
    ((2, 1, 1), (64, 1, 1), 64),
])
def test_thread_builtins(groups, threads, width):
    out = np.full((int(np.prod(groups) * np.prod(threads)), 20), 7, np.uint32)
    _run("emu_thread_ids", groups, threads, [out], simd_width=width)
    np.testing.assert_array_equal(out, _ids(groups, threads, width))


def test_barrier_synchronises(schedule):
    x = np.arange(96, dtype=np.float32)
    out = np.zeros_like(x)
    _run("emu_rotate", (3,), (32,), [x, out], (128,), **schedule)
    np.testing.assert_array_equal(out, np.roll(x.reshape(3, 32), -1, axis=1).ravel())


def test_missing_barrier_fails(schedule):
    """Without the barrier the first thread to run reads a slot nobody has written yet: the
    emulator's poisoned threadgroup memory (NaN) shows up, whatever the schedule."""
    x = np.arange(96, dtype=np.float32)
    out = np.zeros_like(x)
    _run("emu_rotate_without_barrier", (3,), (32,), [x, out], (128,), **schedule)
    assert np.isnan(out).any()


@pytest.mark.parametrize("threads", [32, 64, 256])
def test_tree_sum_with_barriers(schedule, threads):
    x = np.random.default_rng(0).integers(-50, 50, 2 * threads).astype(np.float32)
    out = np.zeros(2, np.float32)
    _run("emu_tree_sum", (2,), (threads,), [x, out, np.array([0], np.uint32)], (threads * 4,),
         **schedule)
    np.testing.assert_array_equal(out, x.reshape(2, threads).sum(axis=1))


def test_tree_sum_without_loop_barrier_fails():
    """The classic missing barrier inside a tree reduction gives a wrong sum when threads run
    in launch order or shuffled (in reverse order it happens to work: that is why the
    kernel tests run under several schedules)."""
    x = np.arange(1, 65, dtype=np.float32)
    wrong = {}
    for name, seed in SEEDED:
        out = np.zeros(1, np.float32)
        _run("emu_tree_sum", (1,), (64,), [x, out, np.array([1], np.uint32)], (256,),
             schedule=name, seed=seed)
        wrong[(name, seed)] = out[0] != x.sum()
    assert wrong[("forward", 0)] and (wrong[("shuffle", 1)] or wrong[("shuffle", 2)]), wrong
    assert not wrong[("reverse", 0)]


def _simd_expected(v, width, delta, mask, source, threshold):
    """Reference results of emu_simd_functions: SIMD-groups of `width` lanes, the last one
    partial; reading a lane that does not exist gives NaN (the emulator's poison)."""
    out = np.full((len(v), 13), np.nan, np.float32)
    for start in range(0, len(v), width):
        lanes = v[start:start + width]
        live = len(lanes)

        def read(i):
            return lanes[i] if 0 <= i < live else np.nan

        for lane, value in enumerate(lanes):
            row = out[start + lane]
            row[0:5] = [lanes.sum(), lanes.max(), lanes.min(), lanes[:lane].sum(),
                        lanes[:lane + 1].sum()]
            row[5] = read((lane + delta) % width)
            row[6] = value if lane + delta >= width else read(lane + delta)
            row[7] = value if lane < delta else read(lane - delta)
            row[8] = read(lane ^ mask)
            row[9] = read(source)
            row[10:13] = [lane == 0, (lanes > threshold).all(), (lanes > threshold).any()]
    return out


@pytest.mark.parametrize("threads,width", [(32, 32), (40, 32), (64, 8), (48, 64)])
def test_simd_functions(schedule, threads, width):
    v = np.random.default_rng(threads).integers(-20, 20, threads).astype(np.float32)
    delta, mask, source, threshold = 3, 5, 2, -15.0
    params = np.array([delta, mask, source, 0], np.uint32)
    params[3] = np.float32(threshold).view(np.uint32)
    out = np.zeros((threads, 13), np.float32)
    _run("emu_simd_functions", (1,), (threads,), [v, out, params], simd_width=width, **schedule)
    np.testing.assert_array_equal(out, _simd_expected(v, width, delta, mask, source, threshold))


@pytest.mark.parametrize("threads,width", [(32, 32), (96, 32), (256, 32), (40, 32), (64, 8)])
def test_threadgroup_sum_helper(schedule, threads, width):
    """kernels/common.h threadgroup_sum, as the statistics kernels use it: every thread gets
    the same total, for any number of (full or partial) SIMD-groups."""
    x = np.random.default_rng(1).integers(-100, 100, 2 * threads).astype(np.float32)
    out = np.zeros_like(x)
    _run("emu_threadgroup_sum", (2,), (threads,), [x, out], (threads * 4,), simd_width=width,
         **schedule)
    np.testing.assert_array_equal(out.reshape(2, threads),
                                  np.repeat(x.reshape(2, threads).sum(1, keepdims=True),
                                            threads, axis=1))


def test_threadgroup_memory_is_per_group_and_poisoned():
    out = np.zeros((3, 16, 2), np.float32)
    _run("emu_threadgroup_memory", (3,), (16,), [out], (64, 64))
    expected = (np.arange(3)[:, None] * 1000 + np.arange(16)[::-1][None, :]).astype(np.float32)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert np.isnan(out[..., 1]).all()  # never written: undefined in Metal, NaN here


def test_storage_conversions_round_to_nearest_even():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 3, 500), rng.normal(0, 1e-5, 100),
                        [0.0, -0.0, 65504.0, 65520.0, 1e6, 1e-8, np.inf, -np.inf, np.nan],
                        # ties: exactly half way between two half / bfloat16 values
                        [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]]
                       ).astype(np.float32)
    out = np.zeros((len(x), 2), np.float32)
    _run("emu_round_trip", (-(-len(x) // 64),), (64,), [x, out, np.array([len(x)], np.uint32)])
    with np.errstate(over="ignore"):  # 65520 and 1e6 overflow to inf in half, as in Metal
        np.testing.assert_array_equal(out[:, 0], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out[:, 1], x.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("kernel,message", [
    ("emu_barrier_after_return", "a barrier must be reached by every thread"),
    ("emu_divergent_barriers", "different threadgroup barriers"),
    ("emu_divergent_simd", "different SIMD-group functions"),
])
def test_rule_breaking_kernels_are_reported(kernel, message):
    error = emulator().launch(kernel, (1,), (8,), [np.zeros(8, np.float32)])
    assert error is not None and message in error, error
    assert f"{kernel}, threadgroup (0, 0, 0)" in error


def test_launch_must_match_the_kernel_parameters():
    emu = emulator()
    x, out = np.zeros(32, np.float32), np.zeros(32, np.float32)
    assert "has 3 buffer/threadgroup parameters" in emu.launch("emu_rotate", (1,), (32,), [x, out])
    assert "not a multiple of 16 bytes" in emu.launch("emu_rotate", (1,), (32,), [x, out], (120,))
    assert "Metal allows 1..1024" in emu.launch("emu_rotate", (1,), (2048,), [x, out], (128,))
    wrong_struct = np.zeros(3, np.uint32)  # SimdTestParams has 4 fields
    error = emu.launch("emu_simd_functions", (1,), (32,), [x, np.zeros(32 * 13, np.float32),
                                                           wrong_struct])
    assert "16-byte constant struct, the launch binds 12 bytes" in error
    assert "no emulated kernel named nope" in emu.launch("nope", (1,), (1,), [])


def test_options_are_validated():
    with pytest.raises(ValueError, match="power of two"):
        emulator().set_options(simd_width=24)
