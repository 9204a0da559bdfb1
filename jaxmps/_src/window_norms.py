"""Spatial, local-contrast and cross-channel normalization (MPSCNNSpatialNormalization,
MPSCNNLocalContrastNormalization, MPSCNNCrossChannelNormalization and their gradients).

These kernels save nothing but their settings: like MPS's opaque MPSNNGradientState, the
gradient kernel recomputes the window statistics from the forward source x, which costs less
memory traffic than storing them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple, Union

import jax

from . import checks, config
from . import norm_kernels as k
from .kernel import Kernel
from .state import gradient_state, static_field

KernelSize = Union[int, Tuple[int, int]]


class _Op(NamedTuple):
    """A forward/gradient kernel pair with its static settings (hashable)."""

    forward: Kernel
    gradient: Kernel
    params: Tuple[Tuple[str, object], ...]  # kernel attributes, channels_last, implementation

    def bind_forward(self, x):
        return self.forward.bind(x, **dict(self.params))[0]

    def bind_gradient(self, dy, x):
        return self.gradient.bind(dy, x, **dict(self.params))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(op: _Op, x):
    return op.bind_forward(x)


def _apply_fwd(op, x):
    return op.bind_forward(x), x


def _apply_bwd(op, x, dy):
    return (op.bind_gradient(dy, x),)


_apply.defvjp(_apply_fwd, _apply_bwd)


@gradient_state
class WindowNormGradientState:
    """Settings shared by a window norm's forward and gradient kernels (MPS's gradient state for
    these kernels holds no buffers; the gradient recomputes from x)."""

    op: str = static_field()
    params: Tuple[Tuple[str, object], ...] = static_field()


class SpatialNormGradientState(WindowNormGradientState):
    """Gradient state of :func:`spatial_norm_forward`."""


class LocalContrastNormGradientState(WindowNormGradientState):
    """Gradient state of :func:`local_contrast_norm_forward`."""


class CrossChannelNormGradientState(WindowNormGradientState):
    """Gradient state of :func:`cross_channel_norm_forward`."""


for _cls in (SpatialNormGradientState, LocalContrastNormGradientState,
             CrossChannelNormGradientState):
    jax.tree_util.register_dataclass(_cls, data_fields=[], meta_fields=["op", "params"])


def _common(op, x, data_format, implementation, alpha, beta, delta):
    x, channels_last, dims = checks.image(op, x, data_format)
    settings = dict(alpha=checks.real(op, "alpha", alpha, nonnegative=True),
                    beta=checks.real(op, "beta", beta), delta=checks.real(op, "delta", delta))
    tail = dict(channels_last=channels_last, implementation=config.resolve(op, implementation))
    return x, settings, tail


def _spatial(op, x, kernel_size, alpha, beta, delta, data_format, implementation):
    x, settings, tail = _common(op, x, data_format, implementation, alpha, beta, delta)
    kh, kw = checks.pair(op, "kernel_size", kernel_size)
    params = dict(kernel_h=kh, kernel_w=kw, **settings, **tail)
    return x, _Op(k.spatial_norm_forward, k.spatial_norm_gradient, tuple(params.items()))


def _lcn(op, x, kernel_size, alpha, beta, delta, p0, pm, ps, data_format, implementation):
    x, settings, tail = _common(op, x, data_format, implementation, alpha, beta, delta)
    kh, kw = checks.pair(op, "kernel_size", kernel_size)
    extra = dict(p0=checks.real(op, "p0", p0), pm=checks.real(op, "pm", pm),
                 ps=checks.real(op, "ps", ps))
    params = dict(kernel_h=kh, kernel_w=kw, **settings, **extra, **tail)
    return x, _Op(k.local_contrast_norm_forward, k.local_contrast_norm_gradient,
                  tuple(params.items()))


def _cross_channel(op, x, kernel_size, alpha, beta, delta, data_format, implementation):
    x, settings, tail = _common(op, x, data_format, implementation, alpha, beta, delta)
    n = checks.positive_int(op, "kernel_size", kernel_size)
    params = dict(kernel_size=n, **settings, **tail)
    return x, _Op(k.cross_channel_norm_forward, k.cross_channel_norm_gradient,
                  tuple(params.items()))


# ---- spatial ---------------------------------------------------------------------------------


def spatial_norm(x: jax.Array, kernel_size: KernelSize, *, alpha: float = 1.0,
                 beta: float = 5.0, delta: float = 1.0, data_format: str = "NHWC",
                 implementation: Optional[str] = None) -> jax.Array:
    """Spatial normalization, MPSCNNSpatialNormalization semantics.

    ``y = x * (delta + alpha / (kh*kw) * S[x^2]) ** -beta`` where S sums each channel over a
    kh x kw window covering rows ``[i - kh//2, i + (kh-1)//2]`` (columns likewise), zero padded,
    divisor kh*kw at borders too. Rectangular windows are allowed (MPS requires kw == kh).

    Args:
      x: (N, H, W, C) image (or NCHW), float16/bfloat16/float32/float64.
      kernel_size: int or (kh, kw).
      alpha (>= 0), beta, delta: MPS parameters (graph-node defaults 1, 5, 1).
      data_format, implementation: as for every jaxmps op.
    """
    x, op = _spatial("spatial_norm", x, kernel_size, alpha, beta, delta, data_format,
                     implementation)
    return _apply(op, x)


def spatial_norm_forward(x, kernel_size: KernelSize, *, alpha: float = 1.0, beta: float = 5.0,
                         delta: float = 1.0, data_format: str = "NHWC",
                         implementation: Optional[str] = None
                         ) -> Tuple[jax.Array, SpatialNormGradientState]:
    """The forward kernel alone: ``(y, state)`` for :func:`spatial_norm_gradient`."""
    x, op = _spatial("spatial_norm_forward", x, kernel_size, alpha, beta, delta, data_format,
                     implementation)
    return op.bind_forward(x), SpatialNormGradientState("spatial_norm", op.params)


# ---- local contrast --------------------------------------------------------------------------


def local_contrast_norm(x: jax.Array, kernel_size: KernelSize, *, alpha: float = 1.0,
                        beta: float = 0.5, delta: float = 2.0 ** -10, p0: float = 1.0,
                        pm: float = 0.0, ps: float = 1.0, data_format: str = "NHWC",
                        implementation: Optional[str] = None) -> jax.Array:
    """Local contrast normalization, MPSCNNLocalContrastNormalization semantics.

    ``y = pm + ps * (x - p0 * M) * (delta + alpha * VAR) ** -beta`` with M and VAR the mean and
    population variance (E[x^2] - M^2) of each channel over the zero-padded window (placement
    as in :func:`spatial_norm`). Defaults are the MPS graph node's (alpha 1, beta 0.5,
    delta 1/1024, p0 1, pm 0, ps 1); note the MPS *kernel* default alpha is 0.
    """
    x, op = _lcn("local_contrast_norm", x, kernel_size, alpha, beta, delta, p0, pm, ps,
                 data_format, implementation)
    return _apply(op, x)


def local_contrast_norm_forward(x, kernel_size: KernelSize, *, alpha: float = 1.0,
                                beta: float = 0.5, delta: float = 2.0 ** -10, p0: float = 1.0,
                                pm: float = 0.0, ps: float = 1.0, data_format: str = "NHWC",
                                implementation: Optional[str] = None
                                ) -> Tuple[jax.Array, LocalContrastNormGradientState]:
    """The forward kernel alone: ``(y, state)`` for :func:`local_contrast_norm_gradient`."""
    x, op = _lcn("local_contrast_norm_forward", x, kernel_size, alpha, beta, delta, p0, pm, ps,
                 data_format, implementation)
    return op.bind_forward(x), LocalContrastNormGradientState("local_contrast_norm", op.params)


# ---- cross channel ---------------------------------------------------------------------------


def cross_channel_norm(x: jax.Array, kernel_size: int = 5, *, alpha: float = 1.0,
                       beta: float = 5.0, delta: float = 1.0, data_format: str = "NHWC",
                       implementation: Optional[str] = None) -> jax.Array:
    """Cross-channel (local response) normalization, MPSCNNCrossChannelNormalization semantics.

    ``y = x * (delta + alpha / N * sum_{q in Q(k)} x_q^2) ** -beta`` per pixel, with
    ``Q(k) = [k - N//2, k + (N-1)//2]`` clipped to the channels and divisor N = kernel_size.
    """
    x, op = _cross_channel("cross_channel_norm", x, kernel_size, alpha, beta, delta,
                           data_format, implementation)
    return _apply(op, x)


def cross_channel_norm_forward(x, kernel_size: int = 5, *, alpha: float = 1.0,
                               beta: float = 5.0, delta: float = 1.0,
                               data_format: str = "NHWC", implementation: Optional[str] = None
                               ) -> Tuple[jax.Array, CrossChannelNormGradientState]:
    """The forward kernel alone: ``(y, state)`` for :func:`cross_channel_norm_gradient`."""
    x, op = _cross_channel("cross_channel_norm_forward", x, kernel_size, alpha, beta, delta,
                           data_format, implementation)
    return op.bind_forward(x), CrossChannelNormGradientState("cross_channel_norm", op.params)


# ---- gradient kernels ------------------------------------------------------------------------

_KERNELS = {
    "spatial_norm": (SpatialNormGradientState, k.spatial_norm_forward, k.spatial_norm_gradient),
    "local_contrast_norm": (LocalContrastNormGradientState, k.local_contrast_norm_forward,
                            k.local_contrast_norm_gradient),
    "cross_channel_norm": (CrossChannelNormGradientState, k.cross_channel_norm_forward,
                           k.cross_channel_norm_gradient),
}


def _gradient(name: str, dy, x, state) -> jax.Array:
    op_name = f"{name}_gradient"
    cls, forward, gradient = _KERNELS[name]
    if not isinstance(state, cls):
        checks.fail(op_name, f"state must be a {cls.__name__}, got {type(state).__name__}",
                    TypeError)
    fmt = "NHWC" if dict(state.params)["channels_last"] else "NCHW"
    x, _, _ = checks.image(op_name, x, fmt)
    dy = checks.same_as(op_name, "dy", dy, "x", x)
    return _Op(forward, gradient, state.params).bind_gradient(dy, x)


def spatial_norm_gradient(dy: jax.Array, x: jax.Array, state: SpatialNormGradientState
                          ) -> jax.Array:
    """The gradient kernel (MPSCNNSpatialNormalizationGradient, exact VJP): returns dx."""
    return _gradient("spatial_norm", dy, x, state)


def local_contrast_norm_gradient(dy: jax.Array, x: jax.Array,
                                 state: LocalContrastNormGradientState) -> jax.Array:
    """The gradient kernel (MPSCNNLocalContrastNormalizationGradient, exact VJP): returns dx."""
    return _gradient("local_contrast_norm", dy, x, state)


def cross_channel_norm_gradient(dy: jax.Array, x: jax.Array,
                                state: CrossChannelNormGradientState) -> jax.Array:
    """The gradient kernel (MPSCNNCrossChannelNormalizationGradient, exact VJP): returns dx."""
    return _gradient("cross_channel_norm", dy, x, state)
