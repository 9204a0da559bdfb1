"""Axis bookkeeping for the two image layouts, NHWC (channels_last) and NCHW."""

from __future__ import annotations

from typing import Tuple

DATA_FORMATS = ("NHWC", "NCHW")


def channel_axis(channels_last: bool) -> int:
    return 3 if channels_last else 1


def spatial_axes(channels_last: bool) -> Tuple[int, int]:
    return (1, 2) if channels_last else (2, 3)


def per_channel_shape(channels_last: bool, c: int) -> Tuple[int, int, int, int]:
    """Shape that broadcasts a (C,) vector against an image."""
    return (1, 1, 1, c) if channels_last else (1, c, 1, 1)


def per_image_channel_shape(channels_last: bool, n: int, c: int) -> Tuple[int, int, int, int]:
    """Shape that broadcasts an (N, C) array against an image."""
    return (n, 1, 1, c) if channels_last else (n, c, 1, 1)


def image_dims(shape, channels_last: bool) -> Tuple[int, int, int, int]:
    """(N, H, W, C) of an image shape in either layout."""
    if channels_last:
        n, h, w, c = shape
    else:
        n, c, h, w = shape
    return n, h, w, c
