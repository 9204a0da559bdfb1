"""2-d convolution transpose (MPSCNNConvolutionTranspose and its gradient)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax

from . import checks, config
from . import conv_args as a
from . import padding as pad
from .conv_plan import ConvolutionGradientState, ConvPlan, convolve

_OP = "conv_transpose2d"

Pair = Union[int, Tuple[int, int]]


def _output_size(op: str, output_size) -> Tuple[Optional[int], Optional[int]]:
    if output_size is None:
        return None, None
    return checks.pair(op, "output_size", output_size)


def _prepare(op, x, weights, bias, strides, dilation, groups, padding, output_size,
             weights_format, data_format, implementation):
    c = a.image_conv_args(op, x, weights, bias, strides, dilation, groups, padding,
                          weights_format, data_format)
    sizes = _output_size(op, output_size)
    axes = [pad.transpose_axis(c.hw[i], c.kernel[i], c.stride[i], c.dilation[i], c.padding, i,
                               sizes[i]) for i in range(2)]
    out = (axes[0].output, axes[1].output)
    a.nonempty(op, out, f"a {c.hw[0]}x{c.hw[1]} input with a {c.kernel[0]}x{c.kernel[1]} "
               f"kernel (dilation {c.dilation}, strides {c.stride}), padding {c.padding!r} "
               f"and output_size {output_size}")
    # The adjoint convolution reads the transpose's output: its top pad mirrors the pad of the
    # zero-inserted image, pad_top = kd - 1 - P_top.
    conv_pads = tuple(pad.dilated_extent(c.kernel[i], c.dilation[i]) - 1 - axes[i].pad_before
                      for i in range(2))
    plan = ConvPlan(c.stride, c.dilation, conv_pads, c.groups, out, c.hw, c.kernel,
                    c.channels_last, config.resolve(op, implementation), transposed=True)
    return c.x, c.weights, c.bias, plan


def conv_transpose2d(x: jax.Array, weights: jax.Array, bias: Optional[jax.Array] = None, *,
                     strides: Pair = 1, dilation: Pair = 1, groups: int = 1,
                     padding: pad.Padding = "same", output_size: Optional[Pair] = None,
                     weights_format: str = "OHWI", data_format: str = "NHWC",
                     implementation: Optional[str] = None) -> jax.Array:
    """2-d convolution transpose with MPSCNNConvolutionTranspose semantics.

    The source pixels are spread out with (stride - 1) zeros between them (an image of
    ``(H - 1) * stride + 1`` rows), then an ordinary stride-1 convolution with the weights as
    given (no 180 degree rotation) and the given dilation slides over it, padded by the MPS
    rule of `padding` applied to that image. Differentiable, with separate native data and
    weight/bias gradient kernels (the transpose runs on the same three kernels as conv2d).

    Args:
      x: (N, H, W, I) image (or NCHW), float16, bfloat16, float32 or float64.
      weights: OHWI (O, KH, KW, I/groups) with O the transpose's output channels (MPS), or
        HWIO (KH, KW, I/groups, O) with ``weights_format="HWIO"`` (Flax ConvTranspose).
      bias: optional (O,).
      strides, dilation, groups: as for :func:`conv2d`.
      padding: "same" (output (H - 1) * stride + 1, MPS DestSizeReverse), "valid" (smaller
        by kd - 1), "full" (larger by kd - 1), "same_bottom_right" (odd pad pixel at the
        bottom/right), or explicit ((top, bottom), (left, right)) pads of the zero-inserted
        image.
      output_size: optional (h, w) output size; the alignment of `padding` is kept (explicit
        padding keeps its top/left pad).

    Returns:
      y, (N, OH, OW, O) (or NCHW) in the dtype of x.
    """
    x, weights, bias, plan = _prepare(_OP, x, weights, bias, strides, dilation, groups, padding,
                                      output_size, weights_format, data_format, implementation)
    return convolve(plan, x, weights, bias)


def conv_transpose2d_forward(x: jax.Array, weights: jax.Array,
                             bias: Optional[jax.Array] = None, *, strides: Pair = 1,
                             dilation: Pair = 1, groups: int = 1,
                             padding: pad.Padding = "same", output_size: Optional[Pair] = None,
                             weights_format: str = "OHWI", data_format: str = "NHWC",
                             implementation: Optional[str] = None
                             ) -> Tuple[jax.Array, ConvolutionGradientState]:
    """The forward kernel alone: ``(y, state)`` for :func:`conv_transpose2d_gradient`."""
    x, weights, bias, plan = _prepare("conv_transpose2d_forward", x, weights, bias, strides,
                                      dilation, groups, padding, output_size, weights_format,
                                      data_format, implementation)
    return a.forward_with_state(_OP, plan, x, weights, bias, weights_format, data_format)


def conv_transpose2d_gradient(dy: jax.Array, x: jax.Array,
                              weights: Union[jax.Array, ConvolutionGradientState], *,
                              strides: Pair = 1, dilation: Pair = 1, groups: int = 1,
                              padding: pad.Padding = "same",
                              output_size: Optional[Pair] = None, weights_format: str = "OHWI",
                              data_format: str = "NHWC", gradient_option: str = "all",
                              implementation: Optional[str] = None):
    """The gradient kernel (MPSCNNConvolutionTransposeGradient): ``(dx, dweights, dbias)``,
    with `weights` the forward's weights (keywords as for :func:`conv_transpose2d`) or the
    state from :func:`conv_transpose2d_forward`; see :func:`conv2d_gradient`."""
    op = "conv_transpose2d_gradient"
    return a.image_op_gradient(
        op, _OP, dy, x, weights, gradient_option, weights_format, data_format,
        lambda: _prepare(op, x, weights, None, strides, dilation, groups, padding, output_size,
                         weights_format, data_format, implementation))
