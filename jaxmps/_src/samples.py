"""Valid inputs for every normalization kernel: used by the self-check (`python -m jaxmps`) and by
the tests that run each kernel generically."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import norm_kernels as k
from .reference.norm import acc_dtype

WINDOW_OPS = ("spatial_norm", "local_contrast_norm", "cross_channel_norm")
ALL_OPS = ("instance_norm", "batch_norm") + WINDOW_OPS


# MPS's default beta of each window op: the form the CUDA kernels compile in.
DEFAULT_BETA = {"spatial_norm": 5.0, "local_contrast_norm": 0.5, "cross_channel_norm": 5.0}


def settings(op: str, window=(3, 3)):
    """Attributes of an op's kernels (non-default values so that every parameter matters)."""
    kh, kw = window
    if op == "spatial_norm":
        return dict(kernel_h=kh, kernel_w=kw, alpha=0.7, beta=0.75, delta=1.5)
    if op == "local_contrast_norm":
        return dict(kernel_h=kh, kernel_w=kw, alpha=0.9, beta=0.6, delta=0.25, p0=0.8,
                    pm=0.1, ps=1.3)
    if op == "cross_channel_norm":
        return dict(kernel_size=kh, alpha=0.8, beta=0.75, delta=1.25)
    return dict(epsilon=1e-3)


def kernel_calls(op: str, x, channels_last: bool, window=(3, 3), seed=0):
    """[(kernel, args, params)] for the forward and gradient kernels of `op` on image x."""
    c = x.shape[3] if channels_last else x.shape[1]
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    pdt = acc_dtype(x.dtype)
    dy = jax.random.normal(keys[0], x.shape, jnp.float32).astype(x.dtype)
    params = dict(settings(op, window), channels_last=channels_last)
    if op in WINDOW_OPS:
        fwd, grad = getattr(k, f"{op}_forward"), getattr(k, f"{op}_gradient")
        return [(fwd, (x,), params), (grad, (dy, x), params)]
    gamma = 1.0 + 0.5 * jax.random.normal(keys[1], (c,), pdt)
    beta = 0.5 * jax.random.normal(keys[2], (c,), pdt)
    if op == "instance_norm":
        _, mean, rstd = k.instance_norm_forward.call_reference(x, gamma, beta, **params)
        return [(k.instance_norm_forward, (x, gamma, beta), params),
                (k.instance_norm_gradient, (dy, x, gamma, mean, rstd),
                 dict(channels_last=channels_last))]
    _, mean, var = k.batch_norm_forward.call_reference(x, gamma, beta, **params)
    dmean = jax.random.normal(keys[3], (c,), pdt)
    dvar = jax.random.normal(keys[4], (c,), pdt)
    return [(k.batch_norm_forward, (x, gamma, beta), params),
            (k.batch_norm_gradient, (dy, x, gamma, mean, var, dmean, dvar), params),
            (k.batch_norm_inference, (x, gamma, beta, mean, var + 0.5), params)]


# ---- convolution -------------------------------------------------------------------------------

CONV_GEOMETRIES = {
    # name: (out channels, kernel (kh, kw), stride, dilation, pads (top, left), groups)
    "3x3 same": (6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2x3 strided grouped dilated": (4, (2, 3), (2, 1), (1, 2), (0, 2), 2),
}


def conv_kernel_calls(x, channels_last: bool, geometry: str = "3x3 same", seed=0):
    """[(kernel, args, params)] for the three convolution kernels on image x (C even)."""
    from . import conv_kernels as ck

    o, (kh, kw), (sh, sw), (dh, dw), (pt, pl), groups = CONV_GEOMETRIES[geometry]
    n, c = x.shape[0], (x.shape[3] if channels_last else x.shape[1])
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    pdt = acc_dtype(x.dtype)
    weights = jax.random.normal(keys[0], (o, kh, kw, c // groups), pdt) * 0.3
    bias = jax.random.normal(keys[1], (o,), pdt)
    # Output size for symmetric padding (pad_bottom = pad_top, pad_right = pad_left).
    oh = (h + 2 * pt - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w + 2 * pl - ((kw - 1) * dw + 1)) // sw + 1
    geom = dict(stride_h=sh, stride_w=sw, dilation_h=dh, dilation_w=dw, pad_top=pt,
                pad_left=pl, groups=groups, channels_last=channels_last)
    dy_shape = (n, oh, ow, o) if channels_last else (n, o, oh, ow)
    dy = jax.random.normal(keys[2], dy_shape, jnp.float32).astype(x.dtype)
    return [(ck.conv2d_forward, (x, weights, bias), dict(geom, output_h=oh, output_w=ow)),
            (ck.conv2d_data_gradient, (dy, weights), dict(geom, input_h=h, input_w=w)),
            (ck.conv2d_weights_gradient, (dy, x), dict(geom, kernel_h=kh, kernel_w=kw))]
