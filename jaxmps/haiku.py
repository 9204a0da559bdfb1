"""Haiku modules for every jaxmps op.

Same conventions as Haiku: ``create_scale``/``create_offset`` with ``scale_init``/
``offset_init`` and parameters ``scale``/``offset`` (norms), ``w``/``b`` (Conv2D,
Conv2DTranspose, Linear), ``is_training`` at call time, running statistics as
``hk.ExponentialMovingAverage`` state (``mean_ema``/``var_ema``), parameters in the input's
dtype, and the same parameter shapes as ``hk.InstanceNorm``, ``hk.BatchNorm``, ``hk.Conv2D``,
``hk.Conv2DTranspose`` and ``hk.Linear`` (so their parameters load unchanged). Every module
takes ``implementation`` (None, "native" or "reference") and ``data_format`` ("NHWC" /
"channels_last" or "NCHW" / "channels_first"). Haiku is an optional dependency:
``pip install jaxmps[haiku]``.

Example::

    def net(x, is_training):
        x = jaxmps.haiku.Conv2D(16, 3)(x)
        x = jaxmps.haiku.BatchNorm(True, True, 0.9)(x, is_training)
        return jaxmps.haiku.Linear(10)(jax.nn.relu(x))

    model = hk.transform_with_state(net)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

try:
    import haiku as hk
except ImportError as e:  # pragma: no cover - exercised only without haiku installed
    raise ImportError("jaxmps.haiku needs Haiku: pip install dm-haiku (or jaxmps[haiku])") from e
import jax
import jax.numpy as jnp
import numpy as np

from ._src import layers
from ._src.instance_norm import instance_norm
from ._src.window_norms import cross_channel_norm, local_contrast_norm, spatial_norm

Initializer = Any


def _name(cls) -> str:
    return f"haiku.{cls.__name__}"


class _Norm(hk.Module):
    """Haiku's scale / offset conventions, shared by InstanceNorm and BatchNorm: parameters
    created (``create_*``, with ``*_init``, default ones / zeros), or given at call time, or
    left out."""

    def __init__(self, create_scale: bool, create_offset: bool, eps: float, scale_init,
                 offset_init, data_format: str, implementation: Optional[str],
                 name: Optional[str]):
        super().__init__(name=name)
        layer = _name(type(self))
        for what, create, init in (("scale", create_scale, scale_init),
                                   ("offset", create_offset, offset_init)):
            if not create and init is not None:
                raise ValueError(f"jaxmps.{layer}: {what}_init must be None when "
                                 f"create_{what}=False, got {init!r}")
        self.create_scale, self.create_offset = create_scale, create_offset
        self.eps = eps
        self.scale_init, self.offset_init = scale_init, offset_init
        self.data_format = layers.canonical_format(layer, data_format)
        self.implementation = implementation

    def _scale_and_offset(self, shape, dtype, scale, offset):
        """(C,) scale and offset (None where there is none) from parameters of `shape`."""
        return (self._per_channel("scale", self.create_scale, scale, shape, dtype,
                                  self.scale_init or jnp.ones),
                self._per_channel("offset", self.create_offset, offset, shape, dtype,
                                  self.offset_init or jnp.zeros))

    def _per_channel(self, name: str, create: bool, given, shape, dtype, init):
        if create:
            if given is not None:
                raise ValueError(f"jaxmps.{_name(type(self))}: {name} must not be passed at "
                                 f"call time when create_{name}=True")
            given = hk.get_parameter(name, shape, dtype, init=init)
        if given is None:
            return None
        return jnp.broadcast_to(jnp.asarray(given), shape).reshape(-1)


class InstanceNorm(_Norm):
    """Instance normalization (MPSCNNInstanceNormalization), as ``hk.InstanceNorm``: each image
    and channel normalized over H x W. Parameters ``scale``/``offset`` have ``hk.InstanceNorm``'s
    shapes ((C,) for channels last, (1, C, 1, 1) for channels first)."""

    def __init__(self, create_scale: bool, create_offset: bool, eps: float = 1e-5,
                 scale_init: Optional[Initializer] = None,
                 offset_init: Optional[Initializer] = None,
                 data_format: str = "channels_last", implementation: Optional[str] = None,
                 name: Optional[str] = None):
        super().__init__(create_scale, create_offset, eps, scale_init, offset_init,
                         data_format, implementation, name)

    def __call__(self, inputs: jax.Array, scale: Optional[jax.Array] = None,
                 offset: Optional[jax.Array] = None) -> jax.Array:
        c = layers.channel_count(_name(type(self)), inputs, self.data_format)
        shape = (c,) if self.data_format == "NHWC" else (1, c, 1, 1)
        scale, offset = self._scale_and_offset(shape, inputs.dtype, scale, offset)
        return instance_norm(inputs, scale, offset, epsilon=self.eps,
                             data_format=self.data_format, implementation=self.implementation)


class BatchNorm(_Norm):
    """Batch normalization (MPSCNNBatchNormalization with its statistics kernel), as
    ``hk.BatchNorm``.

    ``is_training=True``: normalizes with this batch's mean and biased variance over (N, H, W)
    and feeds them to the ``mean_ema`` / ``var_ema`` ``hk.ExponentialMovingAverage`` state
    (``decay_rate``, zero-debiased, exactly as ``hk.BatchNorm``). ``is_training=False``:
    normalizes with the moving averages (or with this batch's statistics when
    ``test_local_stats=True``). ``cross_replica_axis`` averages the statistics across a mapped
    axis with ``lax.pmean``. Inputs are images or (N, C) features; parameters and state have
    ``hk.BatchNorm``'s shapes (the input's rank, 1 but on the channel axis).
    """

    def __init__(self, create_scale: bool, create_offset: bool, decay_rate: float,
                 eps: float = 1e-5, scale_init: Optional[Initializer] = None,
                 offset_init: Optional[Initializer] = None,
                 cross_replica_axis: Optional[str] = None,
                 cross_replica_axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
                 data_format: str = "channels_last", implementation: Optional[str] = None,
                 name: Optional[str] = None):
        super().__init__(create_scale, create_offset, eps, scale_init, offset_init,
                         data_format, implementation, name)
        self.cross_replica_axis = cross_replica_axis
        self.cross_replica_axis_index_groups = cross_replica_axis_index_groups
        self.mean_ema = hk.ExponentialMovingAverage(decay_rate, name="mean_ema")
        self.var_ema = hk.ExponentialMovingAverage(decay_rate, name="var_ema")

    def __call__(self, inputs: jax.Array, is_training: bool, test_local_stats: bool = False,
                 scale: Optional[jax.Array] = None, offset: Optional[jax.Array] = None
                 ) -> jax.Array:
        layer = _name(type(self))
        x, restore = layers.as_image(layer, inputs, self.data_format)
        c = layers.channel_count(layer, x, self.data_format)
        channel_axis = inputs.ndim - 1 if self.data_format == "NHWC" else 1
        shape = tuple(c if i == channel_axis else 1 for i in range(inputs.ndim))
        scale, offset = self._scale_and_offset(shape, inputs.dtype, scale, offset)
        common = dict(epsilon=self.eps, data_format=self.data_format,
                      implementation=self.implementation)
        if is_training or test_local_stats:
            y, mean, var = layers.batch_norm_training(
                x, scale, offset, axis_name=self.cross_replica_axis,
                axis_index_groups=self.cross_replica_axis_index_groups, **common)
        else:
            mean = self.mean_ema.average.reshape(-1)
            var = self.var_ema.average.reshape(-1)
            y = layers.batch_norm_running(x, scale, offset, mean, var, **common)
        if is_training:
            self.mean_ema(mean.reshape(shape))
            self.var_ema(var.reshape(shape))
        return restore(y)


class _WindowNorm(hk.Module):
    """Shared state and call of the parameter-free window normalizations."""

    def __init__(self, function, settings: dict, data_format: str,
                 implementation: Optional[str], name: Optional[str]):
        super().__init__(name=name)
        self._function = function
        self._settings = settings
        self.data_format = layers.canonical_format(_name(type(self)), data_format)
        self.implementation = implementation

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return layers.window_norm(_name(type(self)), self._function, inputs, dtype=None,
                                  data_format=self.data_format,
                                  implementation=self.implementation, **self._settings)


class SpatialNorm(_WindowNorm):
    """Spatial normalization (MPSCNNSpatialNormalization):
    ``y = x * (delta + alpha / (kh*kw) * S[x^2]) ** -beta`` with S a kh x kw window sum per
    channel. No parameters; see :func:`jaxmps.spatial_norm`."""

    def __init__(self, kernel_size: Any = 5, alpha: float = 1.0, beta: float = 5.0,
                 delta: float = 1.0, data_format: str = "channels_last",
                 implementation: Optional[str] = None, name: Optional[str] = None):
        super().__init__(spatial_norm, dict(kernel_size=kernel_size, alpha=alpha, beta=beta,
                                            delta=delta), data_format, implementation, name)


class LocalContrastNorm(_WindowNorm):
    """Local contrast normalization (MPSCNNLocalContrastNormalization):
    ``y = pm + ps * (x - p0 * M) * (delta + alpha * VAR) ** -beta`` with the window mean M and
    variance VAR. No parameters; see :func:`jaxmps.local_contrast_norm`."""

    def __init__(self, kernel_size: Any = 5, alpha: float = 1.0, beta: float = 0.5,
                 delta: float = 2.0 ** -10, p0: float = 1.0, pm: float = 0.0, ps: float = 1.0,
                 data_format: str = "channels_last", implementation: Optional[str] = None,
                 name: Optional[str] = None):
        super().__init__(local_contrast_norm,
                         dict(kernel_size=kernel_size, alpha=alpha, beta=beta, delta=delta,
                              p0=p0, pm=pm, ps=ps), data_format, implementation, name)


class CrossChannelNorm(_WindowNorm):
    """Cross-channel (local response) normalization (MPSCNNCrossChannelNormalization):
    ``y = x * (delta + alpha / n * sum of x^2 over n neighbouring channels) ** -beta``.
    No parameters; see :func:`jaxmps.cross_channel_norm`."""

    def __init__(self, kernel_size: int = 5, alpha: float = 1.0, beta: float = 5.0,
                 delta: float = 1.0, data_format: str = "channels_last",
                 implementation: Optional[str] = None, name: Optional[str] = None):
        super().__init__(cross_channel_norm, dict(kernel_size=kernel_size, alpha=alpha,
                                                  beta=beta, delta=delta),
                         data_format, implementation, name)


def _fan_in_init(fan_in: int) -> Initializer:
    """Haiku's default weight initializer: truncated normal with stddev 1 / sqrt(fan_in)."""
    return hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(fan_in))


