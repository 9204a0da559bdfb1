"""One JAX primitive per native kernel, built the same way for every op.

A :class:`Kernel` owns a ``jax.extend.core.Primitive`` (multiple results) with
- abstract evaluation from a shape function,
- a lowering for each platform with native kernels ("cpu", "cuda") that emits our XLA FFI
  custom call, and a platform-less default lowering from the jnp reference (TPU, ROCm,
  jax-metal, or an install whose native library did not build),
- a JVP rule from ``jax.jvp`` of the reference, so that gradient kernels have derivatives too
  (second order, Hessian-vector products),
- a batching rule that folds the vmapped axis into the kernel's own batch or channel axis.

Every kernel primitive takes the params ``implementation`` ("auto" | "native" | "reference")
and ``channels_last``; its other params are passed to the FFI handler as attributes.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from . import ffi

NATIVE_PLATFORMS = ("cpu", "cuda")


def ffi_attributes(params: Dict) -> Dict:
    """Converts static primitive params to FFI attribute values (float -> f64, int -> i64)."""
    attrs = {}
    for key, value in params.items():
        if key == "implementation":
            continue
        if isinstance(value, (bool, np.bool_)):
            attrs[key] = np.int64(int(value))
        elif isinstance(value, (int, np.integer)):
            attrs[key] = np.int64(value)
        elif isinstance(value, (float, np.floating)):
            attrs[key] = np.float64(value)
        elif isinstance(value, tuple):
            attrs[key] = np.asarray(value, dtype=np.int64)
        else:
            raise TypeError(f"jaxmps: cannot pass param {key}={value!r} to a native kernel")
    return attrs


class Kernel:
    """A native kernel as a JAX primitive (see the module docstring).

    Args:
      name: kernel name; the primitive is ``jaxmps_<name>`` and so is the FFI target.
      reference: ``reference(*args, **params_without_implementation) -> tuple of arrays``.
      shapes: ``shapes(*avals, **params) -> tuple of jax.core.ShapedArray`` for the outputs.
      batch: ``batch(kernel, args, dims, **params) -> (outs, out_dims)`` (see fold helpers).
      xla_native: platforms where XLA's own lowering of the reference *is* the native
        implementation (chosen by measurement, e.g. cuDNN convolution on "cuda"): there
        ``implementation="native"`` lowers to it instead of raising.
      xla_native_impl: what those platforms lower (same signature and values as
        `reference`; default `reference`), e.g. a formulation XLA optimises better.
    """

    def __init__(self, name: str, *, reference: Callable, shapes: Callable, batch: Callable,
                 xla_native: Tuple[str, ...] = (), xla_native_impl: Optional[Callable] = None):
        self.name = name
        self.xla_native = tuple(xla_native)
        self.xla_native_impl = xla_native_impl or reference
        self.target = f"jaxmps_{name}"
        self.reference = reference
        self.primitive = p = Primitive(self.target)
        p.multiple_results = True
        p.def_impl(functools.partial(xla.apply_primitive, p))
        p.def_abstract_eval(lambda *avals, **params: tuple(shapes(*avals, **params)))
        mlir.register_lowering(p, functools.partial(self._lower, platform=None))
        for platform in NATIVE_PLATFORMS:
            mlir.register_lowering(p, functools.partial(self._lower, platform=platform),
                                   platform=platform)
        ad.primitive_jvps[p] = self._jvp
        batching.primitive_batchers[p] = functools.partial(batch, self)

    def bind(self, *args, **params) -> Tuple:
        return tuple(self.primitive.bind(*args, **params))

    def call_reference(self, *args, **params):
        params = {k: v for k, v in params.items() if k != "implementation"}
        return tuple(self.reference(*args, **params))

    def native_target(self, platform: Optional[str], dtype) -> Optional[str]:
        """The FFI target serving this kernel on `platform` for data (first operand) of
        `dtype`, or None."""
        if not platform:
            return None
        return ffi.native_target(self.target, platform, np.dtype(dtype).name)

    def _lower(self, ctx, *args, platform: Optional[str], implementation: str, **params):
        dtype = ctx.avals_in[0].dtype
        target = (self.native_target(platform, dtype) if implementation != "reference"
                  else None)
        if target is not None:
            return jax.ffi.ffi_lowering(target)(ctx, *args, **ffi_attributes(params))
        if implementation == "native" and platform not in self.xla_native:
            where = platform or "this platform"
            raise NotImplementedError(
                f"jaxmps.{self.name}: implementation='native' but no native kernel is available"
                f" on {where} for {np.dtype(dtype).name} data (backends: {describe_backends()});"
                " use implementation=None or 'reference'")
        xla_native = implementation != "reference" and platform in self.xla_native
        fn = self.xla_native_impl if xla_native else self.reference
        return mlir.lower_fun(lambda *a: tuple(fn(*a, **params)),
                              multiple_results=True)(ctx, *args)

    def _jvp(self, primals, tangents, **params):
        out = self.bind(*primals, **params)
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        reference = functools.partial(self.call_reference, **params)
        _, out_tangents = jax.jvp(reference, tuple(primals), tuple(tangents))
        return out, list(out_tangents)


def describe_backends() -> str:
    parts = []
    for name, backend in ffi.backends().items():
        parts.append(f"{name}: {'available' if backend.available else backend.error}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Batching. Operands have roles: "image" (4-d, N first), "nc" (N, C) per-image statistics,
# "c" (C,) per-channel parameters, "scalar"-free. Two exact folds, no Python loops:
#   fold_into_batch: vmapped axis merged into N (images, (N, C) stats); needs every "c"
#     operand unbatched and no "c" output (those are reductions over the batch).
#   fold_into_channels: vmapped axis merged into C (valid for channel-independent ops).
# ---------------------------------------------------------------------------------------------


def _to_front(x, dim, size):
    if dim is None:
        return jax.numpy.broadcast_to(x, (size,) + x.shape)
    return jax.numpy.moveaxis(x, dim, 0)


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def fold_into_batch(kernel: Kernel, args, dims, in_roles: Sequence[str],
                    out_roles: Sequence[str], **params):
    """Batch rule merging the vmapped axis into the image batch axis N."""
    b = _batch_size(args, dims)
    folded = []
    for x, d, role in zip(args, dims, in_roles):
        if role == "c":
            assert d is None
            folded.append(x)
            continue
        x = _to_front(x, d, b)
        folded.append(x.reshape((b * x.shape[1],) + x.shape[2:]))
    outs = kernel.bind(*folded, **params)
    unfolded = [o.reshape((b, o.shape[0] // b) + o.shape[1:]) for o in outs]
    return unfolded, [0] * len(unfolded)


def _image_to_channels(x, b, channels_last):
    # x: (B, N, H, W, C) or (B, N, C, H, W) -> (N, H, W, B*C) or (N, B*C, H, W).
    if channels_last:
        x = jax.numpy.moveaxis(x, 0, 3)
        return x.reshape(x.shape[:3] + (b * x.shape[4],))
    x = jax.numpy.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], b * x.shape[2]) + x.shape[3:])


def _image_from_channels(x, b, channels_last):
    if channels_last:
        x = x.reshape(x.shape[:3] + (b, x.shape[3] // b))
        return jax.numpy.moveaxis(x, 3, 0)
    x = x.reshape((x.shape[0], b, x.shape[1] // b) + x.shape[2:])
    return jax.numpy.moveaxis(x, 1, 0)


def fold_into_channels(kernel: Kernel, args, dims, in_roles: Sequence[str],
                       out_roles: Sequence[str], **params):
    """Batch rule merging the vmapped axis into the channel axis C (channel-independent ops)."""
    b = _batch_size(args, dims)
    cl = params["channels_last"]
    folded = []
    for x, d, role in zip(args, dims, in_roles):
        x = _to_front(x, d, b)
        if role == "image":
            folded.append(_image_to_channels(x, b, cl))
        elif role == "nc":  # (B, N, C) -> (N, B*C)
            folded.append(jax.numpy.moveaxis(x, 0, 1).reshape(x.shape[1], b * x.shape[2]))
        else:  # "c": (B, C) -> (B*C,)
            folded.append(x.reshape(b * x.shape[1]))
    outs = kernel.bind(*folded, **params)
    unfolded = []
    for o, role in zip(outs, out_roles):
        if role == "image":
            unfolded.append(_image_from_channels(o, b, cl))
        elif role == "nc":
            unfolded.append(jax.numpy.moveaxis(o.reshape(o.shape[0], b, -1), 1, 0))
        else:
            unfolded.append(o.reshape(b, -1))
    return unfolded, [0] * len(unfolded)


def channelwise_batch_rule(in_roles: Sequence[str], out_roles: Sequence[str]):
    """Batch rule for a channel-independent kernel: folds into N when that is exact (no
    batched per-channel operand, no per-channel output), else into C."""

    def rule(kernel, args, dims, **params):
        batched_c = any(r == "c" and d is not None
                        for r, d in zip(in_roles, dims))
        if batched_c or "c" in out_roles:
            return fold_into_channels(kernel, args, dims, in_roles, out_roles, **params)
        return fold_into_batch(kernel, args, dims, in_roles, out_roles, **params)

    return rule


def batch_fold_rule(in_roles: Sequence[str], out_roles: Sequence[str]):
    """Batch rule for kernels where images are independent (e.g. mixing channels)."""

    def rule(kernel, args, dims, **params):
        return fold_into_batch(kernel, args, dims, in_roles, out_roles, **params)

    return rule
