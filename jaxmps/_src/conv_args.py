"""Trace-time validation shared by the convolution ops (conv2d, conv_transpose2d,
fully_connected): weights layout and channel counts, groups, strides, dilation, bias,
gradient options. Errors read ``jaxmps.<op>: <arg> must ..., got ...``."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from . import checks
from . import padding as pad
from .conv_plan import GRADIENT_OPTIONS, ConvolutionGradientState, ConvPlan, forward, gradient
from .reference.norm import acc_dtype

WEIGHTS_FORMATS = ("OHWI", "HWIO")


def weights_format(op: str, value: str) -> str:
    if value not in WEIGHTS_FORMATS:
        checks.fail(op, f"weights_format must be 'OHWI' (MPS) or 'HWIO' (Flax), got {value!r}")
    return value


def to_ohwi(op: str, weights, fmt: str, data_dtype) -> jax.Array:
    """4-d weights in MPS OHWI order and the parameter dtype of `data_dtype` data."""
    fmt = weights_format(op, fmt)
    weights = checks.float_array(op, "weights", weights)
    if weights.ndim != 4:
        layout = "(O, KH, KW, I/groups)" if fmt == "OHWI" else "(KH, KW, I/groups, O)"
        checks.fail(op, f"weights must be a 4-d {fmt} array {layout}, got shape "
                    f"{tuple(weights.shape)}")
    if fmt == "HWIO":
        weights = jnp.transpose(weights, (3, 0, 1, 2))
    return weights.astype(acc_dtype(data_dtype))


def from_ohwi(weights, fmt: str):
    """Inverse of the layout change in :func:`to_ohwi` (for returned weight gradients)."""
    return jnp.transpose(weights, (1, 2, 3, 0)) if fmt == "HWIO" else weights


def groups_and_channels(op: str, groups, in_channels: int, weights_ohwi, in_name: str = "x"
                        ) -> int:
    """Checks groups divides both channel counts and the weights read I/groups channels."""
    groups = checks.positive_int(op, "groups", groups)
    out_channels, ig = weights_ohwi.shape[0], weights_ohwi.shape[3]
    if in_channels % groups or out_channels % groups:
        checks.fail(op, f"groups must divide the input channels ({in_channels}) and the output "
                    f"channels ({out_channels}), got groups={groups}")
    if ig * groups != in_channels:
        checks.fail(op, f"weights must have I/groups = {in_channels}//{groups} = "
                    f"{in_channels // groups} input channels per group to match {in_name} with "
                    f"{in_channels} channels, got {ig} (weights OHWI shape "
                    f"{tuple(weights_ohwi.shape)})")
    return groups


def bias_vector(op: str, value, out_channels: int, data_dtype) -> Optional[jax.Array]:
    if value is None:
        return None
    return checks.vector(op, "bias", value, out_channels, acc_dtype(data_dtype))


def strides_dilation(op: str, strides, dilation) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    return checks.pair(op, "strides", strides), checks.pair(op, "dilation", dilation)


class ImageConvArgs(NamedTuple):
    """The validated arguments of conv2d / conv_transpose2d."""

    x: jax.Array
    channels_last: bool
    hw: Tuple[int, int]
    weights: jax.Array          # OHWI, parameter dtype
    bias: Optional[jax.Array]
    groups: int
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    padding: object             # mode string or ((top, bottom), (left, right))

    @property
    def kernel(self) -> Tuple[int, int]:
        return tuple(self.weights.shape[1:3])


def image_conv_args(op: str, x, weights, bias, strides, dilation, groups, padding,
                    weights_format: str, data_format: str) -> ImageConvArgs:
    x, channels_last, (_, h, w, c) = checks.image(op, x, data_format)
    weights = to_ohwi(op, weights, weights_format, x.dtype)
    groups = groups_and_channels(op, groups, c, weights)
    bias = bias_vector(op, bias, weights.shape[0], x.dtype)
    stride, dilation = strides_dilation(op, strides, dilation)
    return ImageConvArgs(x, channels_last, (h, w), weights, bias, groups, stride, dilation,
                         pad.validate(op, padding))


def gradient_option(op: str, value: str) -> str:
    if value not in GRADIENT_OPTIONS:
        checks.fail(op, f"gradient_option must be one of {GRADIENT_OPTIONS}, got {value!r}")
    return value


def nonempty(op: str, output_hw, detail: str):
    if min(output_hw) < 1:
        checks.fail(op, f"the output would be empty: {detail} gives an output of "
                    f"{output_hw[0]}x{output_hw[1]} pixels")


def output_gradient(op: str, dy, expected_shape, like_dtype):
    """Validates dy against the shape the forward produced."""
    dy = checks.float_array(op, "dy", dy)
    if tuple(dy.shape) != tuple(expected_shape):
        checks.fail(op, f"dy must have the forward output's shape {tuple(expected_shape)}, "
                    f"got {tuple(dy.shape)}")
    return dy.astype(like_dtype)


def image_shape(n: int, hw: Tuple[int, int], c: int, channels_last: bool):
    """Shape of an (N, H, W, C) image in the given layout."""
    return (n, hw[0], hw[1], c) if channels_last else (n, c, hw[0], hw[1])


def state_from(op: str, owner: str, state) -> ConvolutionGradientState:
    """Checks `state` is the gradient state of a forward of op `owner`."""
    if not isinstance(state, ConvolutionGradientState):
        checks.fail(op, f"state must be a ConvolutionGradientState, got "
                    f"{type(state).__name__}", TypeError)
    if state.op != owner:
        checks.fail(op, f"state must come from {owner}_forward, got one from {state.op}")
    return state


def run_gradient(op: str, dy, x, state: ConvolutionGradientState, option: str, dy_shape):
    """(dx, dweights, dbias) of a validated forward; dweights in the state's weights format."""
    option = gradient_option(op, option)
    plan = state.plan
    x_shape = image_shape(x.shape[0], plan.output_hw if plan.transposed else plan.input_hw,
                          state.weights.shape[3] * plan.groups, plan.channels_last)
    if tuple(x.shape) != x_shape:
        checks.fail(op, f"x must have the forward input's shape {x_shape}, got "
                    f"{tuple(x.shape)}")
    dy = output_gradient(op, dy, dy_shape, x.dtype)
    dx, dweights, dbias = gradient(state.plan, dy, x, state.weights, option)
    if dweights is not None:
        dweights = from_ohwi(dweights, state.weights_format)
        if state.weights_shape is not None:
            dweights = dweights.reshape(state.weights_shape)
    return dx, dweights, dbias


def forward_with_state(owner: str, plan: ConvPlan, x, weights, bias, weights_format: str,
                       data_format: str, weights_shape=None):
    """``(y, ConvolutionGradientState)`` of the `owner` op's forward kernel."""
    y = forward(plan, x, weights, bias)
    return y, ConvolutionGradientState(weights, owner, plan, weights_format, data_format,
                                       bias is not None, weights_shape)


def image_op_gradient(op: str, owner: str, dy, x, weights, gradient_option: str,
                      weights_format: str, data_format: str, prepare):
    """The gradient of conv2d / conv_transpose2d: `weights` is a gradient state, or weights
    for which ``prepare()`` returns the forward's (x, weights, bias, plan)."""
    state = weights
    if not isinstance(state, ConvolutionGradientState):
        _, w, _, plan = prepare()
        state = ConvolutionGradientState(w, owner, plan, weights_format, data_format, False)
    state_from(op, owner, state)
    x, _, _ = checks.image(op, x, state.data_format)
    plan = state.plan
    dy_shape = image_shape(x.shape[0], plan.input_hw if plan.transposed else plan.output_hw,
                           state.weights.shape[0], plan.channels_last)
    return run_gradient(op, dy, x, state, gradient_option, dy_shape)
