"""Instance normalization (MPSCNNInstanceNormalization and its gradient kernel)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax

from . import checks, config
from . import norm_kernels as k
from .reference.norm import acc_dtype
from .state import gradient_state, static_field

_OP = "instance_norm"


@gradient_state
class InstanceNormGradientState:
    """What MPSCNNInstanceNormalizationGradientState carries: per image and channel `mean` and
    inverse standard deviation `rstd` (N, C), and the `gamma`, `beta` (C,) used."""

    mean: jax.Array
    rstd: jax.Array
    gamma: jax.Array
    beta: jax.Array
    data_format: str = static_field(default="NHWC")
    implementation: str = static_field(default="auto")


class _Config(NamedTuple):
    epsilon: float
    channels_last: bool
    implementation: str


def _prepare(x, gamma, beta, epsilon, data_format, implementation, op=_OP):
    x, channels_last, (_, _, _, c) = checks.image(op, x, data_format)
    pdt = acc_dtype(x.dtype)
    gamma = checks.vector(op, "gamma", gamma, c, pdt, default=1.0)
    beta = checks.vector(op, "beta", beta, c, pdt, default=0.0)
    epsilon = checks.real(op, "epsilon", epsilon, nonnegative=True)
    cfg = _Config(epsilon, channels_last, config.resolve(op, implementation))
    return x, gamma, beta, cfg


def _forward(cfg: _Config, x, gamma, beta):
    return k.instance_norm_forward.bind(x, gamma, beta, epsilon=cfg.epsilon,
                                        channels_last=cfg.channels_last,
                                        implementation=cfg.implementation)


def _gradient(cfg: _Config, dy, x, gamma, mean, rstd):
    return k.instance_norm_gradient.bind(dy, x, gamma, mean, rstd,
                                         channels_last=cfg.channels_last,
                                         implementation=cfg.implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _instance_norm(cfg, x, gamma, beta):
    return _forward(cfg, x, gamma, beta)[0]


def _instance_norm_fwd(cfg, x, gamma, beta):
    y, mean, rstd = _forward(cfg, x, gamma, beta)
    return y, (x, gamma, mean, rstd)


def _instance_norm_bwd(cfg, res, dy):
    return _gradient(cfg, dy, *res)


_instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


def instance_norm(x: jax.Array, gamma: Optional[jax.Array] = None,
                  beta: Optional[jax.Array] = None, *, epsilon: float = 1e-5,
                  data_format: str = "NHWC", implementation: Optional[str] = None) -> jax.Array:
    """Instance normalization, MPSCNNInstanceNormalization semantics.

    ``y = (x - mean) * gamma / sqrt(variance + epsilon) + beta`` with mean and biased variance
    over H*W per image and channel. Differentiable: ``jax.grad`` calls the native gradient
    kernel (dgamma and dbeta are sums over the batch).

    Args:
      x: (N, H, W, C) image (or (N, C, H, W) with ``data_format="NCHW"``), float16, bfloat16,
        float32 or float64.
      gamma, beta: (C,) scale and offset (default ones and zeros); float32 for half inputs.
      epsilon: added to the variance (MPS falls back to FLT_MIN when a data source gives none;
        jaxmps uses 1e-5 like most frameworks).
      data_format: "NHWC" or "NCHW".
      implementation: None (native where available), "native" or "reference".

    Returns:
      y with the shape and dtype of x.
    """
    x, gamma, beta, cfg = _prepare(x, gamma, beta, epsilon, data_format, implementation)
    return _instance_norm(cfg, x, gamma, beta)


def instance_norm_forward(x: jax.Array, gamma: Optional[jax.Array] = None,
                          beta: Optional[jax.Array] = None, *, epsilon: float = 1e-5,
                          data_format: str = "NHWC", implementation: Optional[str] = None
                          ) -> Tuple[jax.Array, InstanceNormGradientState]:
    """The forward kernel alone: returns ``(y, state)`` for :func:`instance_norm_gradient`."""
    x, gamma, beta, cfg = _prepare(x, gamma, beta, epsilon, data_format, implementation,
                                   op="instance_norm_forward")
    y, mean, rstd = _forward(cfg, x, gamma, beta)
    return y, InstanceNormGradientState(mean, rstd, gamma, beta, data_format,
                                        cfg.implementation)


def instance_norm_gradient(dy: jax.Array, x: jax.Array, state: InstanceNormGradientState
                           ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The gradient kernel (MPSCNNInstanceNormalizationGradient): returns
    ``(dx, dgamma, dbeta)`` for incoming gradient `dy`, forward source `x` and the forward's
    `state`. dgamma and dbeta are summed over the batch."""
    op = "instance_norm_gradient"
    if not isinstance(state, InstanceNormGradientState):
        checks.fail(op, f"state must be an InstanceNormGradientState, got "
                    f"{type(state).__name__}", TypeError)
    x, channels_last, _ = checks.image(op, x, state.data_format)
    dy = checks.same_as(op, "dy", dy, "x", x)
    cfg = _Config(0.0, channels_last, state.implementation)
    return _gradient(cfg, dy, x, state.gamma, state.mean, state.rstd)
