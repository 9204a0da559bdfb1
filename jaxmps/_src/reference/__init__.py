"""Pure jax.numpy forward and exact closed-form gradient of every jaxmps kernel.

These functions define the kernel contracts (argument order, attributes, outputs) that every
native backend implements; they are the test oracle and the lowering used where no native
kernel exists. Every function returns a tuple of arrays, like the kernel primitives.
"""
