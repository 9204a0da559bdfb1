"""``python scripts/gpu_bench.py [options of python -m jaxmps.bench]``: the jaxmps benchmark
with timing suited to a GPU, one dtype and layout at a time.

- Each sample times `INNER` back-to-back calls (JAX and PyTorch dispatch asynchronously) and
  one wait at the end, divided by `INNER`, so the host's per-call dispatch and synchronisation
  (about 0.1 ms on the H200 host) overlap device work instead of being counted as part of it;
  the copy-bandwidth roofline is measured the same way.
- ``jaxmps.bench`` is invoked once per (dtype, layout) and the results merged, each invocation
  with its own roofline copy (``bandwidth_Bps`` lists one per invocation). (An earlier case
  builder bound its inputs late, which one invocation per combination also worked around;
  ``tests/test_bench_calls.py`` now checks that cases keep their own inputs.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, List

import jax

from jaxmps.bench import __main__ as bench
from jaxmps.bench import harness

INNER = 20  # calls per timed sample


def pipelined_median_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3,
                          min_time: float = 0.0, inner: int = INNER) -> float:
    """Median over `repeats` samples of (INNER calls of fn, then one wait) / INNER, seconds
    (`inner` is accepted for harness.median_time's signature; INNER always applies)."""
    for _ in range(warmup):
        harness.block(fn())
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        out = None
        for _ in range(INNER):
            out = fn()
        harness.block(out)
        samples.append((time.perf_counter() - t0) / INNER)
    return statistics.median(samples)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dtypes", nargs="*")
    parser.add_argument("--layouts", nargs="*", default=["NHWC"])
    parser.add_argument("--json")
    known, rest = parser.parse_known_args(argv)
    gpu = jax.default_backend() == "gpu"
    dtypes = known.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    harness.median_time = pipelined_median_time
    merged: dict = {"results": [], "bandwidth_Bps": [], "timing": (
        f"median of samples of {INNER} pipelined calls / {INNER} (scripts/gpu_bench.py)")}
    for dtype in dtypes:
        for layout in known.layouts:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "part.json")
                status = bench.main(rest + ["--dtypes", dtype, "--layouts", layout,
                                            "--json", path])
                if status:
                    return status
                with open(path) as f:
                    part = json.load(f)
            for key in ("device", "backend", "jax", "calls_per_program"):
                merged[key] = part[key]
            merged["bandwidth_Bps"].append(part["bandwidth_Bps"])
            merged["results"] += part["results"]
    print(f"\nall cases ({merged.get('device')}; {merged['timing']}):")
    print(harness.format_table(merged["results"]))
    if known.json:
        with open(known.json, "w") as f:
            json.dump(merged, f, indent=1, default=str)
        print(f"wrote {known.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
