"""Framework-neutral pieces of the Flax (linen, NNX) and Haiku layers.

Each library's module owns its parameters and state in that library's own way; the maths that
is the same for all of them lives here once: data-format names, training/inference batch norm
(with statistics averaged across a named mapped axis), the momentum update of running
statistics, the parameter-free window norms, lax-style padding turned into the explicit pads of
jaxmps's convolutions, and the fully connected layer on an (in_features, out_features) kernel.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from . import checks
from .batch_norm import batch_norm, batch_norm_inference

# The names Haiku spells data formats with, beside jaxmps's own.
_FORMAT_ALIASES = {"NHWC": "NHWC", "NCHW": "NCHW",
                   "channels_last": "NHWC", "channels_first": "NCHW"}


def canonical_format(layer: str, value: str) -> str:
    """Canonical "NHWC" / "NCHW" for a layer's `data_format` argument."""
    if value not in _FORMAT_ALIASES:
        checks.fail(layer, "data_format must be 'NHWC' or 'NCHW' (or 'channels_last' / "
                    f"'channels_first'), got {value!r}")
    return _FORMAT_ALIASES[value]


def channel_count(layer: str, x, fmt: str) -> int:
    """Number of channels of a 4-d image `x` in layout `fmt` (with a clear error otherwise)."""
    if getattr(x, "ndim", None) != 4:
        checks.fail(layer, f"x must be a 4-d {fmt} image, got shape {tuple(jnp.shape(x))}")
    return x.shape[3] if fmt == "NHWC" else x.shape[1]


def as_image(layer: str, x, fmt: str) -> Tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Lets batch norm take (N, C) features as well as images: returns a 4-d view of `x` and
    the function that restores the original shape."""
    if getattr(x, "ndim", None) == 2:
        shape = (x.shape[0], 1, 1, x.shape[1]) if fmt == "NHWC" else x.shape + (1, 1)
        return x.reshape(shape), lambda y: y.reshape(x.shape)
    channel_count(layer, x, fmt)
    return x, lambda y: y


def ema(running: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
    """Flax's running-statistics update ``momentum * running + (1 - momentum) * batch``."""
    return momentum * running + (1.0 - momentum) * batch.astype(running.dtype)


