"""``python scripts/gpu_knob_sweep.py --knob NAME=V1,V2 [--knob NAME2=...] [--ops ...]
[--dtypes ...] [--json out.json]``: times the native normalization ops at the issue-4 shape
(N=32, 64x64, C=128, NHWC) under every combination of CUDA benchmarking knobs, in one process
(a development tool, not the benchmark).

The CUDA kernels read their knobs (``JAXMPS_CUDA_*`` environment variables) at each launch, so
one jitted function serves every setting. Settings are timed in interleaved rounds (round 1:
every setting, round 2: every setting, ...) and each reports the median of its rounds, so that
clock or thermal drift over the run falls on all settings alike rather than on the last ones.
A value ``-`` means the variable unset. Times are pipelined as in scripts/gpu_bench.py (20
calls per sample, one program each); the roofline is the issue's (x read twice, y and dx
written, dy read; forward: x read, y written) at the fastest copy bandwidth measured in the
same run (``harness.copy_bandwidth``, as the benchmark).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxmps.bench import harness
from jaxmps.bench.norm_cases import op_function

SHAPE = (32, 64, 64, 128)


def settings(knobs):
    """Every combination of the knob values: a list of {name: value or None}."""
    names = [k.split("=", 1)[0] for k in knobs]
    values = [[None if v == "-" else v for v in k.split("=", 1)[1].split(",")] for k in knobs]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def apply(setting):
    for name, value in setting.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def label(setting):
    return " ".join(f"{k.removeprefix('JAXMPS_CUDA_')}={'-' if v is None else v}"
                    for k, v in setting.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knob", action="append", required=True, help="NAME=v1,v2,... (- = unset)")
    ap.add_argument("--ops", nargs="*", default=["instance_norm"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    combos = settings(args.knob)
    elems = int(np.prod(SHAPE))
    bandwidth = harness.copy_bandwidth(elems * 4)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rng = np.random.default_rng(0)
    c = SHAPE[-1]
    g, b = jnp.ones(c), jnp.zeros(c)
    results = []
    for dtype in args.dtypes:
        x = jnp.asarray(rng.standard_normal(SHAPE), dtype=dtype)
        dy = jnp.asarray(rng.standard_normal(SHAPE), dtype=dtype)
        nbytes = elems * jnp.dtype(dtype).itemsize
        for op in args.ops:
            f = op_function(op, "NHWC", "native")
            fwd = jax.jit(lambda x, f=f: f(x, g, b))

            def fb(x, dy, f=f):
                y, vjp = jax.vjp(lambda v: f(v, g, b), x)
                return y, vjp(dy)[0]
            fbj = jax.jit(fb)
            cases = {"forward": (lambda: fwd(x), 2 * nbytes),
                     "forward+backward": (lambda: fbj(x, dy), 5 * nbytes)}
            samples = {(i, mode): [] for i in range(len(combos)) for mode in cases}
            for _ in range(args.rounds):
                for i, setting in enumerate(combos):
                    apply(setting)
                    for mode, (fn, _) in cases.items():
                        samples[i, mode].append(
                            harness.median_time(fn, repeats=args.repeats, inner=20))
            for i, setting in enumerate(combos):
                for mode, (_, model_bytes) in cases.items():
                    t = statistics.median(samples[i, mode])
                    roofline = model_bytes / bandwidth
                    results.append(dict(op=op, dtype=dtype, mode=mode, setting=setting,
                                        time_s=t, rounds_s=samples[i, mode],
                                        x_roofline=t / roofline))
                    print(f"{op:14s} {dtype:9s} {mode:17s} {label(setting):40s} "
                          f"{t * 1e3:.4f} ms  {t / roofline:.2f}x roofline", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=str(jax.devices()[0].device_kind), shape=SHAPE,
                           bandwidth_Bps=bandwidth, runs=results), fh, indent=1)


if __name__ == "__main__":
    main()
