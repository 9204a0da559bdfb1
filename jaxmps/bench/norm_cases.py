"""Benchmark cases for the normalization family: native vs jnp reference vs PyTorch."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxmps

from .harness import Case

KERNEL = 5  # window size used for spatial, local contrast and cross-channel norm

OPS = ("instance_norm", "batch_norm", "spatial_norm", "local_contrast_norm",
       "cross_channel_norm")


def op_function(op: str, data_format: str, impl: str) -> Callable:
    """f(x, gamma, beta) -> y of `op` (window ops use KERNEL and ignore gamma, beta)."""
    kw = dict(data_format=data_format, implementation=impl)
    if op == "instance_norm":
        return lambda x, g, b: jaxmps.instance_norm(x, g, b, **kw)
    if op == "batch_norm":
        return lambda x, g, b: jaxmps.batch_norm(x, g, b, **kw)[0]
    if op == "spatial_norm":
        return lambda x, g, b: jaxmps.spatial_norm(x, KERNEL, **kw)
    if op == "local_contrast_norm":
        return lambda x, g, b: jaxmps.local_contrast_norm(x, KERNEL, **kw)
    return lambda x, g, b: jaxmps.cross_channel_norm(x, KERNEL, **kw)


def _torch_fn(op: str, channels_last: bool):
    """PyTorch's equivalent (NCHW math; channels_last memory format for NHWC)."""
    import torch
    import torch.nn.functional as F

    k = KERNEL

    def window_mean(v):
        # MPS window [i - k//2, i + (k-1)//2], zero padded, divisor k*k.
        v = F.pad(v, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))
        return F.avg_pool2d(v, k, stride=1)

    if op == "instance_norm":
        return lambda x, g, b: F.instance_norm(x, weight=g, bias=b, eps=1e-5)
    if op == "batch_norm":
        return lambda x, g, b: F.batch_norm(x, None, None, weight=g, bias=b, training=True,
                                            eps=1e-5)
    if op == "spatial_norm":
        return lambda x, g, b: x * (1.0 + window_mean(x * x)) ** -5.0
    if op == "local_contrast_norm":
        def lcn(x, g, b):
            m = window_mean(x)
            var = window_mean(x * x) - m * m
            return (x - m) * (2.0 ** -10 + var) ** -0.5
        return lcn
    # F.local_response_norm: b = a / (k + alpha/n * sum x^2)^beta with a centered window.
    return lambda x, g, b: F.local_response_norm(x, k, alpha=1.0, beta=5.0, k=1.0)


def _torch_impl(op, mode, x_np, channels_last, device, dtype, dy_np):
    import torch
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype]
    # x_np is NHWC; PyTorch's logical layout is NCHW, stored channels-last for NHWC cases.
    x = torch.tensor(x_np, dtype=torch.float32).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    x = x.to(device=device, dtype=tdtype)
    c = x.shape[1]
    g = torch.ones(c, device=device, dtype=tdtype, requires_grad=True)
    b = torch.zeros(c, device=device, dtype=tdtype, requires_grad=True)
    fn = _torch_fn(op, channels_last)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, g, b)
        return run
    xg = x.detach().requires_grad_(True)
    dy = torch.tensor(dy_np, dtype=torch.float32)  # laid out like the case's x
    if channels_last:
        dy = dy.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    dy = dy.to(device=device, dtype=tdtype)

    def run_fb():
        y = fn(xg, g, b)
        return torch.autograd.grad(y, (xg,), dy)[0]
    return run_fb


def cases(shape: Sequence[int], dtypes: Sequence[str], layouts: Sequence[str],
          modes: Sequence[str] = ("forward", "forward+backward"),
          ops: Sequence[str] = OPS, with_torch: bool = True,
          torch_device: Optional[str] = None, calls: int = 1) -> List[Case]:
    """Cases for (N, H, W, C) `shape` over ops x dtypes x layouts x modes.

    `calls` > 1: each timed program makes that many independent calls of the op on distinct
    input arrays (one jit for JAX, a loop of calls for PyTorch), as the ops of a training step
    share one dispatch; times are per call. With 1, each call is its own program and dispatch,
    whose host overhead can exceed a short op's device time."""
    n, h, w, c = shape
    rng = np.random.default_rng(0)
    x_nhwc = rng.standard_normal((n, h, w, c)).astype(np.float32)
    result = []
    for dtype in dtypes:
        for layout in layouts:
            channels_last = layout == "NHWC"
            x_np = x_nhwc if channels_last else np.transpose(x_nhwc, (0, 3, 1, 2))
            x = jnp.asarray(x_np, dtype=dtype)
            # A random cotangent passed as an argument: a constant one would let XLA simplify
            # the reference's backward pass away.
            dy = jnp.asarray(rng.standard_normal(x_np.shape), dtype=dtype)
            g, b = jnp.ones(c), jnp.zeros(c)
            # Distinct buffers per call: XLA cannot merge calls on different arguments.
            xs = [x] + [jnp.array(x, copy=True) for _ in range(calls - 1)]
            dys = [dy] + [jnp.array(dy, copy=True) for _ in range(calls - 1)]
            itemsize = np.dtype(jnp.dtype(dtype)).itemsize
            for op in ops:
                for mode in modes:
                    impls: Dict[str, Callable] = {}
                    for impl in ("native", "reference"):
                        f = op_function(op, layout, impl)
                        if mode == "forward":
                            def one(x, g, b, dy, f=f):
                                return f(x, g, b)
                        else:
                            # Forward + backward as in a training step: y and the VJP for
                            # cotangent dy. Returning y too keeps XLA from dropping the
                            # reference's forward output (the roofline counts writing y).
                            def one(x, g, b, dy, f=f):
                                y, vjp = jax.vjp(lambda v: f(v, g, b), x)
                                return y, vjp(dy)[0]
                        fn = jax.jit(lambda xs, g, b, dys, one=one: [
                            one(x, g, b, dy) for x, dy in zip(xs, dys)])
                        # Inputs bound now: a late-bound xs would be the last dtype/layout's.
                        impls[impl] = (lambda fn=fn, xs=xs, g=g, b=b, dys=dys:
                                       fn(xs, g, b, dys))
                    if with_torch:
                        try:
                            import torch  # noqa: F401
                            dev = torch_device or "cpu"
                            run = _torch_impl(op, mode, x_nhwc, channels_last, dev, dtype,
                                              np.asarray(dy, np.float32))
                            impls["torch"] = (run if calls == 1 else
                                              lambda run=run: [run() for _ in range(calls)])
                        except ImportError:
                            pass
                    # Memory model (issue 4): forward reads x and writes y; forward+backward
                    # reads x twice, writes y and dx, reads dy.
                    passes = 2 if mode == "forward" else 5
                    result.append(Case(op, mode, tuple(x.shape), layout, dtype, impls,
                                       bytes=passes * x.size * itemsize, calls=calls))
    return result
