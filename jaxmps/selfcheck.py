"""Checks every native kernel against the jnp reference on this machine (``python -m jaxmps``
runs it): each forward and gradient kernel, both layouts, every dtype the backend serves."""

from __future__ import annotations

from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from ._src import ffi
from ._src.samples import ALL_OPS, CONV_GEOMETRIES, conv_kernel_calls, kernel_calls

TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 8e-2}


def _platform() -> str:
    return "cuda" if jax.default_backend() == "gpu" else jax.default_backend()


def run(verbose: bool = True) -> Dict:
    """Returns ``{"ok": bool, "platform": str, "checks": [row, ...]}``; a row per kernel x
    dtype x layout with the max error vs the reference, or "reference only" where the
    platform has no native kernel."""
    platform = _platform()
    rows: List[Dict] = []
    dtypes = ["float32", "float16", "bfloat16"]
    if platform == "cpu" and jax.config.jax_enable_x64:
        dtypes.append("float64")

    def sample_calls(x, channels_last):
        for op in ALL_OPS:
            yield from kernel_calls(op, x, channels_last, (3, 2))
        for geometry in CONV_GEOMETRIES:
            yield from conv_kernel_calls(x, channels_last, geometry)

    for dtype in dtypes:
        for channels_last in (True, False):
            x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 8)).astype(dtype) + 0.3
            if not channels_last:
                x = jnp.transpose(x, (0, 3, 1, 2))
            for kernel, args, params in sample_calls(x, channels_last):
                row = dict(kernel=kernel.name, dtype=dtype,
                           layout="NHWC" if channels_last else "NCHW")
                target = kernel.native_target(platform, np.dtype(dtype))
                if target is None:
                    row.update(status="reference only", error=None)
                else:
                    got = kernel.bind(*args, **params, implementation="native")
                    want = kernel.call_reference(*args, **params)
                    err = max(float(np.max(np.abs(np.asarray(g, np.float64)
                                                  - np.asarray(w, np.float64))
                                           / (1 + np.abs(np.asarray(w, np.float64)))))
                              for g, w in zip(got, want))
                    ok = err <= TOLERANCE[dtype]
                    row.update(status="ok" if ok else "MISMATCH", error=err, target=target)
                rows.append(row)
    ok = all(r["status"] != "MISMATCH" for r in rows)
    if verbose:
        native = [r for r in rows if r["status"] != "reference only"]
        print(f"self-check on {platform}: {len(native)} native kernel runs compared with the "
              f"reference, {len(rows) - len(native)} reference-only")
        for r in rows:
            if r["status"] == "MISMATCH":
                print(f"  MISMATCH {r['kernel']} {r['dtype']} {r['layout']}: {r['error']:.3g}")
        worst = max((r for r in native), key=lambda r: r["error"] / TOLERANCE[r["dtype"]],
                    default=None)
        if worst:
            print(f"  worst relative error: {worst['error']:.2e} ({worst['kernel']}, "
                  f"{worst['dtype']}, {worst['layout']}); {'all ok' if ok else 'FAILED'}")
    return {"ok": ok, "platform": platform, "backends": {
        name: (b.available, b.error) for name, b in ffi.backends().items()}, "checks": rows}
