"""Slow numpy loops written directly from the formulas of MPS_SEMANTICS.md (NHWC, float64).
Independent of the jnp reference: they are its oracle on tiny inputs."""

from __future__ import annotations

import numpy as np


def window(center: int, k: int, size: int):
    """Indices of a size-k window at `center` (MPS placement), dropping out-of-range taps."""
    return [i for i in range(center - k // 2, center + (k - 1) // 2 + 1) if 0 <= i < size]


def instance_norm(x, gamma, beta, eps):
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            v = x[b, :, :, ch]
            mean = v.sum() / (h * w)
            var = ((v - mean) ** 2).sum() / (h * w)
            y[b, :, :, ch] = (v - mean) * gamma[ch] / np.sqrt(var + eps) + beta[ch]
    return y


def batch_norm(x, gamma, beta, eps):
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    means, variances = np.zeros(c), np.zeros(c)
    for ch in range(c):
        v = x[:, :, :, ch]
        mean = v.sum() / (n * h * w)
        var = ((v - mean) ** 2).sum() / (n * h * w)
        y[:, :, :, ch] = (v - mean) * gamma[ch] / np.sqrt(var + eps) + beta[ch]
        means[ch], variances[ch] = mean, var
    return y, means, variances


def spatial_norm(x, kh, kw, alpha, beta, delta):
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    s = sum(x[b, p, q, ch] ** 2 for p in window(i, kh, h) for q in window(j, kw, w))
                    t = delta + alpha / (kh * kw) * s
                    y[b, i, j, ch] = x[b, i, j, ch] * t ** (-beta)
    return y


def local_contrast_norm(x, kh, kw, alpha, beta, delta, p0, pm, ps):
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    big_n = kh * kw
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    taps = [x[b, p, q, ch] for p in window(i, kh, h) for q in window(j, kw, w)]
                    mean = sum(taps) / big_n
                    var = sum(t * t for t in taps) / big_n - mean ** 2
                    t = delta + alpha * var
                    y[b, i, j, ch] = pm + ps * (x[b, i, j, ch] - p0 * mean) * t ** (-beta)
    return y


def cross_channel_norm(x, k, alpha, beta, delta):
    n, h, w, c = x.shape
    y = np.zeros_like(x)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    s = sum(x[b, i, j, q] ** 2 for q in window(ch, k, c))
                    y[b, i, j, ch] = x[b, i, j, ch] * (delta + alpha / k * s) ** (-beta)
    return y
