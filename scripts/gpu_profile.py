"""``python scripts/gpu_profile.py [--ncu] [--ops ...] [--dtypes ...] [--layouts ...]``: where the
time of each normalization op goes on a GPU (a development tool, not the benchmark).

Times, per op, dtype and layout at the issue-4 shape (N=32, 64x64, C=128): the native and
reference forward, forward+backward, and the native gradient kernel alone, pipelined as in
scripts/gpu_bench.py, next to the copy ceilings measured in the same run
(``harness.copy_ceilings``: ``jnp.copy``, ``x + 1``, PyTorch's ``copy_`` when present).
``--ncu`` runs every case once after one warm-up call, for ``ncu`` to attribute per-kernel
times, DRAM bytes and L2 hit rates, e.g. ``ncu --clock-control none --csv --metrics
gpu__time_duration.sum,dram__bytes_read.sum python3 scripts/gpu_profile.py --ncu``.
``JAXMPS_CUDA_STATS_PATH=cluster`` (or ``chunked``) in the environment times instance and batch
norm on the statistics path they had before the resident one (xla_ffi/KERNELS.md).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxmps.bench import harness
from jaxmps.bench.harness import block
from jaxmps.bench.norm_cases import OPS, op_function

SHAPE = (32, 64, 64, 128)
INNER = 20


def timed(fn, repeats=15):
    """Median seconds per call over samples of INNER pipelined calls (harness.median_time)."""
    return harness.median_time(fn, repeats=repeats, inner=INNER)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ops", nargs="*", default=list(OPS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--layouts", nargs="*", default=["NHWC"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, h, w, c = SHAPE
    if not args.ncu:
        for k, v in harness.copy_ceilings(n * h * w * c * 4).items():
            print(f"copy ceiling {k}: {v / 1e9:.0f} GB/s")
    print("| op | dtype | layout | fwd nat | fwd ref | f+b nat | f+b ref | grad nat | ms |")
    for dtype in args.dtypes:
        for layout in args.layouts:
            shape = SHAPE if layout == "NHWC" else (n, c, h, w)
            x = jnp.asarray(rng.standard_normal(shape), dtype=dtype)
            dy = jnp.asarray(rng.standard_normal(shape), dtype=dtype)
            g, b = jnp.ones(c), jnp.zeros(c)
            for op in args.ops:
                row = {}
                for impl in ("native", "reference"):
                    f = op_function(op, layout, impl)
                    fwd = jax.jit(lambda x, f=f: f(x, g, b))

                    def fb(x, dy, f=f):
                        y, vjp = jax.vjp(lambda v: f(v, g, b), x)
                        return y, vjp(dy)[0]
                    fbj = jax.jit(fb)
                    if args.ncu:
                        block(fwd(x)); block(fbj(x, dy))
                        continue
                    row["fwd " + impl] = timed(lambda: fwd(x))
                    row["fb " + impl] = timed(lambda: fbj(x, dy))
                if args.ncu:
                    continue
                # The gradient kernel alone: the forward's residuals computed once outside.
                f = op_function(op, layout, "native")
                _, vjp = jax.vjp(lambda v: f(v, g, b), x)
                grad_only = jax.jit(lambda dy, vjp=vjp: vjp(dy)[0])
                row["grad native"] = timed(lambda: grad_only(dy))
                cells = " | ".join(f"{row[k] * 1e3:.3f}" for k in
                                   ("fwd native", "fwd reference", "fb native", "fb reference",
                                    "grad native"))
                print(f"| {op} | {dtype} | {layout} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
