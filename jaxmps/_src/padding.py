"""MPS padding and output-size rules for the convolution family (MPS_SEMANTICS.md 1.3).

Per spatial axis, with the dilated kernel extent ``kd = (k - 1) * dilation + 1`` and the size
style -1 (valid), 0 (same), +1 (full) of MPSNNPaddingMethod::

    DestSize(src, s, kd, style) = (src + style * (kd - 1) + s - 1) // s
    read  = (dest - 1) * s + kd;  extra = read - src
    left  = (extra + policy) / 2   (C division, truncating toward 0; policy 1 = remainder
                                    top/left, MPS's default, 0 = bottom/right as TF SAME)
    pad_before = left, pad_after = extra - left   (negative = rows cropped)

"same_bottom_right" is TensorFlow/XLA SAME exactly: it clamps extra at 0 (when the stride is
larger than the kernel, the unread pixels stay at the bottom/right instead of being centered).

A convolution transpose is the ordinary stride-1 convolution of the zero-inserted image of size
``(src - 1) * s + 1`` (MPS's DestSizeReverse), so its padding uses the same rule on that image.
Everything here is plain Python on static ints: shapes and pads are fixed at trace time.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

PADDING_MODES = ("valid", "same", "same_bottom_right", "full")
_STYLE = {"valid": -1, "same": 0, "same_bottom_right": 0, "full": 1}

Padding = Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]


class AxisPlan(NamedTuple):
    """One spatial axis of a convolution: output size and the pads applied to the input."""

    output: int
    pad_before: int
    pad_after: int


def dilated_extent(kernel: int, dilation: int) -> int:
    """Extent of a kernel of `kernel` taps spaced `dilation` apart."""
    return (kernel - 1) * dilation + 1


def _c_halve(value: int) -> int:
    """value / 2 with C semantics (truncation toward zero), as MPS's offset rule computes it."""
    return -((-value) // 2) if value < 0 else value // 2


def _centered(dest: int, src: int, stride: int, extent: int, policy: int,
              clamp: bool = False) -> AxisPlan:
    extra = (dest - 1) * stride + extent - src
    if clamp:  # TensorFlow never crops: unread pixels stay at the bottom/right
        extra = max(extra, 0)
    left = _c_halve(extra + policy)
    return AxisPlan(dest, left, extra - left)


def _policy(mode: str) -> int:
    return 0 if mode == "same_bottom_right" else 1


def is_explicit(padding) -> bool:
    return not isinstance(padding, str)


def validate(op: str, padding) -> Padding:
    """Returns `padding` as a mode string or ((top, bottom), (left, right)) of ints."""
    if isinstance(padding, str):
        if padding not in PADDING_MODES:
            raise ValueError(f"jaxmps.{op}: padding must be one of {PADDING_MODES} or "
                             f"((top, bottom), (left, right)), got {padding!r}")
        return padding
    try:
        (top, bottom), (left, right) = padding
        values = (top, bottom, left, right)
        ok = all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)
                 for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"jaxmps.{op}: padding must be one of {PADDING_MODES} or "
                         f"((top, bottom), (left, right)) of ints, got {padding!r}")
    return (int(top), int(bottom)), (int(left), int(right))


def forward_axis(src: int, kernel: int, stride: int, dilation: int, padding, axis: int
                 ) -> AxisPlan:
    """Output size and pads of one axis (0 = height, 1 = width) of a forward convolution."""
    extent = dilated_extent(kernel, dilation)
    if is_explicit(padding):
        before, after = padding[axis]
        return AxisPlan((src + before + after - extent) // stride + 1, before, after)
    dest = (src + _STYLE[padding] * (extent - 1) + stride - 1) // stride
    return _centered(dest, src, stride, extent, _policy(padding),
                     clamp=padding == "same_bottom_right")


def transpose_axis(src: int, kernel: int, stride: int, dilation: int, padding, axis: int,
                   output: Optional[int] = None) -> AxisPlan:
    """Output size and pads (of the zero-inserted image) of one axis of a transpose."""
    extent = dilated_extent(kernel, dilation)
    inserted = (src - 1) * stride + 1
    if is_explicit(padding):
        before, after = padding[axis]
        if output is None:
            return AxisPlan(inserted + before + after - extent + 1, before, after)
        # output_size wins over the bottom/right pad (like PyTorch's output_padding).
        return AxisPlan(output, before, output - 1 + extent - inserted - before)
    if output is None:
        output = inserted + _STYLE[padding] * (extent - 1)
    return _centered(output, inserted, 1, extent, _policy(padding))
