"""Library loading: the target registry, the FFI API version guard, and backend reporting."""

from __future__ import annotations

import jax
import pytest

import jaxmps
from jaxmps._src import ffi
from jaxmps._src import norm_kernels


def test_cpu_library_registers_every_normalization_kernel():
    cpu = jaxmps.backends()["cpu"]
    if not cpu.available:
        pytest.skip(cpu.error)
    for kernel in norm_kernels.ALL:
        assert kernel.target in cpu.targets
    assert cpu.api_version == (0, 1), "built against the vendored FFI API 0.1 headers"
    assert "cpu backend" in cpu.build_info


def test_runtime_version_is_read_from_jaxlib_headers():
    version = ffi.runtime_ffi_api_version()
    assert version is not None and version >= (0, 1)


def test_library_newer_than_runtime_is_refused_with_a_warning():
    if ffi._library_path("jaxmps_cpu") is None:
        pytest.skip("CPU library not built")
    with pytest.warns(RuntimeWarning, match=r"not using the cpu kernels: .* newer than this "
                                            r"jaxlib's 0\.0"):
        backend = ffi.load_backend("cpu", runtime_version=(0, 0))
    assert not backend.available and backend.targets == ()
    # The CPU backend keeps working (nothing was registered).
    assert float(jax.numpy.ones(3).sum()) == 3.0


def test_missing_library_is_reported(monkeypatch):
    monkeypatch.setattr(ffi, "_library_path", lambda stem: None)
    backend = ffi.load_backend("cuda")
    assert not backend.available and "was not built" in backend.error
