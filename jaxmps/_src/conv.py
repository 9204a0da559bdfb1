"""2-d convolution (MPSCNNConvolution and MPSCNNConvolutionGradient)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax

from . import config
from . import conv_args as a
from . import padding as pad
from .conv_plan import ConvolutionGradientState, ConvPlan, convolve

_OP = "conv2d"

Pair = Union[int, Tuple[int, int]]


def _prepare(op, x, weights, bias, strides, dilation, groups, padding, weights_format,
             data_format, implementation):
    c = a.image_conv_args(op, x, weights, bias, strides, dilation, groups, padding,
                          weights_format, data_format)
    axes = [pad.forward_axis(c.hw[i], c.kernel[i], c.stride[i], c.dilation[i], c.padding, i)
            for i in range(2)]
    out = (axes[0].output, axes[1].output)
    a.nonempty(op, out, f"a {c.hw[0]}x{c.hw[1]} input with a {c.kernel[0]}x{c.kernel[1]} "
               f"kernel (dilation {c.dilation}, strides {c.stride}) and padding {c.padding!r}")
    plan = ConvPlan(c.stride, c.dilation, (axes[0].pad_before, axes[1].pad_before), c.groups,
                    c.hw, out, c.kernel, c.channels_last, config.resolve(op, implementation))
    return c.x, c.weights, c.bias, plan


def conv2d(x: jax.Array, weights: jax.Array, bias: Optional[jax.Array] = None, *,
           strides: Pair = 1, dilation: Pair = 1, groups: int = 1,
           padding: pad.Padding = "same", weights_format: str = "OHWI",
           data_format: str = "NHWC", implementation: Optional[str] = None) -> jax.Array:
    """2-d convolution with MPSCNNConvolution semantics (cross-correlation, no kernel flip).

    ``y[n,oy,ox,o] = bias[o] + sum W[o,ky,kx,c] x[n, oy*sh - pad_top + ky*dh,
    ox*sw - pad_left + kx*dw, g*I/G + c]`` with zeros outside the image. Differentiable: the
    data gradient and the weight/bias gradient are separate native kernels, and under ``jit``
    only the ones whose results are used run (frozen weights -> data gradient only).

    Args:
      x: (N, H, W, I) image (or (N, I, H, W) with ``data_format="NCHW"``), float16, bfloat16,
        float32 or float64.
      weights: MPS OHWI (O, KH, KW, I/groups), or Flax HWIO (KH, KW, I/groups, O) with
        ``weights_format="HWIO"``. Used in float32 for half and float32 data (MPS keeps
        float32 weights), float64 for float64 data.
      bias: optional (O,).
      strides, dilation: int or (h, w) pair of positive ints.
      groups: channel groups; ``groups == I`` is a depthwise convolution.
      padding: "same" (MPS default: output ceil(H/stride), the odd pad pixel on the top/left),
        "same_bottom_right" (TensorFlow/XLA SAME), "valid" (MPS centered valid), "full", or
        explicit ``((top, bottom), (left, right))`` (negative values crop).
      weights_format: "OHWI" or "HWIO".
      data_format: "NHWC" or "NCHW" (both native; weights are OHWI either way).
      implementation: None (native where available), "native" or "reference".

    Returns:
      y, (N, OH, OW, O) (or NCHW) in the dtype of x.
    """
    x, weights, bias, plan = _prepare(_OP, x, weights, bias, strides, dilation, groups, padding,
                                      weights_format, data_format, implementation)
    return convolve(plan, x, weights, bias)


def conv2d_forward(x: jax.Array, weights: jax.Array, bias: Optional[jax.Array] = None, *,
                   strides: Pair = 1, dilation: Pair = 1, groups: int = 1,
                   padding: pad.Padding = "same", weights_format: str = "OHWI",
                   data_format: str = "NHWC", implementation: Optional[str] = None
                   ) -> Tuple[jax.Array, ConvolutionGradientState]:
    """The forward kernel alone: returns ``(y, state)`` for :func:`conv2d_gradient`."""
    x, weights, bias, plan = _prepare("conv2d_forward", x, weights, bias, strides, dilation,
                                      groups, padding, weights_format, data_format,
                                      implementation)
    return a.forward_with_state(_OP, plan, x, weights, bias, weights_format, data_format)


def conv2d_gradient(dy: jax.Array, x: jax.Array,
                    weights: Union[jax.Array, ConvolutionGradientState], *,
                    strides: Pair = 1, dilation: Pair = 1, groups: int = 1,
                    padding: pad.Padding = "same", weights_format: str = "OHWI",
                    data_format: str = "NHWC", gradient_option: str = "all",
                    implementation: Optional[str] = None
                    ) -> Tuple[Optional[jax.Array], Optional[jax.Array], Optional[jax.Array]]:
    """The gradient kernel (MPSCNNConvolutionGradient): ``(dx, dweights, dbias)``.

    `weights` is either the forward's weights (then the keywords describe the forward as for
    :func:`conv2d`) or the ``ConvolutionGradientState`` returned by :func:`conv2d_forward`
    (then the keywords other than `gradient_option` are ignored). `gradient_option` is "all",
    "data" (dx only) or "weights_and_bias"; what is not asked for is None. dweights (in the
    weights format of the forward, parameter dtype) and dbias are summed over the batch.
    """
    op = "conv2d_gradient"
    return a.image_op_gradient(
        op, _OP, dy, x, weights, gradient_option, weights_format, data_format,
        lambda: _prepare(op, x, weights, None, strides, dilation, groups, padding,
                         weights_format, data_format, implementation))