def batch_norm_training(x, scale, bias, *, epsilon: float, data_format: str,
                        implementation: Optional[str], axis_name: Any = None,
                        axis_index_groups: Optional[Sequence[Sequence[int]]] = None
                        ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Batch norm with this batch's statistics; returns ``(y, mean, variance)``.

    Without `axis_name` this is the native training kernel pair (statistics, normalize and
    their gradients). With `axis_name` (inside ``jax.pmap`` / ``jax.vmap`` / ``shard_map``) the
    per-shard native statistics are averaged across the axis with ``lax.pmean`` (mean and mean
    of squares, as Flax and Haiku do) and the native inference kernel normalizes with the
    global statistics; the gradient then flows through the averaged statistics as well.
    """
    y, (mean, variance) = batch_norm(x, scale, bias, epsilon=epsilon, data_format=data_format,
                                     implementation=implementation)
    if axis_name is None:
        return y, mean, variance
    # The per-shard y above is discarded (the kernel makes it with the statistics anyway).
    mean_and_square = jnp.stack([mean, variance + jnp.square(mean)])
    mean, mean_square = lax.pmean(mean_and_square, axis_name,
                                  axis_index_groups=axis_index_groups)
    # E[x^2] - E[x]^2 can come out slightly negative in floating point.
    variance = jnp.maximum(mean_square - jnp.square(mean), 0.0)
    y = batch_norm_inference(x, _ones_if_none(scale, mean), _zeros_if_none(bias, mean), mean,
                             variance, epsilon=epsilon, data_format=data_format,
                             implementation=implementation)
    return y, mean, variance


def batch_norm_running(x, scale, bias, mean, variance, *, epsilon: float, data_format: str,
                       implementation: Optional[str]) -> jax.Array:
    """Inference-mode batch norm with stored statistics (MPS's data-source statistics)."""
    return batch_norm_inference(x, _ones_if_none(scale, mean), _zeros_if_none(bias, mean),
                                mean, variance, epsilon=epsilon, data_format=data_format,
                                implementation=implementation)


def _ones_if_none(v, like):
    return jnp.ones(like.shape, like.dtype) if v is None else v


def _zeros_if_none(v, like):
    return jnp.zeros(like.shape, like.dtype) if v is None else v


def flatten_features(layer: str, x) -> jax.Array:
    """(N, ...) -> (N, features): MPS fully connected layers read a whole image (H, W, C in
    that order for NHWC) as one feature vector."""
    if getattr(x, "ndim", 0) < 2:
        checks.fail(layer, f"x must have a batch axis and features, got shape "
                    f"{tuple(jnp.shape(x))}")
    return x.reshape(x.shape[0], -1)


def window_norm(layer: str, function: Callable, x, *, dtype, data_format: str,
                implementation: Optional[str], **settings) -> jax.Array:
    """Applies a parameter-free window normalization (spatial, local contrast, cross-channel)
    as a layer: `x` cast to `dtype` when one is given."""
    fmt = canonical_format(layer, data_format)
    if dtype is not None:
        x = jnp.asarray(x, dtype)
    return function(x, data_format=fmt, implementation=implementation, **settings)


# ---- convolution and fully connected -----------------------------------------------------------
# Flax and Haiku both spell padding as lax does ("SAME", "VALID", an int, ints or (lo, hi) pairs
# per axis). jaxmps's own "same" centers windows the MPS way, which differs from lax's SAME for
# even kernels and strides > 1, so the layers turn the lax spelling into explicit pads: a layer
# then computes exactly what flax's / haiku's own layer computes.


def pair(layer: str, name: str, value) -> Tuple[int, int]:
    """A 2-d size (kernel size, strides, dilation) from an int or an (h, w) sequence."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    return checks.pair(layer, name, value)


def _explicit_pads(layer: str, padding) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """lax-style explicit padding as ((top, bottom), (left, right)); None for a mode string."""
    if isinstance(padding, str):
        return None
    if isinstance(padding, int) and not isinstance(padding, bool):
        return (padding, padding), (padding, padding)
    try:
        items = list(padding)
        if len(items) == 2 and all(isinstance(v, int) for v in items):
            return (items[0], items[0]), (items[1], items[1])
        (top, bottom), (left, right) = items
        return (int(top), int(bottom)), (int(left), int(right))
    except (TypeError, ValueError):
        checks.fail(layer, "padding must be 'SAME', 'VALID', an int, (ph, pw) or "
                    f"((top, bottom), (left, right)), got {padding!r}")


def _mode(layer: str, padding: str) -> str:
    mode = padding.upper()
    if mode not in ("SAME", "VALID"):
        checks.fail(layer, "padding must be 'SAME', 'VALID', an int, (ph, pw) or "
                    f"((top, bottom), (left, right)), got {padding!r}")
    return mode


def _spatial_size(x, fmt: str) -> Tuple[int, int]:
    return (x.shape[1], x.shape[2]) if fmt == "NHWC" else (x.shape[2], x.shape[3])


def conv_pads(layer: str, padding, size: Tuple[int, int], kernel: Tuple[int, int],
              strides: Tuple[int, int], dilation: Tuple[int, int]):
    """lax.conv_general_dilated's pads for `padding` (what flax.linen.Conv / hk.Conv2D use)."""
    explicit = _explicit_pads(layer, padding)
    if explicit is not None:
        return explicit
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    top_bottom, left_right = lax.padtype_to_pads(size, extent, strides, _mode(layer, padding))
    return tuple(top_bottom), tuple(left_right)


def _transpose_axis_pads(kernel: int, stride: int, mode: str) -> Tuple[int, int]:
    # The rule of lax.conv_transpose (what flax.linen.ConvTranspose / hk.Conv2DTranspose use),
    # on the zero-inserted image: SAME gives size * stride outputs.
    if mode == "SAME":
        total = kernel + stride - 2
        before = kernel - 1 if stride > kernel - 1 else -(-total // 2)
    else:
        total = kernel + stride - 2 + max(kernel - stride, 0)
        before = kernel - 1
    return before, total - before


def conv_transpose_pads(layer: str, padding, kernel: Tuple[int, int],
                        strides: Tuple[int, int], dilation: Tuple[int, int]):
    """lax.conv_transpose's pads (of the zero-inserted image) for `padding`."""
    explicit = _explicit_pads(layer, padding)
    if explicit is not None:
        return explicit
    mode = _mode(layer, padding)
    return tuple(_transpose_axis_pads((k - 1) * d + 1, s, mode)
                 for k, s, d in zip(kernel, strides, dilation))


def conv(layer: str, x, kernel_hwio, bias, *, strides, padding, dilation, groups: int,
         data_format: str, implementation: Optional[str]) -> jax.Array:
    """jaxmps.conv2d with a lax-style `padding` and an HWIO kernel (kh, kw, in/groups, out)."""
    import jaxmps  # the public op; jaxmps does not import the layers, so no cycle

    kernel = tuple(kernel_hwio.shape[:2])
    pads = conv_pads(layer, padding, _spatial_size(x, data_format), kernel, strides, dilation)
    return jaxmps.conv2d(x, kernel_hwio, bias, strides=strides, dilation=dilation,
                         groups=groups, padding=pads, weights_format="HWIO",
                         data_format=data_format, implementation=implementation)


def conv_transpose(layer: str, x, kernel_hwio, bias, *, strides, padding, dilation,
                   data_format: str, implementation: Optional[str]) -> jax.Array:
    """jaxmps.conv_transpose2d with lax.conv_transpose's `padding` and kernel: HWIO
    (kh, kw, in, out) slid unflipped over the zero-inserted input, MPS's transpose model."""
    import jaxmps

    kernel = tuple(kernel_hwio.shape[:2])
    pads = conv_transpose_pads(layer, padding, kernel, strides, dilation)
    return jaxmps.conv_transpose2d(x, kernel_hwio, bias, strides=strides, dilation=dilation,
                                   padding=pads, weights_format="HWIO",
                                   data_format=data_format, implementation=implementation)


def flipped_kernel(kernel_hwoi):
    """A ``transpose_kernel=True`` kernel (kh, kw, out, in) as the equivalent unflipped HWIO
    kernel (kh, kw, in, out): spatially flipped, in and out swapped (lax.conv_transpose)."""
    return jnp.swapaxes(kernel_hwoi[::-1, ::-1], 2, 3)


def dense(layer: str, x, kernel_io, bias, *, implementation: Optional[str]) -> jax.Array:
    """jaxmps.fully_connected of (N, ...) inputs flattened to (N, in_features) with a Flax /
    Haiku (in_features, out_features) kernel (MPS's (O, features) is its transpose)."""
    import jaxmps

    return jaxmps.fully_connected(flatten_features(layer, x), kernel_io, bias,
                                  weights_format="HWIO", implementation=implementation)
