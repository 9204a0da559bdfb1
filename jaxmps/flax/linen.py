"""Flax linen modules for every jaxmps op.

Same conventions as ``flax.linen``: parameters ``scale``/``bias`` (norms) and ``kernel``/``bias``
(Conv, ConvTranspose: HWIO; Dense: (in_features, features)), running statistics ``mean``/``var``
in the ``batch_stats`` collection, ``dtype`` (computation dtype, default inferred from inputs
and parameters) and ``param_dtype``. Every module takes ``implementation`` (None, "native" or
"reference") and ``data_format`` ("NHWC", Flax's layout, or "NCHW").

Example::

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = jaxmps.flax.linen.Conv(16, (3, 3))(x)
            x = jaxmps.flax.linen.BatchNorm(use_running_average=not train)(x)
            return jaxmps.flax.linen.Dense(10)(jax.nn.relu(x))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype

from .._src import layers
from .._src.instance_norm import instance_norm
from .._src.window_norms import cross_channel_norm, local_contrast_norm, spatial_norm

Dtype = Any
Initializer = Any


def _name(cls) -> str:
    return f"flax.linen.{cls.__name__}"


def _keyword(default):
    """A field that can only be given by keyword (base-class fields stay out of the way of a
    subclass's positional fields)."""
    return dataclasses.field(default=default, kw_only=True)


class _AffineNorm(nn.Module):
    """Fields and the ``scale``/``bias`` parameters shared by InstanceNorm and BatchNorm."""

    epsilon: float = _keyword(1e-5)
    dtype: Optional[Dtype] = _keyword(None)
    param_dtype: Dtype = _keyword(jnp.float32)
    use_bias: bool = _keyword(True)
    use_scale: bool = _keyword(True)
    bias_init: Initializer = _keyword(initializers.zeros)
    scale_init: Initializer = _keyword(initializers.ones)
    data_format: str = _keyword("NHWC")
    implementation: Optional[str] = _keyword(None)

    def _scale_and_bias(self, x, c: int):
        """Creates ``scale`` and ``bias`` (C,) and promotes them with x to the computation
        dtype (Flax's rule); returns ``(x, scale, bias)``."""
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype) \
            if self.use_scale else None
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) \
            if self.use_bias else None
        return promote_dtype(x, scale, bias, dtype=self.dtype)


class InstanceNorm(_AffineNorm):
    """Instance normalization (MPSCNNInstanceNormalization): each image and channel normalized
    over H x W, ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    Like ``flax.linen.InstanceNorm`` except the default ``epsilon`` (1e-5, jaxmps's; Flax uses
    1e-6) and that only 4-d images are accepted.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fmt = layers.canonical_format(_name(type(self)), self.data_format)
        x, scale, bias = self._scale_and_bias(x, layers.channel_count(_name(type(self)), x, fmt))
        return instance_norm(x, scale, bias, epsilon=self.epsilon, data_format=fmt,
                             implementation=self.implementation)


class BatchNorm(_AffineNorm):
    """Batch normalization (MPSCNNBatchNormalization with its statistics kernel) with running
    averages, as ``flax.linen.BatchNorm``.

    Training (``use_running_average=False``): normalizes with this batch's mean and biased
    variance over (N, H, W) and, outside ``init``, updates the ``batch_stats`` collection
    (make it mutable): ``mean <- momentum * mean + (1 - momentum) * batch_mean``, same for
    ``var`` with the biased batch variance. Inference: normalizes with the stored statistics.

    ``axis_name`` (with ``axis_index_groups``) averages the statistics across a mapped axis
    (``jax.pmap``, ``jax.vmap``, ``shard_map``) with ``lax.pmean``, as Flax does. Inputs are
    (N, H, W, C) images (or NCHW) or (N, C) features.
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.99
    axis_name: Optional[str] = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
        name = _name(type(self))
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        fmt = layers.canonical_format(name, self.data_format)
        x, restore = layers.as_image(name, x, fmt)
        c = layers.channel_count(name, x, fmt)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x, scale, bias = self._scale_and_bias(x, c)
        common = dict(epsilon=self.epsilon, data_format=fmt,
                      implementation=self.implementation)
        if use_running_average:
            y = layers.batch_norm_running(x, scale, bias, ra_mean.value, ra_var.value, **common)
            return restore(y)
        initializing = self.is_initializing()
        y, mean, var = layers.batch_norm_training(
            x, scale, bias, axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups, **common)
        if not initializing:
            ra_mean.value = layers.ema(ra_mean.value, mean, self.momentum)
            ra_var.value = layers.ema(ra_var.value, var, self.momentum)
        return restore(y)


class _WindowNorm(nn.Module):
    """Settings and call shared by the parameter-free window normalizations (keyword-only, so
    that ``kernel_size`` stays the first positional field of each)."""

    dtype: Optional[Dtype] = _keyword(None)
    data_format: str = _keyword("NHWC")
    implementation: Optional[str] = _keyword(None)

    def _apply(self, function, x, **settings):
        return layers.window_norm(_name(type(self)), function, x, dtype=self.dtype,
                                  data_format=self.data_format,
                                  implementation=self.implementation, **settings)


