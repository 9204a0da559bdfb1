"""Reference forward and exact gradient kernels of the MPS normalization family.

Formulas: ``shared/MPS_SEMANTICS.md`` sections 2-7. Windows of size k cover
``[c - k//2, c + (k-1)//2]``, out-of-image taps read zero and the divisor stays the full
window size. Gradients are the closed-form exact VJPs (not MPS's documented approximations);
autodiff of the forward functions is the test oracle for them. Half inputs are computed in
float32 and cast back; statistics and parameters are float32 (float64 for float64 data).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..layout import channel_axis, spatial_axes


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation and parameter dtype for data of `dtype` (float32, or float64)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _acc(x):
    return x.astype(acc_dtype(x.dtype))


def _channels(v, channels_last: bool):
    """Broadcasts a (C,) or (N, C) array against an image."""
    if v.ndim == 1:
        return v.reshape((1, 1, 1, -1) if channels_last else (1, -1, 1, 1))
    return v.reshape((v.shape[0], 1, 1, -1) if channels_last else (v.shape[0], -1, 1, 1))


# ---- windows ---------------------------------------------------------------------------------


def _window_sum(x, axes_sizes, transpose: bool):
    """Zero-padded box sum over the given {axis: size}; transpose gives the adjoint window."""
    dims = [1] * x.ndim
    pads = [(0, 0)] * x.ndim
    for axis, k in axes_sizes.items():
        dims[axis] = k
        pads[axis] = ((k - 1) // 2, k // 2) if transpose else (k // 2, (k - 1) // 2)
    return lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, dims, [1] * x.ndim, pads)


def box_sum(x, kernel_h: int, kernel_w: int, channels_last: bool, transpose: bool = False):
    """Spatial window sum S (or its adjoint S^T) with MPS window placement."""
    ah, aw = spatial_axes(channels_last)
    return _window_sum(x, {ah: kernel_h, aw: kernel_w}, transpose)


def channel_window_sum(x, kernel_size: int, channels_last: bool, transpose: bool = False):
    """Window sum across channels (the cross-channel window, or its adjoint)."""
    return _window_sum(x, {channel_axis(channels_last): kernel_size}, transpose)


# ---- instance norm ---------------------------------------------------------------------------


def instance_norm_forward(x, gamma, beta, *, epsilon: float, channels_last: bool):
    """Returns (y, mean, rstd); mean and rstd are (N, C), per image and channel."""
    xa = _acc(x)
    axes = spatial_axes(channels_last)
    mean = jnp.mean(xa, axis=axes)
    var = jnp.mean(jnp.square(xa - _channels(mean, channels_last)), axis=axes)
    rstd = lax.rsqrt(var + jnp.asarray(epsilon, xa.dtype))
    xhat = (xa - _channels(mean, channels_last)) * _channels(rstd, channels_last)
    y = xhat * _channels(gamma.astype(xa.dtype), channels_last) + _channels(
        beta.astype(xa.dtype), channels_last)
    return y.astype(x.dtype), mean, rstd


def instance_norm_gradient(dy, x, gamma, mean, rstd, *, channels_last: bool):
    """Returns (dx, dgamma, dbeta); dgamma and dbeta are summed over the batch."""
    xa, g = _acc(x), _acc(dy)
    axes = spatial_axes(channels_last)
    m = xa.shape[axes[0]] * xa.shape[axes[1]]
    r = _channels(rstd, channels_last)
    xhat = (xa - _channels(mean, channels_last)) * r
    sum_g = jnp.sum(g, axis=axes)
    sum_gx = jnp.sum(g * xhat, axis=axes)
    dx = _channels(gamma.astype(xa.dtype), channels_last) * r * (
        g - _channels(sum_g, channels_last) / m - xhat * _channels(sum_gx, channels_last) / m)
    return dx.astype(x.dtype), jnp.sum(sum_gx, axis=0), jnp.sum(sum_g, axis=0)


# ---- batch norm ------------------------------------------------------------------------------


def batch_norm_forward(x, gamma, beta, *, epsilon: float, channels_last: bool):
    """Training-mode batch norm. Returns (y, mean, variance) with (C,) batch statistics."""
    xa = _acc(x)
    axes = (0,) + spatial_axes(channels_last)
    mean = jnp.mean(xa, axis=axes)
    var = jnp.mean(jnp.square(xa - _channels(mean, channels_last)), axis=axes)
    (y,) = batch_norm_inference(x, gamma, beta, mean, var, epsilon=epsilon,
                                channels_last=channels_last)
    return y, mean, var


def batch_norm_gradient(dy, x, gamma, mean, variance, dmean, dvariance, *, epsilon: float,
                        channels_last: bool):
    """Returns (dx, dgamma, dbeta), including the gradient through the batch statistics
    (cotangents `dmean`, `dvariance` of the returned mean and variance)."""
    xa, g = _acc(x), _acc(dy)
    axes = (0,) + spatial_axes(channels_last)
    m = xa.shape[0] * xa.shape[axes[1]] * xa.shape[axes[2]]
    rstd = lax.rsqrt(variance.astype(xa.dtype) + jnp.asarray(epsilon, xa.dtype))
    centered = xa - _channels(mean.astype(xa.dtype), channels_last)
    xhat = centered * _channels(rstd, channels_last)
    sum_g = jnp.sum(g, axis=axes)
    sum_gx = jnp.sum(g * xhat, axis=axes)
    dx = _channels(gamma.astype(xa.dtype) * rstd, channels_last) * (
        g - _channels(sum_g, channels_last) / m - xhat * _channels(sum_gx, channels_last) / m)
    dx = dx + _channels(dmean.astype(xa.dtype), channels_last) / m + (
        2.0 / m) * _channels(dvariance.astype(xa.dtype), channels_last) * centered
    return dx.astype(x.dtype), sum_gx, sum_g


def batch_norm_inference(x, gamma, beta, mean, variance, *, epsilon: float,
                         channels_last: bool):
    """y = (x - mean) * gamma / sqrt(variance + epsilon) + beta, per channel. Returns (y,)."""
    xa = _acc(x)
    dt = xa.dtype
    scale = gamma.astype(dt) * lax.rsqrt(variance.astype(dt) + jnp.asarray(epsilon, dt))
    shift = beta.astype(dt) - mean.astype(dt) * scale
    y = xa * _channels(scale, channels_last) + _channels(shift, channels_last)
    return (y.astype(x.dtype),)


# ---- spatial norm ----------------------------------------------------------------------------


def _spatial_denominator(xa, kernel_h, kernel_w, alpha, delta, channels_last):
    n = kernel_h * kernel_w
    s = box_sum(jnp.square(xa), kernel_h, kernel_w, channels_last)
    return delta + (alpha / n) * s


def spatial_norm_forward(x, *, kernel_h: int, kernel_w: int, alpha: float, beta: float,
                         delta: float, channels_last: bool):
    """Y = X * T^-beta, T = delta + alpha/N * S[X^2]. Returns (y,)."""
    xa = _acc(x)
    t = _spatial_denominator(xa, kernel_h, kernel_w, alpha, delta, channels_last)
    return ((xa * jnp.power(t, -beta)).astype(x.dtype),)


def spatial_norm_gradient(dy, x, *, kernel_h: int, kernel_w: int, alpha: float, beta: float,
                          delta: float, channels_last: bool):
    """dX = g T^-beta - (2 alpha beta / N) X S^T[g X T^(-beta-1)]. Returns (dx,)."""
    xa, g = _acc(x), _acc(dy)
    n = kernel_h * kernel_w
    t = _spatial_denominator(xa, kernel_h, kernel_w, alpha, delta, channels_last)
    tb = jnp.power(t, -beta)
    inner = box_sum(g * xa * tb / t, kernel_h, kernel_w, channels_last, transpose=True)
    dx = g * tb - (2.0 * alpha * beta / n) * xa * inner
    return (dx.astype(x.dtype),)


# ---- local contrast norm ---------------------------------------------------------------------


def _lcn_statistics(xa, kernel_h, kernel_w, alpha, delta, channels_last):
    n = kernel_h * kernel_w
    mean = box_sum(xa, kernel_h, kernel_w, channels_last) / n
    var = box_sum(jnp.square(xa), kernel_h, kernel_w, channels_last) / n - jnp.square(mean)
    return mean, delta + alpha * var


def local_contrast_norm_forward(x, *, kernel_h: int, kernel_w: int, alpha: float, beta: float,
                                delta: float, p0: float, pm: float, ps: float,
                                channels_last: bool):
    """Y = pm + ps (X - p0 M) T^-beta, T = delta + alpha VAR (window mean M, population
    variance VAR). Returns (y,)."""
    xa = _acc(x)
    mean, t = _lcn_statistics(xa, kernel_h, kernel_w, alpha, delta, channels_last)
    y = pm + ps * (xa - p0 * mean) * jnp.power(t, -beta)
    return (y.astype(x.dtype),)


def local_contrast_norm_gradient(dy, x, *, kernel_h: int, kernel_w: int, alpha: float,
                                 beta: float, delta: float, p0: float, pm: float, ps: float,
                                 channels_last: bool):
    """dX = ps (A - p0/N S^T[A] - 2 alpha beta/N (X S^T[C] - S^T[C M])) with A = g T^-beta,
    C = g U T^(-beta-1), U = X - p0 M. Returns (dx,)."""
    del pm  # an additive constant has no gradient
    xa, g = _acc(x), _acc(dy)
    n = kernel_h * kernel_w
    mean, t = _lcn_statistics(xa, kernel_h, kernel_w, alpha, delta, channels_last)
    tb = jnp.power(t, -beta)
    a = g * tb
    c = a * (xa - p0 * mean) / t

    def st(v):
        return box_sum(v, kernel_h, kernel_w, channels_last, transpose=True)

    dx = ps * (a - (p0 / n) * st(a) - (2.0 * alpha * beta / n) * (xa * st(c) - st(c * mean)))
    return (dx.astype(x.dtype),)


# ---- cross-channel norm ----------------------------------------------------------------------


def _cross_channel_denominator(xa, kernel_size, alpha, delta, channels_last):
    s = channel_window_sum(jnp.square(xa), kernel_size, channels_last)
    return delta + (alpha / kernel_size) * s


def cross_channel_norm_forward(x, *, kernel_size: int, alpha: float, beta: float,
                               delta: float, channels_last: bool):
    """Y = X L^-beta, L = delta + alpha/N sum over channels [k - N//2, k + (N-1)//2] of X^2.
    Returns (y,)."""
    xa = _acc(x)
    lden = _cross_channel_denominator(xa, kernel_size, alpha, delta, channels_last)
    return ((xa * jnp.power(lden, -beta)).astype(x.dtype),)


def cross_channel_norm_gradient(dy, x, *, kernel_size: int, alpha: float, beta: float,
                                delta: float, channels_last: bool):
    """dX = g L^-beta - (2 alpha beta / N) X R[g X L^(-beta-1)], R the adjoint channel window.
    Returns (dx,)."""
    xa, g = _acc(x), _acc(dy)
    lden = _cross_channel_denominator(xa, kernel_size, alpha, delta, channels_last)
    lb = jnp.power(lden, -beta)
    inner = channel_window_sum(g * xa * lb / lden, kernel_size, channels_last, transpose=True)
    dx = g * lb - (2.0 * alpha * beta / kernel_size) * xa * inner
    return (dx.astype(x.dtype),)

