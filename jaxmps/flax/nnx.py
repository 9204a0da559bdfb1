"""Flax NNX modules for every jaxmps op.

Same conventions as ``flax.nnx``: sizes given at construction with ``rngs=`` for modules that
own parameters, ``nnx.Param`` ``scale``/``bias`` (norms) and ``kernel``/``bias`` (Conv,
ConvTranspose: HWIO; Linear/Dense: (in_features, out_features)), running statistics
``mean``/``var`` as ``nnx.BatchStat``, ``dtype``/``param_dtype``, and ``model.eval()`` /
``model.train()`` switching ``BatchNorm.use_running_average``. Every module takes
``implementation`` (None, "native" or "reference") and ``data_format`` ("NHWC" or "NCHW").

Example::

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = jaxmps.flax.nnx.Conv(1, 16, (3, 3), rngs=rngs)
            self.norm = jaxmps.flax.nnx.BatchNorm(16, rngs=rngs)
        def __call__(self, x):
            return jax.nn.relu(self.norm(self.conv(x)))
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.nn.dtypes import promote_dtype

from .._src import layers
from .._src.instance_norm import instance_norm
from .._src.window_norms import cross_channel_norm, local_contrast_norm, spatial_norm

Dtype = Any
Initializer = Any


def _name(cls) -> str:
    return f"flax.nnx.{cls.__name__}"


def _vector_param(use: bool, init: Initializer, rngs: nnx.Rngs, n: int, dtype: Dtype):
    """An (n,) ``nnx.Param`` from `init`, or an empty slot when the layer has none."""
    return nnx.Param(init(rngs.params(), (n,), dtype)) if use else nnx.data(None)


def _value(param) -> Optional[jax.Array]:
    return None if param is None else param[...]


class InstanceNorm(nnx.Module):
    """Instance normalization (MPSCNNInstanceNormalization): each image and channel normalized
    over H x W, ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    Like ``flax.nnx.InstanceNorm`` except the default ``epsilon`` (1e-5, jaxmps's; Flax uses
    1e-6) and that only 4-d images are accepted.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-5,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = initializers.zeros,
                 scale_init: Initializer = initializers.ones, data_format: str = "NHWC",
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        self.scale = _vector_param(use_scale, scale_init, rngs, num_features, param_dtype)
        self.bias = _vector_param(use_bias, bias_init, rngs, num_features, param_dtype)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.data_format = layers.canonical_format(_name(type(self)), data_format)
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        x, scale, bias = promote_dtype((x, _value(self.scale), _value(self.bias)),
                                       dtype=self.dtype)
        return instance_norm(x, scale, bias, epsilon=self.epsilon, data_format=self.data_format,
                             implementation=self.implementation)


