"""The normalization family's kernel primitives: one forward and one gradient kernel per op.

Argument order, attributes and outputs are those of the reference functions in
``reference/norm.py``; every native backend implements exactly these contracts.
"""

from __future__ import annotations

from jax.core import ShapedArray

from .kernel import Kernel, batch_fold_rule, channelwise_batch_rule
from .layout import image_dims
from .reference import norm as ref


def _like(aval, dtype=None):
    return ShapedArray(aval.shape, aval.dtype if dtype is None else dtype)


def _param_dtype(aval):
    return ref.acc_dtype(aval.dtype)


def _per_image_channel(x, channels_last):
    n, _, _, c = image_dims(x.shape, channels_last)
    return ShapedArray((n, c), _param_dtype(x))


def _per_channel(x, channels_last):
    c = image_dims(x.shape, channels_last)[3]
    return ShapedArray((c,), _param_dtype(x))


# ---- instance norm ---------------------------------------------------------------------------

instance_norm_forward = Kernel(
    "instance_norm_forward",
    reference=ref.instance_norm_forward,
    shapes=lambda x, gamma, beta, *, channels_last, **_: (
        _like(x), _per_image_channel(x, channels_last), _per_image_channel(x, channels_last)),
    batch=channelwise_batch_rule(("image", "c", "c"), ("image", "nc", "nc")),
)

instance_norm_gradient = Kernel(
    "instance_norm_gradient",
    reference=ref.instance_norm_gradient,
    shapes=lambda dy, x, gamma, mean, rstd, *, channels_last, **_: (
        _like(x), _per_channel(x, channels_last), _per_channel(x, channels_last)),
    batch=channelwise_batch_rule(("image", "image", "c", "nc", "nc"), ("image", "c", "c")),
)

# ---- batch norm ------------------------------------------------------------------------------

batch_norm_forward = Kernel(
    "batch_norm_forward",
    reference=ref.batch_norm_forward,
    shapes=lambda x, gamma, beta, *, channels_last, **_: (
        _like(x), _per_channel(x, channels_last), _per_channel(x, channels_last)),
    batch=channelwise_batch_rule(("image", "c", "c"), ("image", "c", "c")),
)

batch_norm_gradient = Kernel(
    "batch_norm_gradient",
    reference=ref.batch_norm_gradient,
    shapes=lambda dy, x, gamma, mean, variance, dmean, dvariance, *, channels_last, **_: (
        _like(x), _per_channel(x, channels_last), _per_channel(x, channels_last)),
    batch=channelwise_batch_rule(("image", "image", "c", "c", "c", "c", "c"),
                                 ("image", "c", "c")),
)

batch_norm_inference = Kernel(
    "batch_norm_inference",
    reference=ref.batch_norm_inference,
    shapes=lambda x, gamma, beta, mean, variance, **_: (_like(x),),
    batch=channelwise_batch_rule(("image", "c", "c", "c", "c"), ("image",)),
)

# ---- window norms: the vmapped axis always folds into N (no per-channel operands) -----------

spatial_norm_forward = Kernel(
    "spatial_norm_forward",
    reference=ref.spatial_norm_forward,
    shapes=lambda x, **_: (_like(x),),
    batch=batch_fold_rule(("image",), ("image",)),
)

spatial_norm_gradient = Kernel(
    "spatial_norm_gradient",
    reference=ref.spatial_norm_gradient,
    shapes=lambda dy, x, **_: (_like(x),),
    batch=batch_fold_rule(("image", "image"), ("image",)),
)

local_contrast_norm_forward = Kernel(
    "local_contrast_norm_forward",
    reference=ref.local_contrast_norm_forward,
    shapes=lambda x, **_: (_like(x),),
    batch=batch_fold_rule(("image",), ("image",)),
)

local_contrast_norm_gradient = Kernel(
    "local_contrast_norm_gradient",
    reference=ref.local_contrast_norm_gradient,
    shapes=lambda dy, x, **_: (_like(x),),
    batch=batch_fold_rule(("image", "image"), ("image",)),
)

cross_channel_norm_forward = Kernel(
    "cross_channel_norm_forward",
    reference=ref.cross_channel_norm_forward,
    shapes=lambda x, **_: (_like(x),),
    batch=batch_fold_rule(("image",), ("image",)),
)

cross_channel_norm_gradient = Kernel(
    "cross_channel_norm_gradient",
    reference=ref.cross_channel_norm_gradient,
    shapes=lambda dy, x, **_: (_like(x),),
    batch=batch_fold_rule(("image", "image"), ("image",)),
)

ALL = (
    instance_norm_forward, instance_norm_gradient,
    batch_norm_forward, batch_norm_gradient, batch_norm_inference,
    spatial_norm_forward, spatial_norm_gradient,
    local_contrast_norm_forward, local_contrast_norm_gradient,
    cross_channel_norm_forward, cross_channel_norm_gradient,
)
