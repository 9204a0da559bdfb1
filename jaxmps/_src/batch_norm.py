"""Batch normalization (MPSCNNBatchNormalization, its statistics and gradient kernels)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax

from . import checks, config
from . import norm_kernels as k
from .reference.norm import acc_dtype
from .state import gradient_state, static_field

_OP = "batch_norm"


class BatchNormStats(NamedTuple):
    """Batch statistics of a training-mode batch norm: per channel `mean` and biased
    `variance` over (N, H, W), float32 for half inputs."""

    mean: jax.Array
    variance: jax.Array


@gradient_state
class BatchNormState:
    """What MPSCNNBatchNormalizationState carries for the gradient kernel: the batch `mean` and
    `variance` (C,), and the `gamma`, `beta` (C,) used, with the forward's settings."""

    mean: jax.Array
    variance: jax.Array
    gamma: jax.Array
    beta: jax.Array
    epsilon: float = static_field(default=1e-5)
    data_format: str = static_field(default="NHWC")
    implementation: str = static_field(default="auto")


class _Config(NamedTuple):
    epsilon: float
    channels_last: bool
    implementation: str


def _prepare(op, x, gamma, beta, epsilon, data_format, implementation, require_params=False):
    x, channels_last, (_, _, _, c) = checks.image(op, x, data_format)
    pdt = acc_dtype(x.dtype)
    gamma = checks.vector(op, "gamma", gamma, c, pdt, default=None if require_params else 1.0)
    beta = checks.vector(op, "beta", beta, c, pdt, default=None if require_params else 0.0)
    epsilon = checks.real(op, "epsilon", epsilon, nonnegative=True)
    return x, gamma, beta, _Config(epsilon, channels_last, config.resolve(op, implementation))


def _forward(cfg, x, gamma, beta):
    return k.batch_norm_forward.bind(x, gamma, beta, epsilon=cfg.epsilon,
                                     channels_last=cfg.channels_last,
                                     implementation=cfg.implementation)


def _gradient(cfg, dy, x, gamma, mean, variance, dmean, dvariance):
    return k.batch_norm_gradient.bind(dy, x, gamma, mean, variance, dmean, dvariance,
                                      epsilon=cfg.epsilon, channels_last=cfg.channels_last,
                                      implementation=cfg.implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm(cfg, x, gamma, beta):
    return _forward(cfg, x, gamma, beta)


def _batch_norm_fwd(cfg, x, gamma, beta):
    y, mean, variance = _forward(cfg, x, gamma, beta)
    return (y, mean, variance), (x, gamma, mean, variance)


def _batch_norm_bwd(cfg, res, cotangents):
    dy, dmean, dvariance = cotangents
    return _gradient(cfg, dy, *res, dmean, dvariance)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x: jax.Array, gamma: Optional[jax.Array] = None,
               beta: Optional[jax.Array] = None, *, epsilon: float = 1e-5,
               data_format: str = "NHWC", implementation: Optional[str] = None
               ) -> Tuple[jax.Array, BatchNormStats]:
    """Training-mode batch normalization (MPSCNNBatchNormalizationStatistics followed by
    MPSCNNBatchNormalization).

    ``y = (x - mean) * gamma / sqrt(variance + epsilon) + beta`` with the per-channel mean and
    biased variance of this batch over (N, H, W). The gradient flows through the statistics
    (also into the returned ``BatchNormStats``); MPS keeps no running averages, so neither does
    this function (see the Flax/Haiku layers for momentum-averaged statistics).

    Args:
      x: (N, H, W, C) image (or (N, C, H, W) with ``data_format="NCHW"``).
      gamma, beta: (C,) scale and offset (default ones and zeros).
      epsilon: added to the variance.
      data_format: "NHWC" or "NCHW".
      implementation: None (native where available), "native" or "reference".

    Returns:
      ``(y, BatchNormStats(mean, variance))``.
    """
    x, gamma, beta, cfg = _prepare(_OP, x, gamma, beta, epsilon, data_format, implementation)
    y, mean, variance = _batch_norm(cfg, x, gamma, beta)
    return y, BatchNormStats(mean, variance)


def batch_norm_forward(x: jax.Array, gamma: Optional[jax.Array] = None,
                       beta: Optional[jax.Array] = None, *, epsilon: float = 1e-5,
                       data_format: str = "NHWC", implementation: Optional[str] = None
                       ) -> Tuple[jax.Array, BatchNormState]:
    """The forward kernel alone: returns ``(y, state)`` for :func:`batch_norm_gradient`."""
    x, gamma, beta, cfg = _prepare("batch_norm_forward", x, gamma, beta, epsilon, data_format,
                                   implementation)
    y, mean, variance = _forward(cfg, x, gamma, beta)
    return y, BatchNormState(mean, variance, gamma, beta, cfg.epsilon, data_format,
                             cfg.implementation)


def batch_norm_gradient(dy: jax.Array, x: jax.Array, state: BatchNormState,
                        dmean: Optional[jax.Array] = None,
                        dvariance: Optional[jax.Array] = None
                        ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The gradient kernels (MPSCNNBatchNormalizationStatisticsGradient + Gradient): returns
    ``(dx, dgamma, dbeta)``. `dmean`, `dvariance` are optional cotangents of the batch
    statistics (zero when omitted)."""
    op = "batch_norm_gradient"
    if not isinstance(state, BatchNormState):
        checks.fail(op, f"state must be a BatchNormState, got {type(state).__name__}",
                    TypeError)
    x, channels_last, (_, _, _, c) = checks.image(op, x, state.data_format)
    dy = checks.same_as(op, "dy", dy, "x", x)
    pdt = acc_dtype(x.dtype)
    dmean = checks.vector(op, "dmean", dmean, c, pdt, default=0.0)
    dvariance = checks.vector(op, "dvariance", dvariance, c, pdt, default=0.0)
    cfg = _Config(state.epsilon, channels_last, state.implementation)
    return _gradient(cfg, dy, x, state.gamma, state.mean, state.variance, dmean, dvariance)


def batch_norm_inference(x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                         variance: jax.Array, *, epsilon: float = 1e-5,
                         data_format: str = "NHWC", implementation: Optional[str] = None
                         ) -> jax.Array:
    """Inference-mode batch normalization with given per-channel statistics
    ``y = (x - mean) * gamma / sqrt(variance + epsilon) + beta``. Differentiable in every
    argument (autodiff of the reference formula; MPS has no inference gradient kernel)."""
    op = "batch_norm_inference"
    x, gamma, beta, cfg = _prepare(op, x, gamma, beta, epsilon, data_format, implementation,
                                   require_params=True)
    c = gamma.shape[0]
    mean = checks.vector(op, "mean", mean, c, gamma.dtype)
    variance = checks.vector(op, "variance", variance, c, gamma.dtype)
    (y,) = k.batch_norm_inference.bind(x, gamma, beta, mean, variance, epsilon=cfg.epsilon,
                                       channels_last=cfg.channels_last,
                                       implementation=cfg.implementation)
    return y