def _bias(with_bias: bool, channels: int, data_format: str, dtype, init) -> Optional[jax.Array]:
    """Haiku's conv bias ``b``: (O,) channels last, (O, 1, 1) channels first; returned (O,)."""
    if not with_bias:
        return None
    shape = (channels,) if data_format == "NHWC" else (channels, 1, 1)
    return hk.get_parameter("b", shape, dtype, init=init or jnp.zeros).reshape(-1)


class _Conv(hk.Module):
    """Constructor arguments shared by Conv2D and Conv2DTranspose."""

    def __init__(self, output_channels: int, kernel_shape: Any, stride: Any, padding: Any,
                 with_bias: bool, w_init, b_init, data_format: str,
                 implementation: Optional[str], name: Optional[str]):
        super().__init__(name=name)
        layer = _name(type(self))
        self.output_channels = output_channels
        self.kernel_shape = layers.pair(layer, "kernel_shape", kernel_shape)
        self.stride = layers.pair(layer, "stride", stride)
        self.padding = padding
        self.with_bias = with_bias
        self.w_init, self.b_init = w_init, b_init
        self.data_format = layers.canonical_format(layer, data_format)
        self.implementation = implementation


class Conv2D(_Conv):
    """2-d convolution (MPSCNNConvolution), as ``hk.Conv2D``: ``w`` (kh, kw,
    in // feature_group_count, output_channels), ``b`` (output_channels,), ``rate`` the
    dilation, lax-style ``padding`` ("SAME", "VALID" or ((top, bottom), (left, right)))."""

    def __init__(self, output_channels: int, kernel_shape: Any, stride: Any = 1, rate: Any = 1,
                 padding: Any = "SAME", with_bias: bool = True,
                 w_init: Optional[Initializer] = None, b_init: Optional[Initializer] = None,
                 data_format: str = "NHWC", feature_group_count: int = 1,
                 implementation: Optional[str] = None, name: Optional[str] = None):
        super().__init__(output_channels, kernel_shape, stride, padding, with_bias, w_init,
                         b_init, data_format, implementation, name)
        self.rate = layers.pair(_name(type(self)), "rate", rate)
        self.feature_group_count = feature_group_count

    def __call__(self, inputs: jax.Array) -> jax.Array:
        layer = _name(type(self))
        c = layers.channel_count(layer, inputs, self.data_format)
        w_shape = self.kernel_shape + (c // self.feature_group_count, self.output_channels)
        w = hk.get_parameter("w", w_shape, inputs.dtype,
                             init=self.w_init or _fan_in_init(int(np.prod(w_shape[:3]))))
        b = _bias(self.with_bias, self.output_channels, self.data_format, inputs.dtype,
                  self.b_init)
        return layers.conv(layer, inputs, w, b, strides=self.stride, padding=self.padding,
                           dilation=self.rate, groups=self.feature_group_count,
                           data_format=self.data_format, implementation=self.implementation)


def _output_shape_pads(size: int, output: int, kernel: int, stride: int, padding: str
                       ) -> Tuple[int, int]:
    """Pads (of the zero-inserted image) giving `output` pixels, as hk.Conv2DTranspose's
    ``output_shape`` (haiku's compute_adjusted_padding)."""
    if padding == "SAME":
        before = max(0, (size - 1) * stride + kernel - output) // 2
    else:
        before = 0
    pad_before = kernel - 1 - before
    return pad_before, output + kernel - 1 - ((size - 1) * stride + 1) - pad_before


class Conv2DTranspose(_Conv):
    """2-d transposed convolution (MPSCNNConvolutionTranspose), as ``hk.Conv2DTranspose``
    (``lax.conv_transpose``): ``w`` (kh, kw, output_channels, in) slid unflipped over the
    stride-dilated input, ``b`` (output_channels,); ``output_shape`` (h, w) picks the output
    size as Haiku does. Padding "SAME" gives ``size * stride`` outputs."""

    def __init__(self, output_channels: int, kernel_shape: Any, stride: Any = 1,
                 output_shape: Optional[Any] = None, padding: Any = "SAME",
                 with_bias: bool = True, w_init: Optional[Initializer] = None,
                 b_init: Optional[Initializer] = None, data_format: str = "NHWC",
                 implementation: Optional[str] = None, name: Optional[str] = None):
        super().__init__(output_channels, kernel_shape, stride, padding, with_bias, w_init,
                         b_init, data_format, implementation, name)
        layer = _name(type(self))
        if output_shape is not None:
            output_shape = layers.pair(layer, "output_shape", output_shape)
            if padding not in ("SAME", "VALID"):
                raise ValueError(f"jaxmps.{layer}: padding must be 'SAME' or 'VALID' when "
                                 f"output_shape is given, got {padding!r}")
        self.output_shape = output_shape

    def __call__(self, inputs: jax.Array) -> jax.Array:
        layer = _name(type(self))
        c = layers.channel_count(layer, inputs, self.data_format)
        w_shape = self.kernel_shape + (self.output_channels, c)
        w = hk.get_parameter("w", w_shape, inputs.dtype,
                             init=self.w_init or _fan_in_init(int(np.prod(w_shape[:2])) * c))
        b = _bias(self.with_bias, self.output_channels, self.data_format, inputs.dtype,
                  self.b_init)
        padding = self.padding
        if self.output_shape is not None:
            sizes = inputs.shape[1:3] if self.data_format == "NHWC" else inputs.shape[2:4]
            padding = tuple(_output_shape_pads(*args, self.padding) for args in
                            zip(sizes, self.output_shape, self.kernel_shape, self.stride))
        return layers.conv_transpose(layer, inputs, jnp.swapaxes(w, 2, 3), b,
                                     strides=self.stride, padding=padding, dilation=(1, 1),
                                     data_format=self.data_format,
                                     implementation=self.implementation)


class Linear(hk.Module):
    """Fully connected layer (MPSCNNFullyConnected), as ``hk.Linear`` on (N, features)
    inputs; an (N, H, W, C) image is read whole, flattened (MPS's fully connected layer is a
    convolution covering the image). ``w`` (in_features, output_size), ``b``
    (output_size,)."""

    def __init__(self, output_size: int, with_bias: bool = True,
                 w_init: Optional[Initializer] = None, b_init: Optional[Initializer] = None,
                 implementation: Optional[str] = None, name: Optional[str] = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.with_bias = with_bias
        self.w_init, self.b_init = w_init, b_init
        self.implementation = implementation

    def __call__(self, inputs: jax.Array) -> jax.Array:
        layer = _name(type(self))
        x = layers.flatten_features(layer, inputs)
        w = hk.get_parameter("w", (x.shape[1], self.output_size), x.dtype,
                             init=self.w_init or _fan_in_init(x.shape[1]))
        b = hk.get_parameter("b", (self.output_size,), x.dtype, init=self.b_init or jnp.zeros) \
            if self.with_bias else None
        return layers.dense(layer, x, w, b, implementation=self.implementation)


# The names the jaxmps docs use in every library.
Conv = Conv2D
ConvTranspose = Conv2DTranspose
Dense = Linear

__all__ = ["InstanceNorm", "BatchNorm", "SpatialNorm", "LocalContrastNorm", "CrossChannelNorm",
           "Conv2D", "Conv2DTranspose", "Linear", "Conv", "ConvTranspose", "Dense"]
