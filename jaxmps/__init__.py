"""jaxmps: Apple Metal Performance Shaders' CNN normalization and convolution kernels for JAX.

Every op is a pair of JAX primitives (forward kernel, gradient kernel) joined by
``jax.custom_vjp``, lowered through XLA FFI to native kernels (C++ on CPU, CUDA, Metal) with a
pure-jnp reference everywhere else. ``<op>_forward`` / ``<op>_gradient`` expose the MPS
forward and gradient kernels with their gradient states.
"""

from ._src.batch_norm import (BatchNormState, BatchNormStats, batch_norm, batch_norm_forward,
                              batch_norm_gradient, batch_norm_inference)
from ._src.config import use_implementation
from ._src.ffi import backends
from ._src.instance_norm import (InstanceNormGradientState, instance_norm,
                                 instance_norm_forward, instance_norm_gradient)
from ._src.window_norms import (CrossChannelNormGradientState, LocalContrastNormGradientState,
                                SpatialNormGradientState, cross_channel_norm,
                                cross_channel_norm_forward, cross_channel_norm_gradient,
                                local_contrast_norm, local_contrast_norm_forward,
                                local_contrast_norm_gradient, spatial_norm,
                                spatial_norm_forward, spatial_norm_gradient)

# convolution family
from ._src.conv import conv2d, conv2d_forward, conv2d_gradient
from ._src.conv_plan import ConvolutionGradientState
from ._src.conv_transpose import (conv_transpose2d, conv_transpose2d_forward,
                                  conv_transpose2d_gradient)
from ._src.fully_connected import (fully_connected, fully_connected_forward,
                                   fully_connected_gradient)

__version__ = "0.1.0"
