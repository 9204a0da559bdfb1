"""Trace-time validation shared by every public op. Errors name the op and the argument and
say what was expected and what was got: ``jaxmps.<op>: <arg> must ..., got ...``."""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import jax.numpy as jnp
import numpy as np

from .layout import DATA_FORMATS

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def fail(op: str, message: str, error=ValueError):
    raise error(f"jaxmps.{op}: {message}")


def data_format(op: str, value: str) -> bool:
    """Validates `data_format`; returns channels_last."""
    if value not in DATA_FORMATS:
        fail(op, f"data_format must be 'NHWC' or 'NCHW', got {value!r}")
    return value == "NHWC"


def float_array(op: str, name: str, x):
    """`x` as a JAX array of a supported float dtype (float16, bfloat16, float32, float64)."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        fail(op, f"{name} must have a float dtype (float16, bfloat16, float32, float64), "
             f"got {jnp.dtype(x.dtype).name}", TypeError)
    return x


def image(op: str, x, fmt: str, name: str = "x"):
    """Validates a 4-d image; returns (x, channels_last, (N, H, W, C))."""
    channels_last = data_format(op, fmt)
    x = float_array(op, name, x)
    if x.ndim != 4:
        fail(op, f"{name} must be a 4-d {fmt} image, got shape {tuple(x.shape)}")
    if channels_last:
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    return x, channels_last, (n, h, w, c)


def same_as(op: str, name: str, v, like_name: str, like):
    v = float_array(op, name, v)
    if tuple(v.shape) != tuple(like.shape):
        fail(op, f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
             f"got {tuple(v.shape)}")
    return v.astype(like.dtype) if v.dtype != like.dtype else v


def vector(op: str, name: str, v, length: int, dtype, default: Optional[float] = None):
    """A (length,) parameter cast to `dtype`; `default` fills it when v is None."""
    if v is None:
        if default is None:
            fail(op, f"{name} is required")
        return jnp.full((length,), default, dtype)
    v = float_array(op, name, v)
    if tuple(v.shape) != (length,):
        fail(op, f"{name} must have shape ({length},) (one value per channel), "
             f"got {tuple(v.shape)}")
    return v.astype(dtype)


def positive_int(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or v < 1:
        fail(op, f"{name} must be a positive integer, got {v!r}")
    return int(v)


def pair(op: str, name: str, v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """An int or (h, w) pair of positive integers."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            fail(op, f"{name} must be an int or a pair (h, w), got {v!r}")
        return positive_int(op, name, v[0]), positive_int(op, name, v[1])
    k = positive_int(op, name, v)
    return k, k


def real(op: str, name: str, v, *, nonnegative: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
        fail(op, f"{name} must be a Python float, got {type(v).__name__}", TypeError)
    v = float(v)
    if nonnegative and not v >= 0:
        fail(op, f"{name} must be >= 0, got {v}")
    return v
