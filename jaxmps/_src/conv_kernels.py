"""The convolution family's kernel primitives: forward, data gradient, weights gradient.

Argument order, attributes and outputs are those of the reference functions in
``reference/conv.py`` (contract: ``xla_ffi/KERNELS.md``). Every convolution op (conv2d,
conv_transpose2d, fully_connected) is expressed with these three kernels, so that the data and
the weight/bias gradients are separate primitives that jit dead-code-eliminates when unused.

Params of every kernel: the geometry ``stride_h, stride_w, dilation_h, dilation_w, pad_top,
pad_left, groups, channels_last`` plus the size of its image or weights output
(``output_h/output_w``, ``input_h/input_w``, ``kernel_h/kernel_w``) and ``implementation``.

Batching: with unbatched weights the vmapped axis folds into N (forward, data gradient). When
weights are batched, or for the weights gradient (a sum over N), it folds into the groups:
vmapped copy b of group g becomes group b*G + g, which is exact and needs no loop.
"""

from __future__ import annotations

from jax.core import ShapedArray

from .kernel import (Kernel, _batch_size, _image_from_channels, _image_to_channels, _to_front,
                     fold_into_batch)
from .layout import image_dims
from .reference import conv as ref
from .reference.norm import acc_dtype


# On NVIDIA GPUs the convolution kernels are XLA's own convolution (cuDNN), measured faster
# than custom CUDA kernels would reasonably be; "native" there means that lowering.
XLA_NATIVE = ("cuda",)


def _image_shape(n: int, h: int, w: int, c: int, channels_last: bool):
    return (n, h, w, c) if channels_last else (n, c, h, w)


def _forward_shapes(x, weights, bias, *, output_h, output_w, channels_last, **_):
    n = image_dims(x.shape, channels_last)[0]
    return (ShapedArray(_image_shape(n, output_h, output_w, weights.shape[0], channels_last),
                        x.dtype),)


def _data_gradient_shapes(dy, weights, *, input_h, input_w, groups, channels_last, **_):
    n = image_dims(dy.shape, channels_last)[0]
    c = weights.shape[3] * groups
    return (ShapedArray(_image_shape(n, input_h, input_w, c, channels_last), dy.dtype),)


def _weights_gradient_shapes(dy, x, *, kernel_h, kernel_w, groups, channels_last, **_):
    o = image_dims(dy.shape, channels_last)[3]
    i = image_dims(x.shape, channels_last)[3]
    pdt = acc_dtype(dy.dtype)
    return (ShapedArray((o, kernel_h, kernel_w, i // groups), pdt), ShapedArray((o,), pdt))


# ---- batching ----------------------------------------------------------------------------------


def _fold_into_groups(kernel: Kernel, args, dims, roles, out_roles, **params):
    """Vmapped axis -> groups: images (B, N, H, W, C) -> (N, H, W, B*C), weights
    (B, O, KH, KW, I/G) -> (B*O, ...), vectors (B, O) -> (B*O,), groups -> B*groups."""
    b = _batch_size(args, dims)
    cl = params["channels_last"]
    folded = []
    for x, d, role in zip(args, dims, roles):
        x = _to_front(x, d, b)
        if role == "image":
            folded.append(_image_to_channels(x, b, cl))
        else:  # "weights" or "vector": stack along the output-channel axis
            folded.append(x.reshape((b * x.shape[1],) + x.shape[2:]))
    params = dict(params, groups=b * params["groups"])
    outs = kernel.bind(*folded, **params)
    unfolded = []
    for o, role in zip(outs, out_roles):
        if role == "image":
            unfolded.append(_image_from_channels(o, b, cl))
        else:
            unfolded.append(o.reshape((b, o.shape[0] // b) + o.shape[1:]))
    return unfolded, [0] * len(unfolded)


def _image_weights_rule(roles, out_roles):
    """Forward and data gradient: fold into N when only images are batched, else groups."""

    def rule(kernel, args, dims, **params):
        only_images = all(d is None for d, r in zip(dims, roles) if r != "image")
        if only_images:
            fold_roles = ["image" if r == "image" else "c" for r in roles]
            return fold_into_batch(kernel, args, dims, fold_roles, out_roles, **params)
        return _fold_into_groups(kernel, args, dims, roles, out_roles, **params)

    return rule


def _weights_gradient_rule(kernel, args, dims, **params):
    # dW and db sum over N, so copies of the batch must stay apart: always fold into groups.
    return _fold_into_groups(kernel, args, dims, ("image", "image"), ("weights", "vector"),
                             **params)


conv2d_forward = Kernel(
    "conv2d_forward",
    reference=ref.conv2d_forward,
    shapes=_forward_shapes,
    batch=_image_weights_rule(("image", "weights", "vector"), ("image",)),
    xla_native=XLA_NATIVE,
)

conv2d_data_gradient = Kernel(
    "conv2d_data_gradient",
    reference=ref.conv2d_data_gradient,
    shapes=_data_gradient_shapes,
    batch=_image_weights_rule(("image", "weights"), ("image",)),
    xla_native=XLA_NATIVE,
    xla_native_impl=ref.conv2d_data_gradient_by_vjp,
)

conv2d_weights_gradient = Kernel(
    "conv2d_weights_gradient",
    reference=ref.conv2d_weights_gradient,
    shapes=_weights_gradient_shapes,
    batch=_weights_gradient_rule,
    xla_native=XLA_NATIVE,
    xla_native_impl=ref.conv2d_weights_gradient_by_vjp,
)

ALL = (conv2d_forward, conv2d_data_gradient, conv2d_weights_gradient)
