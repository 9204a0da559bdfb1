"""The benchmark's several-calls-per-program timing (`python -m jaxmps.bench --calls K`): each
program computes K independent calls equal to the single call, and times are per call."""

import numpy as np
import pytest

import jaxmps
from jaxmps.bench import harness, norm_cases


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_program_of_calls_computes_each_call(mode):
    shape = (2, 6, 5, 4)
    (case,) = norm_cases.cases(shape, ["float32"], ["NHWC"], modes=[mode],
                               ops=["spatial_norm"], with_torch=False, calls=3)
    (single,) = norm_cases.cases(shape, ["float32"], ["NHWC"], modes=[mode],
                                 ops=["spatial_norm"], with_torch=False, calls=1)
    assert case.calls == 3 and case.bytes == single.bytes  # bytes are per call
    for impl in ("native", "reference"):
        outs, (one,) = case.impls[impl](), single.impls[impl]()
        assert len(outs) == 3
        for out in outs:
            for got, want in zip(np.atleast_1d(out), np.atleast_1d(one)):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The single call is the op itself (forward: y of the native kernel on the case's x).
    if mode == "forward":
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(one), np.asarray(jaxmps.spatial_norm(x, 5)),
                                   rtol=1e-6, atol=1e-6)


def test_times_are_per_call(monkeypatch):
    monkeypatch.setattr(harness, "median_time", lambda fn, **kw: 0.012)
    cases = [harness.Case("op", "forward", (1,), "NHWC", "float32", {"native": lambda: 0},
                          bytes=100, calls=4)]
    (row,) = harness.run_cases(cases, repeats=1, bandwidth=1e4, peak_flops=None)
    assert row["times_s"]["native"] == pytest.approx(0.003)
    assert row["roofline_s"] == pytest.approx(0.01)
    assert "calls" not in row


@pytest.mark.parametrize("calls", [1, 2])
def test_each_case_runs_on_its_own_inputs(calls):
    """Cases built over several dtypes and layouts time their own inputs, not the last
    combination's (the inputs must be bound when the case is built)."""
    built = norm_cases.cases((1, 4, 5, 3), ["float32", "bfloat16"], ["NHWC", "NCHW"],
                             modes=["forward"], ops=["instance_norm"], with_torch=False,
                             calls=calls)
    assert len(built) == 4
    for case in built:
        for impl in ("native", "reference"):
            for y in case.impls[impl]():
                assert y.shape == case.shape and str(y.dtype) == case.dtype, (case, impl)


def test_copy_ceilings_count_the_copies_of_a_program(monkeypatch):
    """A program of K copies moves K times the bytes of one copy."""
    monkeypatch.setattr(harness, "median_time", lambda fn, **kw: 1.0)
    ceilings = harness.copy_ceilings(nbytes=1024, repeats=1, calls=3)
    assert ceilings["jnp.copy"] == pytest.approx(2 * 1024)
    assert ceilings["jnp.copy x3 in one program"] == pytest.approx(3 * 2 * 1024)
