"""Benchmark cases for the convolution family: conv2d native vs the reference (XLA's own
convolution) vs PyTorch (torch.nn.functional.conv2d with the MPS padding mapped), forward and
forward+backward (gradients for x and the weights), over the issue's shapes."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxmps
from jaxmps._src import padding as pad

from .harness import Case

# size -> (N, H, W, C); C in = C out. "issue": the convolution issue's CPU size (64 -> 64);
# "gpu": the CUDA issue's 128 -> 128 channels.
SIZES = {"issue": (8, 64, 64, 64), "gpu": (8, 64, 64, 128), "small": (2, 16, 16, 16)}

# name -> conv2d keywords and kernel size
VARIANTS = {
    "3x3": dict(kernel=3),
    "1x1": dict(kernel=1),
    "3x3 stride 2": dict(kernel=3, strides=2),
    "3x3 dilation 2": dict(kernel=3, dilation=2),
    "3x3 groups 4": dict(kernel=3, groups=4),
    "3x3 depthwise": dict(kernel=3, groups="depthwise"),
}

MODES = ("forward", "forward+backward")


def _keywords(variant: dict, channels: int) -> dict:
    kw = {k: v for k, v in variant.items() if k != "kernel"}
    if kw.get("groups") == "depthwise":
        kw["groups"] = channels
    return kw


def _flops(x_shape, kernel: int, kw: dict, channels: int, mode: str) -> float:
    n, h, w, _ = x_shape
    stride, groups = kw.get("strides", 1), kw.get("groups", 1)
    out_pixels = -(-h // stride) * -(-w // stride)  # "same"
    forward = 2.0 * n * out_pixels * channels * kernel * kernel * (channels // groups)
    return forward if mode == "forward" else 3.0 * forward  # + data and weight gradients


def _jax_impl(x, w, dy, kw, layout, impl, mode) -> Callable:
    def conv(x, w):
        return jaxmps.conv2d(x, w, data_format=layout, implementation=impl, **kw)

    if mode == "forward":
        fn = jax.jit(conv)
        return lambda: fn(x, w)

    def forward_backward(x, w, dy):
        # y and the gradients, as a training step needs both (returning the gradients alone
        # lets XLA drop the forward convolution).
        y, vjp = jax.vjp(conv, x, w)
        return y, vjp(dy)

    fn = jax.jit(forward_backward)
    return lambda: fn(x, w, dy)


def _torch_impl(x_nhwc, w_ohwi, dy_nhwc, kernel, kw, channels_last, dtype, mode) -> Callable:
    """torch.nn.functional.conv2d with the MPS "same" pads (explicit F.pad when uneven)."""
    import torch
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(a_nhwc, grad=False):
        t = torch.tensor(np.transpose(a_nhwc, (0, 3, 1, 2))).contiguous(memory_format=fmt)
        return t.to(tdtype).requires_grad_(grad)

    x = tensor(x_nhwc, mode != "forward")
    w = torch.tensor(np.transpose(w_ohwi, (0, 3, 1, 2))).to(tdtype).requires_grad_(
        mode != "forward")
    stride, dilation = kw.get("strides", 1), kw.get("dilation", 1)
    plans = [pad.forward_axis(x_nhwc.shape[1 + i], kernel, stride, dilation, "same", i)
             for i in range(2)]
    pads = (plans[1].pad_before, plans[1].pad_after, plans[0].pad_before, plans[0].pad_after)

    def conv(x, w):
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return F.conv2d(x, w, stride=stride, padding=(pads[2], pads[0]),
                            dilation=dilation, groups=kw.get("groups", 1))
        return F.conv2d(F.pad(x, pads), w, stride=stride, dilation=dilation,
                        groups=kw.get("groups", 1))

    if mode == "forward":
        def run():
            with torch.no_grad():
                return conv(x, w)
        return run
    dy = tensor(dy_nhwc)

    def run_fb():
        return torch.autograd.grad(conv(x, w), (x, w), dy)
    return run_fb


def cases(size: str, dtypes: Sequence[str], layouts: Sequence[str],
          with_torch: bool = True) -> List[Case]:
    """conv2d cases at `size` ("issue": N=8, 64x64, 64 -> 64 channels; "gpu": 128 -> 128;
    "small") over the VARIANTS x dtypes x layouts x forward / forward+backward."""
    shape = SIZES[size]
    channels = shape[3]
    rng = np.random.default_rng(0)
    x_nhwc = rng.standard_normal(shape).astype(np.float32)
    result = []
    for name, variant in VARIANTS.items():
        kernel, kw = variant["kernel"], _keywords(variant, channels)
        w_ohwi = (rng.standard_normal((channels, kernel, kernel, channels // kw.get("groups", 1)))
                  * 0.05).astype(np.float32)
        y_shape = jax.eval_shape(lambda x: jaxmps.conv2d(x, w_ohwi, **kw),
                                 jax.ShapeDtypeStruct(shape, jnp.float32)).shape
        # A random cotangent passed as an argument (a constant one could be folded away).
        dy_nhwc = rng.standard_normal(y_shape).astype(np.float32)
        for dtype in dtypes:
            for layout in layouts:
                to_layout = (lambda a: a) if layout == "NHWC" else (
                    lambda a: np.transpose(a, (0, 3, 1, 2)))
                x = jnp.asarray(to_layout(x_nhwc), dtype)
                dy = jnp.asarray(to_layout(dy_nhwc), dtype)
                w = jnp.asarray(w_ohwi)
                for mode in MODES:
                    impls: Dict[str, Callable] = {
                        impl: _jax_impl(x, w, dy, kw, layout, impl, mode)
                        for impl in ("native", "reference")}
                    if with_torch:
                        try:
                            impls["torch"] = _torch_impl(x_nhwc, w_ohwi, dy_nhwc, kernel, kw,
                                                         layout == "NHWC", dtype, mode)
                        except ImportError:
                            pass
                    result.append(Case(f"conv2d {name}", mode, tuple(x.shape), layout, dtype,
                                       impls, flops=_flops(shape, kernel, kw, channels, mode)))
    return result
