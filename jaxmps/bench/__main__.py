"""``python -m jaxmps.bench``: times every op's forward and forward+backward for the native
kernels vs the jnp reference under XLA (and PyTorch when installed), in one run, with medians,
ratios and the memory roofline from a copy measured in the same run."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import jax
import numpy as np

from . import harness, norm_cases

DEFAULT_SHAPE = {"cpu": (8, 64, 64, 64), "gpu": (32, 64, 64, 128)}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m jaxmps.bench", description=__doc__)
    p.add_argument("--family", choices=["norm", "conv", "all"], default="all")
    p.add_argument("--ops", nargs="*", help="only these ops (e.g. spatial_norm conv2d)")
    p.add_argument("--shape", type=int, nargs=4, metavar=("N", "H", "W", "C"),
                   help="normalization input shape (default: the issue's size for the device)")
    p.add_argument("--dtypes", nargs="*", default=None,
                   help="default: float32 on CPU; float32 bfloat16 on GPU")
    p.add_argument("--layouts", nargs="*", default=["NHWC"], choices=["NHWC", "NCHW"])
    p.add_argument("--modes", nargs="*", default=["forward", "forward+backward"],
                   choices=["forward", "forward+backward"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--calls", type=int, default=1,
                   help="normalization op calls per timed program, on distinct inputs (times "
                        "are per call; the roofline copy is also timed that way); default 1: "
                        "one call per program and dispatch")
    p.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be at least 1, got {args.calls}")
    return args


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"{kind} ({platform.processor() or platform.machine()}, " \
               f"{jax.local_device_count()} device, {_cpu_count()} cores)"
    return kind


def _cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None) -> int:
    args = _parse(argv)
    backend = jax.default_backend()
    shape = tuple(args.shape) if args.shape else DEFAULT_SHAPE.get(backend, (8, 64, 64, 64))
    dtypes = args.dtypes or (["float32", "bfloat16"] if backend == "gpu" else ["float32"])
    torch_device = "cuda" if backend == "gpu" else "cpu"
    all_cases = []
    if args.family in ("norm", "all"):
        ops = [o for o in norm_cases.OPS if not args.ops or o in args.ops]
        all_cases += norm_cases.cases(shape, dtypes, args.layouts, args.modes, ops,
                                      with_torch=not args.no_torch, torch_device=torch_device,
                                      calls=args.calls)
    if args.family in ("conv", "all"):
        try:
            from . import conv_cases
        except ImportError:
            conv_cases = None
        if conv_cases is not None:
            all_cases += [c for c in conv_cases.cases(
                "gpu" if backend == "gpu" else "issue", dtypes, args.layouts,
                with_torch=not args.no_torch)
                if not args.ops or c.op in args.ops]
    # The roofline copy moves as many bytes as one input tensor of the normalization cases, so
    # it sees the same level of the memory hierarchy as the ops do.
    bandwidth = harness.copy_bandwidth(nbytes=4 * int(np.prod(shape)), calls=args.calls)
    results = harness.run_cases(all_cases, args.repeats, bandwidth, None)
    print(f"device: {device_name()}; jax {jax.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read+write)")
    print(harness.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "backend": backend, "jax": jax.__version__,
                       "bandwidth_Bps": bandwidth, "calls_per_program": args.calls,
                       "results": results}, f, indent=1,
                      default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