class SpatialNorm(_WindowNorm):
    """Spatial normalization (MPSCNNSpatialNormalization):
    ``y = x * (delta + alpha / (kh*kw) * S[x^2]) ** -beta`` with S a kh x kw window sum per
    channel. No parameters; see :func:`jaxmps.spatial_norm`."""

    kernel_size: Any = 5
    alpha: float = 1.0
    beta: float = 5.0
    delta: float = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(spatial_norm, x, kernel_size=self.kernel_size, alpha=self.alpha,
                           beta=self.beta, delta=self.delta)


class LocalContrastNorm(_WindowNorm):
    """Local contrast normalization (MPSCNNLocalContrastNormalization):
    ``y = pm + ps * (x - p0 * M) * (delta + alpha * VAR) ** -beta`` with the window mean M and
    variance VAR. No parameters; see :func:`jaxmps.local_contrast_norm`."""

    kernel_size: Any = 5
    alpha: float = 1.0
    beta: float = 0.5
    delta: float = 2.0 ** -10
    p0: float = 1.0
    pm: float = 0.0
    ps: float = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(local_contrast_norm, x, kernel_size=self.kernel_size,
                           alpha=self.alpha, beta=self.beta, delta=self.delta, p0=self.p0,
                           pm=self.pm, ps=self.ps)


class CrossChannelNorm(_WindowNorm):
    """Cross-channel (local response) normalization (MPSCNNCrossChannelNormalization):
    ``y = x * (delta + alpha / n * sum of x^2 over n neighbouring channels) ** -beta``.
    No parameters; see :func:`jaxmps.cross_channel_norm`."""

    kernel_size: int = 5
    alpha: float = 1.0
    beta: float = 5.0
    delta: float = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(cross_channel_norm, x, kernel_size=self.kernel_size,
                           alpha=self.alpha, beta=self.beta, delta=self.delta)


def _image_channels(layer: str, x, data_format: str):
    fmt = layers.canonical_format(layer, data_format)
    return fmt, layers.channel_count(layer, x, fmt)


class _ConvBase(nn.Module):
    """Fields and parameters shared by Conv and ConvTranspose (Flax's names and defaults)."""

    features: int
    kernel_size: Any = (3, 3)
    strides: Any = 1
    padding: Any = "SAME"
    kernel_dilation: Any = 1
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = initializers.lecun_normal()
    bias_init: Initializer = initializers.zeros
    data_format: str = "NHWC"
    implementation: Optional[str] = None

    def _setup(self, x, io_of_channels):
        """Creates ``kernel`` (kh, kw, *io_of_channels(C)) and ``bias``; returns the layer
        name, the image format, x, kernel and bias promoted to the computation dtype, and
        the strides and dilation as pairs."""
        name = _name(type(self))
        fmt, c = _image_channels(name, x, self.data_format)
        kh, kw = layers.pair(name, "kernel_size", self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw) + io_of_channels(c),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return (name, fmt, x, kernel, bias, layers.pair(name, "strides", self.strides),
                layers.pair(name, "kernel_dilation", self.kernel_dilation))


class Conv(_ConvBase):
    """2-d convolution (MPSCNNConvolution), as ``flax.linen.Conv``: ``kernel`` (kh, kw,
    in_features // feature_group_count, features), ``bias`` (features,), lax-style
    ``padding`` ("SAME", "VALID", an int, (ph, pw) or ((top, bottom), (left, right))).
    ``kernel_size``, ``strides`` and ``kernel_dilation`` are ints or (h, w) pairs."""

    feature_group_count: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        name, fmt, x, kernel, bias, strides, dilation = self._setup(
            x, lambda c: (c // self.feature_group_count, self.features))
        return layers.conv(name, x, kernel, bias, strides=strides, padding=self.padding,
                           dilation=dilation, groups=self.feature_group_count, data_format=fmt,
                           implementation=self.implementation)


class ConvTranspose(_ConvBase):
    """2-d transposed convolution (MPSCNNConvolutionTranspose), as
    ``flax.linen.ConvTranspose`` (``lax.conv_transpose``): ``kernel`` (kh, kw, in_features,
    features) slid unflipped over the stride-dilated input (``transpose_kernel=True``: kernel
    (kh, kw, features, in_features), flipped, as TensorFlow / Keras), ``bias`` (features,);
    padding "SAME" gives ``size * strides`` outputs."""

    transpose_kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        name, fmt, x, kernel, bias, strides, dilation = self._setup(
            x, lambda c: (self.features, c) if self.transpose_kernel else (c, self.features))
        if self.transpose_kernel:
            kernel = layers.flipped_kernel(kernel)
        return layers.conv_transpose(name, x, kernel, bias, strides=strides,
                                     padding=self.padding, dilation=dilation, data_format=fmt,
                                     implementation=self.implementation)


class Dense(nn.Module):
    """Fully connected layer (MPSCNNFullyConnected), as ``flax.linen.Dense`` on (N, features)
    inputs; an (N, H, W, C) image is read whole, flattened (MPS's fully connected layer is a
    convolution covering the image). ``kernel`` (in_features, features), ``bias``
    (features,)."""

    features: int
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = initializers.lecun_normal()
    bias_init: Initializer = initializers.zeros
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        name = _name(type(self))
        x = layers.flatten_features(name, x)
        kernel = self.param("kernel", self.kernel_init, (x.shape[1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return layers.dense(name, x, kernel, bias, implementation=self.implementation)


__all__ = ["InstanceNorm", "BatchNorm", "SpatialNorm", "LocalContrastNorm", "CrossChannelNorm",
           "Conv", "ConvTranspose", "Dense"]
