"""What every convolution op runs: a static :class:`ConvPlan` (geometry and sizes fixed at
trace time) and the three kernel passes it maps to, the custom_vjp joining them, and the MPS
gradient state.

conv2d and fully_connected use the kernels directly. A transpose (``plan.transposed``) is the
adjoint of the convolution whose input is the transpose's output: its forward is that
convolution's data gradient with the flipped, in/out-swapped weights V; its data gradient is
that convolution's forward with V; its weight gradient is the weights gradient with the roles of
image and gradient exchanged, swapped back. So backends implement three kernels, no more.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from . import conv_kernels as k
from .layout import spatial_axes
from .reference.conv import transpose_weights
from .state import gradient_state, static_field

GRADIENT_OPTIONS = ("all", "data", "weights_and_bias")


class ConvPlan(NamedTuple):
    """Static description of one convolution as the kernels see it.

    For a transpose, ``input_hw`` is the transpose's *output* size and ``output_hw`` its input
    size (the sizes of the adjoint convolution), and the pads are that convolution's pads.
    """

    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    pad_top_left: Tuple[int, int]
    groups: int
    input_hw: Tuple[int, int]
    output_hw: Tuple[int, int]
    kernel_hw: Tuple[int, int]
    channels_last: bool
    implementation: str
    transposed: bool = False

    def params(self) -> dict:
        return dict(stride_h=self.stride[0], stride_w=self.stride[1],
                    dilation_h=self.dilation[0], dilation_w=self.dilation[1],
                    pad_top=self.pad_top_left[0], pad_left=self.pad_top_left[1],
                    groups=self.groups, channels_last=self.channels_last,
                    implementation=self.implementation)


# ---- the convolution's three passes --------------------------------------------------------


def _conv_forward(plan: ConvPlan, x, weights, bias):
    if bias is None:
        bias = jnp.zeros((weights.shape[0],), weights.dtype)
    oh, ow = plan.output_hw
    return k.conv2d_forward.bind(x, weights, bias, output_h=oh, output_w=ow, **plan.params())[0]


def _conv_data_gradient(plan: ConvPlan, dy, weights):
    h, w = plan.input_hw
    return k.conv2d_data_gradient.bind(dy, weights, input_h=h, input_w=w, **plan.params())[0]


def _conv_weights_gradient(plan: ConvPlan, dy, x):
    kh, kw = plan.kernel_hw
    return k.conv2d_weights_gradient.bind(dy, x, kernel_h=kh, kernel_w=kw, **plan.params())


# ---- the op's three passes (a transpose swaps roles) ---------------------------------------


def forward(plan: ConvPlan, x, weights, bias):
    """y of the op: conv2d / fully connected forward, or the transpose's forward."""
    if not plan.transposed:
        return _conv_forward(plan, x, weights, bias)
    y = _conv_data_gradient(plan, x, transpose_weights(weights, plan.groups))
    if bias is None:
        return y
    shape = (1, 1, 1, -1) if plan.channels_last else (1, -1, 1, 1)
    return (y.astype(bias.dtype) + bias.reshape(shape)).astype(y.dtype)


def data_gradient(plan: ConvPlan, dy, weights):
    """dL/dx of the op."""
    if not plan.transposed:
        return _conv_data_gradient(plan, dy, weights)
    return _conv_forward(plan, dy, transpose_weights(weights, plan.groups), None)


def weights_gradient(plan: ConvPlan, dy, x) -> Tuple[jax.Array, jax.Array]:
    """(dL/dweights, dL/dbias) of the op, summed over the batch."""
    if not plan.transposed:
        return _conv_weights_gradient(plan, dy, x)
    dv, _ = _conv_weights_gradient(plan, x, dy)
    dbias = jnp.sum(dy.astype(dv.dtype), axis=(0,) + spatial_axes(plan.channels_last))
    return transpose_weights(dv, plan.groups), dbias


# ---- differentiable op -----------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def convolve(plan: ConvPlan, x, weights, bias):
    """The op as a differentiable function; bias may be None (no bias)."""
    return forward(plan, x, weights, bias)


def _convolve_fwd(plan, x, weights, bias):
    return forward(plan, x, weights, bias), (x, weights, bias)


def _convolve_bwd(plan, res, dy):
    # Separate kernels for the data and the weight/bias gradients: under jit the one whose
    # result is unused (frozen weights, or no gradient wanted for x) is dead code.
    x, weights, bias = res
    dx = data_gradient(plan, dy, weights)
    dweights, dbias = weights_gradient(plan, dy, x)
    return dx, dweights, None if bias is None else dbias


convolve.defvjp(_convolve_fwd, _convolve_bwd)


# ---- MPS gradient state and the gradient kernels ---------------------------------------------


@gradient_state
class ConvolutionGradientState:
    """What MPSCNNConvolutionGradientState carries for the gradient pass: the forward's
    `weights` (OHWI, parameter dtype, as the kernels used them) and, as static metadata, the
    op (`"conv2d"`, `"conv_transpose2d"`, `"fully_connected"`), its :class:`ConvPlan`, the
    user's weights format, data format and weights shape, and whether the forward had a
    bias."""

    weights: jax.Array
    op: str = static_field(default="conv2d")
    plan: Optional[ConvPlan] = static_field(default=None)
    weights_format: str = static_field(default="OHWI")
    data_format: str = static_field(default="NHWC")
    has_bias: bool = static_field(default=True)
    weights_shape: Optional[Tuple[int, ...]] = static_field(default=None)


def gradient(plan: ConvPlan, dy, x, weights, option: str):
    """(dx, dweights, dbias) with None for what `option` does not ask for."""
    dx = data_gradient(plan, dy, weights) if option in ("all", "data") else None
    if option in ("all", "weights_and_bias"):
        dweights, dbias = weights_gradient(plan, dy, x)
    else:
        dweights = dbias = None
    return dx, dweights, dbias
