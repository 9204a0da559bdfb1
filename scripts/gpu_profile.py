"""``python scripts/gpu_profile.py [--ncu | --trace [--hlo]] [--ops ...] [--dtypes ...]
[--layouts ...]``: where the time of each normalization op goes on a GPU (a development tool, not
the benchmark).

Times, per op, dtype and layout at the issue-4 shape (N=32, 64x64, C=128): the native and
reference forward, forward+backward, and the native gradient kernel alone, pipelined as in
scripts/gpu_bench.py, next to the copy ceilings measured in the same run
(``harness.copy_ceilings``: ``jnp.copy``, ``x + 1``, PyTorch's ``copy_`` when present).
``--ncu`` runs every case once after one warm-up call, for ``ncu`` to attribute per-kernel
times, DRAM bytes and L2 hit rates, e.g. ``ncu --clock-control none --csv --metrics
gpu__time_duration.sum,dram__bytes_read.sum python3 scripts/gpu_profile.py --ncu``.
``--trace`` records, per case, a JAX profiler trace (CUPTI; the host has no Nsight Systems) of
TRACE_CALLS back-to-back calls and reads it back with ``jax.profiler.ProfileData``: every
kernel and memset of a call with its duration, the device's idle gaps, and the host's time to
enqueue the calls, which says where the wall time per call beyond the kernels' sum goes (device
idle: launch or host bound; or kernels slower in sequence than alone). ``--hlo`` prints the
optimized HLO of each native forward+backward program as well.
``JAXMPS_CUDA_STATS_PATH=cluster`` (or ``chunked``) in the environment times instance and batch
norm on the statistics path they had before the resident one (xla_ffi/KERNELS.md).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

from jaxmps.bench import harness
from jaxmps.bench.harness import block
from jaxmps.bench.norm_cases import OPS, op_function

SHAPE = (32, 64, 64, 128)
INNER = 20
TRACE_CALLS = 20


def timed(fn, repeats=15):
    """Median seconds per call over samples of INNER pipelined calls (harness.median_time)."""
    return harness.median_time(fn, repeats=repeats, inner=INNER)


def device_events(path: str):
    """(name, start_ns, duration_ns) of every GPU activity in a trace file, in start order."""
    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # CUPTI's per-stream lines; not XLA's derived "ops"/"modules" summary lines.
            if line.name.startswith("Stream"):
                events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return sorted(events, key=lambda e: e[1])


def trace(label: str, fn, calls: int = TRACE_CALLS):
    """Traces `calls` pipelined calls of fn (after two warm-up calls) and prints the device's
    busy time and idle gaps per call, and the activities of one call in the middle."""
    block(fn())
    block(fn())
    logdir = tempfile.mkdtemp()
    with jax.profiler.trace(logdir):
        t0 = time.perf_counter()
        out = [fn() for _ in range(calls)]
        t1 = time.perf_counter()
        block(out)
        t2 = time.perf_counter()
    events = device_events(glob.glob(logdir + "/**/*.xplane.pb", recursive=True)[0])
    if not events:
        print(f"{label}: no device activity recorded")
        return
    end = lambda e: e[1] + e[2]  # noqa: E731
    gaps = [max(0, events[i + 1][1] - end(events[i])) for i in range(len(events) - 1)]
    per_call = len(events) // calls
    print(f"{label}: wall {(t2 - t0) / calls * 1e6:.1f} us/call, host enqueue "
          f"{(t1 - t0) / calls * 1e6:.1f} us/call, device span "
          f"{(end(events[-1]) - events[0][1]) / calls / 1e3:.1f} us/call, busy "
          f"{sum(e[2] for e in events) / calls / 1e3:.1f} us/call, {per_call} activities/call, "
          f"gaps median {statistics.median(gaps or [0]) / 1e3:.2f} us, max "
          f"{max(gaps or [0]) / 1e3:.1f} us")
    first = (calls // 2) * per_call
    for i in range(first, first + per_call):
        idle = events[i][1] - end(events[i - 1]) if i else 0
        print(f"    {events[i][2] / 1e3:8.1f} us after {idle / 1e3:5.1f} us idle: "
              f"{events[i][0][:110]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--hlo", action="store_true")
    ap.add_argument("--ops", nargs="*", default=list(OPS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--layouts", nargs="*", default=["NHWC"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, h, w, c = SHAPE
    if not (args.ncu or args.trace):
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
                    if args.trace:
                        if args.hlo and impl == "native":
                            print(fbj.lower(x, dy).compile().as_text())
                        label = f"{op} {dtype} {layout} {impl}"
                        trace(label + " fwd", lambda: fwd(x))
                        trace(label + " f+b", lambda: fbj(x, dy))
                        continue
                    row["fwd " + impl] = timed(lambda: fwd(x))
                    row["fb " + impl] = timed(lambda: fbj(x, dy))
                if args.ncu or args.trace:
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
