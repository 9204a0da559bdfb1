"""jaxmps: Apple Metal Performance Shaders' CNN normalization and convolution kernels for JAX.

Every op is a pair of JAX primitives (forward kernel, gradient kernel) joined by
``jax.custom_vjp``, lowered through XLA FFI to native kernels (C++ on CPU, CUDA, Metal) with a
pure-jnp reference everywhere else.
"""

from ._src.config import use_implementation
from ._src.instance_norm import (InstanceNormGradientState, instance_norm,
                                 instance_norm_forward, instance_norm_gradient)

__version__ = "0.1.0"
