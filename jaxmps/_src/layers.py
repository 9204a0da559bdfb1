"""Framework-neutral pieces of the Flax (linen, NNX) and Haiku layers.

Each library's module owns its parameters and state in that library's own way; the maths that
is the same for all of them lives here once: data-format names, training/inference batch norm
(with statistics averaged across a named mapped axis), the momentum update of running
statistics, and the fully connected layer on a (in_features, out_features) kernel.
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


def data_format(layer: str, value: str) -> str:
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


def kernel_size_pair(layer: str, kernel_size) -> Tuple[int, int]:
    """A 2-d kernel size from an int or an (h, w) sequence."""
    if isinstance(kernel_size, (list, tuple)):
        return checks.pair(layer, "kernel_size", tuple(kernel_size))
    return checks.pair(layer, "kernel_size", kernel_size)