class BatchNorm(nnx.Module):
    """Batch normalization (MPSCNNBatchNormalization with its statistics kernel) with running
    averages, as ``flax.nnx.BatchNorm``.

    Training (``use_running_average=False``, or after ``model.train()``): normalizes with this
    batch's mean and biased variance over (N, H, W) and updates the ``nnx.BatchStat`` running
    statistics ``mean <- momentum * mean + (1 - momentum) * batch_mean`` (``var`` likewise with
    the biased batch variance). Inference (``model.eval()``): uses the stored statistics.

    ``axis_name`` (with ``axis_index_groups``) averages the statistics across a mapped axis
    with ``lax.pmean``, as Flax does. Inputs are (N, H, W, C) images (or NCHW) or (N, C).
    """

    def __init__(self, num_features: int, *, use_running_average: bool = False,
                 momentum: float = 0.99, epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Initializer = initializers.zeros,
                 scale_init: Initializer = initializers.ones, axis_name: Optional[str] = None,
                 axis_index_groups: Any = None, data_format: str = "NHWC",
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.scale = _vector_param(use_scale, scale_init, rngs, num_features, param_dtype)
        self.bias = _vector_param(use_bias, bias_init, rngs, num_features, param_dtype)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.data_format = layers.canonical_format(_name(type(self)), data_format)
        self.implementation = implementation

    def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        x, restore = layers.as_image(_name(type(self)), x, self.data_format)
        x, scale, bias = promote_dtype((x, _value(self.scale), _value(self.bias)),
                                       dtype=self.dtype)
        common = dict(epsilon=self.epsilon, data_format=self.data_format,
                      implementation=self.implementation)
        if use_running_average:
            return restore(layers.batch_norm_running(x, scale, bias, self.mean[...],
                                                     self.var[...], **common))
        y, mean, var = layers.batch_norm_training(
            x, scale, bias, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            **common)
        # Running statistics are not trained: keep autodiff out of them.
        self.mean[...] = jax.lax.stop_gradient(layers.ema(self.mean[...], mean, self.momentum))
        self.var[...] = jax.lax.stop_gradient(layers.ema(self.var[...], var, self.momentum))
        return restore(y)

    def set_view(self, use_running_average: Optional[bool] = None):
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class _WindowNorm(nnx.Module):
    """Shared state and call of the parameter-free window normalizations."""

    def __init__(self, function, settings: dict, dtype, data_format, implementation):
        self._function = function
        self.settings = settings
        self.dtype = dtype
        self.data_format = layers.canonical_format(_name(type(self)), data_format)
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.window_norm(_name(type(self)), self._function, x, dtype=self.dtype,
                                  data_format=self.data_format,
                                  implementation=self.implementation, **self.settings)


class SpatialNorm(_WindowNorm):
    """Spatial normalization (MPSCNNSpatialNormalization):
    ``y = x * (delta + alpha / (kh*kw) * S[x^2]) ** -beta`` with S a kh x kw window sum per
    channel. No parameters; see :func:`jaxmps.spatial_norm`."""

    def __init__(self, kernel_size: Any = 5, *, alpha: float = 1.0, beta: float = 5.0,
                 delta: float = 1.0, dtype: Optional[Dtype] = None, data_format: str = "NHWC",
                 implementation: Optional[str] = None):
        super().__init__(spatial_norm, dict(kernel_size=kernel_size, alpha=alpha, beta=beta,
                                            delta=delta), dtype, data_format, implementation)


class LocalContrastNorm(_WindowNorm):
    """Local contrast normalization (MPSCNNLocalContrastNormalization):
    ``y = pm + ps * (x - p0 * M) * (delta + alpha * VAR) ** -beta`` with the window mean M and
    variance VAR. No parameters; see :func:`jaxmps.local_contrast_norm`."""

    def __init__(self, kernel_size: Any = 5, *, alpha: float = 1.0, beta: float = 0.5,
                 delta: float = 2.0 ** -10, p0: float = 1.0, pm: float = 0.0, ps: float = 1.0,
                 dtype: Optional[Dtype] = None, data_format: str = "NHWC",
                 implementation: Optional[str] = None):
        super().__init__(local_contrast_norm,
                         dict(kernel_size=kernel_size, alpha=alpha, beta=beta, delta=delta,
                              p0=p0, pm=pm, ps=ps), dtype, data_format, implementation)


class CrossChannelNorm(_WindowNorm):
    """Cross-channel (local response) normalization (MPSCNNCrossChannelNormalization):
    ``y = x * (delta + alpha / n * sum of x^2 over n neighbouring channels) ** -beta``.
    No parameters; see :func:`jaxmps.cross_channel_norm`."""

    def __init__(self, kernel_size: int = 5, *, alpha: float = 1.0, beta: float = 5.0,
                 delta: float = 1.0, dtype: Optional[Dtype] = None, data_format: str = "NHWC",
                 implementation: Optional[str] = None):
        super().__init__(cross_channel_norm, dict(kernel_size=kernel_size, alpha=alpha,
                                                  beta=beta, delta=delta),
                         dtype, data_format, implementation)


class _ConvBase(nnx.Module):
    """Parameters and settings shared by Conv and ConvTranspose: ``kernel`` (kh, kw,
    *kernel_io) and ``bias`` (out_features,)."""

    def __init__(self, in_features: int, out_features: int, kernel_size, strides, padding,
                 kernel_dilation, use_bias: bool, dtype, param_dtype, kernel_init, bias_init,
                 data_format: str, implementation: Optional[str], rngs: nnx.Rngs,
                 kernel_io: Tuple[int, int]):
        name = _name(type(self))
        shape = layers.pair(name, "kernel_size", kernel_size) + tuple(kernel_io)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = _vector_param(use_bias, bias_init, rngs, out_features, param_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.strides = layers.pair(name, "strides", strides)
        self.padding = padding
        self.kernel_dilation = layers.pair(name, "kernel_dilation", kernel_dilation)
        self.dtype = dtype
        self.data_format = layers.canonical_format(name, data_format)
        self.implementation = implementation

    def _promoted(self, x):
        return promote_dtype((x, self.kernel[...], _value(self.bias)), dtype=self.dtype)


class Conv(_ConvBase):
    """2-d convolution (MPSCNNConvolution), as ``flax.nnx.Conv``: ``kernel`` (kh, kw,
    in_features // feature_group_count, out_features), ``bias`` (out_features,), lax-style
    ``padding`` ("SAME", "VALID", an int, (ph, pw) or ((top, bottom), (left, right))).
    ``kernel_size``, ``strides`` and ``kernel_dilation`` are ints or (h, w) pairs."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Any = (3, 3),
                 strides: Any = 1, *, padding: Any = "SAME", kernel_dilation: Any = 1,
                 feature_group_count: int = 1, use_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = initializers.lecun_normal(),
                 bias_init: Initializer = initializers.zeros, data_format: str = "NHWC",
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, kernel_size, strides, padding,
                         kernel_dilation, use_bias, dtype, param_dtype, kernel_init, bias_init,
                         data_format, implementation, rngs,
                         kernel_io=(in_features // feature_group_count, out_features))
        self.feature_group_count = feature_group_count

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self._promoted(x)
        return layers.conv(_name(type(self)), x, kernel, bias, strides=self.strides,
                           padding=self.padding, dilation=self.kernel_dilation,
                           groups=self.feature_group_count, data_format=self.data_format,
                           implementation=self.implementation)


class ConvTranspose(_ConvBase):
    """2-d transposed convolution (MPSCNNConvolutionTranspose), as ``flax.nnx.ConvTranspose``
    (``lax.conv_transpose``): ``kernel`` (kh, kw, in_features, out_features) slid unflipped
    over the stride-dilated input (``transpose_kernel=True``: kernel (kh, kw, out_features,
    in_features), flipped, as TensorFlow / Keras), ``bias`` (out_features,); padding "SAME"
    gives ``size * strides`` outputs."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Any = (3, 3),
                 strides: Any = 1, *, padding: Any = "SAME", kernel_dilation: Any = 1,
                 use_bias: bool = True, transpose_kernel: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = initializers.lecun_normal(),
                 bias_init: Initializer = initializers.zeros, data_format: str = "NHWC",
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        io = (out_features, in_features) if transpose_kernel else (in_features, out_features)
        super().__init__(in_features, out_features, kernel_size, strides, padding,
                         kernel_dilation, use_bias, dtype, param_dtype, kernel_init, bias_init,
                         data_format, implementation, rngs, kernel_io=io)
        self.transpose_kernel = transpose_kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self._promoted(x)
        if self.transpose_kernel:
            kernel = layers.flipped_kernel(kernel)
        return layers.conv_transpose(_name(type(self)), x, kernel, bias, strides=self.strides,
                                     padding=self.padding, dilation=self.kernel_dilation,
                                     data_format=self.data_format,
                                     implementation=self.implementation)


class Linear(nnx.Module):
    """Fully connected layer (MPSCNNFullyConnected), as ``flax.nnx.Linear`` on
    (N, in_features) inputs; an (N, H, W, C) image is read whole, flattened (in_features =
    H*W*C; MPS's fully connected layer is a convolution covering the image). ``kernel``
    (in_features, out_features), ``bias`` (out_features,)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = initializers.lecun_normal(),
                 bias_init: Initializer = initializers.zeros,
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            param_dtype))
        self.bias = _vector_param(use_bias, bias_init, rngs, out_features, param_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        name = _name(type(self))
        x = layers.flatten_features(name, x)
        x, kernel, bias = promote_dtype((x, self.kernel[...], _value(self.bias)),
                                        dtype=self.dtype)
        return layers.dense(name, x, kernel, bias, implementation=self.implementation)


Dense = Linear  # the name the jaxmps docs use for the fully connected layer in every library

__all__ = ["InstanceNorm", "BatchNorm", "SpatialNorm", "LocalContrastNorm", "CrossChannelNorm",
           "Conv", "ConvTranspose", "Linear", "Dense"]
