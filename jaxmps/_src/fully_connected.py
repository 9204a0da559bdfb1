"""Fully connected layer (MPSCNNFullyConnected and its gradient): a convolution whose kernel
covers the whole source image, run on the conv2d kernels (valid, output 1x1)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax

from . import checks, config
from . import conv_args as a
from .conv_plan import ConvolutionGradientState, ConvPlan, convolve

_OP = "fully_connected"


def _as_image(op: str, x, data_format: str):
    """(N, F) -> (N, 1, 1, F) (or (N, F, 1, 1)); images pass through."""
    channels_last = checks.data_format(op, data_format)
    x = checks.float_array(op, "x", x)
    if x.ndim == 2:
        return x.reshape((x.shape[0], 1, 1, x.shape[1]) if channels_last
                         else (x.shape[0], x.shape[1], 1, 1))
    if x.ndim != 4:
        checks.fail(op, f"x must be (N, features) or a 4-d {data_format} image, got shape "
                    f"{tuple(x.shape)}")
    return x


def _prepare(op, x, weights, bias, weights_format, data_format, implementation):
    """x as a 4-d image ((N, F) -> (N, 1, 1, F)), weights as OHWI (O, H, W, C)."""
    x = _as_image(op, x, data_format)
    _, channels_last, (n, h, w, c) = checks.image(op, x, data_format)
    fmt = a.weights_format(op, weights_format)
    weights = checks.float_array(op, "weights", weights)
    if weights.ndim == 2:
        # (O, F) / (F, O) with F flattened in MPS order (H, W, C).
        if h * w * c != (weights.shape[1] if fmt == "OHWI" else weights.shape[0]):
            checks.fail(op, f"weights must have H*W*C = {h * w * c} features to match x, got "
                        f"shape {tuple(weights.shape)} ({fmt})")
        o = weights.shape[0] if fmt == "OHWI" else weights.shape[1]
        shape = (o, h, w, c) if fmt == "OHWI" else (h, w, c, o)
        weights4 = weights.reshape(shape)
    else:
        weights4 = weights
    ohwi = a.to_ohwi(op, weights4, fmt, x.dtype)
    if tuple(ohwi.shape[1:]) != (h, w, c):
        checks.fail(op, f"weights must cover the whole input: OHWI shape (O, {h}, {w}, {c}), "
                    f"got {tuple(ohwi.shape)}")
    bias = a.bias_vector(op, bias, ohwi.shape[0], x.dtype)
    plan = ConvPlan((1, 1), (1, 1), (0, 0), 1, (h, w), (1, 1), (h, w), channels_last,
                    config.resolve(op, implementation))
    return x, ohwi, bias, plan, tuple(weights.shape)


def fully_connected(x: jax.Array, weights: jax.Array, bias: Optional[jax.Array] = None, *,
                    weights_format: str = "OHWI", data_format: str = "NHWC",
                    implementation: Optional[str] = None) -> jax.Array:
    """Fully connected layer, MPSCNNFullyConnected semantics: ``y[n,o] = bias[o] +
    sum W[o,y,x,c] x[n,y,x,c]`` (the input flattened in MPS order H, W, C).

    Args:
      x: (N, features) or an (N, H, W, C) image (NCHW with ``data_format="NCHW"``; the
        weights keep the H, W, C order either way).
      weights: OHWI (O, H, W, C) or (O, H*W*C); with ``weights_format="HWIO"`` (H, W, C, O) or
        (H*W*C, O) (Flax Dense kernel). Parameter dtype as for :func:`conv2d`.
      bias: optional (O,).

    Returns:
      y, (N, O) in the dtype of x.
    """
    x, weights, bias, plan, _ = _prepare(_OP, x, weights, bias, weights_format, data_format,
                                         implementation)
    return convolve(plan, x, weights, bias).reshape(x.shape[0], -1)


def fully_connected_forward(x: jax.Array, weights: jax.Array,
                            bias: Optional[jax.Array] = None, *, weights_format: str = "OHWI",
                            data_format: str = "NHWC", implementation: Optional[str] = None
                            ) -> Tuple[jax.Array, ConvolutionGradientState]:
    """The forward kernel alone: ``(y, state)`` for :func:`fully_connected_gradient`."""
    x, w4, bias, plan, shape = _prepare("fully_connected_forward", x, weights, bias,
                                        weights_format, data_format, implementation)
    y, state = a.forward_with_state(_OP, plan, x, w4, bias, weights_format, data_format, shape)
    return y.reshape(x.shape[0], -1), state


def fully_connected_gradient(dy: jax.Array, x: jax.Array,
                             weights: Union[jax.Array, ConvolutionGradientState], *,
                             weights_format: str = "OHWI", data_format: str = "NHWC",
                             gradient_option: str = "all",
                             implementation: Optional[str] = None):
    """The gradient kernel (MPSCNNFullyConnectedGradient): ``(dx, dweights, dbias)`` for
    dy (N, O), with `weights` the forward's weights or its state; dx has the shape of x and
    dweights the shape and format of the forward's weights. See :func:`conv2d_gradient`."""
    op = "fully_connected_gradient"
    state = weights
    if not isinstance(state, ConvolutionGradientState):
        _, w4, _, plan, shape = _prepare(op, x, weights, None, weights_format, data_format,
                                         implementation)
        state = ConvolutionGradientState(w4, _OP, plan, weights_format, data_format, False,
                                         shape)
    a.state_from(op, _OP, state)
    x_shape = x.shape
    x = _as_image(op, x, state.data_format)
    n, o = x.shape[0], state.weights.shape[0]
    dy = checks.float_array(op, "dy", dy)
    if tuple(dy.shape) != (n, o):
        checks.fail(op, f"dy must have the forward output's shape {(n, o)}, got "
                    f"{tuple(dy.shape)}")
    dy = dy.reshape(a.image_shape(n, (1, 1), o, state.plan.channels_last))
    dx, dweights, dbias = a.run_gradient(op, dy, x, state, gradient_option, dy.shape)
    return (None if dx is None else dx.reshape(x_shape)), dweights, dbias
