"""``python -m jaxmps``: lists the native backends, self-checks every native kernel against the
jnp reference, then runs the training demo (:mod:`jaxmps.demo`). ``--help`` lists the options;
``--json`` prints one machine-readable report. Exit status: 0 when the self-check passes and
native and reference losses agree, 1 when either fails, 2 for bad options."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Dict, Optional, Sequence, TextIO

import jax

from . import __version__
from ._src import ffi


class BackendError(ValueError):
    """The requested --backend cannot run here."""


def _backend_rows() -> Dict[str, Dict]:
    rows = {}
    for name, backend in ffi.backends().items():
        rows[name] = dict(available=backend.available, error=backend.error,
                          kernels=len(backend.targets), build=backend.build_info or None,
                          library=str(backend.path) if backend.path else None)
    return rows


def print_backends(rows: Dict[str, Dict], log: TextIO):
    print(f"jaxmps {__version__}, jax {jax.__version__}, JAX devices: "
          f"{', '.join(str(d) for d in jax.devices())}", file=log)
    print("native backends:", file=log)
    for name, row in rows.items():
        if row["available"]:
            print(f"  {name:<6} available, {row['kernels']} kernels ({row['build']})", file=log)
        else:
            print(f"  {name:<6} not available: {row['error']}", file=log)


def select_device(backend: str, rows: Dict[str, Dict]):
    """The JAX device for `backend` ("auto", "cpu", "cuda", "metal"); raises BackendError with
    the reason when it cannot run here."""
    if backend == "auto":
        return jax.devices()[0]
    row = rows[backend]
    if not row["available"]:
        raise BackendError(f"--backend {backend}: the jaxmps {backend} kernels are not "
                           f"available ({row['error']}); use --backend auto")
    if backend == "cuda":
        try:
            return jax.devices("cuda")[0]
        except RuntimeError:
            raise BackendError("--backend cuda: JAX sees no CUDA device (devices: "
                               f"{', '.join(str(d) for d in jax.devices())})") from None
    # The C++ and Metal kernels both serve JAX's cpu platform; JAXMPS_METAL picks between them
    # when ops are traced (Metal wins by default where it loads).
    os.environ["JAXMPS_METAL"] = "1" if backend == "metal" else "0"
    return jax.devices("cpu")[0]


def selfcheck(log: TextIO) -> Dict:
    """Runs jaxmps.selfcheck (native kernels vs reference) with its output sent to `log`."""
    try:
        from . import selfcheck as check
    except ImportError as e:
        print(f"self-check: skipped, jaxmps.selfcheck is not available ({e})", file=log)
        return dict(ok=None, skipped=str(e))
    with contextlib.redirect_stdout(log):
        result = check.run()
    print(f"self-check: {'passed' if result.get('ok') else 'FAILED'}", file=log)
    return result


def _summary(report: Dict, log: TextIO):
    print(f"held-out accuracy {report['test_accuracy']:.3f} (target "
          f"{report['target_accuracy']:.2f}: "
          f"{'reached' if report['reached_target'] else 'NOT reached'}) after "
          f"{report['epochs']} epochs, {report['steps']} steps in "
          f"{report['train_seconds']:.1f} s", file=log)
    ms = report["step_ms"]
    if "native" in ms:
        print(f"time per step (batch {report['batch_size']}, median after compilation): "
              f"native {ms['native']:.2f} ms, reference {ms['reference']:.2f} ms", file=log)
    comparison = report.get("comparison")
    if comparison:
        print(f"native and reference losses "
              f"{'agree' if comparison['agree'] else 'DISAGREE'} over {comparison['steps']} "
              f"steps (max relative difference {comparison['max_relative_difference']:.1e})",
              file=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from . import demo
    except ImportError as e:
        print(f"python -m jaxmps: the demo needs Flax, optax and scikit-learn "
              f"(pip install 'jaxmps[demo]'): {e}", file=sys.stderr)
        return 2
    args = demo.parse_args(argv)
    log = sys.stderr if args.json else sys.stdout
    rows = _backend_rows()
    try:
        device = select_device(args.backend, rows)
    except BackendError as e:
        print(f"python -m jaxmps: error: {e}", file=sys.stderr)
        return 2
    print_backends(rows, log)
    print(f"running on {device} (--backend {args.backend})", file=log)
    with jax.default_device(device):
        check = dict(ok=None, skipped="--no-selfcheck") if args.no_selfcheck else selfcheck(log)
        try:
            report = demo.run(args, log)
        except demo.OptionError as e:
            print(f"python -m jaxmps: error: {e}", file=sys.stderr)
            return 2
    _summary(report, log)
    agree = report.get("comparison", {}).get("agree", True)
    ok = check.get("ok") is not False and agree
    if args.json:
        report.update(jaxmps_version=__version__, jax_version=jax.__version__,
                      device=str(device), backend=args.backend, backends=rows,
                      selfcheck=dict(ok=check.get("ok"), skipped=check.get("skipped"),
                                     mismatches=[r for r in check.get("checks", [])
                                                 if r.get("status") == "MISMATCH"]),
                      ok=ok)
        print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
