"""Benchmark harness: timing with medians, the copy-bandwidth roofline, tables and JSON.

A :class:`Case` holds zero-argument callables per implementation ("native", "reference",
"torch") with their inputs already bound and compiled; the harness times them in one run so
ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Case:
    op: str                      # e.g. "spatial_norm"
    mode: str                    # "forward" or "forward+backward"
    shape: tuple                 # input shape as laid out
    layout: str                  # "NHWC" / "NCHW"
    dtype: str                   # "float32", "bfloat16", ...
    impls: Dict[str, Callable[[], Any]]
    bytes: Optional[float] = None   # bytes the op must move (memory roofline model)
    flops: Optional[float] = None   # useful FLOPs (compute roofline model)
    note: str = ""
    calls: int = 1                  # op calls per timed program (times are divided by it)


def block(out):
    """Waits for a JAX or PyTorch result."""
    leaves = jax.tree_util.tree_leaves(out)
    for leaf in leaves:
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
        elif type(leaf).__module__.startswith("torch"):
            import torch
            if leaf.is_cuda:
                torch.cuda.synchronize()
    return out


def median_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3,
                min_time: float = 0.0, inner: int = 1) -> float:
    """Median wall time of fn() in seconds (after `warmup` untimed calls). Each sample times
    `inner` back-to-back calls and one wait, so that on a GPU the host's per-call wait does not
    count (calls queue on the device stream as in a training loop)."""
    for _ in range(warmup):
        block(fn())
    samples: List[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        block(out)
        samples.append((time.perf_counter() - t0) / inner)
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def copy_ceilings(nbytes: int = 256 << 20, repeats: int = 20, calls: int = 1
                  ) -> Dict[str, float]:
    """Device memory bandwidths in bytes/s (bytes read + written) of copies of `nbytes`:
    a device-to-device copy (``jnp.copy`` into a new buffer: XLA cannot alias a non-donated
    argument, so it copies), XLA's elementwise ``x + 1`` over the same bytes, with `calls` > 1
    also `calls` copies of distinct arrays in one program (timed as the cases are) and, on a GPU
    with PyTorch present, ``torch.Tensor.copy_`` (cudaMemcpy)."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    gpu = jax.default_backend() == "gpu"
    inner = 10 if gpu else 1
    # name: (fn, copies of nbytes that one fn() makes)
    copies = {"jnp.copy": (lambda f=jax.jit(jnp.copy): f(x), 1),
              "x + 1": (lambda f=jax.jit(lambda a: a + 1.0): f(x), 1)}
    if calls > 1:
        xs = [jnp.array(x, copy=True) for _ in range(calls)]
        many = jax.jit(lambda *a: [jnp.copy(v) for v in a])
        copies[f"jnp.copy x{calls} in one program"] = (lambda: many(*xs), calls)
    if gpu:
        try:
            import torch
            if torch.cuda.is_available():
                src = torch.randn(n, device="cuda")
                dst = torch.empty_like(src)
                copies["torch copy_"] = (lambda: dst.copy_(src), 1)
        except ImportError:
            pass
    return {name: 2 * n * 4 * count / median_time(copy, repeats=repeats, inner=inner)
            for name, (copy, count) in copies.items()}


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 20, calls: int = 1) -> float:
    """The fastest of copy_ceilings: the strictest roofline bandwidth."""
    return max(copy_ceilings(nbytes, repeats, calls).values())


def run_cases(cases: List[Case], repeats: int, bandwidth: float, peak_flops: Optional[float]
              ) -> List[Dict]:
    inner = 10 if jax.default_backend() == "gpu" else 1
    results = []
    for case in cases:
        times = {}
        for impl, fn in case.impls.items():
            try:
                times[impl] = median_time(fn, repeats=repeats, inner=inner) / case.calls
            except Exception as e:  # report, keep going (e.g. torch lacks a dtype)
                times[impl] = None
                case.note += f" {impl} failed: {type(e).__name__}: {e}"[:200]
        row = dataclasses.asdict(case)
        row.pop("impls")
        row.pop("calls")
        row["times_s"] = times
        native, ref = times.get("native"), times.get("reference")
        row["speedup_vs_reference"] = ref / native if native and ref else None
        torch_t = times.get("torch")
        row["speedup_vs_torch"] = torch_t / native if native and torch_t else None
        if case.bytes and bandwidth:
            row["roofline_s"] = case.bytes / bandwidth
        if case.flops and peak_flops:
            row["roofline_s"] = case.flops / peak_flops
        if row.get("roofline_s") and native:
            row["native_over_roofline"] = native / row["roofline_s"]
        results.append(row)
    return results


def format_table(results: List[Dict]) -> str:
    header = ("| op | mode | layout | dtype | shape | native ms | reference ms | torch ms "
              "| ref/native | torch/native | native/roofline |")
    lines = [header, "|" + "---|" * 11]

    def ms(v):
        return f"{v * 1e3:.3f}" if v else "-"

    def ratio(v):
        return f"{v:.2f}x" if v else "-"

    for r in results:
        t = r["times_s"]
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['layout']} | {r['dtype']} | "
            f"{'x'.join(map(str, r['shape']))} | {ms(t.get('native'))} | "
            f"{ms(t.get('reference'))} | {ms(t.get('torch'))} | "
            f"{ratio(r['speedup_vs_reference'])} | {ratio(r['speedup_vs_torch'])} | "
            f"{ratio(r.get('native_over_roofline'))} |")
    return "\n".join(lines)
