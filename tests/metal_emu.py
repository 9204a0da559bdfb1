"""Loads the Metal emulator library (libjaxmps_metal_emu, built on Linux by
xla_ffi/cmake/metal_emulator.cmake) for the Metal tests: ctypes access to single emulated
kernels, and the emulated Metal FFI targets (jaxmps_<kernel>_metal_emu) registered with XLA."""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import pytest

from jaxmps._src import ffi
from jaxmps._src.kernel import Kernel, ffi_attributes

TARGET_SUFFIX = "_metal_emu"
SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}


class Emulator:
    """The loaded library: kernel launches over numpy buffers and emulator options."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.jaxmps_emu_kernel_name.restype = ctypes.c_char_p
        lib.jaxmps_emu_last_error.restype = ctypes.c_char_p
        lib.jaxmps_emu_set_options.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32]
        lib.jaxmps_target_name.restype = ctypes.c_char_p
        lib.jaxmps_target_handler.restype = ctypes.c_void_p
        self.targets = self._register_targets()

    def kernel_names(self):
        return [self.lib.jaxmps_emu_kernel_name(i).decode()
                for i in range(self.lib.jaxmps_emu_kernel_count())]

    def _register_targets(self) -> Dict[str, str]:
        targets = {}
        for i in range(self.lib.jaxmps_target_count()):
            name = self.lib.jaxmps_target_name(i).decode()
            handler = ctypes.c_void_p(self.lib.jaxmps_target_handler(i))
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
            targets[name[: -len(TARGET_SUFFIX)]] = name
        return targets

    def set_options(self, schedule: str = "forward", seed: int = 0, simd_width: int = 32):
        if self.lib.jaxmps_emu_set_options(SCHEDULES[schedule], seed, simd_width) != 0:
            raise ValueError(self.lib.jaxmps_emu_last_error().decode())

    def get_options(self) -> Dict:
        schedule, seed, width = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_uint32()
        self.lib.jaxmps_emu_get_options(ctypes.byref(schedule), ctypes.byref(seed),
                                        ctypes.byref(width))
        names = {v: k for k, v in SCHEDULES.items()}
        return dict(schedule=names[schedule.value], seed=seed.value, simd_width=width.value)

    @contextlib.contextmanager
    def options(self, **kwargs) -> Iterator[None]:
        """Emulator options (set_options' arguments, the others unchanged) for a `with` block."""
        previous = self.get_options()
        self.set_options(**dict(previous, **kwargs))
        try:
            yield
        finally:
            self.set_options(**previous)

    def launch(self, kernel: str, groups, threads, buffers: Sequence[np.ndarray],
               threadgroup_bytes: Sequence[int] = ()) -> Optional[str]:
        """Runs `kernel`, binding buffers[i] to [[buffer(i)]] (written in place). Returns None,
        or the emulator's error message."""
        groups, threads = tuple(groups) + (1,) * (3 - len(groups)), tuple(threads) + (1,) * (
            3 - len(threads))
        for b in buffers:
            assert b.flags.c_contiguous and b.flags.writeable
        pointers = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        sizes = (ctypes.c_uint64 * len(buffers))(*[b.nbytes for b in buffers])
        tg = (ctypes.c_uint32 * max(1, len(threadgroup_bytes)))(*threadgroup_bytes)
        rc = self.lib.jaxmps_emu_launch(kernel.encode(), (ctypes.c_uint32 * 3)(*groups),
                                        (ctypes.c_uint32 * 3)(*threads), len(buffers), pointers,
                                        sizes, len(threadgroup_bytes), tg)
        return None if rc == 0 else self.lib.jaxmps_emu_last_error().decode()

    def call(self, kernel: Kernel, *args, out_types=None, **params):
        """Runs `kernel`'s emulated Metal FFI target (the macOS handler code, validation and
        dispatch plan, on the emulator) eagerly; result shapes follow the reference unless
        `out_types` gives them."""
        if out_types is None:
            out_types = jax.eval_shape(lambda *a: kernel.call_reference(*a, **params), *args)
        call = jax.ffi.ffi_call(self.targets[kernel.target], out_types)
        return on_host(call, *args, **ffi_attributes(params))


def on_host(fn, *args, **kwargs):
    """Runs `fn` on the CPU device: the emulator's handlers are registered for XLA:CPU, also
    when the default device is a GPU."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return fn(*[jax.device_put(a, cpu) for a in args], **kwargs)


_EMULATOR: Optional[Emulator] = None


def emulator() -> Emulator:
    """The emulator, loaded once; skips the test (fails under JAXMPS_REQUIRE_NATIVE=1) when the
    library was not built."""
    global _EMULATOR
    if _EMULATOR is None:
        path = ffi._library_path("jaxmps_metal_emu")
        if path is None:
            message = "libjaxmps_metal_emu was not built (JAXMPS_ENABLE_METAL_EMULATOR)"
            if os.environ.get("JAXMPS_REQUIRE_NATIVE") == "1":
                pytest.fail(message)
            pytest.skip(message)
        _EMULATOR = Emulator(ctypes.cdll.LoadLibrary(str(path)))
    return _EMULATOR
