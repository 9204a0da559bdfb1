"""``python scripts/gpu_profile.py [--ncu] [--ops ...] [--dtypes ...] [--layouts ...]``: where the
time of each normalization op goes on a GPU (a development tool, not the benchmark).

Times, per op, dtype and layout at the issue-4 shape (N=32, 64x64, C=128): the native and
reference forward, forward+backward, and the native gradient kernel alone, pipelined as in
scripts/gpu_bench.py, next to three copy ceilings measured in the same run (XLA's jitted
``x + 1``, ``jnp.copy`` through a donated buffer, and PyTorch's ``copy_`` when present).
``--ncu`` runs every case once after one warm-up call, for ``ncu`` to attribute per-kernel
times, DRAM bytes and L2 hit rates (see scripts/gpu_run.sh profile mode).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jaxmps
from jaxmps.bench import harness
from jaxmps.bench.harness import block
from jaxmps.bench.norm_cases import KERNEL, OPS

SHAPE = (32, 64, 64, 128)
INNER = 20


def timed(fn, repeats=15):
    """Median seconds per call over samples of INNER pipelined calls (harness.median_time)."""
    return harness.median_time(fn, repeats=repeats, inner=INNER)


def op_fn(op, layout, impl):
    kw = dict(data_format=layout, implementation=impl)
    return {
        "instance_norm": lambda x, g, b: jaxmps.instance_norm(x, g, b, **kw),
        "batch_norm": lambda x, g, b: jaxmps.batch_norm(x, g, b, **kw)[0],
        "spatial_norm": lambda x, g, b: jaxmps.spatial_norm(x, KERNEL, **kw),
        "local_contrast_norm": lambda x, g, b: jaxmps.local_contrast_norm(x, KERNEL, **kw),
        "cross_channel_norm": lambda x, g, b: jaxmps.cross_channel_norm(x, KERNEL, **kw),
    }[op]


def copy_ceilings(nbytes):
    n = nbytes // 4
    x = jnp.asarray(np.random.default_rng(1).standard_normal(n, dtype=np.float32))
    plus = jax.jit(lambda a: a + 1.0)
    out = {"xla_x_plus_1": 2 * nbytes / timed(lambda: plus(x))}
    try:
        import torch
        t = torch.randn(n, device="cuda")
        u = torch.empty_like(t)
        # PyTorch calls are asynchronous too: time with events around INNER copies.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            u.copy_(t)
        samples = []
        for _ in range(15):
            start.record()
            for _ in range(INNER):
                u.copy_(t)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / INNER)
        out["torch_copy_"] = 2 * nbytes / statistics.median(samples)
        big = torch.randn(1 << 28, device="cuda")
        big2 = torch.empty_like(big)
        samples = []
        for _ in range(5):
            start.record()
            big2.copy_(big)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        out["torch_copy_1GiB"] = 2 * big.numel() * 4 / statistics.median(samples)
        del big, big2
    except Exception as e:  # noqa: BLE001 - PyTorch is optional here
        out["torch_error"] = str(e)
    return out


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
        for k, v in copy_ceilings(n * h * w * c * 4).items():
            print(f"copy ceiling {k}: {v / 1e9:.0f} GB/s" if isinstance(v, float) else f"{k}: {v}")
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
                    f = op_fn(op, layout, impl)
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
                f = op_fn(op, layout, "native")
                _, vjp = jax.vjp(lambda v: f(v, g, b), x)
                grad_only = jax.jit(lambda dy, vjp=vjp: vjp(dy)[0])
                row["grad native"] = timed(lambda: grad_only(dy))
                cells = " | ".join(f"{row[k] * 1e3:.3f}" for k in
                                   ("fwd native", "fwd reference", "fb native", "fb reference",
                                    "grad native"))
                print(f"| {op} | {dtype} | {layout} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
