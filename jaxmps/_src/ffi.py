"""Loads the native jaxmps libraries and registers their XLA FFI targets.

Each library (``jaxmps/_lib/libjaxmps_<backend>.so``) exports its own target table, the XLA FFI
API version its handlers were compiled against, and a build description (see
``xla_ffi/common/registry.cc``). A library compiled against newer FFI headers than the running
jaxlib is refused with a warning: registering it would make XLA fail to initialise the whole CPU
backend, not just our ops.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import jax

_LIB_DIR = Path(__file__).resolve().parent.parent / "_lib"

# Data dtypes each backend's kernels implement (others fall back to the next backend or the
# reference): CUDA and Metal have no float64.
BACKEND_DTYPES: Dict[str, Tuple[str, ...]] = {
    "cpu": ("float16", "bfloat16", "float32", "float64"),
    "cuda": ("float16", "bfloat16", "float32"),
    "metal": ("float16", "bfloat16", "float32"),
}

# backend -> (library stem, XLA platform its targets are registered for, target-name suffix)
BACKENDS: Dict[str, Tuple[str, str, str]] = {
    "cpu": ("jaxmps_cpu", "cpu", ""),
    "cuda": ("jaxmps_cuda", "CUDA", ""),
    # Metal runs on the Apple GPU from a CPU-platform handler (XLA's buffers are host memory).
    "metal": ("jaxmps_metal", "cpu", "_metal"),
}


@dataclasses.dataclass
class Backend:
    name: str
    path: Optional[Path] = None
    targets: Tuple[str, ...] = ()
    api_version: Optional[Tuple[int, int]] = None
    build_info: str = ""
    error: Optional[str] = None  # why the backend is unavailable

    @property
    def available(self) -> bool:
        return self.error is None and bool(self.targets)


def runtime_ffi_api_version() -> Optional[Tuple[int, int]]:
    """XLA FFI API version of the running jaxlib, read from the headers it ships."""
    try:
        header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
        text = header.read_text()
    except Exception:  # pragma: no cover - jaxlib without headers
        return None
    major = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text)
    minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", text)
    if not (major and minor):  # pragma: no cover
        return None
    return int(major.group(1)), int(minor.group(1))


def _installed_lib_dir() -> Optional[Path]:
    """`_lib` of the pip-installed jaxmps, for when a source checkout shadows it (running
    ``python -m jaxmps`` or the tests from the repository root after ``pip install .``)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        return Path(distribution("jaxmps").locate_file("jaxmps/_lib"))
    except (ImportError, PackageNotFoundError):
        return None


def _library_path(stem: str) -> Optional[Path]:
    search = [Path(p) for p in os.environ.get("JAXMPS_LIB_DIR", "").split(os.pathsep) if p]
    search.append(_LIB_DIR)
    installed = _installed_lib_dir()
    if installed is not None:
        search.append(installed)
    for directory in search:
        for suffix in (".so", ".dylib"):
            candidate = directory / f"lib{stem}{suffix}"
            if candidate.exists():
                return candidate
    return None


def load_backend(name: str, runtime_version=None) -> Backend:
    """Loads one backend library and registers its targets (idempotent per process)."""
    stem, platform, suffix = BACKENDS[name]
    backend = Backend(name)
    path = _library_path(stem)
    if path is None:
        backend.error = f"lib{stem} was not built"
        return backend
    backend.path = path
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        backend.error = f"cannot load {path.name}: {e}"
        return backend
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.jaxmps_ffi_api_version(ctypes.byref(major), ctypes.byref(minor))
    backend.api_version = (major.value, minor.value)
    lib.jaxmps_build_info.restype = ctypes.c_char_p
    backend.build_info = lib.jaxmps_build_info().decode()
    if name == "metal":
        # The Metal library loads on any Mac; it reports here when there is no Metal device or
        # its metallib is missing, and the C++ CPU kernels then serve instead.
        lib.jaxmps_metal_error.restype = ctypes.c_char_p
        problem = (lib.jaxmps_metal_error() or b"").decode()
        if problem:
            backend.error = problem
            return backend
    runtime = runtime_ffi_api_version() if runtime_version is None else runtime_version
    if runtime is not None and backend.api_version > runtime:
        backend.error = (
            f"{path.name} was built against XLA FFI API {backend.api_version[0]}."
            f"{backend.api_version[1]}, newer than this jaxlib's {runtime[0]}.{runtime[1]}; "
            "rebuild jaxmps against older headers (the default vendored ones)"
        )
        warnings.warn(f"jaxmps: not using the {name} kernels: {backend.error}", RuntimeWarning,
                      stacklevel=3)
        return backend
    lib.jaxmps_target_name.restype = ctypes.c_char_p
    lib.jaxmps_target_handler.restype = ctypes.c_void_p
    names = []
    for i in range(lib.jaxmps_target_count()):
        target = lib.jaxmps_target_name(i).decode()
        handler = ctypes.cast(lib.jaxmps_target_handler(i), ctypes.c_void_p)
        try:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform=platform)
        except Exception as e:  # e.g. no plugin for this platform in this jaxlib
            backend.error = f"cannot register {target} for {platform}: {e}"
            return backend
        names.append(target[: len(target) - len(suffix)] if suffix else target)
    backend.targets = tuple(names)
    backend._lib = lib  # keep the library loaded for the life of the process
    return backend


_BACKENDS: Dict[str, Backend] = {}


def backends() -> Dict[str, Backend]:
    """All backends, loading (and registering) them on first use."""
    if not _BACKENDS:
        if os.environ.get("JAXMPS_DISABLE_FFI", "") == "1":
            for name in BACKENDS:
                _BACKENDS[name] = Backend(name, error="disabled by JAXMPS_DISABLE_FFI=1")
        else:
            for name in BACKENDS:
                _BACKENDS[name] = load_backend(name)
    return _BACKENDS


def _serves(name: str, target: str, dtype: str) -> bool:
    backend = backends()[name]
    return backend.available and target in backend.targets and dtype in BACKEND_DTYPES[name]


def native_target(target: str, platform: str, dtype: str) -> Optional[str]:
    """The registered FFI target implementing `target` on `platform` ("cpu", "cuda") for data
    of `dtype`, or None.

    On the cpu platform the Metal library wins when it is loaded and ``JAXMPS_METAL`` is not
    "0" (macOS with a Metal device); otherwise the C++ CPU kernels serve.
    """
    if platform == "cpu":
        if os.environ.get("JAXMPS_METAL") != "0" and _serves("metal", target, dtype):
            return target + BACKENDS["metal"][2]
        return target if _serves("cpu", target, dtype) else None
    if platform == "cuda":
        return target if _serves("cuda", target, dtype) else None
    return None
